//! `arca mount` on real FUSE mounts, over a real daemon's services via gRPC:
//! the real-Nix fixture closure compared with the Nix store copy (`diff -r`,
//! `nix-hash`), modes, inodes, xattrs, EROFS, lookups by exact name, the
//! root listing, SIGTERM and SIGKILL.
//!
//! Needs root, `/dev/fuse` and `fusermount3` (scripts/test.sh installs
//! `fuse3`); under `CI=true` their absence fails the test. Every mount is
//! unmounted by a guard, even when a test fails.
mod common;
#[path = "../../store/tests/common/mod.rs"]
mod store_common;

use common::{stderr, stdout, Daemon};
use std::collections::HashMap;
use std::ffi::CString;
use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use store_common::{closure, fixture, manifest};

/// Whether FUSE mounts can be made here. Under `CI=true` anything missing
/// fails the test; elsewhere the test is skipped loudly.
fn have_fuse() -> bool {
    let mut missing = Vec::new();
    if !Path::new("/dev/fuse").exists() {
        missing.push("/dev/fuse");
    }
    if !Command::new("fusermount3")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
    {
        missing.push("fusermount3 (apt-get install fuse3)");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root");
    }
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "FUSE tests need {missing:?} (scripts/test.sh installs fuse3)"
    );
    eprintln!("SKIPPED: FUSE tests need {missing:?}");
    false
}

/// Runs `arca` against the daemon's three services.
fn arca(d: &Daemon, client_data: &Path, args: &[&str]) -> Output {
    d.arca_client(client_data, args)
}

/// `arca import PATH` through the daemon: the store path's basename.
fn import_base(d: &Daemon, client_data: &Path, path: &Path) -> String {
    let o = arca(d, client_data, &["import", path.to_str().unwrap()]);
    assert!(
        o.status.success(),
        "arca import {}: {}",
        path.display(),
        stderr(&o)
    );
    stdout(&o)
        .trim()
        .strip_prefix("/nix/store/")
        .unwrap()
        .to_string()
}

fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let want = path.to_str().unwrap();
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(want))
}

fn wait_unmounted(path: &Path, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if !is_mounted(path) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    !is_mounted(path)
}

/// A running `arca mount` on a temporary directory. Dropping it stops the
/// process (SIGTERM, then SIGKILL) and makes sure nothing stays mounted.
struct Mount {
    child: Option<Child>,
    path: PathBuf,
    stderr_lines: mpsc::Receiver<String>,
    _dir: tempfile::TempDir,
}

impl Mount {
    fn start(d: &Daemon, client_data: &Path, extra: &[&str]) -> Mount {
        Self::start_with_env(d, client_data, extra, &[])
    }

