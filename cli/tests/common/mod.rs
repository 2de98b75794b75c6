//! Runs the real `arca` binary: a daemon on a loopback port with a temporary
//! data dir, stopped (SIGTERM, then SIGKILL) when dropped.
#![allow(dead_code)]
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub fn arca_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_arca"))
}

pub struct Daemon {
    pub child: Option<Child>,
    /// `grpc+http://127.0.0.1:PORT` (or `grpc+unix://…`).
    pub url: String,
    pub data: tempfile::TempDir,
    pub stderr_lines: mpsc::Receiver<String>,
}

impl Daemon {
    pub fn start() -> Daemon {
        Self::start_with(&["--listen", "127.0.0.1:0"])
    }

    pub fn start_with(args: &[&str]) -> Daemon {
        let data = tempfile::tempdir().unwrap();
        let mut child = Command::new(arca_bin())
            .arg("daemon")
            .args(args)
            .arg("--data-dir")
            .arg(data.path())
            .env_remove("BLOB_SERVICE_ADDR")
            .env_remove("DIRECTORY_SERVICE_ADDR")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start arca daemon");
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .expect("daemon did not report its address within 30 s");
            if let Some(addr) = line.strip_prefix("arca daemon listening on ") {
                break if addr.starts_with("unix://") {
                    format!("grpc+{addr}")
                } else {
                    format!("grpc+http://{addr}")
                };
            }
        };
        Daemon {
            child: Some(child),
            url,
            data,
            stderr_lines: rx,
        }
    }

    /// Runs `arca` against this daemon.
    pub fn arca(&self, args: &[&str]) -> Output {
        Command::new(arca_bin())
            .args(args)
            .env("BLOB_SERVICE_ADDR", &self.url)
            .env("DIRECTORY_SERVICE_ADDR", &self.url)
            .output()
            .expect("run arca")
    }

    /// An `arca` command against this daemon's three services, with
    /// `client_data` as its data dir (its own NAR index), unaffected by the
    /// caller's composition or NAR index settings.
    pub fn client_command(&self, client_data: &Path) -> Command {
        let mut c = Command::new(arca_bin());
        c.env("BLOB_SERVICE_ADDR", &self.url)
            .env("DIRECTORY_SERVICE_ADDR", &self.url)
            .env("PATH_INFO_SERVICE_ADDR", &self.url)
            .env("ARCA_DATA_DIR", client_data)
            .env_remove("ARCA_STORE_COMPOSITION")
            .env_remove("NAR_INDEX_ADDR");
        c
    }

    /// Runs [Self::client_command] with `args` to completion.
    pub fn arca_client(&self, client_data: &Path, args: &[&str]) -> Output {
        self.client_command(client_data)
            .args(args)
            .output()
            .expect("run arca")
    }

    /// Sends SIGTERM and waits (at most 30 s) for the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("daemon did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Bytes stored under the data dir's `blobs/`.
    pub fn blob_bytes(&self) -> u64 {
        dir_bytes(&self.data.path().join("blobs"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
    }
}

pub fn dir_bytes(p: &Path) -> u64 {
    walkdir(p)
        .iter()
        .filter_map(|e| std::fs::symlink_metadata(e).ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

fn walkdir(p: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![p.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let path = e.path();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The protocol.md tree: `keep/.keep`, `.keep`, `aa -> /nix/store/somewhereelse`.
pub fn protocol_tree(root: &Path) {
    std::fs::create_dir_all(root.join("keep")).unwrap();
    std::fs::write(root.join("keep/.keep"), b"").unwrap();
    std::fs::write(root.join(".keep"), b"").unwrap();
    std::os::unix::fs::symlink("/nix/store/somewhereelse", root.join("aa")).unwrap();
}

/// A varied tree: nested dirs, an empty dir, executables, symlinks
/// (one to a directory outside, never followed), empty and multi-chunk files.
pub fn varied_tree(root: &Path, seed: u64) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("share/doc/deep/er")).unwrap();
    std::fs::create_dir_all(root.join("empty")).unwrap();
    for i in 0..40u64 {
        let data = bytes_for(seed * 1000 + i, (i as usize * 7919) % 50_000);
        std::fs::write(root.join(format!("share/doc/f{i}.txt")), &data).unwrap();
    }
    std::fs::write(
        root.join("share/doc/deep/er/big.bin"),
        bytes_for(seed, 3 * 1024 * 1024 + 11),
    )
    .unwrap();
    std::fs::write(root.join("share/empty-file"), b"").unwrap();
    std::fs::write(root.join("bin/tool"), format!("#!/bin/sh\necho {seed}\n")).unwrap();
    std::fs::set_permissions(
        root.join("bin/tool"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    // same content as tool, but not executable
    std::fs::write(
        root.join("share/tool-copy"),
        format!("#!/bin/sh\necho {seed}\n"),
    )
    .unwrap();
    std::os::unix::fs::symlink("../share/doc", root.join("bin/docs")).unwrap();
    std::os::unix::fs::symlink("/etc", root.join("etc-link")).unwrap();
}

pub fn bytes_for(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The root node JSON an in-process import into memory gives for `path`.
pub fn expected_node(path: &Path) -> serde_json::Value {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (node, _) = arca_castore::import::import_path(
            path,
            std::sync::Arc::new(arca_castore::blobservice::MemoryBlobService::default()),
            std::sync::Arc::new(arca_castore::directoryservice::MemoryDirectoryService::default()),
            4,
            std::sync::Arc::new(arca_castore::import::NoProgress),
        )
        .await
        .unwrap();
        node.to_json()
    })
}
