//! The binary-cache path-info service (`nix+http://`, `nix+file://`) against
//! real binary caches written by Nix (the shared fixture), served over
//! loopback HTTP: every compression, signatures, every check failing on
//! tampered copies, the NAR index and narinfo cache, layering by URL.
mod common;

use arca_castore::blobservice::MemoryBlobService;
use arca_castore::directoryservice::MemoryDirectoryService;
use arca_castore::{BlobService, DirectoryService, Error};
use arca_store::nar::render_nar;
use arca_store::pathinfoservice::{
    pathinfo_service_from_url, NixHttpPathInfoService, PathInfoService, StoreServices,
};
use arca_store::{
    CachedNarInfo, LazyNarIndex, NarIndex, NarinfoTtl, NixHash, PathInfo, PublicKey, SecretKey,
    StorePath,
};
use axum::http::StatusCode;
use common::{
    closure, copy_dir, fixture, hash_part, manifest, narinfo_field, public_key, set_narinfo_field,
    CacheServer,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const LEAF: &str = "fixture-leaf";
const NOTE: &str = "note.txt";

/// Castore services and a NAR index, shared by the services a test builds.
struct Env {
    blobs: Arc<dyn BlobService>,
    directories: Arc<dyn DirectoryService>,
    index: Arc<NarIndex>,
}

impl Env {
    fn new() -> Env {
        Env {
            blobs: Arc::new(MemoryBlobService::default()),
            directories: Arc::new(MemoryDirectoryService::default()),
            index: Arc::new(NarIndex::temporary().unwrap()),
        }
    }

    fn service(&self, url: &str, keys: &[&str]) -> NixHttpPathInfoService {
        let keys = keys
            .iter()
            .map(|k| k.parse::<PublicKey>().unwrap())
            .collect();
        NixHttpPathInfoService::new(
            url,
            keys,
            self.blobs.clone(),
            self.directories.clone(),
            self.index.clone(),
        )
        .unwrap()
    }

    fn store_services(&self) -> StoreServices {
        StoreServices::new(
            self.blobs.clone(),
            self.directories.clone(),
            LazyNarIndex::from(self.index.clone()),
        )
    }

    async fn render(&self, info: &PathInfo) -> Vec<u8> {
        render_nar(
            &info.node,
            self.blobs.clone(),
            &*self.directories,
            Vec::new(),
        )
        .await
        .unwrap()
    }
}

fn digest_of(path: &str) -> [u8; 20] {
    *StorePath::from_absolute_path(path).unwrap().digest()
}

/// The closure path whose name ends with `name`.
fn path_named(fx: &Path, name: &str) -> String {
    closure(fx)
        .into_iter()
        .find(|p| p.ends_with(name))
        .unwrap_or_else(|| panic!("no {name} in the closure"))
}

/// The uncompressed NAR of `path` (cache-none's NAR files are uncompressed).
fn nar_bytes(fx: &Path, path: &str) -> Vec<u8> {
    let narinfo = fx
        .join("cache-none")
        .join(format!("{}.narinfo", hash_part(path)));
    std::fs::read(
        fx.join("cache-none")
            .join(narinfo_field(&narinfo, "URL").unwrap()),
    )
    .unwrap()
}

/// The NarHash of `path` (32 bytes), from cache-none's narinfo.
fn nar_sha256(fx: &Path, path: &str) -> [u8; 32] {
    let narinfo = fx
        .join("cache-none")
        .join(format!("{}.narinfo", hash_part(path)));
    NixHash::parse_prefixed(&narinfo_field(&narinfo, "NarHash").unwrap())
        .unwrap()
        .as_sha256()
        .unwrap()
}

fn narinfo_path(cache: &Path, path: &str) -> PathBuf {
    cache.join(format!("{}.narinfo", hash_part(path)))
}

/// The file a narinfo's URL points to.
fn nar_file(cache: &Path, path: &str) -> PathBuf {
    cache.join(narinfo_field(&narinfo_path(cache, path), "URL").unwrap())
}

/// Asserts `r` failed, naming `needle` and the store path; returns the message.
fn failed(r: Result<Option<PathInfo>, Error>, needle: &str, path: &str) -> String {
    let e = match r {
        Err(e) => e.to_string(),
        Ok(v) => panic!("expected an error naming {needle:?}, got {v:?}"),
    };
    eprintln!("expected failure: {e}");
    assert!(e.contains(needle), "{needle:?} not in: {e}");
    assert!(
        e.contains(path) || e.contains(hash_part(path)),
        "{path} not in: {e}"
    );
    e
}

/// Asserts nothing was recorded for `path` (no NAR index entry, no cached narinfo).
async fn nothing_recorded(env: &Env, svc: &NixHttpPathInfoService, fx: &Path, path: &str) {
    assert_eq!(
        env.index.get_nar(&nar_sha256(fx, path)).await.unwrap(),
        None,
        "NAR index entry for {path}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let cached = env
        .index
        .get_narinfo(svc.cache_url(), &digest_of(path), now)
        .await
        .unwrap();
    assert!(
        !matches!(cached, CachedNarInfo::Present(_)),
        "narinfo of {path} cached: {cached:?}"
    );
}

/// Gets every closure path from `svc` and checks it against Nix's own data.
async fn check_closure(env: &Env, svc: &dyn PathInfoService, fx: &Path) {
    let manifest = manifest(fx);
    let paths = closure(fx);
    assert_eq!(paths.len(), 6, "{paths:?}");
    for p in &paths {
        let info = svc
            .get(digest_of(p))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{p} missing"));
        assert_eq!(info.store_path.to_absolute_path(), *p);
        let m = &manifest[p];
        assert_eq!(NixHash::sha256(info.nar_sha256).to_sri(), m.nar_hash, "{p}");
        assert_eq!(info.nar_size, m.nar_size, "{p}");
        let mut refs: Vec<String> = info
            .references
            .iter()
            .map(|r| r.to_absolute_path())
            .collect();
        refs.sort();
        assert_eq!(refs, m.references, "{p}");
        let rendered = env.render(&info).await;
        assert!(
            rendered == nar_bytes(fx, p),
            "{p}: rendered NAR differs from Nix's"
        );
    }
    // get_many agrees.
    let digests: Vec<[u8; 20]> = paths.iter().map(|p| digest_of(p)).collect();
    let many = svc.get_many(&digests).await.unwrap();
    assert!(many.iter().zip(&paths).all(|(i, p)| i
        .as_ref()
        .is_some_and(|i| i.store_path.to_absolute_path() == *p)));
}

async fn closure_from(cache: &str, signed: bool) {
    let Some(fx) = fixture() else { return };
    let server = CacheServer::start(&fx).await;
    let env = Env::new();
    let key = public_key(&fx);
    let keys: Vec<&str> = if signed { vec![key.as_str()] } else { vec![] };
    let svc = env.service(&format!("nix+{}", server.url(cache)), &keys);
    check_closure(&env, &svc, &fx).await;
    assert_eq!(env.index.nar_count().await.unwrap(), 6);
    // Each narinfo and each NAR was fetched once.
    assert_eq!(
        server.count_ending(".narinfo"),
        6,
        "{:?}",
        server.requests()
    );
    assert_eq!(server.nar_requests(), 6, "{:?}", server.requests());
}

#[tokio::test]
async fn closure_from_xz_cache() {
    closure_from("cache-xz", false).await;
}

#[tokio::test]
async fn closure_from_zstd_cache() {
    closure_from("cache-zstd", false).await;
}

#[tokio::test]
async fn closure_from_uncompressed_cache() {
    closure_from("cache-none", false).await;
}

#[tokio::test]
async fn closure_from_signed_cache_with_key_required() {
    closure_from("cache-xz-signed", true).await;
}

#[tokio::test]
async fn nix_file_cache() {
    let Some(fx) = fixture() else { return };
    let env = Env::new();
    let key = public_key(&fx);
    let svc = env.service(
        &format!("nix+file://{}", fx.join("cache-xz-signed").display()),
        &[&key],
    );
    check_closure(&env, &svc, &fx).await;
    assert_eq!(svc.get([7; 20]).await.unwrap(), None);
    // Through the URL builder too, keys in the query.
    let url = format!(
        "nix+file://{}?trusted-public-keys={}",
        fx.join("cache-zstd").display(),
        "other-1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
    );
    let svc = pathinfo_service_from_url(&url, &Env::new().store_services()).unwrap();
    let leaf = path_named(&fx, LEAF);
    let e = svc.get(digest_of(&leaf)).await.unwrap_err().to_string();
    assert!(e.contains("signature") && e.contains(&leaf), "{e}");
}

#[tokio::test]
async fn tampered_nar_bytes_are_refused() {
    let Some(fx) = fixture() else { return };
    let leaf = path_named(&fx, LEAF);
    for (cache, needle) in [
        ("cache-none", "NarHash mismatch"),
        ("cache-xz", "decompressing (xz)"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        copy_dir(&fx.join(cache), tmp.path());
        let nar = nar_file(tmp.path(), &leaf);
        let mut bytes = std::fs::read(&nar).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x55;
        std::fs::write(&nar, &bytes).unwrap();

        let server = CacheServer::start(tmp.path()).await;
        let env = Env::new();
        let svc = env.service(&format!("nix+{}", server.url("")), &[]);
        failed(svc.get(digest_of(&leaf)).await, needle, &leaf);
        nothing_recorded(&env, &svc, &fx, &leaf).await;

        // Fixed upstream: the next get works.
        server.set_root(&fx.join(cache));
        let info = svc.get(digest_of(&leaf)).await.unwrap().unwrap();
        assert!(env.render(&info).await == nar_bytes(&fx, &leaf), "{cache}");
        assert!(env
            .index
            .get_nar(&nar_sha256(&fx, &leaf))
            .await
            .unwrap()
            .is_some());
    }
}

#[tokio::test]
async fn tampered_narinfos_are_refused() {
    let Some(fx) = fixture() else { return };
    let key = public_key(&fx);
    let leaf = path_named(&fx, LEAF);
    let base = path_named(&fx, "fixture-base");
    let size: u64 = narinfo_field(&narinfo_path(&fx.join("cache-xz-signed"), &leaf), "NarSize")
        .unwrap()
        .parse()
        .unwrap();
    let other_hash = narinfo_field(&narinfo_path(&fx.join("cache-xz"), &base), "NarHash").unwrap();
    let base_basename = base.trim_start_matches("/nix/store/").to_string();
    type Tamper = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, bool, Tamper, &str)> = vec![
        // Signed cache, key required: any change to the fingerprint breaks the signature.
        (
            "cache-xz-signed",
            true,
            Box::new(move |n: &Path| {
                set_narinfo_field(n, "NarSize", Some(&(size + 8).to_string()))
            }),
            "signature",
        ),
        (
            "cache-xz-signed",
            true,
            Box::new(move |n: &Path| set_narinfo_field(n, "References", Some(&base_basename))),
            "signature",
        ),
        // Unsigned: the NAR itself gives the lie.
        (
            "cache-xz",
            false,
            Box::new(move |n: &Path| set_narinfo_field(n, "NarHash", Some(&other_hash))),
            "NarHash mismatch",
        ),
        (
            "cache-xz",
            false,
            Box::new(move |n: &Path| {
                set_narinfo_field(n, "NarSize", Some(&(size + 8).to_string()))
            }),
            "NarSize mismatch",
        ),
        (
            "cache-xz",
            false,
            Box::new(move |n: &Path| {
                set_narinfo_field(n, "NarSize", Some(&(size - 8).to_string()))
            }),
            "NarSize mismatch",
        ),
        (
            "cache-xz",
            false,
            Box::new(|n: &Path| set_narinfo_field(n, "Compression", Some("zstd"))),
            "decompressing (zstd)",
        ),
        (
            "cache-xz",
            false,
            Box::new(|n: &Path| set_narinfo_field(n, "URL", Some("../../etc/passwd"))),
            "not a relative path",
        ),
        (
            "cache-xz",
            false,
            Box::new(|n: &Path| set_narinfo_field(n, "StorePath", None)),
            "invalid narinfo",
        ),
    ];
    for (cache, signed, tamper, needle) in cases {
        let tmp = tempfile::tempdir().unwrap();
        copy_dir(&fx.join(cache), tmp.path());
        tamper(&narinfo_path(tmp.path(), &leaf));
        let server = CacheServer::start(tmp.path()).await;
        let env = Env::new();
        let keys: Vec<&str> = if signed { vec![&key] } else { vec![] };
        let svc = env.service(&format!("nix+{}", server.url("")), &keys);
        failed(svc.get(digest_of(&leaf)).await, needle, &leaf);
        nothing_recorded(&env, &svc, &fx, &leaf).await;
        server.set_root(&fx.join(cache));
        assert!(
            svc.get(digest_of(&leaf)).await.unwrap().is_some(),
            "{cache}/{needle}: not fixed"
        );
    }
}

#[tokio::test]
async fn narinfo_under_the_wrong_hash() {
    let Some(fx) = fixture() else { return };
    let leaf = path_named(&fx, LEAF);
    let base = path_named(&fx, "fixture-base");
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fx.join("cache-xz"), tmp.path());
    std::fs::copy(
        narinfo_path(tmp.path(), &leaf),
        narinfo_path(tmp.path(), &base),
    )
    .unwrap();
    let server = CacheServer::start(tmp.path()).await;
    let env = Env::new();
    let svc = env.service(&format!("nix+{}", server.url("")), &[]);
    let e = failed(svc.get(digest_of(&base)).await, "StorePath mismatch", &base);
    assert!(e.contains(&leaf), "{e}");
    nothing_recorded(&env, &svc, &fx, &base).await;
    assert_eq!(env.index.nar_count().await.unwrap(), 0);
    assert_eq!(server.nar_requests(), 0);
    server.set_root(&fx.join("cache-xz"));
    assert!(svc.get(digest_of(&base)).await.unwrap().is_some());
}

#[tokio::test]
async fn signatures_are_required_with_keys() {
    let Some(fx) = fixture() else { return };
    let key = public_key(&fx);
    let leaf = path_named(&fx, LEAF);
    let note = path_named(&fx, NOTE);
    let server = CacheServer::start(&fx).await;

    // No signature at all.
    let env = Env::new();
    let svc = env.service(&format!("nix+{}", server.url("cache-xz")), &[&key]);
    let e = failed(svc.get(digest_of(&leaf)).await, "signature", &leaf);
    assert!(e.contains("signed by: none"), "{e}");
    nothing_recorded(&env, &svc, &fx, &leaf).await;
    assert_eq!(
        server.nar_requests(),
        0,
        "downloaded before checking the signature"
    );

    // Signed, but by another key: one with the same name, one with another.
    let same_name = SecretKey::from_seed("arca-fixture-1", [42; 32])
        .public_key()
        .to_string();
    let other_name = SecretKey::from_seed("someone-else-1", [43; 32])
        .public_key()
        .to_string();
    for wrong in [&same_name, &other_name] {
        let env = Env::new();
        let svc = env.service(&format!("nix+{}", server.url("cache-xz-signed")), &[wrong]);
        failed(svc.get(digest_of(&leaf)).await, "signature", &leaf);
        nothing_recorded(&env, &svc, &fx, &leaf).await;
        // Any one trusted key is enough.
        let svc = env.service(
            &format!("nix+{}", server.url("cache-xz-signed")),
            &[wrong, &key],
        );
        assert!(svc.get(digest_of(&leaf)).await.unwrap().is_some());
    }

    // A narinfo cached by a service that checks nothing is checked again by one with keys.
    let env = Env::new();
    let open = env.service(&format!("nix+{}", server.url("cache-xz")), &[]);
    assert!(open.get(digest_of(&leaf)).await.unwrap().is_some());
    let strict = env.service(&format!("nix+{}", server.url("cache-xz")), &[&key]);
    failed(strict.get(digest_of(&leaf)).await, "signature", &leaf);

    // Content-addressed paths need no signature: the text CA is verified instead.
    let env = Env::new();
    let svc = env.service(&format!("nix+{}", server.url("cache-xz")), &[&key]);
    let info = svc.get(digest_of(&note)).await.unwrap().unwrap();
    assert!(info.ca.is_some() && info.signatures.is_empty());
    assert!(env.render(&info).await == nar_bytes(&fx, &note));
}

#[tokio::test]
async fn content_addresses_are_verified_without_signatures() {
    let Some(fx) = fixture() else { return };
    let key = public_key(&fx);
    let note = path_named(&fx, NOTE);

    // A CA that does not give the store path: no trust.
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fx.join("cache-none"), tmp.path());
    let other_ca = format!("text:{}", NixHash::sha256([7; 32]));
    set_narinfo_field(&narinfo_path(tmp.path(), &note), "CA", Some(&other_ca));
    let server = CacheServer::start(tmp.path()).await;
    let env = Env::new();
    let svc = env.service(&format!("nix+{}", server.url("")), &[&key]);
    let e = failed(svc.get(digest_of(&note)).await, "signature", &note);
    assert!(e.contains("does not give this store path"), "{e}");
    nothing_recorded(&env, &svc, &fx, &note).await;

    // The right CA, but other contents (with a NarHash and NarSize that match them).
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fx.join("cache-none"), tmp.path());
    let original = nar_bytes(&fx, &note);
    let needle = b"hello from builtins.toFile";
    let at = original
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap();
    let mut forged = original.clone();
    forged[at..at + 5].copy_from_slice(b"HELLO");
    let forged_hash = NixHash::sha256_of(&forged);
    let narinfo = narinfo_path(tmp.path(), &note);
    std::fs::write(nar_file(tmp.path(), &note), &forged).unwrap();
    set_narinfo_field(&narinfo, "NarHash", Some(&forged_hash.to_string()));
    set_narinfo_field(&narinfo, "FileHash", None);
    set_narinfo_field(&narinfo, "FileSize", None);
    let server = CacheServer::start(tmp.path()).await;
    let env = Env::new();
    let svc = env.service(&format!("nix+{}", server.url("")), &[&key]);
    failed(
        svc.get(digest_of(&note)).await,
        "content address mismatch",
        &note,
    );
    assert_eq!(
        env.index
            .get_nar(&forged_hash.as_sha256().unwrap())
            .await
            .unwrap(),
        None
    );
    // Without keys nothing is checked, as in Nix with require-sigs off.
    let env = Env::new();
    let svc = env.service(&format!("nix+{}", server.url("")), &[]);
    assert!(svc.get(digest_of(&note)).await.unwrap().is_some());
}