    fn start_with_env(
        d: &Daemon,
        client_data: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Mount {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().canonicalize().unwrap().join("store");
        std::fs::create_dir(&path).unwrap();
        let mut child = d
            .client_command(client_data)
            .arg("mount")
            .args(extra)
            .arg(&path)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start arca mount");
        let (tx, rx) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let m = Mount {
            child: Some(child),
            path,
            stderr_lines: rx,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match m.stderr_lines.recv_timeout(left) {
                Ok(line) if line.starts_with("arca mount: mounted on") => break,
                Ok(line) => eprintln!("arca mount: {line}"),
                Err(e) => panic!("arca mount did not report the mount within 30 s: {e}"),
            }
        }
        assert!(
            is_mounted(&m.path),
            "{} not in /proc/mounts",
            m.path.display()
        );
        m
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Sends `signal` and waits (at most 30 s) for the process to exit.
    fn signal_and_wait(&mut self, signal: i32) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("arca mount did not exit within 30 s of signal {signal}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if !wait_unmounted(&self.path, Duration::from_secs(5)) {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z", "--"])
                .arg(&self.path)
                .status();
            if is_mounted(&self.path) {
                let _ = Command::new("umount").arg("-l").arg(&self.path).status();
            }
        }
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn nix_hash(path: &Path) -> String {
    let o = run(Command::new("nix-hash")
        .args(["--type", "sha256", "--base32"])
        .arg(path));
    assert!(
        o.status.success(),
        "nix-hash {}: {}",
        path.display(),
        stderr(&o)
    );
    stdout(&o).trim().to_string()
}

fn xattr(path: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and a buffer of the given length.
    let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

fn xattr_names(path: &Path) -> Vec<u8> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: a valid C string and a buffer of the given length.
    let r = unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(
        r >= 0,
        "listxattr {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    buf.truncate(r as usize);
    buf
}

fn errno<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    r.expect_err("expected an error")
        .raw_os_error()
        .expect("an OS error")
}

/// Walks `real` and `mounted` together: same names, same types, modes as
/// the store shows them (0444/0555 files, 0555 dirs), same symlink targets,
/// same sizes; inodes stable across stats and equal to readdir's; the
/// BLAKE3 xattr of every file right. Returns (files, directories, symlinks).
fn compare_trees(real: &Path, mounted: &Path) -> (usize, usize, usize) {
    let (mut files, mut dirs, mut links) = (0, 0, 0);
    let rm = std::fs::symlink_metadata(real).unwrap();
    let mm = std::fs::symlink_metadata(mounted).unwrap();
    assert_eq!(
        mm.ino(),
        std::fs::symlink_metadata(mounted).unwrap().ino(),
        "{}: inode changed",
        mounted.display()
    );
    let mode = mm.mode() & 0o7777;
    if rm.file_type().is_symlink() {
        assert!(
            mm.file_type().is_symlink(),
            "{} is not a symlink",
            mounted.display()
        );
        assert_eq!(
            std::fs::read_link(real).unwrap(),
            std::fs::read_link(mounted).unwrap()
        );
        assert_eq!(
            mm.len(),
            std::fs::read_link(real).unwrap().as_os_str().len() as u64
        );
        assert_eq!(errno(xattr(mounted, "user.arca.blake3")), libc::ENODATA);
        links += 1;
    } else if rm.is_dir() {
        assert!(mm.is_dir(), "{} is not a directory", mounted.display());
        assert_eq!(mode, 0o555, "{}", mounted.display());
        assert_eq!(xattr_names(mounted), b"user.arca.blake3\0");
        let mut real_names: Vec<_> = std::fs::read_dir(real)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        real_names.sort();
        let mut entries: Vec<_> = std::fs::read_dir(mounted)
            .unwrap()
            .map(|e| e.unwrap())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        let names: Vec<_> = entries.iter().map(|e| e.file_name()).collect();
        assert_eq!(names, real_names, "{}", mounted.display());
        for e in entries {
            let (f, d, l) = compare_trees(&real.join(e.file_name()), &e.path());
            assert_eq!(
                e.ino(),
                std::fs::symlink_metadata(e.path()).unwrap().ino(),
                "readdir vs stat: {}",
                e.path().display()
            );
            files += f;
            dirs += d;
            links += l;
        }
        dirs += 1;
    } else {
        assert!(mm.is_file(), "{} is not a file", mounted.display());
        let exec = rm.mode() & 0o100 != 0;
        assert_eq!(
            mode,
            if exec { 0o555 } else { 0o444 },
            "{}",
            mounted.display()
        );
        assert_eq!(mm.len(), rm.len(), "{}", mounted.display());
        let data = std::fs::read(mounted).unwrap();
        assert!(
            data == std::fs::read(real).unwrap(),
            "{} differs",
            mounted.display()
        );
        let digest = arca_castore::B3Digest::of(&data).to_hex();
        assert_eq!(
            xattr(mounted, "user.arca.blake3").unwrap(),
            digest.as_bytes(),
            "{}",
            mounted.display()
        );
        assert_eq!(errno(xattr(mounted, "user.other")), libc::ENODATA);
        files += 1;
    }
    assert_eq!(
        mm.ino(),
        std::fs::symlink_metadata(mounted).unwrap().ino(),
        "{}: inode changed",
        mounted.display()
    );
    (files, dirs, links)
}

#[test]
fn fixture_closure_through_the_mount_matches_the_nix_store() {
    let Some(fx) = fixture() else { return };
    if !have_fuse() {
        return;
    }
    let d = Daemon::start();
    let client = tempfile::tempdir().unwrap();
    let root = std::fs::read_to_string(fx.join("ROOT_PATH"))
        .unwrap()
        .trim()
        .to_string();
    let from = format!("nix+file://{}", fx.join("cache-xz").display());
    let o = arca(&d, client.path(), &["copy", "--from", &from, &root]);
    assert!(o.status.success(), "arca copy: {}", stderr(&o));

    let mut m = Mount::start(&d, client.path(), &["--list-root"]);
    let paths = closure(&fx);
    let manifest = manifest(&fx);
    assert!(paths.len() >= 6);
    let (mut files, mut dirs, mut links) = (0, 0, 0);
    for p in &paths {
        let base = p.strip_prefix("/nix/store/").unwrap();
        let real = fx.join("nix-root/nix/store").join(base);
        let mounted = m.p(base);
        // diff -r: contents, names, and symlinks by target (never followed).
        let o = run(Command::new("diff")
            .args(["-r", "--no-dereference"])
            .arg(&real)
            .arg(&mounted));
        assert!(
            o.status.success(),
            "diff -r {base}:\n{}{}",
            stdout(&o),
            stderr(&o)
        );
        // nix-hash of the mounted path is the NarHash Nix recorded.
        let want: arca_store::NixHash = manifest[p].nar_hash.parse().unwrap();
        assert_eq!(
            nix_hash(&mounted),
            want.to_nixbase32(),
            "NarHash of {base} through the mount"
        );
        let (f, dd, l) = compare_trees(&real, &mounted);
        files += f;
        dirs += dd;
        links += l;
        if std::fs::symlink_metadata(&real).unwrap().is_dir() {
            let expected = common::expected_node(&real);
            let got = xattr(&mounted, "user.arca.blake3").unwrap();
            assert_eq!(
                String::from_utf8(got).unwrap(),
                expected["digest"].as_str().unwrap(),
                "{base}"
            );
        }
    }
    assert!(
        files >= 5 && dirs >= 5 && links >= 2,
        "files {files}, dirs {dirs}, symlinks {links}"
    );

    // --list-root lists the store paths.
    let mut listed: Vec<String> = std::fs::read_dir(&m.path)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    listed.sort();
    let mut want: Vec<String> = paths
        .iter()
        .map(|p| p.strip_prefix("/nix/store/").unwrap().to_string())
        .collect();
    want.sort();
    assert_eq!(listed, want);

    // Lookups must match the whole name.
    let top = paths
        .iter()
        .find(|p| p.ends_with("-fixture-top"))
        .unwrap()
        .strip_prefix("/nix/store/")
        .unwrap();
    let hash = &top[..32];
    for bad in [
        format!("{hash}-wrongname"),
        format!("{hash}-fixture-to"),
        format!("{hash}-fixture-topp"),
        hash.to_string(),
    ] {
        assert_eq!(
            errno(std::fs::symlink_metadata(m.p(&bad))),
            libc::ENOENT,
            "{bad}"
        );
    }
    assert_eq!(
        errno(std::fs::symlink_metadata(
            m.p("00000000000000000000000000000000-fixture-top")
        )),
        libc::ENOENT
    );
    assert_eq!(
        errno(std::fs::symlink_metadata(m.p("not-a-store-path"))),
        libc::ENOENT
    );
    assert!(std::fs::symlink_metadata(m.p(top)).unwrap().is_dir());

    // Writes fail with EROFS.
    let file = walk_first_file(&m.p(top));
    assert_eq!(
        errno(std::fs::OpenOptions::new().write(true).open(&file)),
        libc::EROFS
    );
    assert_eq!(
        errno(std::fs::OpenOptions::new().append(true).open(&file)),
        libc::EROFS
    );
    assert_eq!(
        errno(std::fs::File::create(m.p(top).join("new-file"))),
        libc::EROFS
    );
    assert_eq!(errno(std::fs::File::create(m.p("new-file"))), libc::EROFS);
    assert_eq!(
        errno(std::fs::create_dir(m.p(top).join("new-dir"))),
        libc::EROFS
    );
    assert_eq!(errno(std::fs::remove_file(&file)), libc::EROFS);
    assert_eq!(
        errno(std::fs::rename(&file, m.p(top).join("renamed"))),
        libc::EROFS
    );
    assert_eq!(
        errno(std::fs::set_permissions(
            &file,
            std::fs::Permissions::from_mode(0o777)
        )),
        libc::EROFS
    );
    assert_eq!(
        errno(std::os::unix::fs::symlink("x", m.p(top).join("link"))),
        libc::EROFS
    );

    // SIGTERM unmounts and exits 0.
    let status = m.signal_and_wait(libc::SIGTERM);
    assert!(
        status.success(),
        "arca mount exited with {status} after SIGTERM"
    );
    assert!(!is_mounted(&m.path), "still mounted after SIGTERM");
}

fn walk_first_file(dir: &Path) -> PathBuf {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for e in entries {
            let m = std::fs::symlink_metadata(&e).unwrap();
            if m.is_file() {
                return e;
            }
            if m.is_dir() {
                stack.push(e);
            }
        }
    }
    panic!("no file under {}", dir.display())
}

