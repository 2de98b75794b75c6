//! The Nix-layer commands: `arca import`, `arca nar dump|add`, `arca path-info`.
use crate::services::{build, Defaults, Services};
use crate::ServiceArgs;
use anyhow::{anyhow, bail, Context, Result};
use arca_castore::import::{CloseOnDrop, DigestBoard};
use arca_store::nar::{dump_path_observed, ingest_nar, tree_entries, DumpedEntry, HashingWriter};
use arca_store::pathinfo::PathInfo;
use arca_store::{ContentAddress, NixHash, StorePath};
use clap::{Args, Subcommand};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::task::AbortOnDropHandle;

#[derive(Args)]
pub struct ImportArgs {
    /// Files or directories to add.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Store path name (default: the file name); only with a single PATH.
    #[arg(long)]
    name: Option<String>,
    /// Files uploaded at once.
    #[arg(long, default_value_t = 32)]
    jobs: usize,
}

#[derive(Subcommand)]
pub enum NarCommand {
    /// Write a store path's NAR to stdout (byte-identical to `nix-store --dump`).
    #[command(
        after_help = "A daemon on this machine (the default 127.0.0.1:8000, or any loopback or\n\
                      Unix-socket address given for both blobs and directories) renders the NAR\n\
                      into standard output itself, over its local socket; other stores are read\n\
                      over gRPC.\n\n\
                      Example:\n  arca nar dump /nix/store/…-hello > hello.nar"
    )]
    Dump {
        /// The store path (absolute, or its basename).
        store_path: String,
    },
    /// Ingest a NAR as a content-addressed store path and print the path.
    #[command(
        after_help = "Examples:\n  arca nar add --name hello hello.nar\n  nix-store --dump ./dir | arca nar add --name dir"
    )]
    Add {
        /// Name of the store path.
        #[arg(long)]
        name: String,
        /// The NAR file; `-` or nothing reads stdin.
        file: Option<PathBuf>,
    },
}

#[derive(Args)]
pub struct PathInfoArgs {
    /// Print JSON with the field names of `nix path-info --json`.
    #[arg(long)]
    json: bool,
    /// Include the closure (every path referred to, transitively).
    #[arg(long, short)]
    recursive: bool,
    /// Store paths (absolute, or basenames).
    #[arg(required = true)]
    paths: Vec<String>,
}

pub(crate) fn parse_store_path(s: &str) -> Result<StorePath> {
    let parsed = if s.starts_with('/') {
        StorePath::from_absolute_path(s)
    } else {
        StorePath::from_basename(s)
    };
    parsed.with_context(|| format!("{s:?} is not a store path"))
}

/// Looks a path up by digest and checks the name too.
async fn lookup(services: &Services, path: &StorePath) -> Result<Option<PathInfo>> {
    let info = services
        .path_info
        .get(*path.digest())
        .await
        .with_context(|| format!("looking up {path}"))?;
    Ok(info.filter(|i| i.store_path == *path))
}

/// Registers `node` as the content-addressed source path `nix-store --add`
/// would make of it (no references, `CA: fixed:r:sha256:…`).
async fn register_source_path(
    services: &Services,
    name: &str,
    node: arca_castore::Node,
    nar_size: u64,
    nar_sha256: [u8; 32],
) -> Result<StorePath> {
    let store_path = StorePath::from_source(nar_sha256, &[], name)?;
    let info = PathInfo {
        store_path: store_path.clone(),
        node,
        references: vec![],
        nar_size,
        nar_sha256,
        signatures: vec![],
        deriver: None,
        ca: Some(ContentAddress::Fixed {
            recursive: true,
            hash: NixHash::sha256(nar_sha256),
        }),
    };
    services
        .path_info
        .put(info)
        .await
        .with_context(|| format!("registering {store_path}"))?;
    Ok(store_path)
}

