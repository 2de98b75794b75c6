//! `arca copy`: copies store paths, with their closure, from a Nix binary
//! cache or another store into the configured store.
//!
//! The walk keeps many requests in flight: narinfos (or path infos) of the
//! closure are looked up while the NARs already known are being fetched, and
//! a path info is stored only once every reference of it is stored, so the
//! store never holds a path whose closure is incomplete. Paths the
//! destination already has are neither fetched nor walked into (their
//! closure is complete by that same rule), which makes an interrupted copy
//! resume where it stopped.
use crate::services::{self, Defaults, Services};
use crate::ServiceArgs;
use anyhow::{anyhow, Context, Result};
use arca_castore::composition::{Builder, Composition};
use arca_castore::{BlobService, DirectoryService, Node};
use arca_store::narinfo::NarInfo;
use arca_store::pathinfo::PathInfo;
use arca_store::pathinfoservice::{NixHttpPathInfoService, PathInfoService, StoreServices};
use arca_store::store_path::{StorePath, DIGEST_LEN};
use clap::Args;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::{HashMap, HashSet};
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;

/// Arguments of `arca copy`.
#[derive(Args, Debug)]
pub struct CopyArgs {
    /// Where to copy from: a Nix binary cache (`nix+http://host:port/path`,
    /// `nix+https://…`, `nix+file:///abs/dir`, each with
    /// `?trusted-public-keys=name:key`) or another store's path-info service
    /// (`grpc+http://…`: its castore content is copied too).
    #[arg(long, value_name = "URL")]
    pub from: String,
    /// Copy only the paths named, not their closure (their references must
    /// already be in the store).
    #[arg(long)]
    pub no_closure: bool,
    /// Lookups and downloads in flight at once (each).
    #[arg(long, short = 'j', default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub jobs: u32,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
    /// Store paths (`/nix/store/<hash>-<name>` or `<hash>-<name>`).
    #[arg(required = true, value_name = "STORE_PATH")]
    pub paths: Vec<String>,
}

/// Where paths come from.
enum Source {
    /// A Nix binary cache: narinfos first, NARs ingested into the
    /// destination's castore.
    BinaryCache(NixHttpPathInfoService),
    /// Another store with its own castore (gRPC): path infos, then the
    /// directories and blobs they name.
    Remote {
        path_info: Arc<dyn PathInfoService>,
        blobs: Arc<dyn BlobService>,
        directories: Arc<dyn DirectoryService>,
    },
}

/// What a lookup found.
enum Found {
    /// The destination has the path already.
    Present,
    /// The source has it; its references and what to fetch.
    Source(Meta),
}

/// A path's metadata from the source, before its content is copied.
enum Meta {
    NarInfo(Box<NarInfo>),
    PathInfo(Box<PathInfo>),
}

impl Meta {
    fn references(&self) -> &[StorePath] {
        match self {
            Meta::NarInfo(n) => n.references(),
            Meta::PathInfo(p) => &p.references,
        }
    }
}

type Digest = [u8; DIGEST_LEN];

struct Copier {
    source: Source,
    dest: Services,
    lookups: Semaphore,
    fetches: Semaphore,
}

impl Copier {
    /// Whether the destination has `path`, else what the source knows of it.
    async fn lookup(&self, path: &StorePath) -> Result<Option<Found>> {
        let _permit = self.lookups.acquire().await?;
        if let Some(info) = self
            .dest
            .path_info
            .get(*path.digest())
            .await
            .context("asking the destination")?
        {
            if info.store_path == *path {
                return Ok(Some(Found::Present));
            }
        }
        let meta = match &self.source {
            Source::BinaryCache(cache) => cache
                .lookup(*path.digest())
                .await?
                .map(|n| Meta::NarInfo(Box::new(n))),
            Source::Remote { path_info, .. } => path_info
                .get(*path.digest())
                .await?
                .map(|p| Meta::PathInfo(Box::new(p))),
        };
        match meta {
            None => Ok(None),
            Some(m) => {
                let found = match &m {
                    Meta::NarInfo(n) => n.store_path(),
                    Meta::PathInfo(p) => &p.store_path,
                };
                if found != path {
                    return Err(anyhow!(
                        "the source has {found} under this hash, not {path}"
                    ));
                }
                Ok(Some(Found::Source(m)))
            }
        }
    }