/// A tree imported with `arca import`: two files with the same content and
/// different exec bits, multi-chunk files read at random offsets, many files
/// read in parallel; inodes stable and released when the kernel forgets them.
#[test]
fn imported_tree_modes_exec_bits_large_files_and_parallel_reads() {
    if !have_fuse() {
        return;
    }
    let d = Daemon::start();
    let client = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("tree");
    common::varied_tree(&tree, 7);
    std::fs::write(tree.join("same-plain"), b"identical content\n").unwrap();
    std::fs::write(tree.join("same-exec"), b"identical content\n").unwrap();
    std::fs::set_permissions(
        tree.join("same-exec"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let big = common::bytes_for(99, 9 * 1024 * 1024 + 4321);
    std::fs::write(tree.join("big.bin"), &big).unwrap();
    let big2 = common::bytes_for(98, 7 * 1024 * 1024 + 17);
    std::fs::write(tree.join("big2.bin"), &big2).unwrap();
    // Two identical directories in different places.
    for p in ["x/same", "y/same"] {
        std::fs::create_dir_all(tree.join(p)).unwrap();
        std::fs::write(tree.join(p).join("f"), b"f\n").unwrap();
    }
    std::fs::write(tree.join("y/other"), b"other\n").unwrap();
    // A real ELF executable (mapped, not read, by the kernel and ld.so).
    let elf = ["/bin/true", "/usr/bin/true"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists());
    if let Some(elf) = elf {
        std::fs::copy(elf, tree.join("bin/true")).unwrap();
    }
    for i in 0..200 {
        std::fs::write(
            tree.join(format!("share/doc/small-{i:03}")),
            common::bytes_for(1000 + i, (i as usize * 977) % 20_000),
        )
        .unwrap();
    }
    let base = import_base(&d, client.path(), &tree);

    // Without --list-root the root reads as empty, but lookups work.
    let mut m = Mount::start(&d, client.path(), &["--threads", "3"]);
    assert_eq!(std::fs::read_dir(&m.path).unwrap().count(), 0);
    let mounted = m.p(&base);

    // Random-offset reads of a large file on a fresh mount (before anything
    // is in the page cache), then a sequential read.
    let f = std::fs::File::open(mounted.join("big.bin")).unwrap();
    let mut x = 12345u64;
    for _ in 0..64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % big.len() as u64) as usize;
        let len = ((x >> 32) % 300_000) as usize;
        let mut buf = vec![0u8; len];
        let n = f.read_at(&mut buf, off as u64).unwrap();
        let end = (off + len).min(big.len());
        assert_eq!(n, end - off);
        assert!(buf[..n] == big[off..end], "read_at {off}+{len}");
    }
    drop(f);
    assert!(std::fs::read(mounted.join("big.bin")).unwrap() == big);

    // Several readers of one large file at different places at once.
    std::thread::scope(|s| {
        for start in [0usize, 3 << 20, 5 << 20, 1 << 20] {
            let (big2, path) = (&big2, mounted.join("big2.bin"));
            s.spawn(move || {
                let f = std::fs::File::open(path).unwrap();
                let mut pos = start;
                let mut buf = vec![0u8; 100_000];
                while pos < big2.len() {
                    let n = f.read_at(&mut buf, pos as u64).unwrap();
                    assert!(
                        n > 0 && buf[..n] == big2[pos..pos + n],
                        "reader from {start} at {pos}"
                    );
                    pos += n;
                }
            });
        }
    });

    // Modes and the exec bit per file, even with the same content.
    let plain = std::fs::symlink_metadata(mounted.join("same-plain")).unwrap();
    let exec = std::fs::symlink_metadata(mounted.join("same-exec")).unwrap();
    assert_eq!(plain.mode() & 0o7777, 0o444);
    assert_eq!(exec.mode() & 0o7777, 0o555);
    assert_ne!(
        plain.ino(),
        exec.ino(),
        "same content, different exec bit: different inodes"
    );
    assert_eq!(
        xattr(&mounted.join("same-plain"), "user.arca.blake3").unwrap(),
        xattr(&mounted.join("same-exec"), "user.arca.blake3").unwrap()
    );
    assert_eq!(
        std::fs::read(mounted.join("same-exec")).unwrap(),
        b"identical content\n"
    );
    // varied_tree: bin/tool (0755) and share/tool-copy (0644) share content too.
    assert_eq!(
        std::fs::symlink_metadata(mounted.join("bin/tool"))
            .unwrap()
            .mode()
            & 0o7777,
        0o555
    );
    assert_eq!(
        std::fs::symlink_metadata(mounted.join("share/tool-copy"))
            .unwrap()
            .mode()
            & 0o7777,
        0o444
    );
    let o = run(&mut Command::new(mounted.join("bin/tool")));
    assert!(
        o.status.success(),
        "running an executable from the mount: {}",
        stderr(&o)
    );
    assert_eq!(stdout(&o), "7\n");
    if elf.is_some() {
        let o = run(&mut Command::new(mounted.join("bin/true")));
        assert!(
            o.status.success(),
            "running an ELF binary from the mount: {}",
            stderr(&o)
        );
    }

    // Identical directories are distinct inodes: a directory held open (a
    // cwd, an fd) keeps its own parent and path while its twin is used.
    let xs = mounted.join("x/same");
    let held = std::fs::File::open(&xs).unwrap();
    let fd_path = PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&held)
    ));
    assert_ne!(
        std::fs::metadata(&xs).unwrap().ino(),
        std::fs::metadata(mounted.join("y/same")).unwrap().ino()
    );
    assert_eq!(
        std::fs::read_dir(mounted.join("y/same")).unwrap().count(),
        1
    );
    assert_eq!(std::fs::read(mounted.join("y/same/f")).unwrap(), b"f\n");
    let mut up: Vec<_> = std::fs::read_dir(fd_path.join(".."))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    up.sort();
    assert_eq!(up, ["same"], "`..` of x/same after using y/same");
    assert_eq!(std::fs::read_link(&fd_path).unwrap(), xs);
    drop(held);

    // Many files read at once from several threads.
    let files: Vec<PathBuf> = (0..200)
        .map(|i| PathBuf::from(format!("share/doc/small-{i:03}")))
        .collect();
    std::thread::scope(|s| {
        for chunk in files.chunks(25) {
            let (tree, mounted) = (&tree, &mounted);
            s.spawn(move || {
                for rel in chunk {
                    assert!(
                        std::fs::read(mounted.join(rel)).unwrap()
                            == std::fs::read(tree.join(rel)).unwrap(),
                        "{}",
                        rel.display()
                    );
                }
            });
        }
    });

    // The whole tree, and its NAR hash as Nix computes it.
    let o = run(Command::new("diff")
        .args(["-r", "--no-dereference"])
        .arg(&tree)
        .arg(&mounted));
    assert!(o.status.success(), "diff -r:\n{}{}", stdout(&o), stderr(&o));
    if store_common::have_nix() {
        assert_eq!(nix_hash(&mounted), nix_hash(&tree));
    }
    let ino_before: HashMap<PathBuf, u64> = files
        .iter()
        .map(|r| (r.clone(), std::fs::metadata(mounted.join(r)).unwrap().ino()))
        .collect();
    compare_trees(&tree, &mounted);

    // Inodes are released when the kernel forgets them (statfs reports the
    // live count in f_files), and numbers stay the same when looked up again.
    let live = |p: &Path| {
        let c = CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid C string and a zeroed statvfs to fill.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
        s.f_files
    };
    let before = live(&m.path);
    assert!(before >= 200, "live inodes {before}");
    if std::fs::write("/proc/sys/vm/drop_caches", "2").is_ok() {
        let deadline = Instant::now() + Duration::from_secs(10);
        while live(&m.path) > before / 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let after = live(&m.path);
        eprintln!("live inodes: {before} before dropping dentries, {after} after");
        assert!(
            after <= before / 2,
            "inodes not released: {before} before dropping dentries, {after} after"
        );
    }
    for (rel, ino) in &ino_before {
        assert_eq!(
            std::fs::metadata(mounted.join(rel)).unwrap().ino(),
            *ino,
            "{}",
            rel.display()
        );
    }

    let status = m.signal_and_wait(libc::SIGINT);
    assert!(
        status.success(),
        "arca mount exited with {status} after SIGINT"
    );
    assert!(!is_mounted(&m.path));
}

