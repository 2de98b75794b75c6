//! The Nix binary cache over HTTP (`arca serve-cache`, `arca daemon
//! --http-listen`) against the real Nix 2.8: `nix copy --from` with
//! signatures required, `nix-build --max-jobs 0` substituting, `nix copy
//! --to` uploading in every compression, Range requests, bad requests, two
//! replicas sharing uploads, and the batch lookup. Every server is started
//! and stopped by its test, on 127.0.0.1.
mod common;
#[path = "../../store/tests/common/mod.rs"]
mod store_common;

use common::{arca_bin, stderr, stdout, Daemon};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use store_common::{closure, fixture, hash_part, manifest, narinfo_field, public_key};

const NIX_CONFIG: &str =
    "build-users-group =\nexperimental-features = nix-command\nsubstituters =\nsandbox = false\n";

// ------------------------------------------------------------------ helpers

/// Runs a Nix command with a fresh narinfo disk cache (`xdg`).
fn nix(xdg: &Path, args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .env("NIX_CONFIG", NIX_CONFIG)
        .env("XDG_CACHE_HOME", xdg)
        .output()
        .expect("run nix")
}

fn nix_ok(xdg: &Path, args: &[&str]) -> Output {
    let out = nix(xdg, args);
    assert!(
        out.status.success(),
        "{args:?} failed:\n{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    out
}

/// A fresh key pair: (secret key file, public key).
fn keypair(dir: &Path, name: &str) -> (PathBuf, String) {
    let sk = dir.join(format!("{name}.sec"));
    let secret = nix_ok(dir, &["nix", "key", "generate-secret", "--key-name", name]).stdout;
    std::fs::write(&sk, &secret).unwrap();
    let public = Command::new("nix")
        .args(["key", "convert-secret-to-public"])
        .env("NIX_CONFIG", NIX_CONFIG)
        .stdin(std::fs::File::open(&sk).unwrap())
        .output()
        .unwrap();
    assert!(public.status.success(), "{}", stderr(&public));
    (sk, stdout(&public).trim().to_string())
}

/// Runs `arca` against a daemon's three services, with its own data dir.
fn arca(d: &Daemon, client_data: &Path, args: &[&str]) -> Output {
    d.arca_client(client_data, args)
}

/// Fills the daemon with the fixture closure from a fixture cache.
fn fill_from_fixture(d: &Daemon, fx: &Path, cache: &str) {
    let client = tempfile::tempdir().unwrap();
    let from = if cache == "cache-xz-signed" {
        format!(
            "nix+file://{}/{cache}?trusted-public-keys={}",
            fx.display(),
            public_key(fx)
        )
    } else {
        format!("nix+file://{}/{cache}", fx.display())
    };
    let o = arca(d, client.path(), &["copy", "--from", &from, &root_path(fx)]);
    assert!(o.status.success(), "arca copy: {}", stderr(&o));
}

fn root_path(fx: &Path) -> String {
    std::fs::read_to_string(fx.join("ROOT_PATH"))
        .unwrap()
        .trim()
        .to_string()
}

/// `nix-store --dump` of a path of the fixture's chroot store.
fn nix_dump(fx: &Path, path: &str) -> Vec<u8> {
    let on_disk = fx.join("nix-root").join(path.trim_start_matches('/'));
    let o = Command::new("nix-store")
        .arg("--dump")
        .arg(&on_disk)
        .env("NIX_CONFIG", NIX_CONFIG)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    o.stdout
}

/// A daemon serving gRPC and the binary cache: (daemon, `http://127.0.0.1:PORT`).
fn daemon_with_http(extra: &[&str]) -> (Daemon, String) {
    let mut args = vec!["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let d = Daemon::start_with(&args);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = d
            .stderr_lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the daemon did not report its HTTP address");
        if let Some(url) = line.strip_prefix("arca daemon serving the Nix binary cache on ") {
            return (d, url.to_string());
        }
    }
}

/// A running `arca serve-cache`, stopped (SIGTERM, exit 0 checked) when dropped.
struct ServeCache {
    child: Option<Child>,
    url: String,
    _data: tempfile::TempDir,
}

impl ServeCache {
    /// Serves over the daemon's services, with `env` (e.g. NAR_INDEX_ADDR) and `args`.
    fn start(d: &Daemon, args: &[&str], env: &[(&str, &str)]) -> ServeCache {
        let data = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(arca_bin());
        cmd.arg("serve-cache")
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("BLOB_SERVICE_ADDR", &d.url)
            .env("DIRECTORY_SERVICE_ADDR", &d.url)
            .env("PATH_INFO_SERVICE_ADDR", &d.url)
            .env("ARCA_DATA_DIR", data.path())
            .env_remove("NAR_INDEX_ADDR")
            .env_remove("ARCA_STORE_COMPOSITION")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start arca serve-cache");
        let (tx, rx) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("[serve-cache] {line}");
                if tx.send(line).is_err() {
                    // Keep draining so the child never blocks on stderr.
                    continue;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("serve-cache did not report its address within 30 s");
            if let Some(url) = line.strip_prefix("arca serve-cache listening on ") {
                break url.to_string();
            }
        };
        ServeCache {
            child: Some(child),
            url,
            _data: data,
        }
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "serve-cache exited with {status} after SIGTERM"
                );
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("serve-cache did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServeCache {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        } else {
            self.stop();
        }
    }
}

