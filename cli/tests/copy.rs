//! `arca copy` from real Nix binary caches (the fixture's, served over
//! loopback HTTP) into a real daemon, and a daemon whose path-info service
//! reads through from a binary cache.
mod common;
#[path = "../../store/tests/common/mod.rs"]
mod store_common;

use common::{stderr, stdout, Daemon};
use std::path::{Path, PathBuf};
use std::process::Output;
use store_common::{
    closure, copy_dir, fixture, hash_part, narinfo_field, public_key, set_narinfo_field,
    CacheServer,
};

/// Runs `arca` against the daemon's three services, with its own data dir
/// (for the client's NAR index).
fn arca(d: &Daemon, client_data: &Path, args: &[&str]) -> Output {
    d.arca_client(client_data, args)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// The uncompressed NAR of `path` in the fixture's `cache-none`.
fn nar_of(fx: &Path, path: &str) -> Vec<u8> {
    let none = fx.join("cache-none");
    let url = narinfo_field(&none.join(format!("{}.narinfo", hash_part(path))), "URL").unwrap();
    std::fs::read(none.join(url)).unwrap()
}

fn root_path(fx: &Path) -> String {
    std::fs::read_to_string(fx.join("ROOT_PATH"))
        .unwrap()
        .trim()
        .to_string()
}

/// Whether the daemon has `path` (by `arca path-info`).
fn has_path(d: &Daemon, client: &Path, path: &str) -> bool {
    let o = arca(d, client, &["path-info", path]);
    match o.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!("path-info {path}: {}", stderr(&o)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_every_fixture_cache_byte_identical() {
    let Some(fx) = fixture() else { return };
    let server = CacheServer::start(&fx).await;
    let key = public_key(&fx);
    let root = root_path(&fx);
    let paths = closure(&fx);
    assert!(paths.len() >= 6);
    for (cache, keys) in [
        ("cache-xz", None),
        ("cache-zstd", None),
        ("cache-none", None),
        ("cache-xz-signed", Some(&key)),
    ] {
        let from = match keys {
            Some(k) => format!("nix+{}?trusted-public-keys={k}", server.url(cache)),
            None => format!("nix+{}", server.url(cache)),
        };
        let (fx2, root2, paths2) = (fx.clone(), root.clone(), paths.clone());
        blocking(move || {
            let d = Daemon::start();
            let client = tempfile::tempdir().unwrap();
            let o = arca(
                &d,
                client.path(),
                &["copy", "--json", "--from", &from, &root2],
            );
            assert!(o.status.success(), "{cache}: {}", stderr(&o));
            let summary: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
            assert_eq!(summary["copied"], paths2.len(), "{cache}: {summary}");
            assert!(
                stderr(&o).contains(&format!("copied {} paths", paths2.len())),
                "{}",
                stderr(&o)
            );
            for p in &paths2 {
                let dump = arca(&d, client.path(), &["nar", "dump", p]);
                assert!(dump.status.success(), "{cache} {p}: {}", stderr(&dump));
                assert!(
                    dump.stdout == nar_of(&fx2, p),
                    "{cache}: NAR of {p} differs from cache-none's"
                );
            }
            // A second copy finds everything present and fetches nothing.
            let o = arca(
                &d,
                client.path(),
                &["copy", "--json", "--from", &from, &root2],
            );
            assert!(o.status.success(), "{}", stderr(&o));
            let summary: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
            assert_eq!(summary["copied"], 0);
            assert_eq!(
                summary["alreadyPresent"], 1,
                "the root is present: its closure is not walked"
            );
        })
        .await;
    }
    assert!(server.nar_requests() >= 4 * paths.len());
}

/// A copy of the fixture with one cache tampered with by `tamper`.
fn tampered(fx: &Path, cache: &str, tamper: impl FnOnce(&Path)) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fx.join(cache), &dir.path().join(cache));
    tamper(&dir.path().join(cache));
    let root = dir.path().to_path_buf();
    (dir, root)
}

/// Copies the fixture closure from a tampered cache: the copy fails naming
/// `victim` and `needle`; neither the victim nor anything depending on it is
/// stored, the rest is (but for paths only reachable through the victim when
/// its narinfo is refused: `walks_victim` false); then, from the intact cache, the copy completes
/// without fetching again the NARs of what was stored.
async fn refused_then_resumed(
    fx: &Path,
    cache: &str,
    keys: Option<String>,
    victim: &str,
    needle: &str,
    walks_victim: bool,
    tamper: impl FnOnce(&Path),
) {
    let (_keep, root_dir) = tampered(fx, cache, tamper);
    let server = CacheServer::start(&root_dir).await;
    let from = match keys {
        Some(k) => format!("nix+{}?trusted-public-keys={k}", server.url(cache)),
        None => format!("nix+{}", server.url(cache)),
    };
    let root = root_path(fx);
    let paths = closure(fx);
    let manifest = store_common::manifest(fx);
    let victim = victim.to_string();
    let needle = needle.to_string();
    let d = blocking(Daemon::start).await;
    let client = tempfile::tempdir().unwrap();
    let client_path = client.path().to_path_buf();
    let (d, stored_before) = {
        let (from, root, victim, needle, client_path) = (
            from.clone(),
            root.clone(),
            victim.clone(),
            needle,
            client_path.clone(),
        );
        blocking(move || {
            let o = arca(&d, &client_path, &["copy", "--from", &from, &root]);
            assert_eq!(
                o.status.code(),
                Some(1),
                "tampered copy must fail: {}",
                stderr(&o)
            );
            let err = stderr(&o);
            assert!(
                err.contains(&victim) && err.contains(&needle),
                "error must name {victim} and {needle}: {err}"
            );
            // What depends on the victim, transitively, including itself.
            let mut tainted = std::collections::HashSet::from([victim.clone()]);
            loop {
                let before = tainted.len();
                for (p, e) in &manifest {
                    if e.references.iter().any(|r| r != p && tainted.contains(r)) {
                        tainted.insert(p.clone());
                    }
                }
                if tainted.len() == before {
                    break;
                }
            }
            // What the walk can discover from the root.
            let mut reachable = std::collections::HashSet::from([root.clone()]);
            let mut queue = vec![root.clone()];
            while let Some(p) = queue.pop() {
                if p == victim && !walks_victim {
                    continue;
                }
                for r in &manifest[&p].references {
                    if reachable.insert(r.clone()) {
                        queue.push(r.clone());
                    }
                }
            }
            let mut stored = Vec::new();
            for p in &paths {
                let has = has_path(&d, &client_path, p);
                let expected = reachable.contains(p) && !tainted.contains(p);
                assert_eq!(
                    has,
                    expected,
                    "{p}: stored={has}, depends on the bad path={}",
                    tainted.contains(p)
                );
                if has {
                    stored.push(p.clone());
                }
            }
            (d, stored)
        })
        .await
    };
    // Fixed upstream: the copy resumes.
    server.set_root(fx);
    let before = server.requests().len();
    let requests_before = server.requests();
    let (root2, client2) = (root.clone(), client_path.clone());
    let d = blocking(move || {
        let o = arca(&d, &client2, &["copy", "--from", &from, &root2]);
        assert!(
            o.status.success(),
            "copy from the intact cache: {}",
            stderr(&o)
        );
        d
    })
    .await;
    let after: Vec<String> = server.requests()[before..].to_vec();
    for p in &stored_before {
        let h = hash_part(p);
        let nar = narinfo_field(&fx.join(cache).join(format!("{h}.narinfo")), "URL").unwrap();
        assert!(
            !after.iter().any(|r| r.ends_with(&nar)),
            "NAR of {p} (stored already) fetched again: {after:?}"
        );
        assert!(
            !after.iter().any(|r| r.ends_with(&format!("{h}.narinfo"))),
            "{p} looked up again upstream"
        );
    }
    assert!(!requests_before.is_empty());
    let paths = closure(fx);
    blocking(move || {
        for p in &paths {
            assert!(
                has_path(&d, &client_path, p),
                "{p} missing after the resumed copy"
            );
        }
        drop(client);
    })
    .await;
}

/// The closure's first path with no references but itself (a leaf).
fn leaf(fx: &Path) -> String {
    let manifest = store_common::manifest(fx);
    closure(fx)
        .into_iter()
        .find(|p| manifest[p].references.iter().all(|r| r == p))
        .expect("a leaf")
}

/// A path with references (not the root): tampering it leaves dependents unstored.
fn middle(fx: &Path) -> String {
    let manifest = store_common::manifest(fx);
    let root = root_path(fx);
    closure(fx)
        .into_iter()
        .find(|p| *p != root && manifest[p].references.iter().any(|r| r != p))
        .expect("a path with references below the root")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_nar_is_refused_and_the_copy_resumes() {
    let Some(fx) = fixture() else { return };
    // A path with references and a large NAR: a byte in the middle of it is file content.
    let victim = middle(&fx);
    let h = hash_part(&victim).to_string();
    refused_then_resumed(
        &fx,
        "cache-none",
        None,
        &victim,
        "NarHash mismatch",
        true,
        |c| {
            let nar = c.join(narinfo_field(&c.join(format!("{h}.narinfo")), "URL").unwrap());
            let mut bytes = std::fs::read(&nar).unwrap();
            assert!(
                bytes.len() > 100_000,
                "{victim}: NAR of {} bytes",
                bytes.len()
            );
            let n = bytes.len() / 2;
            bytes[n] ^= 0x20;
            std::fs::write(&nar, bytes).unwrap();
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_narinfo_fails_its_signature() {
    let Some(fx) = fixture() else { return };
    let victim = middle(&fx);
    let h = hash_part(&victim).to_string();
    let key = public_key(&fx);
    refused_then_resumed(
        &fx,
        "cache-xz-signed",
        Some(key),
        &victim,
        "signature",
        false,
        |c| {
            let ni = c.join(format!("{h}.narinfo"));
            let size: u64 = narinfo_field(&ni, "NarSize").unwrap().parse().unwrap();
            set_narinfo_field(&ni, "NarSize", Some(&(size + 8).to_string()));
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn narinfo_for_another_path_is_refused() {
    let Some(fx) = fixture() else { return };
    let victim = leaf(&fx);
    let other = closure(&fx).into_iter().find(|p| *p != victim).unwrap();
    let (hv, ho) = (
        hash_part(&victim).to_string(),
        hash_part(&other).to_string(),
    );
    refused_then_resumed(
        &fx,
        "cache-xz",
        None,
        &victim,
        "StorePath mismatch",
        false,
        |c| {
            std::fs::copy(
                c.join(format!("{ho}.narinfo")),
                c.join(format!("{hv}.narinfo")),
            )
            .unwrap();
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_signature_is_refused() {
    let Some(fx) = fixture() else { return };
    let victim = middle(&fx);
    let h = hash_part(&victim).to_string();
    let key = public_key(&fx);
    refused_then_resumed(
        &fx,
        "cache-xz-signed",
        Some(key),
        &victim,
        "signature",
        false,
        |c| {
            set_narinfo_field(&c.join(format!("{h}.narinfo")), "Sig", None);
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signature_by_an_untrusted_key_is_refused() {
    let Some(fx) = fixture() else { return };
    // A key of another fixture run: same name, other key.
    let other_key = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../store/tests/data/keys/public.key"),
    )
    .unwrap();
    assert_ne!(other_key.trim(), public_key(&fx).trim());
    let server = CacheServer::start(&fx).await;
    let from = format!(
        "nix+{}?trusted-public-keys={}",
        server.url("cache-xz-signed"),
        other_key.trim()
    );
    let root = root_path(&fx);
    let paths = closure(&fx);
    blocking(move || {
        let d = Daemon::start();
        let client = tempfile::tempdir().unwrap();
        let o = arca(&d, client.path(), &["copy", "--from", &from, &root]);
        assert_eq!(o.status.code(), Some(1));
        assert!(
            stderr(&o).contains("signature check failed"),
            "{}",
            stderr(&o)
        );
        for p in &paths {
            assert!(
                !has_path(&d, client.path(), p),
                "{p} stored without a trusted signature"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_closure_copies_only_the_named_path() {
    let Some(fx) = fixture() else { return };
    let server = CacheServer::start(&fx).await;
    let from = format!("nix+{}", server.url("cache-zstd"));
    let leaf = leaf(&fx);
    let root = root_path(&fx);
    blocking(move || {
        let d = Daemon::start();
        let client = tempfile::tempdir().unwrap();
        let o = arca(
            &d,
            client.path(),
            &["copy", "--no-closure", "--from", &from, &leaf],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(has_path(&d, client.path(), &leaf));
        // The root's references are not in the store: the daemon refuses it.
        let o = arca(
            &d,
            client.path(),
            &["copy", "--no-closure", "--from", &from, &root],
        );
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).contains(&root), "{}", stderr(&o));
        assert!(!has_path(&d, client.path(), &root));
        // Bad arguments are refused before anything happens.
        let o = arca(&d, client.path(), &["copy", "--from", "ftp://x", &root]);
        assert_eq!(o.status.code(), Some(1));
        assert!(stderr(&o).contains("--from"), "{}", stderr(&o));
        let o = arca(
            &d,
            client.path(),
            &["copy", "--from", &from, "/nix/store/not-a-path"],
        );
        assert_eq!(o.status.code(), Some(1));
        assert!(stderr(&o).contains("not a store path"), "{}", stderr(&o));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_reads_through_a_binary_cache_once() {
    let Some(fx) = fixture() else { return };
    let server = CacheServer::start(&fx).await;
    let root = root_path(&fx);
    let paths = closure(&fx);
    let far = format!("nix+{}", server.url("cache-xz"));
    let (fx2, far2) = (fx.clone(), far.clone());
    let (d, near) = blocking(move || {
        let near = tempfile::tempdir().unwrap();
        let url = format!(
            "cache://?near=sled://{}/pi.sled&far={far2}",
            near.path().display()
        );
        let d = Daemon::start_with(&["--listen", "127.0.0.1:0", "--path-info-service-addr", &url]);
        (d, near)
    })
    .await;
    let (root2, paths2) = (root.clone(), paths.clone());
    let d = blocking(move || {
        let client = tempfile::tempdir().unwrap();
        for p in paths2.iter().chain([&root2]) {
            assert!(
                has_path(&d, client.path(), p),
                "{p} not served through the daemon"
            );
        }
        let dump = arca(&d, client.path(), &["nar", "dump", &root2]);
        assert!(dump.status.success(), "{}", stderr(&dump));
        assert!(dump.stdout == nar_of(&fx2, &root2));
        d
    })
    .await;
    let after_first = server.request_count();
    assert!(
        server.nar_requests() >= paths.len(),
        "NARs fetched on first access"
    );
    let d = blocking(move || {
        let client = tempfile::tempdir().unwrap();
        for p in &paths {
            assert!(has_path(&d, client.path(), p));
        }
        d
    })
    .await;
    assert_eq!(
        server.request_count(),
        after_first,
        "second access answered locally: {:?}",
        server.requests()
    );
    drop(d);
    drop(near);
    let _ = far;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_between_daemons_over_grpc() {
    let Some(fx) = fixture() else { return };
    let server = CacheServer::start(&fx).await;
    let from = format!("nix+{}", server.url("cache-zstd"));
    let root = root_path(&fx);
    let paths = closure(&fx);
    blocking(move || {
        let a = Daemon::start();
        let b = Daemon::start();
        let client = tempfile::tempdir().unwrap();
        let o = arca(&a, client.path(), &["copy", "--from", &from, &root]);
        assert!(o.status.success(), "{}", stderr(&o));
        let o = arca(
            &b,
            client.path(),
            &["copy", "--json", "--from", &a.url, &root],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let summary: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        assert_eq!(summary["copied"], paths.len());
        for p in &paths {
            let dump = arca(&b, client.path(), &["nar", "dump", p]);
            assert!(dump.status.success(), "{p}: {}", stderr(&dump));
            assert!(
                dump.stdout == nar_of(&fx, p),
                "NAR of {p} differs after a daemon-to-daemon copy"
            );
        }
    })
    .await;
}