    /// Brings the path's content into the destination's castore.
    async fn fetch(&self, meta: Meta) -> Result<PathInfo> {
        let _permit = self.fetches.acquire().await?;
        match (meta, &self.source) {
            (Meta::NarInfo(narinfo), Source::BinaryCache(cache)) => {
                Ok(cache.fetch_narinfo(*narinfo).await?)
            }
            (
                Meta::PathInfo(info),
                Source::Remote {
                    blobs, directories, ..
                },
            ) => {
                copy_castore(&info.node, &**blobs, &**directories, &self.dest).await?;
                Ok(*info)
            }
            _ => Err(anyhow!("internal: metadata from another kind of source")),
        }
    }
}

/// Copies a node's directories and blobs from a remote castore.
async fn copy_castore(
    node: &Node,
    blobs: &dyn BlobService,
    directories: &dyn DirectoryService,
    dest: &Services,
) -> Result<()> {
    let mut files = Vec::new();
    // The directory closure to store, once its blobs are there.
    let mut closure = None;
    match node {
        Node::Directory { digest, .. } => {
            if dest.directory.get(digest).await?.is_none() {
                let dirs = arca_castore::directoryservice::get_closure(directories, digest)
                    .await
                    .with_context(|| format!("fetching directory {digest}"))?;
                for d in &dirs {
                    for (_, n) in d.entries() {
                        if let Node::File { digest, size, .. } = n {
                            files.push((*digest, *size));
                        }
                    }
                }
                closure = Some(arca_castore::directoryservice::order_leaves_first(
                    *digest, dirs,
                )?);
            }
        }
        Node::File { digest, size, .. } => files.push((*digest, *size)),
        Node::Symlink { .. } => {}
    }
    files.sort();
    files.dedup();
    for (digest, size) in files {
        if dest.blob.has(&digest).await? {
            continue;
        }
        let mut reader = blobs
            .open_read(&digest)
            .await?
            .ok_or_else(|| anyhow!("the source lacks blob {digest}"))?;
        let mut writer = dest.blob.open_write().await;
        let mut total = 0u64;
        loop {
            let mut buf = bytes::BytesMut::with_capacity(arca_castore::BLOB_MESSAGE_CHUNK);
            if reader.read_buf(&mut buf).await? == 0 {
                break;
            }
            total += buf.len() as u64;
            writer.write(buf.freeze()).await?;
        }
        let stored = writer.close().await?;
        if stored != digest || total != size {
            return Err(anyhow!(
                "blob {digest} ({size} bytes) arrived as {stored} ({total} bytes)"
            ));
        }
    }
    if let Some(dirs) = closure {
        arca_castore::directoryservice::put_all(&*dest.directory, dirs).await?;
    }
    Ok(())
}

/// Events of the walk.
enum Event {
    Looked(StorePath, Result<Option<Found>>),
    Fetched(StorePath, Result<PathInfo>),
    Stored(StorePath, Result<PathInfo>),
}

/// The outcome of a copy.
#[derive(Default)]
struct Summary {
    copied: u64,
    present: u64,
    nar_bytes: u64,
    failed: Vec<(StorePath, String)>,
}