/// A killed `arca mount` leaves no dead mount behind (fusermount3's
/// auto_unmount helper, backed by Arca's own unmount guard).
#[test]
fn sigkill_leaves_no_dead_mount() {
    sigkill_case(&[]);
}

/// The unmount guard alone (no auto_unmount helper) cleans up after SIGKILL:
/// it is what catches the helper's race with the dying process's fds.
#[test]
fn sigkill_leaves_no_dead_mount_with_the_guard_alone() {
    sigkill_case(&[("ARCA_MOUNT_NO_AUTO_UNMOUNT", "1")]);
}

/// A daemon holding one file `hello` ("hello\n") as a store path; the client
/// data dir; the store path's base name.
fn hello_store() -> (Daemon, tempfile::TempDir, String) {
    let d = Daemon::start();
    let client = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("hello"), b"hello\n").unwrap();
    let base = import_base(&d, client.path(), &src.path().join("hello"));
    (d, client, base)
}

/// The guard never touches a mount that still answers: with its stdin
/// closed while `arca mount` lives on, it gives up after its settle time.
#[test]
fn the_unmount_guard_leaves_a_live_mount_alone() {
    if !have_fuse() {
        return;
    }
    let (d, client, base) = hello_store();
    let m = Mount::start(&d, client.path(), &[]);
    let dev = std::fs::metadata(&m.path).unwrap().dev();
    let guard = |line: String| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_arca"))
            .args(["__mount-guard", "--settle-ms", "300"])
            .arg(&m.path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), line.as_bytes()).unwrap();
        drop(child.stdin.take());
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o).trim().to_string()
    };
    assert_eq!(
        guard(format!("{}:{}\n", libc::major(dev), libc::minor(dev))),
        "LeftAlive"
    );
    // Another device number: not this mount, nothing to do.
    assert_eq!(
        guard(format!(
            "{}:{}\n",
            libc::major(dev),
            libc::minor(dev) + 1000
        )),
        "AlreadyGone"
    );
    assert_eq!(guard(String::new()), "NeverArmed");
    assert!(is_mounted(&m.path));
    assert_eq!(std::fs::read(m.p(&base)).unwrap(), b"hello\n");
}

