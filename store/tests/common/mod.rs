//! Shared helpers of the store's integration tests:
//!
//! - [fixture]: the real-Nix fixture (`shared/fixtures/make-nix-fixture.sh`:
//!   a 6-path closure and binary caches), built once per target directory and
//!   reused by every test process (nextest runs each test in its own).
//! - [CacheServer]: a loopback HTTP server for binary-cache directories, with
//!   a request log, an optional delay per response, swappable root
//!   directory and per-path status overrides.
#![allow(dead_code)]
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::oneshot;

/// Whether `nix-store` is installed. Under `CI=true` its absence fails the
/// test (scripts/test.sh installs it); elsewhere the test is skipped loudly.
pub fn have_nix() -> bool {
    let ok = Command::new("nix-store")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "nix-store not found (scripts/test.sh installs nix-bin)"
        );
        eprintln!("SKIPPED: nix-store not found (run scripts/test.sh to install nix-bin)");
    }
    ok
}

fn fixture_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/make-nix-fixture.sh")
}

/// The fixture directory (`cache-xz/`, `cache-none/`, `cache-zstd/`,
/// `cache-xz-signed/`, `keys/public.key`, `closure.txt`, `manifest.json`),
/// built on first use under `$CARGO_TARGET_TMPDIR/nix-fixture` and reused
/// while the script is unchanged. `None` (test skipped) when Nix is missing
/// outside CI.
pub fn fixture() -> Option<PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        if !have_nix() {
            return None;
        }
        Some(build_fixture())
    })
    .clone()
}