/// A small blocking HTTP client.
struct Http {
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
}

struct Resp {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Resp {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    }
}

impl std::fmt::Debug for Resp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HTTP {} {:?} {:?}",
            self.status,
            self.headers,
            String::from_utf8_lossy(&self.body[..self.body.len().min(300)])
        )
    }
}

impl Http {
    fn new() -> Http {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap();
        Http { rt, client }
    }

    fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Resp {
        self.rt.block_on(async {
            let mut req = self
                .client
                .request(reqwest::Method::from_bytes(method.as_bytes()).unwrap(), url);
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            if let Some(b) = body {
                req = req.body(b);
            }
            let r = req
                .send()
                .await
                .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
            let status = r.status().as_u16();
            let headers = r.headers().clone();
            let body = r
                .bytes()
                .await
                .unwrap_or_else(|e| panic!("{method} {url}: reading the body: {e}"))
                .to_vec();
            Resp {
                status,
                headers,
                body,
            }
        })
    }

    fn get(&self, url: &str) -> Resp {
        self.send("GET", url, &[], None)
    }

    fn get_with(&self, url: &str, headers: &[(&str, &str)]) -> Resp {
        self.send("GET", url, headers, None)
    }

    fn head(&self, url: &str) -> Resp {
        self.send("HEAD", url, &[], None)
    }

    fn put(&self, url: &str, body: Vec<u8>) -> Resp {
        self.send("PUT", url, &[], Some(body))
    }

    fn post(&self, url: &str, body: Vec<u8>) -> Resp {
        self.send("POST", url, &[], Some(body))
    }
}

/// A narinfo text's field.
fn field(narinfo: &str, key: &str) -> Option<String> {
    narinfo
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}: ")).map(String::from))
}

fn decompress_zstd(data: &[u8]) -> Vec<u8> {
    zstd::stream::decode_all(data).expect("zstd")
}

/// Asserts a 4xx answer whose message contains `needle`.
fn assert_4xx(r: &Resp, status: u16, needle: &str, what: &str) {
    assert_eq!(r.status, status, "{what}: {r:?}");
    assert!(
        r.text().contains(needle),
        "{what}: {needle:?} not in {:?}",
        r.text()
    );
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("text/plain; charset=utf-8"),
        "{what}"
    );
}

/// A fixture cache's narinfo and NAR file for `path`: (narinfo text, NAR URL, NAR bytes).
fn cache_files(fx: &Path, cache: &str, path: &str) -> (String, String, Vec<u8>) {
    let ni = fx.join(cache).join(format!("{}.narinfo", hash_part(path)));
    let url = narinfo_field(&ni, "URL").unwrap();
    (
        std::fs::read_to_string(&ni).unwrap(),
        url.clone(),
        std::fs::read(fx.join(cache).join(&url)).unwrap(),
    )
}

