//! `arca`: the command-line interface of the Arca store.
use anyhow::{anyhow, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

mod castore_cmds;
mod copy;
mod daemon;
mod mount;
mod nix_cmds;
mod progress;
mod serve_cache;
mod services;

const EXAMPLES: &str = "\
Examples:
  arca daemon                                  serve the embedded store on 127.0.0.1:8000
  arca daemon --listen unix:///run/arca.sock   serve on a Unix socket
  arca castore import ./some/tree              import a tree through the daemon, print its root node
  arca castore ls <digest>                     list a directory
  arca castore cat <digest> > file             write a blob to stdout
  BLOB_SERVICE_ADDR=objectstore+file:///var/lib/arca/blobs arca castore import ./tree
                                               import straight into a local store, no daemon";

/// Arca: a content-addressed store for Nix-style software deployment.
#[derive(Parser)]
#[command(name = "arca", version, about, after_help = EXAMPLES)]
struct Cli {
    /// More output: -v shows error context and info logs, -vv debug logs.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    #[command(flatten)]
    services: ServiceArgs,

    #[command(subcommand)]
    command: Command,
}

/// Which services make up the store (see `docs/user-guide.md` for URL schemes).
#[derive(Args, Clone, Debug)]
pub struct ServiceArgs {
    /// Blob service URL [daemon default: objectstore+file://$DATA/blobs; others: grpc+http://127.0.0.1:8000].
    #[arg(long, env = "BLOB_SERVICE_ADDR", global = true)]
    pub blob_service_addr: Option<String>,
    /// Directory service URL [daemon default: sled://$DATA/directories.sled; others: grpc+http://127.0.0.1:8000].
    #[arg(long, env = "DIRECTORY_SERVICE_ADDR", global = true)]
    pub directory_service_addr: Option<String>,
    /// Path-info service URL [daemon default: sled://$DATA/pathinfo.sled; others: grpc+http://127.0.0.1:8000].
    #[arg(long, env = "PATH_INFO_SERVICE_ADDR", global = true)]
    pub path_info_service_addr: Option<String>,
    /// A TOML file composing the services; replaces the URLs.
    #[arg(long, env = "ARCA_STORE_COMPOSITION", global = true)]
    pub store_composition: Option<PathBuf>,
    /// Data directory of the embedded store [default: $XDG_DATA_HOME/arca or ~/.local/share/arca].
    #[arg(long, env = "ARCA_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// NAR index URL: sled:///abs/path, or objectstore+file:///… / objectstore+s3://… to share it
    /// between replicas of the HTTP binary cache [default: sled://$DATA/narindex.sled].
    #[arg(long, env = "NAR_INDEX_ADDR", global = true)]
    pub nar_index_addr: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the store over gRPC (castore services, health, reflection).
    #[command(
        after_help = "Examples:\n  arca daemon\n  arca daemon --listen 0.0.0.0:8000 --data-dir /var/lib/arca\n  arca daemon --listen unix:///run/arca/arca.sock\n\nUnder systemd socket activation (LISTEN_FDS) the passed socket is used.\nSIGTERM or SIGINT stops accepting, drains running calls and exits 0."
    )]
    Daemon(daemon::DaemonArgs),
    /// Work with the content-addressed layer directly.
    #[command(subcommand)]
    Castore(castore_cmds::CastoreCommand),
    /// Add files or directories as store paths, exactly as `nix-store --add` would.
    #[command(
        after_help = "Example:\n  arca import ./hello.txt ./src\n  /nix/store/…-hello.txt\n  /nix/store/…-src"
    )]
    Import(nix_cmds::ImportArgs),
    /// NAR export and import.
    #[command(subcommand)]
    Nar(nix_cmds::NarCommand),
    /// Show store paths' metadata (narinfo-style, or `nix path-info --json` style).
    #[command(
        after_help = "Examples:\n  arca path-info /nix/store/…-hello\n  arca path-info --json --recursive /nix/store/…-hello\n\nExit code 1 if a path is missing."
    )]
    PathInfo(nix_cmds::PathInfoArgs),
    /// Copy store paths with their closure from a Nix binary cache or another store.
    #[command(
        after_help = "Examples:\n  arca copy --from nix+https://cache.nixos.org /nix/store/…-hello-2.12\n  arca copy --from 'nix+http://127.0.0.1:5000?trusted-public-keys=cache-1:AbC…=' --jobs 64 /nix/store/…-hello\n  arca copy --from grpc+http://other-host:8000 --no-closure /nix/store/…-hello\n\nPaths already in the store are skipped with their closure, so an interrupted copy resumes.\nA path info is stored only after all its references. Exit code 1 if any path failed."
    )]
    Copy(copy::CopyArgs),
    /// Serve the store as a Nix binary cache over HTTP (reads and uploads).
    #[command(
        after_help = "Examples:\n  arca serve-cache                                  over the daemon on 127.0.0.1:8000, on 127.0.0.1:9000\n  arca serve-cache --listen 0.0.0.0:9000 --signing-key /etc/arca/cache.sec\n  nix copy --from http://127.0.0.1:9000 --to ./store /nix/store/…-hello\n  nix copy --to 'http://127.0.0.1:9000?compression=zstd' /nix/store/…-hello\n\nSIGTERM or SIGINT stops accepting, lets running requests finish and exits 0."
    )]
    ServeCache(serve_cache::ServeCacheArgs),
    /// Mount the store as a lazy, read-only /nix/store (FUSE).
    #[command(
        after_help = "Examples:\n  arca mount /nix/store                           over the daemon on 127.0.0.1:8000\n  arca mount --list-root --threads 8 /mnt/store\n  PATH_INFO_SERVICE_ADDR=grpc+http://10.0.0.5:8000 BLOB_SERVICE_ADDR=… DIRECTORY_SERVICE_ADDR=… arca mount /nix/store\n\n/MOUNTPOINT/<hash>-<name> resolves through the path-info service; content is fetched when read.\nExtended attribute user.arca.blake3: the BLAKE3 digest of a file or directory.\nSIGTERM or SIGINT unmounts and exits 0; if the process dies, fusermount3's helper and\nArca's unmount guard (`arca __mount-guard`) unmount."
    )]
    Mount(mount::MountArgs),
    /// Internal: the unmount guard `arca mount` starts (see arca_fuse::guard).
    #[command(name = "__mount-guard", hide = true)]
    MountGuard {
        /// How long to wait for a dead mount's connection to be aborted.
        #[arg(long, default_value_t = arca_fuse::guard::SETTLE_LIMIT.as_millis() as u64)]
        settle_ms: u64,
        /// The mount point to watch.
        mountpoint: PathBuf,
    },
}

fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("ARCA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// Keeps allocations below 32 MiB in glibc's heap, and up to 64 MiB of
/// freed memory unreturned: the 1 MiB message buffers of gRPC streams are
/// otherwise mapped, faulted in and unmapped anew for every message (a
/// 1 GiB download spent a third of its time in page faults).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    init_tracing(cli.verbose);
    if let Command::MountGuard {
        mountpoint,
        settle_ms,
    } = &cli.command
    {
        // No runtime, no threads: it only waits, then maybe unmounts.
        let settle = std::time::Duration::from_millis(*settle_ms);
        return match arca_fuse::guard::run_guard(mountpoint, std::io::stdin().lock(), settle) {
            Ok(outcome) => {
                tracing::debug!("unmount guard of {}: {outcome:?}", mountpoint.display());
                // What it did, for whoever runs it by hand (tests).
                println!("{outcome:?}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: unmount guard of {}: {e}", mountpoint.display());
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let verbose = cli.verbose;
    let result: Result<()> = runtime.block_on(async move {
        match cli.command {
            Command::Daemon(args) => daemon::run(args, cli.services).await,
            Command::Castore(cmd) => castore_cmds::run(cmd, cli.services).await,
            Command::Import(args) => nix_cmds::import(args, cli.services).await,
            Command::Nar(cmd) => nix_cmds::nar(cmd, cli.services).await,
            Command::PathInfo(args) => nix_cmds::path_info(args, cli.services).await,
            Command::Copy(args) => copy::run(args, cli.services).await,
            Command::ServeCache(args) => serve_cache::run(args, cli.services).await,
            Command::Mount(args) => mount::run(args, cli.services).await,
            Command::MountGuard { .. } => unreachable!("handled before the runtime starts"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if verbose > 0 {
                eprintln!("error: {e:?}");
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

/// The default data directory.
pub fn default_data_dir() -> Result<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(x).join("arca"));
    }
    let home = std::env::var_os("HOME")
        .ok_or_else(|| anyhow!("neither XDG_DATA_HOME nor HOME is set; pass --data-dir"))?;
    Ok(PathBuf::from(home).join(".local/share/arca"))
}

/// The data directory (not created).
pub fn data_dir_path(args: &ServiceArgs) -> Result<PathBuf> {
    match &args.data_dir {
        Some(d) => Ok(d.clone()),
        None => default_data_dir(),
    }
}

/// Resolves the data directory and creates it.
pub fn data_dir(args: &ServiceArgs) -> Result<PathBuf> {
    let dir = data_dir_path(args)?;
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating data directory {}", dir.display()))?;
    std::fs::canonicalize(&dir).with_context(|| format!("resolving {}", dir.display()))
}
