//! Starts a real SeaweedFS (`weed mini`) with an S3 API on 127.0.0.1 for a
//! test, and stops it (the whole process group) when dropped.
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Seaweed {
    child: Child,
    pub s3_port: u16,
    pub bucket: String,
    _dir: tempfile::TempDir,
}

fn weed_binary() -> Option<std::path::PathBuf> {
    if let Ok(p) = std::env::var("ARCA_TEST_WEED") {
        return Some(p.into());
    }
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/seaweed/bin/weed");
    if repo.exists() {
        return Some(repo);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("weed"))
            .find(|p| p.exists())
    })
}

/// Several free ports ≤ 45535 (weed also opens port + 10000).
fn free_ports(n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    let mut candidate = 20000 + (std::process::id() % 20000) as u16;
    while out.len() < n {
        candidate = if candidate >= 45000 {
            20000
        } else {
            candidate + 7
        };
        if TcpListener::bind(("127.0.0.1", candidate)).is_ok()
            && TcpListener::bind(("127.0.0.1", candidate + 10000)).is_ok()
        {
            out.push(candidate);
        }
    }
    out
}

impl Seaweed {
    /// Starts SeaweedFS, or returns None (outside CI) when `weed` is not
    /// installed; call it on the test's own thread (weed is killed when the
    /// thread that started it ends). Under CI=true a missing `weed` fails the test.
    pub fn start() -> Option<Seaweed> {
        let Some(weed) = weed_binary() else {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("SeaweedFS `weed` not found: run the test script (scripts/test.sh) which installs it");
            }
            eprintln!("SKIPPED: SeaweedFS `weed` not found (run scripts/test.sh to install it)");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        std::fs::create_dir_all(dir.path().join("logs")).unwrap();
        let p = free_ports(5);
        let bucket = "arca".to_string();
        let mut cmd = Command::new(&weed);
        cmd.env("AWS_ACCESS_KEY_ID", "k")
            .env("AWS_SECRET_ACCESS_KEY", "s")
            .arg(format!("-logdir={}", dir.path().join("logs").display()))
            .arg("mini")
            .arg(format!("-dir={}", dir.path().join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-master.port={}", p[0]))
            .arg(format!("-volume.port={}", p[1]))
            .arg(format!("-filer.port={}", p[2]))
            .arg(format!("-s3.port={}", p[3]))
            .arg(format!("-admin.port={}", p[4]))
            .args([
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-webdav=false",
                "-admin.ui=false",
                "-master.telemetry=false",
            ])
            .arg(format!("-bucket={bucket}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        // If the test process dies without running Drop (a test killed for
        // running too long), weed dies with it instead of living on.
        // SAFETY: prctl is async-signal-safe; nothing else runs in the child
        // before exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start weed");
        let sw = Seaweed {
            child,
            s3_port: p[3],
            bucket,
            _dir: dir,
        };
        sw.wait_ready();
        Some(sw)
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = Command::new("curl")
                .args([
                    "-sf",
                    "--aws-sigv4",
                    "aws:amz:us-east-1:s3",
                    "--user",
                    "k:s",
                ])
                .args([
                    "-H",
                    "x-amz-content-sha256:UNSIGNED-PAYLOAD",
                    "-X",
                    "PUT",
                    "--data-binary",
                    "x",
                ])
                .arg(format!(
                    "http://127.0.0.1:{}/{}/.ready",
                    self.s3_port, self.bucket
                ))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "SeaweedFS did not become ready within 60 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// An `objectstore+s3://` URL for a prefix in the test bucket.
    pub fn url(&self, prefix: &str) -> String {
        format!(
            "objectstore+s3://{}/{prefix}?endpoint=http://127.0.0.1:{}&region=us-east-1&access_key_id=k&secret_access_key=s&allow_http=true&virtual_hosted_style_request=false",
            self.bucket, self.s3_port
        )
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        // weed runs in its own process group (process_group(0) above); kill
        // the whole group, never anything else.
        let pgid = self.child.id() as libc::pid_t;
        if pgid > 1 {
            // SAFETY: plain syscall on a process group we created.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
        let _ = self.child.wait();
    }
}