fn progress_bar() -> ProgressBar {
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(0), target);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} paths {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(100));
    bar
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Runs `arca copy`.
pub async fn run(args: CopyArgs, service_args: ServiceArgs) -> Result<()> {
    let started = Instant::now();
    let dest = services::build(&service_args, Defaults::Daemon)?;
    let wanted: Vec<StorePath> = args
        .paths
        .iter()
        .map(|p| crate::nix_cmds::parse_store_path(p))
        .collect::<Result<_>>()?;
    let store = StoreServices::new(
        dest.blob.clone(),
        dest.directory.clone(),
        dest.nar_index.clone(),
    );
    let source = match arca_store::pathinfoservice::binary_cache_from_url(&args.from, &store)
        .with_context(|| format!("--from {}", args.from))?
    {
        Some(cache) => Source::BinaryCache(cache),
        None if args.from.starts_with("grpc+") => {
            let builder = Builder::new(Composition::from_urls(&args.from, &args.from)?);
            Source::Remote {
                path_info: arca_store::pathinfoservice::pathinfo_service_from_url(&args.from, &store)?,
                blobs: builder.blob_service("default")?,
                directories: builder.directory_service("default")?,
            }
        }
        None => {
            return Err(anyhow!(
                "--from {}: expected a binary cache (nix+http://, nix+https://, nix+file://) or a store (grpc+http://, grpc+https://, grpc+unix://)",
                args.from
            ))
        }
    };
    let jobs = args.jobs as usize;
    let copier = Arc::new(Copier {
        source,
        dest,
        lookups: Semaphore::new(jobs),
        fetches: Semaphore::new(jobs),
    });
    let summary = walk(copier, wanted, !args.no_closure).await;
    let seconds = started.elapsed().as_secs_f64();

    for (path, error) in &summary.failed {
        eprintln!("error: {path}: {error}");
    }
    if args.json {
        let failed: Vec<_> = summary
            .failed
            .iter()
            .map(|(p, e)| serde_json::json!({"path": p.to_absolute_path(), "error": e}))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "copied": summary.copied,
                "alreadyPresent": summary.present,
                "failed": failed,
                "narBytes": summary.nar_bytes,
                "seconds": seconds,
            })
        );
    }
    eprintln!(
        "copied {} paths ({:.1} MiB of NAR) in {:.2} s, {:.1} MiB/s; {} already present; {} failed",
        summary.copied,
        mib(summary.nar_bytes),
        seconds,
        mib(summary.nar_bytes) / seconds.max(1e-9),
        summary.present,
        summary.failed.len()
    );
    if summary.failed.is_empty() {
        Ok(())
    } else {
        Err(anyhow!(
            "{} of the paths could not be copied",
            summary.failed.len()
        ))
    }
}