/// Replaces a field of a narinfo text.
fn with_field(narinfo: &str, key: &str, value: &str) -> String {
    narinfo
        .lines()
        .map(|l| {
            if l.starts_with(&format!("{key}: ")) {
                format!("{key}: {value}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

// -------------------------------------------------------------------- tests

/// (a) `nix copy --from` Arca (serve-cache over a daemon, narinfos signed on
/// the fly) into an empty chroot store with signatures required, then
/// `nix-store --verify --check-contents` there.
#[test]
fn nix_copy_from_arca_with_signatures_required() {
    let Some(fx) = fixture() else { return };
    let t = tempfile::tempdir().unwrap();
    let (sk, public) = keypair(t.path(), "arca-http-test-1");
    let d = Daemon::start();
    fill_from_fixture(&d, &fx, "cache-xz");
    let mut cache = ServeCache::start(&d, &["--signing-key", sk.to_str().unwrap()], &[]);
    let root = root_path(&fx);

    // Arca's key trusted: the closure copies, and verifies with its contents.
    let store = format!("local?root={}", t.path().join("r").display());
    let xdg = t.path().join("xdg");
    nix_ok(
        &xdg,
        &[
            "nix",
            "copy",
            "--from",
            &cache.url,
            "--to",
            &store,
            "--option",
            "require-sigs",
            "true",
            "--option",
            "trusted-public-keys",
            &public,
            &root,
        ],
    );
    let verify = nix_ok(
        &xdg,
        &[
            "nix-store",
            "--store",
            &store,
            "--verify",
            "--check-contents",
        ],
    );
    assert!(!stderr(&verify).contains("error"), "{}", stderr(&verify));
    let info: serde_json::Value = serde_json::from_slice(
        &nix_ok(
            &xdg,
            &["nix", "path-info", "--store", &store, "--json", "-r", &root],
        )
        .stdout,
    )
    .unwrap();
    let m = manifest(&fx);
    assert_eq!(info.as_array().unwrap().len(), m.len());
    for p in info.as_array().unwrap() {
        let path = p["path"].as_str().unwrap();
        assert_eq!(p["narHash"].as_str().unwrap(), m[path].nar_hash, "{path}");
        let sigs: Vec<&str> = p["signatures"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        assert!(
            sigs.iter().any(|s| s.starts_with("arca-http-test-1:")),
            "{path}: {sigs:?}"
        );
    }

    // Another key trusted (the fixture's, which signed nothing here): refused.
    let store2 = format!("local?root={}", t.path().join("r2").display());
    let out = nix(
        &t.path().join("xdg2"),
        &[
            "nix",
            "copy",
            "--from",
            &cache.url,
            "--to",
            &store2,
            "--option",
            "require-sigs",
            "true",
            "--option",
            "trusted-public-keys",
            &public_key(&fx),
            &root,
        ],
    );
    assert!(!out.status.success(), "copied without a trusted signature");
    assert!(stderr(&out).contains("signature"), "{}", stderr(&out));
    cache.stop();
}

/// (b) `nix-build --max-jobs 0` substitutes the fixture from a daemon's
/// binary cache (`--http-listen`, `--signing-key`); upstream signatures are
/// kept beside Arca's.
#[test]
fn nix_build_substitutes_from_the_daemon() {
    let Some(fx) = fixture() else { return };
    let t = tempfile::tempdir().unwrap();
    let (sk, public) = keypair(t.path(), "arca-daemon-test-1");
    let (mut d, url) = daemon_with_http(&["--signing-key", sk.to_str().unwrap()]);
    fill_from_fixture(&d, &fx, "cache-xz-signed");

    let http = Http::new();
    for p in closure(&fx) {
        let r = http.get(&format!("{url}/{}.narinfo", hash_part(&p)));
        assert_eq!(r.status, 200, "{p}: {r:?}");
        let text = r.text();
        let sigs: Vec<&str> = text.lines().filter(|l| l.starts_with("Sig: ")).collect();
        assert!(
            sigs.iter().any(|s| s.starts_with("Sig: arca-fixture-1:")),
            "upstream signature kept: {text}"
        );
        assert!(
            sigs.iter()
                .any(|s| s.starts_with("Sig: arca-daemon-test-1:")),
            "signed by Arca: {text}"
        );
    }

    let store = format!("local?root={}", t.path().join("built").display());
    let expr = fx.join("expr/default.nix");
    let out = nix_ok(
        &t.path().join("xdg"),
        &[
            "nix-build",
            "--store",
            &store,
            "--no-out-link",
            "--max-jobs",
            "0",
            "--option",
            "substituters",
            &url,
            "--option",
            "trusted-public-keys",
            &public,
            expr.to_str().unwrap(),
            "-A",
            "link",
        ],
    );
    assert_eq!(stdout(&out).trim(), root_path(&fx));
    nix_ok(
        &t.path().join("xdg"),
        &[
            "nix",
            "store",
            "verify",
            "--store",
            &store,
            "--trusted-public-keys",
            &public,
            "-r",
            &root_path(&fx),
        ],
    );
    assert!(d.stop().success());
}

/// (c) `nix copy --to 'http://…?compression=C'` for every compression of
/// narinfos (none, xz, zstd, bzip2, br, and gzip, which Nix names `.nar`)
/// into an empty Arca: `arca nar dump` and the NAR served over HTTP equal
/// `nix-store --dump` of each path. An lz4 upload is refused and stores nothing.
#[test]
fn nix_copy_to_arca_in_every_compression() {
    let Some(fx) = fixture() else { return };
    let t = tempfile::tempdir().unwrap();
    let root = root_path(&fx);
    let paths = closure(&fx);
    let m = manifest(&fx);
    let http = Http::new();
    let source = format!("local?root={}", fx.join("nix-root").display());
    for c in ["none", "xz", "zstd", "bzip2", "br", "gzip"] {
        let (mut d, url) = daemon_with_http(&[]);
        nix_ok(
            &t.path().join(format!("xdg-{c}")),
            &[
                "nix",
                "copy",
                "--from",
                &source,
                "--to",
                &format!("{url}?compression={c}"),
                &root,
            ],
        );
        let client = tempfile::tempdir().unwrap();
        for p in &paths {
            let want = nix_dump(&fx, p);
            let dump = arca(&d, client.path(), &["nar", "dump", p]);
            assert!(dump.status.success(), "{c} {p}: {}", stderr(&dump));
            assert!(
                dump.stdout == want,
                "{c}: arca nar dump of {p} differs from nix-store --dump"
            );

            let ni = http.get(&format!("{url}/{}.narinfo", hash_part(p)));
            assert_eq!(ni.status, 200, "{c} {p}: {ni:?}");
            let text = ni.text();
            let nar_hash = field(&text, "NarHash").unwrap();
            assert_eq!(field(&text, "NarSize").unwrap(), m[p].nar_size.to_string());
            assert_eq!(field(&text, "Compression").as_deref(), Some("zstd"));
            let nar_url = field(&text, "URL").unwrap();
            assert_eq!(
                nar_url,
                format!("nar/{}.nar.zst", nar_hash.trim_start_matches("sha256:"))
            );
            let zst = http.get(&format!("{url}/{nar_url}"));
            assert_eq!(zst.status, 200, "{zst:?}");
            assert!(
                decompress_zstd(&zst.body) == want,
                "{c}: zstd NAR of {p} served over HTTP differs"
            );
            let plain = http.get(&format!("{url}/{}", nar_url.trim_end_matches(".zst")));
            assert!(
                plain.body == want,
                "{c}: NAR of {p} served over HTTP differs"
            );
        }
        // Uploaded again: Nix finds every narinfo and uploads nothing.
        let again = nix_ok(
            &t.path().join(format!("xdg2-{c}")),
            &[
                "nix",
                "copy",
                "--from",
                &source,
                "--to",
                &format!("{url}?compression={c}"),
                &root,
            ],
        );
        assert!(
            !stderr(&again).contains("copying path"),
            "{}",
            stderr(&again)
        );
        assert!(d.stop().success());
    }

    let (mut d, url) = daemon_with_http(&[]);
    let out = nix(
        &t.path().join("xdg-lz4"),
        &[
            "nix",
            "copy",
            "--from",
            &source,
            "--to",
            &format!("{url}?compression=lz4"),
            &root,
        ],
    );
    assert!(!out.status.success(), "an lz4 upload was accepted");
    assert!(stderr(&out).contains("400"), "{}", stderr(&out));
    for p in &paths {
        assert_eq!(
            http.get(&format!("{url}/{}.narinfo", hash_part(p))).status,
            404,
            "{p} stored from an lz4 upload"
        );
    }
    assert!(d.stop().success());
}

/// (d) Range requests on uncompressed NARs: first bytes, middle, suffix,
/// open end, unsatisfiable (416), If-Range, HEAD; headers of every kind of file.
#[test]
fn range_requests_and_headers() {
    let Some(fx) = fixture() else { return };
    let d = Daemon::start();
    fill_from_fixture(&d, &fx, "cache-xz");
    let mut cache = ServeCache::start(&d, &["--nar-compression", "none", "--priority", "7"], &[]);
    let http = Http::new();
    let url = &cache.url;

    let info = http.get(&format!("{url}/nix-cache-info"));
    assert_eq!(info.status, 200);
    assert_eq!(
        info.header("content-type").as_deref(),
        Some("text/x-nix-cache-info")
    );
    assert_eq!(
        info.text(),
        "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 7\n"
    );

    // The largest path of the closure (the leaf, with a 2 MB file).
    let m = manifest(&fx);
    let leaf = m.values().max_by_key(|e| e.nar_size).unwrap().path.clone();
    let ni = http.get(&format!("{url}/{}.narinfo", hash_part(&leaf)));
    assert_eq!(ni.status, 200);
    assert_eq!(
        ni.header("content-type").as_deref(),
        Some("text/x-nix-narinfo")
    );
    assert!(ni.header("cache-control").unwrap().contains("max-age"));
    let text = ni.text();
    assert_eq!(field(&text, "Compression").as_deref(), Some("none"));
    assert!(field(&text, "FileHash").is_none() && field(&text, "FileSize").is_none());
    let nar_url = format!("{url}/{}", field(&text, "URL").unwrap());
    assert!(nar_url.ends_with(".nar"), "{nar_url}");
    let head = http.head(&format!("{url}/{}.narinfo", hash_part(&leaf)));
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());

    let full = http.get(&nar_url);
    assert_eq!(full.status, 200);
    let want = nix_dump(&fx, &leaf);
    assert!(full.body == want);
    let len = want.len();
    assert_eq!(
        full.header("content-type").as_deref(),
        Some("application/x-nix-nar")
    );
    assert_eq!(
        full.header("cache-control").as_deref(),
        Some("public, max-age=31536000, immutable")
    );
    assert_eq!(full.header("accept-ranges").as_deref(), Some("bytes"));
    assert_eq!(full.header("content-length"), Some(len.to_string()));
    let etag = full.header("etag").unwrap();

    let h = http.head(&nar_url);
    assert_eq!(h.status, 200);
    assert_eq!(h.header("content-length"), Some(len.to_string()));
    assert!(h.body.is_empty());

    for (range, start, end) in [
        ("bytes=0-99".to_string(), 0, 99),
        ("bytes=1000-200999".to_string(), 1000, 200_999),
        ("bytes=-1234".to_string(), len - 1234, len - 1),
        (format!("bytes={}-", len - 5000), len - 5000, len - 1),
        (format!("bytes=100-{}", len + 100), 100, len - 1),
        (format!("bytes={}-{}", len - 1, len - 1), len - 1, len - 1),
    ] {
        let r = http.get_with(&nar_url, &[("Range", &range)]);
        assert_eq!(r.status, 206, "{range}: {r:?}");
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes {start}-{end}/{len}")),
            "{range}"
        );
        assert_eq!(
            r.header("content-length"),
            Some((end - start + 1).to_string()),
            "{range}"
        );
        assert!(r.body == want[start..=end], "{range}: wrong bytes");
    }
    for range in [
        format!("bytes={len}-"),
        format!("bytes={}-{}", len + 10, len + 20),
        "bytes=-0".to_string(),
    ] {
        let r = http.get_with(&nar_url, &[("Range", &range)]);
        assert_eq!(r.status, 416, "{range}: {r:?}");
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes */{len}")),
            "{range}"
        );
    }
    // A different validator, several ranges, other units: the whole NAR.
    for (k, v) in [
        ("If-Range", "\"other\""),
        ("Range", "bytes=0-1,5-6"),
        ("Range", "lines=1-2"),
    ] {
        let mut headers = vec![(k, v)];
        if k == "If-Range" {
            headers.push(("Range", "bytes=0-9"));
        }
        let r = http.get_with(&nar_url, &headers);
        assert_eq!(r.status, 200, "{k}: {v}");
        assert!(r.body == want);
    }
    let r = http.get_with(&nar_url, &[("Range", "bytes=0-9"), ("If-Range", &etag)]);
    assert_eq!(r.status, 206);

    // Compressed variants: no ranges, same content.
    let zst = http.get_with(&format!("{nar_url}.zst"), &[("Range", "bytes=0-9")]);
    assert_eq!(zst.status, 200);
    assert_eq!(zst.header("accept-ranges").as_deref(), Some("none"));
    assert!(decompress_zstd(&zst.body) == want);
    let zh = http.head(&format!("{nar_url}.zst"));
    assert_eq!(zh.status, 200);
    assert!(zh.body.is_empty());

    // Absent things: 404, not cached.
    let missing = http.get(&format!("{url}/{}.narinfo", "0".repeat(32)));
    assert_4xx(&missing, 404, "no path with hash", "absent narinfo");
    assert_eq!(missing.header("cache-control").as_deref(), Some("no-cache"));
    let missing = http.get(&format!("{url}/nar/{}.nar", "0".repeat(52)));
    assert_4xx(&missing, 404, "no NAR", "absent NAR");
    cache.stop();
}

/// (e) Every bad request gets a 4xx with a message naming the problem, and
/// stores nothing; the server keeps serving.
#[test]
fn bad_requests_get_4xx_and_store_nothing() {
    let Some(fx) = fixture() else { return };
    let (mut d, url) = daemon_with_http(&[]);
    let http = Http::new();
    let client = tempfile::tempdir().unwrap();
    let m = manifest(&fx);
    // base: a single file without references; leaf refers to base and note.txt.
    let base = m
        .keys()
        .find(|p| p.ends_with("-fixture-base"))
        .unwrap()
        .clone();
    let leaf = m
        .keys()
        .find(|p| p.ends_with("-fixture-leaf"))
        .unwrap()
        .clone();
    let (base_ni, base_url, base_nar) = cache_files(&fx, "cache-xz", &base);
    let (leaf_ni, leaf_url, leaf_nar) = cache_files(&fx, "cache-xz", &leaf);
    let (_, _, base_plain) = cache_files(&fx, "cache-none", &base);
    let (_, _, leaf_plain) = cache_files(&fx, "cache-none", &leaf);
    let h52 = |data: &[u8]| {
        use sha2::Digest;
        arca_store::nixbase32::encode(&sha2::Sha256::digest(data))
    };

    // Malformed names.
    for (method, path, needle) in [
        ("GET", "/abc.narinfo".to_string(), "malformed narinfo name"),
        (
            "GET",
            format!("/{}.narinfo", "e".repeat(32)),
            "malformed narinfo name",
        ),
        ("HEAD", format!("/{}.narinfo", "0".repeat(31)), ""),
        ("PUT", "/x.narinfo".to_string(), "malformed narinfo name"),
        ("GET", "/nar/xyz.nar".to_string(), "malformed NAR file name"),
        (
            "PUT",
            "/nar/xyz.nar.xz".to_string(),
            "malformed NAR file name",
        ),
        (
            "GET",
            format!("/nar/{}.tar", "0".repeat(52)),
            "malformed NAR file name",
        ),
        (
            "PUT",
            format!("/nar/{}.nar%2e.xz", "0".repeat(52)),
            "malformed NAR file name",
        ),
        (
            "GET",
            format!("/nar/{}.nar.lzip", "0".repeat(52)),
            "unknown compression",
        ),
        (
            "PUT",
            "/nar/..%2F..%2Fetc%2Fpasswd.nar".to_string(),
            "malformed NAR file name",
        ),
        ("POST", "/_arca/narinfos".to_string(), "malformed hash part"),
    ] {
        let body = if method == "POST" {
            Some(b"[\"not-a-hash\"]".to_vec())
        } else if method == "PUT" {
            Some(b"x".to_vec())
        } else {
            None
        };
        let r = http.send(method, &format!("{url}{path}"), &[], body);
        assert_eq!(r.status, 400, "{method} {path}: {r:?}");
        if method != "HEAD" {
            assert!(r.text().contains(needle), "{method} {path}: {:?}", r.text());
        }
    }
    assert_4xx(
        &http.get(&format!("{url}/some/thing")),
        404,
        "no such file",
        "unknown path",
    );
    assert_4xx(
        &http.send("DELETE", &format!("{url}/nix-cache-info"), &[], None),
        405,
        "not allowed",
        "DELETE",
    );

    // Unknown compression.
    let r = http.put(
        &format!("{url}/nar/{}.nar.lz4", h52(&base_nar)),
        base_nar.clone(),
    );
    assert_4xx(&r, 400, "unknown compression", "lz4 upload");

    // Truncated NAR upload (uncompressed and xz), corrupt xz, wrong name, trailing garbage.
    let trunc = &leaf_plain[..leaf_plain.len() - 24];
    let r = http.put(
        &format!("{url}/nar/{}.nar", h52(&leaf_plain)),
        trunc.to_vec(),
    );
    assert_4xx(&r, 400, "truncated NAR", "truncated upload");
    assert_eq!(
        http.head(&format!("{url}/nar/{}.nar", h52(&leaf_plain)))
            .status,
        404,
        "nothing recorded for a truncated NAR"
    );
    let r = http.put(
        &format!("{url}/nar/{}.nar.xz", h52(&leaf_nar)),
        leaf_nar[..leaf_nar.len() / 2].to_vec(),
    );
    assert_eq!(r.status, 400, "half an xz file: {r:?}");
    let r = http.put(
        &format!("{url}/nar/{}.nar.xz", h52(b"garbage")),
        b"garbage, not xz".to_vec(),
    );
    assert_4xx(&r, 400, "decompressing (xz)", "corrupt xz");
    let r = http.put(
        &format!("{url}/nar/{}.nar", "1".repeat(52)),
        base_plain.clone(),
    );
    assert_4xx(&r, 400, "hash mismatch", "misnamed NAR");
    let mut trailing = base_plain.clone();
    trailing.extend_from_slice(&[0u8; 8]);
    let r = http.put(&format!("{url}/nar/{}.nar", h52(&trailing)), trailing);
    assert_4xx(&r, 400, "invalid NAR", "trailing bytes");

    // A narinfo whose NAR was never uploaded.
    let r = http.put(
        &format!("{url}/{}.narinfo", hash_part(&base)),
        base_ni.clone().into_bytes(),
    );
    assert_4xx(&r, 400, "never uploaded", "narinfo before its NAR");
    assert_eq!(
        http.get(&format!("{url}/{}.narinfo", hash_part(&base)))
            .status,
        404
    );

    // The NARs themselves are fine.
    let r = http.put(&format!("{url}/{base_url}"), base_nar.clone());
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(
        http.head(&format!("{url}/{base_url}")).status,
        200,
        "an uploaded NAR exists (Nix skips it)"
    );
    let r = http.put(&format!("{url}/{leaf_url}"), leaf_nar.clone());
    assert_eq!(r.status, 204, "{r:?}");

    // Narinfos that disagree with their NAR, or with their URL, or are too big or garbled.
    let other_hash = field(&leaf_ni, "NarHash").unwrap();
    let base_size: u64 = field(&base_ni, "NarSize").unwrap().parse().unwrap();
    for (body, to, status, needle) in [
        (
            with_field(&base_ni, "NarHash", &other_hash),
            hash_part(&base).to_string(),
            400,
            "NarHash mismatch",
        ),
        (
            with_field(&base_ni, "NarSize", &(base_size + 8).to_string()),
            hash_part(&base).to_string(),
            400,
            "NarSize mismatch",
        ),
        (
            with_field(&base_ni, "FileSize", "1"),
            hash_part(&base).to_string(),
            400,
            "FileSize mismatch",
        ),
        (
            with_field(&base_ni, "Compression", "bzip2"),
            hash_part(&base).to_string(),
            400,
            "Compression mismatch",
        ),
        (
            base_ni.clone(),
            hash_part(&leaf).to_string(),
            400,
            "StorePath mismatch",
        ),
        (
            format!("{base_ni}X-Padding: {}\n", "x".repeat(70 * 1024)),
            hash_part(&base).to_string(),
            413,
            "larger than 65536 bytes",
        ),
        (
            "StorePath: nonsense\n".to_string(),
            hash_part(&base).to_string(),
            400,
            "invalid narinfo",
        ),
        (
            with_field(&base_ni, "Compression", "lz4"),
            hash_part(&base).to_string(),
            400,
            "invalid narinfo",
        ),
    ] {
        let r = http.put(&format!("{url}/{to}.narinfo"), body.into_bytes());
        assert_4xx(&r, status, needle, needle);
    }
    // References must be stored first: leaf before base is refused.
    let r = http.put(
        &format!("{url}/{}.narinfo", hash_part(&leaf)),
        leaf_ni.clone().into_bytes(),
    );
    assert_4xx(
        &r,
        400,
        "which is not stored",
        "narinfo before its references",
    );

    // Nothing of the above was stored.
    for p in [&base, &leaf] {
        assert_eq!(
            http.get(&format!("{url}/{}.narinfo", hash_part(p))).status,
            404,
            "{p}"
        );
        let o = arca(&d, client.path(), &["path-info", p]);
        assert_eq!(o.status.code(), Some(1), "{p} stored: {}", stdout(&o));
    }

    // Batch limits.
    let many: Vec<String> = (0..5001).map(|_| "0".repeat(32)).collect();
    let r = http.post(
        &format!("{url}/_arca/narinfos"),
        serde_json::to_vec(&many).unwrap(),
    );
    assert_4xx(&r, 413, "at most 5000", "batch too long");
    let r = http.post(&format!("{url}/_arca/narinfos"), vec![b'['; 600 * 1024]);
    assert_4xx(&r, 413, "larger than", "batch too large");

    // The server is alive and a correct upload works.
    let r = http.put(
        &format!("{url}/{}.narinfo", hash_part(&base)),
        base_ni.clone().into_bytes(),
    );
    assert_eq!(r.status, 204, "{r:?}");
    let served = http.get(&format!("{url}/{}.narinfo", hash_part(&base)));
    assert_eq!(served.status, 200);
    assert!(
        decompress_zstd(
            &http
                .get(&format!("{url}/{}", field(&served.text(), "URL").unwrap()))
                .body
        ) == base_plain
    );
    assert_eq!(http.get(&format!("{url}/nix-cache-info")).status, 200);
    assert!(d.stop().success());
}

/// (f) Two `serve-cache` replicas over one daemon, sharing an object-store
/// NAR index: one takes every NAR upload, the other every narinfo; both
/// serve the result, Nix copies from either; a replica with its own index
/// cannot see the uploads.
#[test]
fn two_replicas_share_uploads_through_the_nar_index() {
    let Some(fx) = fixture() else { return };
    let t = tempfile::tempdir().unwrap();
    let d = Daemon::start();
    let index = format!("objectstore+file://{}/narindex", t.path().display());
    let mut a = ServeCache::start(&d, &[], &[("NAR_INDEX_ADDR", &index)]);
    let mut b = ServeCache::start(&d, &[], &[("NAR_INDEX_ADDR", &index)]);
    let mut lone = ServeCache::start(&d, &[], &[]);
    let http = Http::new();
    let paths = closure(&fx);

    // The first narinfo at a replica that never saw the NAR (own sled index): refused.
    let (ni0, url0, nar0) = cache_files(&fx, "cache-xz", &paths[0]);
    assert_eq!(http.put(&format!("{}/{url0}", a.url), nar0).status, 204);
    let r = http.put(
        &format!("{}/{}.narinfo", lone.url, hash_part(&paths[0])),
        ni0.into_bytes(),
    );
    assert_4xx(&r, 400, "never uploaded", "replica with its own index");

    for p in &paths {
        let (ni, nar_url, nar) = cache_files(&fx, "cache-xz", p);
        let r = http.put(&format!("{}/{nar_url}", a.url), nar);
        assert_eq!(r.status, 204, "NAR of {p} to A: {r:?}");
        let r = http.put(
            &format!("{}/{}.narinfo", b.url, hash_part(p)),
            ni.into_bytes(),
        );
        assert_eq!(r.status, 204, "narinfo of {p} to B: {r:?}");
    }
    for p in &paths {
        let (_, _, want) = cache_files(&fx, "cache-none", p);
        for (served_by, fetched_from) in [(&a, &b), (&b, &a)] {
            let ni = http.get(&format!("{}/{}.narinfo", served_by.url, hash_part(p)));
            assert_eq!(ni.status, 200, "{p}");
            let nar = http.get(&format!(
                "{}/{}",
                fetched_from.url,
                field(&ni.text(), "URL").unwrap()
            ));
            assert_eq!(nar.status, 200, "{p}");
            assert!(decompress_zstd(&nar.body) == want, "{p}");
        }
    }

    // A path that never went through HTTP (arca import): its narinfo served by
    // A records its NarHash in the shared index, so B serves the NAR.
    let tree = t.path().join("imported");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("sub/file"), common::bytes_for(7, 300_000)).unwrap();
    let client = tempfile::tempdir().unwrap();
    let o = arca(&d, client.path(), &["import", tree.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let imported = stdout(&o).trim().to_string();
    let ni = http.get(&format!("{}/{}.narinfo", a.url, hash_part(&imported)));
    assert_eq!(ni.status, 200);
    let nar = http.get(&format!(
        "{}/{}",
        b.url,
        field(&ni.text(), "URL").unwrap().trim_end_matches(".zst")
    ));
    assert_eq!(nar.status, 200, "{nar:?}");
    let dump = Command::new("nix-store")
        .arg("--dump")
        .arg(&tree)
        .output()
        .unwrap();
    assert!(nar.body == dump.stdout);

    // Nix copies the uploaded closure from B.
    let store = format!("local?root={}", t.path().join("r").display());
    nix_ok(
        &t.path().join("xdg"),
        &[
            "nix",
            "copy",
            "--no-check-sigs",
            "--from",
            &b.url,
            "--to",
            &store,
            &root_path(&fx),
        ],
    );
    nix_ok(
        &t.path().join("xdg"),
        &[
            "nix-store",
            "--store",
            &store,
            "--verify",
            "--check-contents",
        ],
    );
    a.stop();
    b.stop();
    lone.stop();
}

/// (g) The batch lookup: `POST /_arca/narinfos` with a JSON list or one hash
/// per line answers `{hash: narinfo | null}`, the narinfos as GET serves them.
#[test]
fn batch_lookup() {
    let Some(fx) = fixture() else { return };
    let (mut d, url) = daemon_with_http(&[]);
    fill_from_fixture(&d, &fx, "cache-xz");
    let http = Http::new();
    let paths = closure(&fx);
    let mut hashes: Vec<String> = paths.iter().map(|p| hash_part(p).to_string()).collect();
    let absent = "0".repeat(32);
    hashes.push(absent.clone());
    hashes.push(hashes[0].clone());

    let json = http.post(
        &format!("{url}/_arca/narinfos"),
        serde_json::to_vec(&hashes).unwrap(),
    );
    assert_eq!(json.status, 200, "{json:?}");
    assert_eq!(
        json.header("content-type").as_deref(),
        Some("application/json")
    );
    let answer: serde_json::Value = serde_json::from_slice(&json.body).unwrap();
    let map = answer.as_object().unwrap();
    assert_eq!(map.len(), paths.len() + 1);
    assert_eq!(map[&absent], serde_json::Value::Null);
    for p in &paths {
        let h = hash_part(p);
        let get = http.get(&format!("{url}/{h}.narinfo"));
        assert_eq!(map[h].as_str().unwrap(), get.text(), "{p}");
    }
    let lines = http.post(
        &format!("{url}/_arca/narinfos"),
        hashes.join("\n").into_bytes(),
    );
    assert_eq!(lines.status, 200);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&lines.body).unwrap(),
        answer
    );
    let empty = http.post(&format!("{url}/_arca/narinfos"), b"[]".to_vec());
    assert_eq!(empty.text(), "{}");
    assert_4xx(
        &http.get(&format!("{url}/_arca/narinfos")),
        405,
        "not allowed",
        "GET batch",
    );
    assert!(d.stop().success());
}