fn build_fixture() -> PathBuf {
    let script = fixture_script();
    let script_text =
        std::fs::read(&script).unwrap_or_else(|e| panic!("{}: {e}", script.display()));
    let stamp = format!("{:x}", sha2::Sha256::digest(&script_text));
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    let dir = base.join("nix-fixture");
    let marker = base.join("nix-fixture.complete");
    // One builder at a time across test processes; the others wait, then reuse.
    let lock = std::fs::File::create(base.join("nix-fixture.lock")).unwrap();
    lock.lock().unwrap();
    if std::fs::read_to_string(&marker).ok().as_deref() != Some(stamp.as_str()) {
        let _ = std::fs::remove_file(&marker);
        let out = Command::new("bash")
            .arg(&script)
            .arg(&dir)
            .env("FIXTURE_HTTP_SELFTEST", "0")
            .output()
            .expect("run make-nix-fixture.sh");
        assert!(
            out.status.success(),
            "make-nix-fixture.sh failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(&marker, &stamp).unwrap();
    }
    lock.unlock().unwrap();
    dir
}

use sha2::Digest as _;

/// One path of the fixture's `manifest.json` (`nix path-info --json -r`).
#[derive(Debug, Clone)]
pub struct ManifestEntry {
    /// `/nix/store/…`
    pub path: String,
    /// SRI `sha256-…`
    pub nar_hash: String,
    pub nar_size: u64,
    /// Full paths, sorted.
    pub references: Vec<String>,
}

/// The manifest, by store path.
pub fn manifest(fixture: &Path) -> HashMap<String, ManifestEntry> {
    let text = std::fs::read_to_string(fixture.join("manifest.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let mut references: Vec<String> = e["references"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_str().unwrap().to_string())
                .collect();
            references.sort();
            let entry = ManifestEntry {
                path: e["path"].as_str().unwrap().to_string(),
                nar_hash: e["narHash"].as_str().unwrap().to_string(),
                nar_size: e["narSize"].as_u64().unwrap(),
                references,
            };
            (entry.path.clone(), entry)
        })
        .collect()
}

/// The closure's store paths, dependencies first.
pub fn closure(fixture: &Path) -> Vec<String> {
    std::fs::read_to_string(fixture.join("closure.txt"))
        .unwrap()
        .lines()
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

/// The fixture's public key (`name:base64`).
pub fn public_key(fixture: &Path) -> String {
    std::fs::read_to_string(fixture.join("keys/public.key"))
        .unwrap()
        .trim()
        .to_string()
}

/// The 32-character hash part of a store path.
pub fn hash_part(path: &str) -> &str {
    &path["/nix/store/".len().."/nix/store/".len() + 32]
}

/// A copy of a directory tree (for tampering with a cache).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A narinfo field's value.
pub fn narinfo_field(narinfo: &Path, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(narinfo).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}: ")).map(String::from))
}

/// Rewrites a narinfo: `key`'s line gets `value`, or is removed for `None`.
pub fn set_narinfo_field(narinfo: &Path, key: &str, value: Option<&str>) {
    let text = std::fs::read_to_string(narinfo).unwrap();
    let prefix = format!("{key}: ");
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with(&prefix) {
            if let Some(v) = value {
                out.push_str(&format!("{prefix}{v}\n"));
            }
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    std::fs::write(narinfo, out).unwrap();
}

// ---------------------------------------------------------------- HTTP server

#[derive(Default)]
struct ServerState {
    root: Mutex<PathBuf>,
    log: Mutex<Vec<String>>,
    delay_ms: AtomicU64,
    statuses: Mutex<HashMap<String, StatusCode>>,
}

/// A loopback HTTP server for binary-cache directories, stopped when dropped.
pub struct CacheServer {
    state: Arc<ServerState>,
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl CacheServer {
    /// Serves the files under `root` on 127.0.0.1 (a free port).
    pub async fn start(root: &Path) -> CacheServer {
        let state = Arc::new(ServerState {
            root: Mutex::new(root.to_path_buf()),
            ..Default::default()
        });
        let app = axum::Router::new()
            .fallback(serve_file)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        CacheServer {
            state,
            addr,
            stop: Some(stop),
        }
    }

    /// `http://127.0.0.1:PORT/<sub>` (no trailing slash).
    pub fn url(&self, sub: &str) -> String {
        format!("http://{}/{}", self.addr, sub.trim_matches('/'))
            .trim_end_matches('/')
            .to_string()
    }

    /// Serves another directory from now on.
    pub fn set_root(&self, root: &Path) {
        *self.state.root.lock() = root.to_path_buf();
    }

    /// Waits this long before every response.
    pub fn set_delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// Answers `status` (empty body) for the URL path `path` (e.g. `/cache-xz/x.narinfo`).
    pub fn set_status(&self, path: &str, status: StatusCode) {
        self.state.statuses.lock().insert(path.to_string(), status);
    }

    /// Forgets status overrides.
    pub fn clear_statuses(&self) {
        self.state.statuses.lock().clear();
    }

    /// Every request so far, as `METHOD /path`.
    pub fn requests(&self) -> Vec<String> {
        self.state.log.lock().clone()
    }

    /// Requests so far.
    pub fn request_count(&self) -> usize {
        self.state.log.lock().len()
    }

    /// Requests so far whose path ends with `suffix`.
    pub fn count_ending(&self, suffix: &str) -> usize {
        self.state
            .log
            .lock()
            .iter()
            .filter(|r| r.ends_with(suffix))
            .count()
    }

    /// Requests so far of NAR files (`/nar/…`).
    pub fn nar_requests(&self) -> usize {
        self.state
            .log
            .lock()
            .iter()
            .filter(|r| r.contains("/nar/"))
            .count()
    }
}

impl Drop for CacheServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn serve_file(State(state): State<Arc<ServerState>>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    state.log.lock().push(format!("{} {path}", req.method()));
    let delay = state.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if let Some(status) = state.statuses.lock().get(&path).copied() {
        return status.into_response();
    }
    let rel = Path::new(path.trim_start_matches('/'));
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let file = state.root.lock().join(rel);
    match tokio::fs::read(&file).await {
        Ok(bytes) => {
            let ty = if path.ends_with(".narinfo") {
                "text/x-nix-narinfo"
            } else if path.contains("/nar/") {
                "application/x-nix-nar"
            } else {
                "application/octet-stream"
            };
            Response::builder()
                .header(header::CONTENT_TYPE, ty)
                .body(Body::from(bytes))
                .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
        }
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}