fn sigkill_case(env: &[(&str, &str)]) {
    if !have_fuse() {
        return;
    }
    let (d, client, base) = hello_store();
    let t0 = Instant::now();
    let mut m = Mount::start_with_env(&d, client.path(), &[], env);
    let mounted = t0.elapsed();
    assert_eq!(std::fs::read(m.p(&base)).unwrap(), b"hello\n");
    let read = t0.elapsed();
    let pid = m.pid();
    let status = m.signal_and_wait(libc::SIGKILL);
    assert!(!status.success(), "pid {pid} was killed");
    let killed = t0.elapsed();
    if !wait_unmounted(&m.path, Duration::from_secs(30)) {
        let ps = Command::new("ps")
            .args(["-eo", "pid,ppid,stat,wchan:32,args"])
            .output()
            .unwrap();
        let ps = String::from_utf8_lossy(&ps.stdout);
        let related: Vec<&str> = ps
            .lines()
            .filter(|l| l.contains("fusermount") || l.contains("arca"))
            .collect();
        let log: Vec<String> = m.stderr_lines.try_iter().collect();
        panic!(
            "a dead mount stayed 30 s after SIGKILL (mounted after {mounted:?}, read after {read:?}, \
             exited after {killed:?})\nprocesses:\n{}\nmount log:\n{}",
            related.join("\n"),
            log.join("\n")
        );
    }
    // The directory is usable again (no "Transport endpoint is not connected").
    assert_eq!(std::fs::read_dir(&m.path).unwrap().count(), 0);
}

