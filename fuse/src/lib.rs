//! A lazy, read-only `/nix/store` over FUSE from any Arca store.
//!
//! [ArcaFs] shows every store path the path-info service knows as
//! `MOUNTPOINT/<hash>-<name>`, fetching directories and blobs from the
//! castore services only when they are looked up or read. [mount] mounts it
//! (multi-threaded, read-only, unmounted by `fusermount3` if the process dies)
//! and returns a [MountHandle] to unmount it.
//!
//! - [inodes]: the inode table (inode numbers derived from content, entries
//!   dropped when the kernel forgets them).
//! - [fs]: the `fuser` callbacks, bridging to the tokio runtime.
//! - `cache`: bounded caches of directories and small blobs, one fetch per digest.
//! - `read`: large files, streamed with read-ahead per open file.
#![warn(missing_docs)]

mod cache;
pub mod fs;
pub mod guard;
pub mod inodes;
mod read;

pub use fs::{ArcaFs, FsOptions, XATTR_BLAKE3};

use std::io;
use std::path::{Path, PathBuf};

/// How to mount.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Threads reading requests from the kernel (the work itself runs on the tokio runtime).
    pub threads: usize,
    /// Let every user access the mount (else only its owner and root).
    pub allow_other: bool,
    /// Kernel read-ahead per file in KiB, set through the mount's BDI when
    /// possible (root); `None` keeps the kernel's default.
    pub read_ahead_kb: Option<u32>,
    /// Ask `fusermount3` for its `auto_unmount` helper (on by default; the
    /// [guard] backs it up). Off only to test the guard alone.
    pub auto_unmount: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            threads: 4,
            allow_other: false,
            read_ahead_kb: Some(4096),
            auto_unmount: true,
        }
    }
}

/// A mounted filesystem.
pub struct MountHandle {
    unmounter: fuser::SessionUnmounter,
    ended: Option<tokio::sync::oneshot::Receiver<io::Result<()>>>,
    mountpoint: PathBuf,
    guard: Option<guard::UnmountGuard>,
}

/// Mounts `fs` on `mountpoint`: read-only, `auto_unmount` (a `fusermount3`
/// helper unmounts it when this process dies, even by SIGKILL), the kernel
/// checking permissions from the modes. Blocks until the kernel's handshake
/// is done, then serves requests on `options.threads` threads.
///
/// `guard`, if given, is a command running [guard::run_guard] on the same
/// mount point; it is started before mounting and unmounts a mount this
/// process leaves behind when `auto_unmount` loses its race (see [guard]).
pub fn mount(
    fs: ArcaFs,
    mountpoint: &Path,
    options: &MountOptions,
    guard: Option<std::process::Command>,
) -> io::Result<MountHandle> {
    use fuser::MountOption as O;
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        O::FSName("arca".into()),
        O::Subtype("arca".into()),
        O::RO,
        O::NoDev,
        O::NoSuid,
        O::NoAtime,
        O::DefaultPermissions,
    ];
    if options.auto_unmount {
        config.mount_options.push(O::AutoUnmount);
    }
    // auto_unmount needs allow_other at the kernel level; without
    // --allow-other fuser itself refuses everyone but the owner and root.
    config.acl = if options.allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::RootAndOwner
    };
    config.n_threads = Some(options.threads.max(1));
    config.clone_fd = options.threads > 1;
    let mountpoint = mountpoint.canonicalize()?;
    // Before mounting: the guard must not inherit a /dev/fuse fd.
    // Only a second line of defence: a mount without it still works.
    let mut guard = guard.and_then(|mut command| {
        command.arg(&mountpoint);
        guard::UnmountGuard::spawn(command)
            .map_err(|e| tracing::warn!("starting the unmount guard: {e}; mounting without it"))
            .ok()
    });
    let notifier_slot = fs.notifier_slot();
    let mut session = fuser::Session::new(fs, &mountpoint, &config)?;
    let _ = notifier_slot.set(fs::PageCacheFiller::start(session.notifier())?);
    let unmounter = session.unmount_callable();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("arca-fuse".into())
        .spawn(move || {
            let _ = tx.send(session.run());
        })?;
    if let Some(g) = guard.as_mut() {
        if let Err(e) = g.arm(&mountpoint) {
            tracing::warn!("the unmount guard could not be armed: {e}");
        }
    }
    if let Some(kb) = options.read_ahead_kb {
        if let Err(e) = set_read_ahead(&mountpoint, kb) {
            tracing::debug!("setting the mount's read-ahead: {e}");
        }
    }
    Ok(MountHandle {
        unmounter,
        ended: Some(rx),
        mountpoint,
        guard,
    })
}

/// Raises the kernel's read-ahead for the mount (its BDI is named after the
/// device number; FUSE starts at 128 KiB).
fn set_read_ahead(mountpoint: &Path, kb: u32) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(mountpoint)?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    std::fs::write(
        format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb"),
        kb.to_string(),
    )
}

impl MountHandle {
    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmounts (lazily: open files stay readable until closed, nothing new
    /// can be opened). [Self::ended] resolves once the kernel let go.
    ///
    /// The `auto_unmount` helper only unmounts a filesystem whose server is
    /// gone, so a live one is detached here: `umount2(MNT_DETACH)` as root,
    /// else `fusermount3 -u -z`.
    pub fn unmount(&mut self) -> io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(self.mountpoint.as_os_str().as_bytes())?;
        // SAFETY: a valid NUL-terminated path; umount2 touches nothing else.
        let detached = unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } == 0;
        if !detached {
            let err = io::Error::last_os_error();
            let status = std::process::Command::new("fusermount3")
                .args(["-u", "-z", "--"])
                .arg(&self.mountpoint)
                .stdout(std::process::Stdio::null())
                .status();
            if !matches!(status, Ok(s) if s.success()) {
                return Err(io::Error::other(format!(
                    "umount2: {err}; fusermount3 -u -z failed too"
                )));
            }
        }
        self.unmounter.unmount()
    }

    /// Resolves when the session ends: after [Self::unmount], or when the
    /// filesystem was unmounted from outside (`fusermount3 -u`, `umount`).
    ///
    /// Cancel-safe: dropped before it resolved (in a `select!`), a later
    /// call still waits for the session's end.
    pub async fn ended(&mut self) -> io::Result<()> {
        let ended = match self.ended.as_mut() {
            Some(rx) => {
                let r = rx
                    .await
                    .unwrap_or_else(|_| Err(io::Error::other("FUSE session thread died")));
                self.ended = None;
                r
            }
            None => Ok(()),
        };
        if let Some(guard) = self.guard.take() {
            // Nothing is left for it to unmount; reap it.
            if let Err(e) = tokio::task::spawn_blocking(move || guard.finish())
                .await
                .map_err(io::Error::other)?
            {
                tracing::debug!("waiting for the unmount guard: {e}");
            }
        }
        ended
    }
}
