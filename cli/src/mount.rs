//! `arca mount`: the store as a lazy, read-only FUSE filesystem.
use crate::services::{build, Defaults};
use crate::ServiceArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};

/// Flags of `arca mount`.
#[derive(Args, Debug)]
pub struct MountArgs {
    /// An empty directory to mount on.
    pub mountpoint: PathBuf,
    /// List the store paths when the mount's root is read (else it reads as empty;
    /// `<hash>-<name>` lookups work either way).
    #[arg(long)]
    pub list_root: bool,
    /// Threads reading FUSE requests (the work itself runs on the async runtime).
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Let other users than the mounting one (and root) access the mount.
    #[arg(long)]
    pub allow_other: bool,
}

/// How long `arca mount` waits for each service to answer before mounting.
const REACH_TIMEOUT: Duration = Duration::from_secs(30);

/// Asks each service about something no store holds before mounting: a
/// store that cannot be reached is an error now, not an EIO at the first
/// lookup, and the connections are up before the first request needs them.
async fn reach(services: &crate::services::Services) -> Result<()> {
    let nothing = arca_castore::B3Digest::from([0u8; 32]);
    answers(
        "path info",
        services
            .path_info
            .get([0u8; arca_store::store_path::DIGEST_LEN]),
    )
    .await?;
    answers("directory", services.directory.get(&nothing)).await?;
    answers("blob", services.blob.has(&nothing)).await
}

/// Waits [REACH_TIMEOUT] for the `what` service's answer to `call`.
async fn answers<T, E>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<()>
where
    E: std::error::Error + Send + Sync + 'static,
{
    match tokio::time::timeout(REACH_TIMEOUT, call).await {
        Ok(answer) => answer
            .map(|_| ())
            .with_context(|| format!("reaching the {what} service")),
        Err(_) => bail!(
            "the {what} service did not answer within {} s",
            REACH_TIMEOUT.as_secs()
        ),
    }
}

/// `arca mount MOUNTPOINT`: mounts, serves until SIGINT/SIGTERM (or an
/// unmount from outside), unmounts, exits 0.
pub async fn run(args: MountArgs, service_args: ServiceArgs) -> Result<()> {
    if args.threads == 0 {
        bail!("--threads must be at least 1");
    }
    let meta = std::fs::metadata(&args.mountpoint)
        .with_context(|| format!("mount point {}", args.mountpoint.display()))?;
    if !meta.is_dir() {
        bail!(
            "mount point {} is not a directory",
            args.mountpoint.display()
        );
    }
    let services = build(&service_args, Defaults::Daemon)?;
    reach(&services).await?;
    let fs = arca_fuse::ArcaFs::new(
        services.blob,
        services.directory,
        services.path_info,
        arca_fuse::FsOptions {
            list_root: args.list_root,
        },
        tokio::runtime::Handle::current(),
    );
    // Signal handlers before mounting: a signal right after the mount still unmounts.
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let options = arca_fuse::MountOptions {
        threads: args.threads,
        allow_other: args.allow_other,
        // Only for testing the guard alone.
        auto_unmount: std::env::var_os("ARCA_MOUNT_NO_AUTO_UNMOUNT").is_none(),
        ..Default::default()
    };
    // The same binary, as the guard that unmounts if this process dies.
    let mut guard =
        std::process::Command::new(std::env::current_exe().context("finding the arca binary")?);
    guard.arg("__mount-guard");
    let mountpoint = args.mountpoint.clone();
    let mut handle = tokio::task::spawn_blocking(move || {
        arca_fuse::mount(fs, &mountpoint, &options, Some(guard))
    })
    .await?
    .with_context(|| format!("mounting on {}", args.mountpoint.display()))?;
    eprintln!("arca mount: mounted on {}", args.mountpoint.display());
    tokio::select! {
        r = handle.ended() => {
            // Unmounted from outside.
            r.context("FUSE session")?;
            eprintln!("arca mount: {} was unmounted", args.mountpoint.display());
            return Ok(());
        }
        _ = term.recv() => tracing::info!("SIGTERM: unmounting"),
        _ = int.recv() => tracing::info!("SIGINT: unmounting"),
    }
    handle
        .unmount()
        .with_context(|| format!("unmounting {}", args.mountpoint.display()))?;
    match tokio::time::timeout(Duration::from_secs(30), handle.ended()).await {
        Ok(r) => r.context("FUSE session")?,
        Err(_) => bail!("{} did not unmount within 30 s", args.mountpoint.display()),
    }
    eprintln!("arca mount: unmounted {}", args.mountpoint.display());
    Ok(())
}