/// The walk: lookups, fetches and puts, all in flight together.
async fn walk(copier: Arc<Copier>, wanted: Vec<StorePath>, closure: bool) -> Summary {
    let bar = progress_bar();
    let started = Instant::now();
    let mut summary = Summary::default();
    let mut events: FuturesUnordered<BoxFuture<'static, Event>> = FuturesUnordered::new();
    // Every path in the copy: looked up, fetched, waiting, stored or failed.
    let mut seen: HashSet<Digest> = HashSet::new();
    let mut stored: HashSet<Digest> = HashSet::new();
    let mut failed: HashMap<Digest, StorePath> = HashMap::new();
    // Fetched path infos waiting for references, and who waits for whom.
    let mut waiting: HashMap<Digest, (PathInfo, HashSet<Digest>)> = HashMap::new();
    let mut dependents: HashMap<Digest, Vec<Digest>> = HashMap::new();

    let look = |path: StorePath| -> BoxFuture<'static, Event> {
        let c = copier.clone();
        Box::pin(async move {
            let r = c.lookup(&path).await;
            Event::Looked(path, r)
        })
    };
    let fetch = |path: StorePath, meta: Meta| -> BoxFuture<'static, Event> {
        let c = copier.clone();
        Box::pin(async move {
            let r = c.fetch(meta).await;
            Event::Fetched(path, r)
        })
    };
    let put = |info: PathInfo| -> BoxFuture<'static, Event> {
        let c = copier.clone();
        Box::pin(async move {
            let path = info.store_path.clone();
            let r = c
                .dest
                .path_info
                .put(info)
                .await
                .map_err(anyhow::Error::from);
            Event::Stored(path, r)
        })
    };

    for path in wanted {
        if seen.insert(*path.digest()) {
            bar.inc_length(1);
            events.push(look(path));
        }
    }

    // Marks a path failed and, transitively, everything waiting for it.
    fn fail(
        path: StorePath,
        error: String,
        summary: &mut Summary,
        failed: &mut HashMap<Digest, StorePath>,
        waiting: &mut HashMap<Digest, (PathInfo, HashSet<Digest>)>,
        dependents: &mut HashMap<Digest, Vec<Digest>>,
    ) {
        let mut queue = vec![(path, error)];
        while let Some((path, error)) = queue.pop() {
            let digest = *path.digest();
            if failed.insert(digest, path.clone()).is_some() {
                continue;
            }
            for d in dependents.remove(&digest).unwrap_or_default() {
                if let Some((info, _)) = waiting.remove(&d) {
                    queue.push((
                        info.store_path,
                        format!("its reference {path} could not be copied"),
                    ));
                }
            }
            summary.failed.push((path, error));
        }
    }

    while let Some(event) = events.next().await {
        match event {
            Event::Looked(path, Err(e)) => fail(
                path,
                format!("{e:#}"),
                &mut summary,
                &mut failed,
                &mut waiting,
                &mut dependents,
            ),
            Event::Looked(path, Ok(None)) => fail(
                path,
                "not found in the source".into(),
                &mut summary,
                &mut failed,
                &mut waiting,
                &mut dependents,
            ),
            Event::Looked(path, Ok(Some(Found::Present))) => {
                summary.present += 1;
                bar.inc(1);
                events.extend(
                    mark_stored(*path.digest(), &mut stored, &mut waiting, &mut dependents)
                        .into_iter()
                        .map(&put),
                );
            }
            Event::Looked(path, Ok(Some(Found::Source(meta)))) => {
                if closure {
                    for r in meta.references() {
                        if seen.insert(*r.digest()) {
                            bar.inc_length(1);
                            events.push(look(r.clone()));
                        }
                    }
                }
                events.push(fetch(path, meta));
            }
            Event::Fetched(path, Err(e)) => fail(
                path,
                format!("{e:#}"),
                &mut summary,
                &mut failed,
                &mut waiting,
                &mut dependents,
            ),
            Event::Fetched(path, Ok(info)) => {
                let digest = *path.digest();
                let refs: HashSet<Digest> = info
                    .references
                    .iter()
                    .map(|r| *r.digest())
                    .filter(|r| *r != digest && seen.contains(r))
                    .collect();
                if let Some(bad) = refs.iter().find_map(|r| failed.get(r)) {
                    let error = format!("its reference {bad} could not be copied");
                    fail(
                        path,
                        error,
                        &mut summary,
                        &mut failed,
                        &mut waiting,
                        &mut dependents,
                    );
                    continue;
                }
                let missing: HashSet<Digest> =
                    refs.into_iter().filter(|r| !stored.contains(r)).collect();
                if missing.is_empty() {
                    events.push(put(info));
                } else {
                    for r in &missing {
                        dependents.entry(*r).or_default().push(digest);
                    }
                    waiting.insert(digest, (info, missing));
                }
            }
            Event::Stored(path, Err(e)) => fail(
                path,
                format!("storing: {e:#}"),
                &mut summary,
                &mut failed,
                &mut waiting,
                &mut dependents,
            ),
            Event::Stored(path, Ok(info)) => {
                summary.copied += 1;
                summary.nar_bytes += info.nar_size;
                bar.inc(1);
                let rate = mib(summary.nar_bytes) / started.elapsed().as_secs_f64().max(1e-9);
                bar.set_message(format!(
                    "{:.1} MiB, {rate:.1} MiB/s",
                    mib(summary.nar_bytes)
                ));
                events.extend(
                    mark_stored(*path.digest(), &mut stored, &mut waiting, &mut dependents)
                        .into_iter()
                        .map(&put),
                );
            }
        }
    }
    bar.finish_and_clear();
    // Nothing can still wait: every reference ended stored or failed.
    for (_, (info, _)) in waiting.drain() {
        summary.failed.push((
            info.store_path,
            "internal: left waiting for its references".into(),
        ));
    }
    summary
}

/// Records `digest` as stored; returns the path infos now ready to store.
fn mark_stored(
    digest: Digest,
    stored: &mut HashSet<Digest>,
    waiting: &mut HashMap<Digest, (PathInfo, HashSet<Digest>)>,
    dependents: &mut HashMap<Digest, Vec<Digest>>,
) -> Vec<PathInfo> {
    stored.insert(digest);
    let mut ready = Vec::new();
    for d in dependents.remove(&digest).unwrap_or_default() {
        let done = match waiting.get_mut(&d) {
            Some((_, missing)) => {
                missing.remove(&digest);
                missing.is_empty()
            }
            None => false,
        };
        if done {
            if let Some((info, _)) = waiting.remove(&d) {
                ready.push(info);
            }
        }
    }
    ready
}