/// Whether the first page of `path` is in the kernel's page cache, found
/// with `mincore` on a mapping (which reads nothing).
fn first_page_cached(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    assert!(len > 0);
    // SAFETY: a read-only shared mapping of an open file, unmapped before
    // return; mincore writes one byte per page of the (one-page) range.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "mmap {}", path.display());
        let mut vec = [0u8; 1];
        let r = libc::mincore(p, len.min(4096), vec.as_mut_ptr());
        libc::munmap(p, len);
        assert_eq!(r, 0, "mincore {}", path.display());
        vec[0] & 1 == 1
    }
}

#[test]
fn small_files_are_fetched_ahead_into_the_page_cache_only_once_reading_starts() {
    if !have_fuse() {
        return;
    }
    let d = Daemon::start();
    let client = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("smalls");
    std::fs::create_dir(&tree).unwrap();
    for i in 0..100 {
        std::fs::write(
            tree.join(format!("f{i:03}")),
            format!("small file {i}\n").repeat(50),
        )
        .unwrap();
    }
    let base = import_base(&d, client.path(), &tree);
    let m = Mount::start_with_env(
        &d,
        client.path(),
        &[],
        &[("ARCA_LOG", "arca_castore=debug")],
    );
    let later = m.p(&format!("{base}/f050"));
    // Listing and stat-ing fetch no contents: nothing is in the page cache yet.
    assert_eq!(std::fs::read_dir(m.p(&base)).unwrap().count(), 100);
    assert!(
        !first_page_cached(&later),
        "contents fetched before any read"
    );
    // Reading the first file fetches the ones after it in one batch, straight
    // into the page cache (FUSE_NOTIFY_STORE), before they are read.
    assert_eq!(
        std::fs::read(m.p(&format!("{base}/f000"))).unwrap(),
        "small file 0\n".repeat(50).as_bytes()
    );
    let start = Instant::now();
    while !first_page_cached(&later) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "f050 never reached the page cache"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // What the kernel holds is the file's content.
    for i in [1, 50, 99] {
        let got = std::fs::read(m.p(&format!("{base}/f{i:03}"))).unwrap();
        assert_eq!(
            got,
            format!("small file {i}\n").repeat(50).as_bytes(),
            "f{i:03}"
        );
    }
    // The daemon is on this machine: the blobs came from the files it
    // passed over its local socket, not over gRPC.
    // (Logged once the daemon answered a read request with its files.)
    let log: Vec<String> = m.stderr_lines.try_iter().collect();
    assert!(
        log.iter()
            .any(|l| l.contains("reading blobs from the daemon's files")),
        "no local reads in the mount's log: {log:?}"
    );
    assert!(
        !log.iter().any(|l| l.contains("local reads failed")),
        "local reads fell back to gRPC: {log:?}"
    );
}

#[test]
fn a_store_that_cannot_be_reached_fails_the_mount_at_once() {
    // Nothing listens on this port (bound, then closed): every service is unreachable.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("grpc+http://127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_arca"))
        .arg("mount")
        .arg(&mnt)
        .env("BLOB_SERVICE_ADDR", &addr)
        .env("DIRECTORY_SERVICE_ADDR", &addr)
        .env("PATH_INFO_SERVICE_ADDR", &addr)
        .env("ARCA_DATA_DIR", dir.path().join("data"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("reaching the path info service"),
        "{stderr}"
    );
    assert!(!is_mounted(&mnt), "nothing is mounted");
}
