//! `arca castore …`: import, cat, ls.
use crate::services::{build, Defaults};
use crate::ServiceArgs;
use anyhow::{anyhow, bail, Context, Result};
use arca_castore::{B3Digest, Node};
use clap::Subcommand;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;

#[derive(Subcommand)]
pub enum CastoreCommand {
    /// Import a file, directory or symlink; print its root node as JSON.
    #[command(
        after_help = "Example:\n  arca castore import ./tree\n  {\"type\":\"directory\",\"digest\":\"424a7f…\",\"size\":6}\n\nSymlinks are stored, never followed; the exec bit is kept; sockets, FIFOs and devices are refused."
    )]
    Import {
        /// What to import.
        path: PathBuf,
        /// Files uploaded at once.
        #[arg(long, default_value_t = 32)]
        jobs: usize,
    },
    /// Write a blob's bytes to stdout.
    Cat {
        /// The blob's BLAKE3 digest (hex).
        digest: B3Digest,
    },
    /// List a directory's entries.
    #[command(
        after_help = "Output: one line per entry: kind (d, f, x for executable, l), digest or target, size, name."
    )]
    Ls {
        /// The directory's BLAKE3 digest (hex).
        digest: B3Digest,
        /// Print JSON instead of lines.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(cmd: CastoreCommand, args: ServiceArgs) -> Result<()> {
    let services = build(&args, Defaults::Daemon)?;
    match cmd {
        CastoreCommand::Import { path, jobs } => {
            let bar = Arc::new(crate::progress::ImportBar::new());
            let result = arca_castore::import::import_path(
                &path,
                services.blob.clone(),
                services.directory.clone(),
                jobs,
                bar.clone(),
            )
            .await;
            bar.finish();
            let (node, stats) = result?;
            tracing::info!(
                files = stats.files,
                bytes = stats.bytes,
                directories = stats.directories,
                symlinks = stats.symlinks,
                "imported"
            );
            println!("{}", node.to_json());
        }
        CastoreCommand::Cat { digest } => {
            let mut reader = services
                .blob
                .open_read(&digest)
                .await
                .with_context(|| format!("reading blob {digest}"))?
                .ok_or_else(|| anyhow!("blob {digest} not found"))?;
            // Large pieces: every write to tokio's stdout is a hop to the blocking pool.
            let mut reader = tokio::io::BufReader::with_capacity(1024 * 1024, &mut reader);
            let mut out = tokio::io::stdout();
            tokio::io::copy_buf(&mut reader, &mut out)
                .await
                .with_context(|| format!("reading blob {digest}"))?;
            out.flush().await?;
        }
        CastoreCommand::Ls { digest, json } => {
            let dir = services
                .directory
                .get(&digest)
                .await
                .with_context(|| format!("reading directory {digest}"))?;
            let Some(dir) = dir else {
                bail!("directory {digest} not found")
            };
            if json {
                let entries: Vec<serde_json::Value> = dir
                    .entries()
                    .map(|(name, node)| {
                        let mut v = node.to_json();
                        v["name"] = serde_json::Value::String(name.to_string());
                        v
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(entries));
            } else {
                for (name, node) in dir.entries() {
                    match node {
                        Node::Directory { digest, size } => println!("d {digest} {size} {name}"),
                        Node::File {
                            digest,
                            size,
                            executable,
                        } => {
                            println!(
                                "{} {digest} {size} {name}",
                                if *executable { "x" } else { "f" }
                            )
                        }
                        Node::Symlink { target } => println!("l {target} - {name}"),
                    }
                }
            }
        }
    }
    Ok(())
}
