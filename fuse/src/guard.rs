//! A second line of defence against dead mounts: a small process that
//! unmounts the filesystem when the mounting process dies without doing so.
//!
//! `auto_unmount` (a `fusermount3` helper) covers most deaths, but it races
//! with the dying process: it wakes when its socket to the process closes
//! and unmounts only if opening the mount root then fails with `ENOTCONN`.
//! A process closes its fds in ascending order, so the helper's socket (a
//! low fd) can close before the `/dev/fuse` fds (the mount's fd plus one clone
//! per FUSE thread); if the helper's open reaches the kernel in between, it
//! is aborted with `ECONNABORTED`, and the helper leaves the dead mount.
//!
//! The guard is spawned before mounting, so it holds no `/dev/fuse` fd. The
//! mounting process keeps the write end of the guard's stdin; once mounted it
//! writes the mount's device number (`major:minor\n`). The guard then waits for
//! end of file on stdin, which comes when the mounting process exits or
//! drops the [UnmountGuard]. It then waits, bounded, until the mount is gone
//! or its connection reports `ENOTCONN`, and in that case detaches it with
//! `fusermount3 -u -z`. A mount that still answers (or another filesystem
//! mounted there since) is left alone.
use std::io::{self, BufRead, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a guard waits, by default, for the dead mount's connection to be aborted.
pub const SETTLE_LIMIT: Duration = Duration::from_secs(30);
/// How often it looks.
const POLL: Duration = Duration::from_millis(10);

/// The mounting side of a guard: dropping it (or exiting, however) lets the
/// guard act.
pub struct UnmountGuard {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl UnmountGuard {
    /// Starts the guard process from `command` (a program that calls
    /// [run_guard] with its stdin and the same mount point). It is put in its
    /// own process group, so a terminal's Ctrl-C reaches only the mounting
    /// process, which unmounts by itself.
    pub fn spawn(mut command: Command) -> io::Result<Self> {
        use std::os::unix::process::CommandExt;
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()?;
        let stdin = child.stdin.take();
        Ok(Self { child, stdin })
    }

    /// Tells the guard which mount to watch: the device number of the mounted
    /// root, so that a later mount on the same directory is never touched.
    pub fn arm(&mut self, mountpoint: &Path) -> io::Result<()> {
        let dev = std::fs::metadata(mountpoint)?.dev();
        let line = format!("{}:{}\n", libc::major(dev), libc::minor(dev));
        match self.stdin.as_mut() {
            Some(stdin) => stdin.write_all(line.as_bytes()),
            None => Err(io::Error::other("the unmount guard's stdin is closed")),
        }
    }

    /// Lets the guard finish (after a clean unmount it finds nothing to do)
    /// and reaps it.
    pub fn finish(mut self) -> io::Result<std::process::ExitStatus> {
        drop(self.stdin.take());
        self.child.wait()
    }
}

/// What the guard did.
#[derive(Debug, PartialEq, Eq)]
pub enum GuardOutcome {
    /// The mounting process never reported a mount.
    NeverArmed,
    /// The mount was gone by the time the guard looked (a clean unmount, or
    /// `auto_unmount` did it).
    AlreadyGone,
    /// The mount's server was dead and the guard detached it.
    Unmounted,
    /// The mount still answered after the wait; it was left alone.
    LeftAlive,
}

/// The guard's side: reads the device line, waits for end of file on
/// `input`, then unmounts `mountpoint` if its FUSE connection is dead
/// (waiting up to `settle_limit` for that).
/// Ignores SIGINT, SIGTERM and SIGHUP: the guard must outlive the process it
/// guards, and exits on its own right after.
pub fn run_guard(
    mountpoint: &Path,
    input: impl Read,
    settle_limit: Duration,
) -> io::Result<GuardOutcome> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: setting a signal's disposition to ignore; no handler runs.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    let mut input = io::BufReader::new(input);
    let mut line = String::new();
    input.read_line(&mut line)?;
    let Some(dev) = parse_dev(&line) else {
        return Ok(GuardOutcome::NeverArmed);
    };
    // Block until the mounting process is gone (or let go of us).
    io::copy(&mut input, &mut io::sink())?;
    let mountpoint = mountpoint.to_path_buf();
    let deadline = Instant::now() + settle_limit;
    loop {
        if !is_mounted(&mountpoint, dev)? {
            return Ok(GuardOutcome::AlreadyGone);
        }
        match std::fs::File::open(&mountpoint) {
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
                detach(&mountpoint)?;
                return Ok(GuardOutcome::Unmounted);
            }
            // ECONNABORTED: the server's last fds are still closing. Success:
            // someone still serves it (or the kernel has not noticed yet).
            _ if Instant::now() < deadline => std::thread::sleep(POLL),
            _ => return Ok(GuardOutcome::LeftAlive),
        }
    }
}

fn parse_dev(line: &str) -> Option<(u32, u32)> {
    let (major, minor) = line.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Whether `/proc/self/mountinfo` lists a mount of device `dev` on `mountpoint`.
fn is_mounted(mountpoint: &Path, dev: (u32, u32)) -> io::Result<bool> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let want_dev = format!("{}:{}", dev.0, dev.1);
    Ok(mountinfo.lines().any(|l| {
        let mut fields = l.split(' ');
        let dev = fields.nth(2);
        let point = fields.nth(1);
        dev == Some(want_dev.as_str())
            && point.map(unescape_mountinfo) == Some(mountpoint.to_path_buf())
    }))
}

/// Mount points in mountinfo have space, tab, newline and backslash escaped as octal.
fn unescape_mountinfo(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|o| bytes[i] == b'\\' && o.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(o) => {
                out.push((o[0] - b'0') * 64 + (o[1] - b'0') * 8 + (o[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Detaches the dead mount: `umount2(MNT_DETACH)` as root, else `fusermount3 -u -z`.
fn detach(mountpoint: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(mountpoint.as_os_str().as_bytes())?;
    // SAFETY: a valid NUL-terminated path; umount2 touches nothing else.
    if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } == 0 {
        return Ok(());
    }
    let status = Command::new("fusermount3")
        .args(["-u", "-z", "--"])
        .arg(mountpoint)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "fusermount3 -u -z {} failed: {status}",
            mountpoint.display()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_lines() {
        assert_eq!(parse_dev("0:52\n"), Some((0, 52)));
        assert_eq!(parse_dev(""), None);
        assert_eq!(parse_dev("52\n"), None);
        assert_eq!(parse_dev("a:b\n"), None);
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(
            unescape_mountinfo("/tmp/a\\040b\\011c\\134d"),
            PathBuf::from("/tmp/a b\tc\\d")
        );
        assert_eq!(unescape_mountinfo("/plain\\9"), PathBuf::from("/plain\\9"));
        assert_eq!(unescape_mountinfo("/end\\04"), PathBuf::from("/end\\04"));
    }

    #[test]
    fn a_guard_never_armed_does_nothing() {
        let outcome = run_guard(Path::new("/nonexistent"), &b""[..], SETTLE_LIMIT).unwrap();
        assert_eq!(outcome, GuardOutcome::NeverArmed);
    }

    #[test]
    fn a_guard_whose_mount_is_gone_does_nothing() {
        // The root file system's device, on a path it is not mounted on.
        let dir = tempfile::tempdir().unwrap();
        let dev = std::fs::metadata(dir.path()).unwrap().dev();
        let line = format!("{}:{}\n", libc::major(dev), libc::minor(dev));
        let outcome = run_guard(dir.path(), line.as_bytes(), SETTLE_LIMIT).unwrap();
        assert_eq!(outcome, GuardOutcome::AlreadyGone);
    }
}
