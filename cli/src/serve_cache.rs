//! `arca serve-cache`: the Nix binary cache over HTTP, alone, over the
//! configured services (by default a daemon on 127.0.0.1:8000); and the
//! pieces `arca daemon --http-listen` shares with it.
use crate::services::{build, Defaults, Services};
use crate::ServiceArgs;
use anyhow::{bail, Context, Result};
use arca_store::http_cache::{CacheServices, HttpCacheOptions};
use arca_store::{Compression, SecretKey};
use std::path::{Path, PathBuf};
use tokio::signal::unix::{signal, SignalKind};

/// How the binary cache behaves (shared by `serve-cache` and `daemon --http-listen`).
#[derive(clap::Args, Debug, Clone)]
pub struct HttpCacheArgs {
    /// `Priority` announced in /nix-cache-info (Nix prefers lower; cache.nixos.org has 40).
    #[arg(long, env = "ARCA_CACHE_PRIORITY", default_value_t = 30)]
    pub priority: u32,
    /// The compression served narinfos name: `zstd` (NARs compressed on the
    /// fly) or `none` (plain NARs, with HTTP Range support).
    #[arg(long, env = "ARCA_NAR_COMPRESSION", default_value = "zstd", value_parser = parse_nar_compression)]
    pub nar_compression: Compression,
    /// zstd level of on-the-fly compression.
    #[arg(long, env = "ARCA_ZSTD_LEVEL", default_value_t = 1, value_parser = clap::value_parser!(i32).range(-7..=19))]
    pub zstd_level: i32,
    /// Refuse uploads (PUT): serve only.
    #[arg(long, env = "ARCA_NO_UPLOADS")]
    pub no_uploads: bool,
    /// Signed narinfos kept in memory (0: render and sign every request).
    #[arg(long, env = "ARCA_NARINFO_CACHE", default_value_t = 16384)]
    pub narinfo_cache: usize,
}

fn parse_nar_compression(s: &str) -> Result<Compression, String> {
    match s {
        "zstd" => Ok(Compression::Zstd),
        "none" => Ok(Compression::None),
        other => Err(format!("{other:?}: expected zstd or none")),
    }
}

#[derive(clap::Args)]
pub struct ServeCacheArgs {
    /// Where to listen (HOST:PORT).
    #[arg(long, env = "ARCA_CACHE_LISTEN", default_value = "127.0.0.1:9000")]
    listen: String,
    /// A Nix secret key file (`nix key generate-secret`): every narinfo
    /// served gets a signature by it (signatures already there are kept).
    #[arg(long, env = "ARCA_SIGNING_KEY")]
    signing_key: Option<PathBuf>,
    #[command(flatten)]
    cache: HttpCacheArgs,
}

/// Reads a Nix secret key file.
pub fn load_signing_key(file: &Path) -> Result<SecretKey> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("{} is not a Nix secret key", file.display()))
}

/// The binary cache's router over `services`; `path_info` is where reads
/// and (checked) uploads go.
pub fn router(
    services: &Services,
    path_info: std::sync::Arc<dyn arca_store::PathInfoService>,
    signing_key: Option<SecretKey>,
    args: &HttpCacheArgs,
) -> Result<arca_store::http_cache::Router> {
    let nar_index = services.nar_index.get().context("opening the NAR index")?;
    let options = HttpCacheOptions {
        priority: args.priority,
        signing_key,
        nar_compression: args.nar_compression,
        zstd_level: args.zstd_level,
        uploads: !args.no_uploads,
        narinfo_cache_capacity: args.narinfo_cache,
    };
    Ok(arca_store::http_cache::router(
        CacheServices {
            blobs: services.blob.clone(),
            directories: services.directory.clone(),
            path_info,
            nar_index,
        },
        options,
    ))
}

/// Installs SIGTERM and SIGINT handlers now, and returns a future that
/// completes when one of them arrives.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = int.recv() => tracing::info!("SIGINT: draining"),
        }
    }
}

/// `arca serve-cache`
pub async fn run(args: ServeCacheArgs, service_args: ServiceArgs) -> Result<()> {
    let services = build(&service_args, Defaults::Daemon)?;
    let key = args
        .signing_key
        .as_deref()
        .map(load_signing_key)
        .transpose()?;
    let router = router(&services, services.path_info.clone(), key, &args.cache)?;
    if args.listen.starts_with("unix://") {
        bail!(
            "--listen {}: serve-cache listens on TCP (HOST:PORT)",
            args.listen
        );
    }
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let shutdown = shutdown_signal();
    eprintln!("arca serve-cache listening on http://{addr}");
    arca_store::http_cache::serve(listener, router, shutdown)
        .await
        .context("serving HTTP")?;
    eprintln!("arca serve-cache stopped");
    Ok(())
}