/// `arca import PATH...`
pub async fn import(args: ImportArgs, service_args: ServiceArgs) -> Result<()> {
    if args.name.is_some() && args.paths.len() != 1 {
        bail!("--name needs exactly one PATH");
    }
    let services = build(&service_args, Defaults::Daemon)?;
    for path in &args.paths {
        let name = match &args.name {
            Some(n) => n.clone(),
            None => path
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| anyhow!("{}: no usable file name; pass --name", path.display()))?
                .to_string(),
        };
        arca_store::store_path::validate_name(&name)
            .with_context(|| format!("{}: invalid store path name", path.display()))?;

        // One pass in NAR order reads every file once: it computes the NAR
        // hash and each file's BLAKE3 digest, which the castore import (in
        // parallel, a little behind) uses to skip what the store has; what it
        // uploads is checked against those digests, so the NAR hash always
        // describes exactly the bytes stored.
        let board = Arc::new(DigestBoard::new());
        let nar_path = path.clone();
        let publisher = board.clone();
        // Aborted if the import fails first.
        let nar_hash = AbortOnDropHandle::new(tokio::spawn(async move {
            let _closes = CloseOnDrop(publisher.clone());
            // Every entry the NAR describes, by path relative to the root.
            let mut seen: Vec<(Vec<u8>, DumpedEntry)> = Vec::new();
            let mut observe = |p: &std::path::Path, entry: DumpedEntry| {
                if let DumpedEntry::File { digest, size, .. } = &entry {
                    publisher.publish(p, *digest, *size);
                }
                let rel = p.strip_prefix(&nar_path).unwrap_or(p);
                seen.push((rel.as_os_str().as_bytes().to_vec(), entry));
            };
            let result = dump_path_observed(&nar_path, HashingWriter::new(), Some(&mut observe))
                .await
                .map(|w| w.finalize());
            publisher.close(
                result
                    .as_ref()
                    .map(|_| ())
                    .map_err(|e| format!("computing the NAR: {e}")),
            );
            result.map(|hash| (hash, seen))
        }));
        let bar = Arc::new(crate::progress::ImportBar::new());
        let imported = arca_castore::import::import_path_with(
            path,
            services.blob.clone(),
            services.directory.clone(),
            args.jobs,
            bar.clone(),
            board,
        )
        .await;
        bar.finish();
        let (node, _) = match imported {
            Ok(x) => x,
            // A failed NAR pass fails the import too (the files waiting for
            // their digests); its own error names the file it failed on.
            Err(e) if nar_hash.is_finished() => match nar_hash.await {
                Ok(Err(nar_error)) => {
                    return Err(anyhow::Error::new(nar_error)
                        .context(format!("{}: computing the NAR", path.display())))
                }
                _ => return Err(e.into()),
            },
            Err(e) => return Err(e.into()),
        };
        let ((nar_size, nar_sha256), seen) = nar_hash
            .await
            .context("hashing the NAR")?
            .with_context(|| format!("{}: computing the NAR", path.display()))?;
        // The tree stored is the one the NAR hash describes: same entries,
        // names, kinds, exec bits, symlink targets, file digests and sizes
        // (each pass looked at the tree on disk itself).
        let stored = tree_entries(&node, services.directory.as_ref())
            .await
            .with_context(|| format!("{}: reading back the imported tree", path.display()))?;
        if let Some(what) = first_difference(&seen, &stored) {
            bail!(
                "{}: changed while importing ({what}); nothing was registered",
                path.display()
            );
        }
        let store_path = register_source_path(&services, &name, node, nar_size, nar_sha256).await?;
        println!("{store_path}");
    }
    Ok(())
}

/// The daemon's local socket, if it takes NAR exports: only when the blob
/// and directory services are the same gRPC address on this machine (so the
/// daemon renders from the very services this command would read), and no
/// composition file says otherwise.
async fn local_exporter(
    args: &ServiceArgs,
) -> Option<arca_castore::local_ingest::LocalIngestClient> {
    if args.store_composition.is_some() {
        return None;
    }
    let blob = args
        .blob_service_addr
        .as_deref()
        .unwrap_or(crate::services::DEFAULT_DAEMON);
    let dir = args
        .directory_service_addr
        .as_deref()
        .unwrap_or(crate::services::DEFAULT_DAEMON);
    let url = url::Url::parse(blob).ok()?;
    if blob != dir
        || !url.scheme().starts_with("grpc+")
        || !arca_castore::composition::on_this_machine(&url)
    {
        return None;
    }
    let channel = arca_castore::grpc::channel_from_url(&url).ok()?;
    let client = arca_castore::local_ingest::LocalIngestClient::discover(channel).await?;
    client.takes_exports().then_some(client)
}