#[tokio::test]
async fn truncated_nars_are_refused() {
    let Some(fx) = fixture() else { return };
    let leaf = path_named(&fx, LEAF);
    for cache in ["cache-xz", "cache-none", "cache-zstd"] {
        let tmp = tempfile::tempdir().unwrap();
        copy_dir(&fx.join(cache), tmp.path());
        let nar = nar_file(tmp.path(), &leaf);
        let bytes = std::fs::read(&nar).unwrap();
        std::fs::write(&nar, &bytes[..bytes.len() / 2]).unwrap();
        let server = CacheServer::start(tmp.path()).await;
        let env = Env::new();
        let svc = env.service(&format!("nix+{}", server.url("")), &[]);
        failed(svc.get(digest_of(&leaf)).await, "truncated NAR", &leaf);
        nothing_recorded(&env, &svc, &fx, &leaf).await;
        server.set_root(&fx.join(cache));
        assert!(svc.get(digest_of(&leaf)).await.unwrap().is_some());
    }
}

#[tokio::test]
async fn file_size_and_file_hash_are_checked() {
    let Some(fx) = fixture() else { return };
    let key = public_key(&fx);
    let leaf = path_named(&fx, LEAF);
    let real = narinfo_field(
        &narinfo_path(&fx.join("cache-xz-signed"), &leaf),
        "FileSize",
    )
    .unwrap();
    let real: u64 = real.parse().unwrap();
    // FileSize and FileHash are not signed: the signature still verifies.
    for (field, value, needle) in [
        ("FileSize", (real - 1).to_string(), "FileSize mismatch"),
        ("FileSize", (real + 1).to_string(), "FileSize mismatch"),
        (
            "FileHash",
            NixHash::sha256([9; 32]).to_string(),
            "FileHash mismatch",
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        copy_dir(&fx.join("cache-xz-signed"), tmp.path());
        set_narinfo_field(&narinfo_path(tmp.path(), &leaf), field, Some(&value));
        let server = CacheServer::start(tmp.path()).await;
        let env = Env::new();
        let svc = env.service(&format!("nix+{}", server.url("")), &[&key]);
        failed(svc.get(digest_of(&leaf)).await, needle, &leaf);
        nothing_recorded(&env, &svc, &fx, &leaf).await;
        server.set_root(&fx.join("cache-xz-signed"));
        assert!(svc.get(digest_of(&leaf)).await.unwrap().is_some());
    }
}

#[tokio::test]
async fn absent_paths_are_cached_negatively() {
    let Some(fx) = fixture() else { return };
    let server = CacheServer::start(&fx).await;
    let env = Env::new();
    let svc = env.service(&format!("nix+{}", server.url("cache-xz")), &[]);
    let absent = [1u8; 20];
    assert_eq!(svc.get(absent).await.unwrap(), None);
    assert_eq!(server.request_count(), 1);
    assert_eq!(svc.get(absent).await.unwrap(), None);
    assert_eq!(
        server.request_count(),
        1,
        "the negative answer was not cached: {:?}",
        server.requests()
    );

    // 403 is absent too.
    let forbidden = [2u8; 20];
    server.set_status(
        &format!(
            "/cache-xz/{}.narinfo",
            arca_store::nixbase32::encode(&forbidden)
        ),
        StatusCode::FORBIDDEN,
    );
    assert_eq!(svc.get(forbidden).await.unwrap(), None);

    // Other statuses are errors naming the URL, and are not cached.
    let broken = [3u8; 20];
    let url_path = format!(
        "/cache-xz/{}.narinfo",
        arca_store::nixbase32::encode(&broken)
    );
    server.set_status(&url_path, StatusCode::INTERNAL_SERVER_ERROR);
    let e = svc.get(broken).await.unwrap_err();
    assert!(
        matches!(&e, Error::Unavailable(m) if m.contains(&url_path) && m.contains("500")),
        "{e}"
    );
    let before = server.request_count();
    assert!(svc.get(broken).await.is_err());
    assert_eq!(server.request_count(), before + 1);

    // A NAR missing upstream is an error, not "absent".
    server.clear_statuses();
    let leaf = path_named(&fx, LEAF);
    let nar_url = format!(
        "/cache-xz/{}",
        narinfo_field(&narinfo_path(&fx.join("cache-xz"), &leaf), "URL").unwrap()
    );
    server.set_status(&nar_url, StatusCode::NOT_FOUND);
    failed(svc.get(digest_of(&leaf)).await, "not its NAR", &leaf);
    nothing_recorded(&env, &svc, &fx, &leaf).await;

    // With a negative TTL of 0 every miss asks again.
    env.index.set_ttl(NarinfoTtl {
        negative: Duration::ZERO,
        ..NarinfoTtl::NIX_DEFAULT
    });
    let before = server.request_count();
    assert_eq!(svc.get(absent).await.unwrap(), None);
    assert_eq!(server.request_count(), before + 1);
}

#[tokio::test]
async fn nars_are_never_downloaded_twice() {
    let Some(fx) = fixture() else { return };
    let paths = closure(&fx);
    let env = Env::new();
    let first = CacheServer::start(&fx).await;
    let svc = env.service(&format!("nix+{}", first.url("cache-xz")), &[]);
    for p in &paths {
        assert!(svc.get(digest_of(p)).await.unwrap().is_some());
    }
    assert_eq!(first.nar_requests(), 6);

    // A new service on the same cache, sharing the index: answered from the
    // narinfo cache and the NAR index, no request at all.
    let again = env.service(&format!("nix+{}", first.url("cache-xz")), &[]);
    let before = first.request_count();
    check_closure(&env, &again, &fx).await;
    assert_eq!(first.request_count(), before, "{:?}", first.requests());

    // Narinfo answers expired: only the narinfos are fetched again.
    env.index.set_ttl(NarinfoTtl::NONE);
    let before_nars = first.nar_requests();
    let before_narinfos = first.count_ending(".narinfo");
    check_closure(&env, &again, &fx).await;
    assert_eq!(first.nar_requests(), before_nars, "{:?}", first.requests());
    assert!(first.count_ending(".narinfo") > before_narinfos);
    env.index.set_ttl(NarinfoTtl::NIX_DEFAULT);

    // Another cache (a mirror, other compression) with the same NARs: only its narinfos.
    let mirror = CacheServer::start(&fx).await;
    let svc = env.service(&format!("nix+{}", mirror.url("cache-zstd")), &[]);
    check_closure(&env, &svc, &fx).await;
    assert_eq!(mirror.nar_requests(), 0, "{:?}", mirror.requests());
    assert_eq!(mirror.count_ending(".narinfo"), 6);

    // Castore lost the content (a fresh store sharing the index): downloaded
    // again, except a symlink root (its node is all its content).
    let mut symlinks = 0;
    for p in &paths {
        let info = svc.get(digest_of(p)).await.unwrap().unwrap();
        symlinks += usize::from(matches!(info.node, arca_castore::Node::Symlink { .. }));
    }
    assert_eq!(symlinks, 1, "the fixture's root path is a symlink");
    let fresh = Env {
        index: env.index.clone(),
        ..Env::new()
    };
    env.index.set_ttl(NarinfoTtl::NONE);
    let svc = fresh.service(&format!("nix+{}", mirror.url("cache-zstd")), &[]);
    check_closure(&fresh, &svc, &fx).await;
    assert_eq!(
        mirror.nar_requests(),
        6 - symlinks,
        "{:?}",
        mirror.requests()
    );
}

#[tokio::test]
async fn concurrent_gets_share_one_download() {
    let Some(fx) = fixture() else { return };
    let leaf = path_named(&fx, LEAF);
    let server = CacheServer::start(&fx).await;
    server.set_delay(Duration::from_millis(200));
    let env = Env::new();
    let svc = Arc::new(env.service(&format!("nix+{}", server.url("cache-xz")), &[]));
    let gets: Vec<_> = (0..8)
        .map(|_| {
            let svc = svc.clone();
            let d = digest_of(&leaf);
            tokio::spawn(async move { svc.get(d).await })
        })
        .collect();
    for g in gets {
        assert!(g.await.unwrap().unwrap().is_some());
    }
    assert_eq!(server.request_count(), 2, "{:?}", server.requests());
}

#[tokio::test]
async fn layered_by_url_answers_locally_the_second_time() {
    let Some(fx) = fixture() else { return };
    let key = public_key(&fx);
    let leaf = path_named(&fx, LEAF);
    let server = CacheServer::start(&fx).await;
    let tmp = tempfile::tempdir().unwrap();
    let encoded_key = key.replace('+', "%2B").replace('=', "%3D");
    for near in [
        "memory://".to_string(),
        format!("sled://{}/near.sled", tmp.path().display()),
    ] {
        let env = Env::new();
        let url = format!(
            "cache://?near={near}&far=nix+{}?trusted-public-keys={}",
            server.url("cache-xz-signed"),
            // A nested query is percent-encoded once more by whoever writes the URL.
            encoded_key.replace('%', "%25")
        );
        let svc = pathinfo_service_from_url(&url, &env.store_services())
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        let before = server.request_count();
        let info = svc.get(digest_of(&leaf)).await.unwrap().unwrap();
        assert_eq!(
            server.request_count(),
            before + 2,
            "{:?}",
            server.requests()
        );
        assert!(env.render(&info).await == nar_bytes(&fx, &leaf));
        assert_eq!(svc.get(digest_of(&leaf)).await.unwrap(), Some(info));
        assert_eq!(
            server.request_count(),
            before + 2,
            "second get went upstream: {:?}",
            server.requests()
        );
        // The far side is read-only.
        let e = svc.list().next_err().await;
        assert!(e.contains("cannot be listed"), "{e}");
    }
    // A wrong key in the URL refuses the path.
    let env = Env::new();
    let url = format!(
        "nix+{}?trusted-public-keys=other-1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA%3D",
        server.url("cache-xz-signed")
    );
    let svc = pathinfo_service_from_url(&url, &env.store_services()).unwrap();
    let e = svc.get(digest_of(&leaf)).await.unwrap_err().to_string();
    assert!(e.contains("signature") && e.contains(&leaf), "{e}");
}

/// The first error of a stream, as text.
trait NextErr {
    async fn next_err(self) -> String;
}

impl<S: futures::Stream<Item = Result<PathInfo, Error>> + Unpin> NextErr for S {
    async fn next_err(mut self) -> String {
        use futures::StreamExt;
        match self.next().await {
            Some(Err(e)) => e.to_string(),
            other => panic!("expected an error, got {other:?}"),
        }
    }
}

/// The HTTP front records what each path info it serves claims (NarHash →
/// root node) so any replica can serve the NAR a narinfo names. A path
/// info's NarHash is not checked against its node, so such a claim must
/// never count as proof that the NAR was ingested: a path info claiming
/// another path's NarHash for other content would otherwise make a later
/// fetch of that path from a trusted cache skip the download and register
/// the other content.
#[tokio::test]
async fn a_claimed_nar_hash_never_replaces_a_download() {
    let Some(fx) = fixture() else { return };
    let leaf = path_named(&fx, LEAF);
    let env = Env::new();
    let evil =
        arca_castore::blobservice::put_bytes(&*env.blobs, bytes::Bytes::from_static(b"evil"))
            .await
            .unwrap();
    let evil_node = arca_castore::Node::File {
        digest: evil,
        size: 4,
        executable: false,
    };
    let size = nar_bytes(&fx, &leaf).len() as u64;
    env.index
        .record_nar(&nar_sha256(&fx, &leaf), &evil_node, size)
        .await
        .unwrap();
    let server = CacheServer::start(&fx).await;
    let svc = env.service(&format!("nix+{}", server.url("cache-xz")), &[]);
    let info = svc.get(digest_of(&leaf)).await.unwrap().unwrap();
    assert_ne!(info.node, evil_node);
    assert_eq!(server.nar_requests(), 1, "{:?}", server.requests());
    assert_eq!(env.render(&info).await, nar_bytes(&fx, &leaf));
    // The download replaced the claim with the verified entry.
    assert_eq!(
        env.index.get_nar(&nar_sha256(&fx, &leaf)).await.unwrap(),
        Some((info.node.clone(), size))
    );
}