/// `arca nar dump|add`
pub async fn nar(cmd: NarCommand, service_args: ServiceArgs) -> Result<()> {
    let services = build(&service_args, Defaults::Daemon)?;
    match cmd {
        NarCommand::Dump { store_path } => {
            let path = parse_store_path(&store_path)?;
            let info = lookup(&services, &path)
                .await?
                .ok_or_else(|| anyhow!("path '{path}' is not valid"))?;
            let stdout = std::io::stdout();
            // A daemon on this machine renders the NAR into our standard
            // output itself (arca_store::nar::export); any other store is
            // read here, and written out from a thread of its own.
            if let Some(daemon) = local_exporter(&service_args).await {
                tracing::debug!("the daemon writes the NAR");
                let written = daemon
                    .export(&arca_store::nar::export_request(&info.node), &stdout)
                    .await
                    .with_context(|| format!("the daemon rendering the NAR of {path}"))?;
                if written != info.nar_size {
                    bail!(
                        "the daemon wrote {written} bytes for {path}, whose NAR has {}",
                        info.nar_size
                    );
                }
                return Ok(());
            }
            use std::os::fd::AsFd;
            let fd = stdout
                .as_fd()
                .try_clone_to_owned()
                .context("duplicating standard output")?;
            let out = arca_store::nar::render_nar_keeping_repeats(
                &info.node,
                services.blob.clone(),
                services.directory.as_ref(),
                arca_store::nar::FdWriter::new(fd)?,
                arca_store::nar::REPEAT_BUDGET,
            )
            .await
            .with_context(|| format!("rendering the NAR of {path}"))?;
            out.finish().await.context("writing the NAR")?;
        }
        NarCommand::Add { name, file } => {
            arca_store::store_path::validate_name(&name).context("invalid store path name")?;
            let reader: Box<dyn tokio::io::AsyncRead + Unpin + Send> = match &file {
                Some(f) if f.as_os_str() != "-" => Box::new(
                    tokio::fs::File::open(f)
                        .await
                        .with_context(|| format!("opening {}", f.display()))?,
                ),
                _ => Box::new(tokio::io::stdin()),
            };
            let reader = tokio::io::BufReader::with_capacity(1024 * 1024, reader);
            let (node, nar_size, nar_sha256) =
                ingest_nar(reader, services.blob.clone(), services.directory.as_ref())
                    .await
                    .context("ingesting the NAR")?;
            let store_path =
                register_source_path(&services, &name, node, nar_size, nar_sha256).await?;
            println!("{store_path}");
        }
    }
    Ok(())
}

/// `arca path-info`
pub async fn path_info(args: PathInfoArgs, service_args: ServiceArgs) -> Result<()> {
    let services = build(&service_args, Defaults::Daemon)?;
    let mut found: BTreeMap<String, PathInfo> = BTreeMap::new();
    let mut missing = Vec::new();
    let mut queue: VecDeque<StorePath> = VecDeque::new();
    for p in &args.paths {
        queue.push_back(parse_store_path(p)?);
    }
    let mut seen: HashSet<StorePath> = queue.iter().cloned().collect();
    while let Some(path) = queue.pop_front() {
        match lookup(&services, &path).await? {
            None => missing.push(path),
            Some(info) => {
                if args.recursive {
                    for r in &info.references {
                        if seen.insert(r.clone()) {
                            queue.push_back(r.clone());
                        }
                    }
                }
                found.insert(path.to_absolute_path(), info);
            }
        }
    }
    if args.json {
        let list: Vec<serde_json::Value> = found.values().map(to_json).collect();
        println!("{}", serde_json::Value::Array(list));
    } else {
        let mut out = String::new();
        for info in found.values() {
            out.push_str(&format!("StorePath: {}\n", info.store_path));
            out.push_str(&format!("NarHash: {}\n", NixHash::sha256(info.nar_sha256)));
            out.push_str(&format!("NarSize: {}\n", info.nar_size));
            let mut refs: Vec<String> = info.references.iter().map(|r| r.basename()).collect();
            refs.sort();
            out.push_str(&format!("References: {}\n", refs.join(" ")));
            if let Some(d) = &info.deriver {
                out.push_str(&format!("Deriver: {}\n", d.basename()));
            }
            for s in &info.signatures {
                out.push_str(&format!("Sig: {s}\n"));
            }
            if let Some(ca) = &info.ca {
                out.push_str(&format!("CA: {ca}\n"));
            }
            out.push('\n');
        }
        print!("{out}");
    }
    if let Some(first) = missing.first() {
        for m in &missing {
            eprintln!("error: path '{m}' is not valid");
        }
        bail!(
            "{} of the paths asked for {} not in the store (first: {first})",
            missing.len(),
            if missing.len() == 1 { "is" } else { "are" }
        );
    }
    Ok(())
}

/// The fields and formats of `nix path-info --json`.
fn to_json(info: &PathInfo) -> serde_json::Value {
    let mut refs: Vec<String> = info
        .references
        .iter()
        .map(|r| r.to_absolute_path())
        .collect();
    refs.sort();
    let mut v = serde_json::json!({
        "path": info.store_path.to_absolute_path(),
        "narHash": NixHash::sha256(info.nar_sha256).to_sri(),
        "narSize": info.nar_size,
        "references": refs,
    });
    if let Some(d) = &info.deriver {
        v["deriver"] = d.to_absolute_path().into();
    }
    if !info.signatures.is_empty() {
        v["signatures"] = info
            .signatures
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .into();
    }
    if let Some(ca) = &info.ca {
        v["ca"] = ca.to_string().into();
    }
    v
}

/// Where two listings of a tree in NAR order first differ, said for a user.
fn first_difference(
    nar: &[(Vec<u8>, DumpedEntry)],
    stored: &[(Vec<u8>, DumpedEntry)],
) -> Option<String> {
    let show = |p: &[u8]| {
        if p.is_empty() {
            "the root".to_string()
        } else {
            String::from_utf8_lossy(p).into_owned()
        }
    };
    for (i, pair) in nar.iter().zip(stored.iter()).enumerate() {
        let ((np, ne), (sp, se)) = pair;
        if np != sp {
            return Some(format!(
                "entry {i} is {} in the NAR, {} in the stored tree",
                show(np),
                show(sp)
            ));
        }
        if ne != se {
            return Some(format!(
                "{} is {ne:?} in the NAR, {se:?} in the stored tree",
                show(np)
            ));
        }
    }
    match nar.len().cmp(&stored.len()) {
        std::cmp::Ordering::Equal => None,
        _ => Some(format!(
            "{} entries in the NAR, {} in the stored tree",
            nar.len(),
            stored.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_between_listings_are_named() {
        let file = |s: &[u8], x| DumpedEntry::File {
            digest: arca_castore::B3Digest::of(s),
            size: s.len() as u64,
            executable: x,
        };
        let a = vec![
            (b"".to_vec(), DumpedEntry::Directory),
            (b"f".to_vec(), file(b"1", false)),
        ];
        assert_eq!(first_difference(&a, &a), None);
        let exec = vec![
            (b"".to_vec(), DumpedEntry::Directory),
            (b"f".to_vec(), file(b"1", true)),
        ];
        assert!(first_difference(&a, &exec)
            .unwrap()
            .starts_with("f is File"));
        let renamed = vec![
            (b"".to_vec(), DumpedEntry::Directory),
            (b"g".to_vec(), file(b"1", false)),
        ];
        assert!(first_difference(&a, &renamed)
            .unwrap()
            .contains("f in the NAR, g in the stored tree"));
        assert!(first_difference(&a, &a[..1])
            .unwrap()
            .contains("2 entries in the NAR, 1"));
    }
}
