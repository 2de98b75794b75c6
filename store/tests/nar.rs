//! NAR reader, writer, ingest and render, checked against the real Nix 2.8
//! (`nix-store --dump`, `nix-hash`) and against hand-made malformed NARs.
use arca_castore::blobservice::{put_bytes, MemoryBlobService};
use arca_castore::directoryservice::{MemoryDirectoryService, ValidatedClosure};
use arca_castore::import::{import_path, NoProgress};
use arca_castore::{B3Digest, BlobService, Directory, DirectoryService, Node};
use arca_store::nar::{
    calculate_nar, dump_path, ingest_nar, ingest_nar_expecting, render_nar, Event, ExpectedNar,
    IngestError, NarError, NarReader, NarWriter, RenderError, WriteError,
};
use arca_store::NixHash;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::AsyncReadExt;

// ---------------------------------------------------------------- helpers

/// Whether `nix-store` can be used; under CI=true its absence fails the test.
fn have_nix(test: &str) -> bool {
    let ok = Command::new("nix-store")
        .arg("--version")
        .env("NIX_CONFIG", "build-users-group =")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test}: nix-store is not installed, and CI=true");
        }
        eprintln!("SKIPPED {test}: nix-store is not installed");
    }
    ok
}

fn nix(cmd: &str, args: &[&std::ffi::OsStr]) -> Vec<u8> {
    let out = Command::new(cmd)
        .args(args)
        .env("NIX_CONFIG", "build-users-group =")
        .output()
        .expect("run nix");
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn nix_dump(p: &Path) -> Vec<u8> {
    nix("nix-store", &["--dump".as_ref(), p.as_os_str()])
}

fn nix_hash(p: &Path) -> String {
    let out = nix(
        "nix-hash",
        &[
            "--type".as_ref(),
            "sha256".as_ref(),
            "--base32".as_ref(),
            p.as_os_str(),
        ],
    );
    String::from_utf8(out).unwrap().trim().to_string()
}

/// A tree with everything a NAR can hold, and awkward names.
fn make_tree(root: &Path) {
    use std::os::unix::fs::symlink;
    std::fs::create_dir_all(root.join("a/b/c/d")).unwrap();
    std::fs::create_dir(root.join("empty")).unwrap();
    std::fs::create_dir(root.join("also-empty")).unwrap();
    std::fs::write(root.join("empty-file"), b"").unwrap();
    std::fs::write(root.join("a/b/c/d/deep"), b"deep down\n").unwrap();
    std::fs::write(root.join("a/hello"), b"hello world").unwrap();
    std::fs::write(root.join("a/b/eight888"), b"12345678").unwrap();
    std::fs::write(root.join("run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(root.join("exec-empty"), b"").unwrap();
    std::fs::set_permissions(
        root.join("exec-empty"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    // A few MiB of pseudo-random bytes (not a multiple of 8).
    let mut big = Vec::with_capacity(5 * 1024 * 1024 + 3);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while big.len() < 5 * 1024 * 1024 + 3 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        big.push((x >> 24) as u8);
    }
    std::fs::write(root.join("a/big.bin"), &big).unwrap();
    // Content that shows up again (a hard link, an executable copy, a small
    // file twice): the renderer writes repeats from memory.
    std::fs::hard_link(root.join("a/big.bin"), root.join("a/b/big-link")).unwrap();
    std::fs::write(root.join("big-exec"), &big).unwrap();
    std::fs::set_permissions(
        root.join("big-exec"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(root.join("a/b/c/hello-again"), b"hello world").unwrap();
    symlink(
        "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-dangling",
        root.join("abs-link"),
    )
    .unwrap();
    symlink("../hello", root.join("a/b/rel-link")).unwrap();
    symlink("a/hello", root.join("link-to-file")).unwrap();
    symlink("a", root.join("link-to-dir")).unwrap();
    symlink("x".repeat(1000), root.join("long-link")).unwrap();
    // Unusual but valid names; their order is by raw bytes.
    let names: &[&[u8]] = &[
        b"with space",
        b"UPPER",
        b"lower",
        b"...",
        b".hidden",
        b"-dash",
        b"new\nline",
        b"tab\there",
        b"caf\xc3\xa9",
        b"\xff\xfe not utf-8",
        b"\x01ctrl",
        b"a.b",
        b"a-b",
        b"a~",
        b"back\\slash",
    ];
    for n in names {
        std::fs::write(root.join(std::ffi::OsStr::from_bytes(n)), *n).unwrap();
    }
    std::fs::write(root.join("n".repeat(255)), b"longest name").unwrap();
}

fn memory() -> (Arc<dyn BlobService>, Arc<CountingDirectories>) {
    (
        Arc::new(MemoryBlobService::default()),
        Arc::new(CountingDirectories::default()),
    )
}

/// A memory directory service that counts what is stored.
#[derive(Default)]
struct CountingDirectories {
    inner: MemoryDirectoryService,
    closures: AtomicUsize,
    directories: AtomicUsize,
}

impl CountingDirectories {
    fn stored(&self) -> usize {
        self.directories.load(Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl DirectoryService for CountingDirectories {
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>, arca_castore::Error> {
        self.inner.get(digest).await
    }
    async fn put_closure(
        &self,
        closure: ValidatedClosure,
    ) -> Result<B3Digest, arca_castore::Error> {
        self.closures.fetch_add(1, Ordering::SeqCst);
        self.directories
            .fetch_add(closure.directories().len(), Ordering::SeqCst);
        self.inner.put_closure(closure).await
    }
}

async fn write_nar_of(path: &Path) -> Vec<u8> {
    dump_path(path, Vec::new()).await.unwrap()
}

// ---------------------------------------------------------------- against Nix

#[tokio::test]
async fn writer_is_byte_identical_to_nix_store_dump() {
    if !have_nix("writer_is_byte_identical_to_nix_store_dump") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("tree");
    make_tree(&root);
    // The whole tree, then every kind of root on its own.
    for p in [
        root.clone(),
        root.join("a"),
        root.join("empty"),
        root.join("empty-file"),
        root.join("run.sh"),
        root.join("a/big.bin"),
        root.join("abs-link"),
        root.join("a/b/rel-link"),
    ] {
        let ours = write_nar_of(&p).await;
        let theirs = nix_dump(&p);
        assert!(
            ours == theirs,
            "{}: our NAR ({} bytes) differs from nix-store --dump ({} bytes)",
            p.display(),
            ours.len(),
            theirs.len()
        );
    }
}

#[tokio::test]
async fn ingest_then_render_round_trips_nix_dumps() {
    if !have_nix("ingest_then_render_round_trips_nix_dumps") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("tree");
    make_tree(&root);
    for p in [
        root.clone(),
        root.join("a/b"),
        root.join("run.sh"),
        root.join("empty-file"),
        root.join("abs-link"),
        root.join("empty"),
    ] {
        let nar = nix_dump(&p);
        let (blobs, dirs) = memory();
        let (node, size, sha) = ingest_nar(&nar[..], blobs.clone(), &*dirs).await.unwrap();
        assert_eq!(size, nar.len() as u64, "{}", p.display());
        assert_eq!(
            NixHash::sha256(sha).to_nixbase32(),
            nix_hash(&p),
            "{}",
            p.display()
        );

        // The same node as importing the tree from the file system.
        let (b2, d2): (Arc<dyn BlobService>, Arc<dyn DirectoryService>) = (
            Arc::new(MemoryBlobService::default()),
            Arc::new(MemoryDirectoryService::default()),
        );
        let (imported, _) = import_path(&p, b2, d2, 4, Arc::new(NoProgress))
            .await
            .unwrap();
        assert_eq!(node, imported, "{}", p.display());
        if matches!(node, Node::Directory { .. }) {
            assert_eq!(dirs.closures.load(Ordering::SeqCst), 1);
        } else {
            assert_eq!(dirs.stored(), 0);
        }

        // Rendering gives the very same bytes, and calculate_nar their size and hash.
        let rendered = render_nar(&node, blobs.clone(), &*dirs, Vec::new())
            .await
            .unwrap();
        assert!(rendered == nar, "{}: rendered NAR differs", p.display());
        // Keeping repeated contents (a hard link, a copy: see make_tree) too.
        let kept = arca_store::nar::render_nar_keeping_repeats(
            &node,
            blobs.clone(),
            &*dirs,
            Vec::new(),
            arca_store::nar::REPEAT_BUDGET,
        )
        .await
        .unwrap();
        assert!(
            kept == nar,
            "{}: NAR rendered keeping repeats differs",
            p.display()
        );
        assert_eq!(
            calculate_nar(&node, blobs.clone(), &*dirs).await.unwrap(),
            (size, sha)
        );
    }
}

#[tokio::test]
async fn ingest_checks_expected_hash_and_size() {
    if !have_nix("ingest_checks_expected_hash_and_size") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("tree");
    make_tree(&root);
    let nar = nix_dump(&root);
    let sha = NixHash::parse_unprefixed(arca_store::HashAlgo::Sha256, &nix_hash(&root))
        .unwrap()
        .as_sha256()
        .unwrap();
    let len = nar.len() as u64;

    let (blobs, dirs) = memory();
    let ok = ExpectedNar {
        nar_size: Some(len),
        nar_sha256: Some(sha),
    };
    ingest_nar_expecting(&nar[..], blobs, &*dirs, ok)
        .await
        .unwrap();
    assert!(dirs.stored() > 0);

    let mut wrong = sha;
    wrong[0] ^= 1;
    for (expected, what) in [
        (
            ExpectedNar {
                nar_size: Some(len),
                nar_sha256: Some(wrong),
            },
            "hash",
        ),
        (
            ExpectedNar {
                nar_size: Some(len - 8),
                nar_sha256: Some(sha),
            },
            "size (smaller)",
        ),
        (
            ExpectedNar {
                nar_size: Some(len + 8),
                nar_sha256: None,
            },
            "size (larger)",
        ),
    ] {
        let (blobs, dirs) = memory();
        let err = ingest_nar_expecting(&nar[..], blobs, &*dirs, expected)
            .await
            .unwrap_err();
        match what {
            "hash" => assert!(matches!(err, IngestError::NarHashMismatch { .. }), "{err}"),
            "size (smaller)" => assert!(
                matches!(err, IngestError::NarSizeMismatch { at_least: true, .. }),
                "{err}"
            ),
            _ => assert!(
                matches!(err, IngestError::NarSizeMismatch { at_least: false, actual, .. } if actual == len),
                "{err}"
            ),
        }
        assert_eq!(
            dirs.stored(),
            0,
            "{what}: directories stored despite the mismatch"
        );
    }
}

#[tokio::test]
async fn reader_streams_exact_contents() {
    if !have_nix("reader_streams_exact_contents") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("tree");
    make_tree(&root);
    let nar = nix_dump(&root);
    let mut r = NarReader::new(&nar[..]).await.unwrap();
    let mut path = vec![root.clone()];
    let (mut files, mut links, mut dirs) = (0, 0, 0);
    while let Some(ev) = r.next().await.unwrap() {
        match ev {
            Event::DirectoryStart { name } => {
                dirs += 1;
                if let Some(n) = name {
                    let p = path
                        .last()
                        .unwrap()
                        .join(std::ffi::OsStr::from_bytes(n.as_bytes()));
                    path.push(p);
                }
            }
            Event::DirectoryEnd => {
                path.pop();
            }
            Event::File {
                name,
                executable,
                size,
            } => {
                files += 1;
                let p = path
                    .last()
                    .unwrap()
                    .join(std::ffi::OsStr::from_bytes(name.unwrap().as_bytes()));
                let want = std::fs::read(&p).unwrap();
                assert_eq!(size, want.len() as u64);
                assert_eq!(
                    executable,
                    std::fs::metadata(&p).unwrap().permissions().mode() & 0o100 != 0
                );
                // Read in small pieces; more than the file must never come out.
                let mut got = Vec::new();
                let mut c = r.contents();
                let mut buf = [0u8; 4099];
                loop {
                    let n = c.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                assert!(got == want, "{}", p.display());
            }
            Event::Symlink { name, target } => {
                links += 1;
                let p = path
                    .last()
                    .unwrap()
                    .join(std::ffi::OsStr::from_bytes(name.unwrap().as_bytes()));
                assert_eq!(
                    std::fs::read_link(&p).unwrap().as_os_str().as_bytes(),
                    target.as_bytes()
                );
            }
        }
    }
    assert_eq!((files, links, dirs), (26, 5, 7));
    // Skipping contents (not reading them) works too.
    let mut r = NarReader::new(&nar[..]).await.unwrap();
    let mut n = 0;
    while r.next().await.unwrap().is_some() {
        n += 1;
    }
    assert_eq!(n, 26 + 5 + 2 * 7);
}

// ---------------------------------------------------------------- malformed NARs

/// Appends a NAR string: length, bytes, zero padding.
fn push(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
    out.resize(out.len() + (8 - s.len() % 8) % 8, 0);
}

fn build(tokens: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for t in tokens {
        push(&mut out, t);
    }
    out
}

/// A valid NAR: a directory holding a directory with a file, and a symlink.
fn valid_tokens() -> Vec<&'static [u8]> {
    vec![
        b"nix-archive-1",
        b"(",
        b"type",
        b"directory",
        b"entry",
        b"(",
        b"name",
        b"a",
        b"node",
        b"(",
        b"type",
        b"directory",
        b"entry",
        b"(",
        b"name",
        b"f",
        b"node",
        b"(",
        b"type",
        b"regular",
        b"executable",
        b"",
        b"contents",
        b"hello",
        b")",
        b")",
        b")",
        b")",
        b"entry",
        b"(",
        b"name",
        b"b",
        b"node",
        b"(",
        b"type",
        b"symlink",
        b"target",
        b"a",
        b")",
        b")",
        b")",
    ]
}

/// Replaces the token at `i`.
fn with(i: usize, t: &'static [u8]) -> Vec<u8> {
    let mut v = valid_tokens();
    v[i] = t;
    build(&v)
}

/// Parses to the end with the bare reader, then ingests; both must fail, and
/// nothing may be stored.
async fn reject(nar: &[u8]) -> (NarError, IngestError) {
    let reader_err = async {
        let mut r = NarReader::new(nar).await?;
        while let Some(ev) = r.next().await? {
            if let Event::File { .. } = ev {
                tokio::io::copy(&mut r.contents(), &mut tokio::io::sink())
                    .await
                    .map_err(|e| {
                        if e.kind() == std::io::ErrorKind::UnexpectedEof {
                            NarError::Truncated
                        } else {
                            NarError::Io(e)
                        }
                    })?;
            }
        }
        Ok::<(), NarError>(())
    }
    .await
    .expect_err("the reader accepted a malformed NAR");
    let (blobs, dirs) = memory();
    let ingest_err = ingest_nar(nar, blobs, &*dirs)
        .await
        .expect_err("ingest accepted a malformed NAR");
    assert_eq!(dirs.stored(), 0, "a malformed NAR stored directories");
    assert_eq!(dirs.closures.load(Ordering::SeqCst), 0);
    (reader_err, ingest_err)
}

macro_rules! rejects {
    ($nar:expr, $pat:pat $(if $guard:expr)?) => {{
        let (r, i) = reject(&$nar[..]).await;
        assert!(matches!(r, $pat $(if $guard)?), "reader: got {r:?}");
        assert!(matches!(i, IngestError::Nar($pat) $(if $guard)?), "ingest: got {i:?}");
    }};
}

#[tokio::test]
async fn the_valid_base_nar_is_accepted() {
    let nar = build(&valid_tokens());
    let (blobs, dirs) = memory();
    let (node, size, _) = ingest_nar(&nar[..], blobs.clone(), &*dirs).await.unwrap();
    assert_eq!(size, nar.len() as u64);
    assert_eq!(dirs.stored(), 2);
    assert_eq!(
        render_nar(&node, blobs, &*dirs, Vec::new()).await.unwrap(),
        nar
    );
}

#[tokio::test]
async fn rejects_bad_magic() {
    rejects!(with(0, b"nix-archive-2"), NarError::BadMagic);
    rejects!(with(0, b"nix-archive-1\0"), NarError::BadMagic);
    rejects!(Vec::<u8>::new(), NarError::BadMagic);
    rejects!(b"nix-archive-1", NarError::BadMagic);
    let mut huge = u64::MAX.to_le_bytes().to_vec();
    huge.extend_from_slice(b"nix-archive-1\0\0\0");
    rejects!(huge, NarError::BadMagic);
}

#[tokio::test]
async fn rejects_unknown_and_misplaced_tokens() {
    rejects!(with(1, b"["), NarError::UnexpectedToken { .. });
    rejects!(with(2, b"kind"), NarError::UnexpectedToken { .. });
    rejects!(with(3, b"fifo"), NarError::UnexpectedToken { .. });
    rejects!(with(4, b"entries"), NarError::UnexpectedToken { .. });
    rejects!(with(6, b"nom"), NarError::UnexpectedToken { .. });
    rejects!(with(8, b"nodes"), NarError::UnexpectedToken { .. });
    rejects!(with(20, b"executabl"), NarError::UnexpectedToken { .. });
    // "executable" must be followed by an empty string.
    rejects!(with(21, b"yes"), NarError::UnexpectedToken { .. });
    rejects!(with(22, b"content"), NarError::UnexpectedToken { .. });
    rejects!(with(36, b"targets"), NarError::UnexpectedToken { .. });
    // The closing parentheses.
    rejects!(with(24, b"("), NarError::UnexpectedToken { .. });
    rejects!(with(25, b"entry"), NarError::UnexpectedToken { .. });
    rejects!(with(39, b"]"), NarError::UnexpectedToken { .. });
    // Two "executable" markers; "contents" missing.
    let mut v = valid_tokens();
    v.splice(20..20, [b"executable".as_slice(), b""]);
    rejects!(build(&v), NarError::UnexpectedToken { .. });
    let mut v = valid_tokens();
    v.drain(22..24);
    rejects!(build(&v), NarError::UnexpectedToken { .. });
}

#[tokio::test]
async fn rejects_non_zero_padding() {
    let nar = build(&valid_tokens());
    // Offsets of padding bytes: after "nix-archive-1" (13 bytes: padding at 8+13..8+16),
    // after the name "a", and after the contents "hello".
    let mut cases = vec![8 + 13, 8 + 15];
    let find = |needle: &[u8]| nar.windows(needle.len()).position(|w| w == needle).unwrap();
    let name_a = find(&[1, 0, 0, 0, 0, 0, 0, 0, b'a']) + 9;
    let hello = find(b"hello") + 5;
    cases.extend([name_a, name_a + 6, hello, hello + 2]);
    // A padding byte of a keyword token ("(" has 7).
    cases.push(8 + 16 + 8 + 2);
    for at in cases {
        let mut bad = nar.clone();
        assert_eq!(bad[at], 0, "offset {at} is not padding");
        bad[at] = 1;
        if at < 8 + 16 {
            rejects!(bad, NarError::BadMagic);
        } else {
            rejects!(bad, NarError::NonZeroPadding);
        }
    }
}

#[tokio::test]
async fn rejects_names_out_of_order_or_duplicated() {
    let mut v = valid_tokens();
    v[7] = b"c";
    rejects!(build(&v), NarError::NamesOutOfOrder { .. });
    v[7] = b"b";
    rejects!(build(&v), NarError::DuplicateName(_));
    // Byte order, not locale order: "B" (0x42) sorts before "a" (0x61).
    v[7] = b"a";
    v[31] = b"B";
    rejects!(build(&v), NarError::NamesOutOfOrder { .. });
    // A prefix sorts first: "ab" after "a" is fine, "a" after "ab" is not.
    v[7] = b"ab";
    v[31] = b"a";
    rejects!(build(&v), NarError::NamesOutOfOrder { .. });
}

#[tokio::test]
async fn rejects_invalid_names() {
    for name in [b"".as_slice(), b".", b"..", b"a/b", b"/", b"a\0b"] {
        let mut v = valid_tokens();
        v[31] = name;
        rejects!(build(&v), NarError::InvalidName(_));
    }
    let long = vec![b'z'; 256];
    let mut v = valid_tokens();
    v[31] = &long;
    rejects!(build(&v), NarError::NameTooLong(256));
}

#[tokio::test]
async fn rejects_invalid_symlink_targets() {
    rejects!(with(37, b""), NarError::InvalidTarget(_));
    rejects!(with(37, b"a\0b"), NarError::InvalidTarget(_));
    let long = vec![b't'; 4096];
    let mut v = valid_tokens();
    v[37] = &long;
    rejects!(build(&v), NarError::TargetTooLong(4096));
    // 4095 bytes are fine.
    let ok = vec![b't'; 4095];
    v[37] = &ok;
    let (blobs, dirs) = memory();
    ingest_nar(&build(&v)[..], blobs, &*dirs).await.unwrap();
}

#[tokio::test]
async fn rejects_absurd_lengths() {
    let nar = build(&valid_tokens());
    // The length of "type" (at 8+16+16) set to huge values.
    for len in [17u64, 1 << 20, 1 << 40, u64::MAX] {
        let mut bad = nar.clone();
        bad[40..48].copy_from_slice(&len.to_le_bytes());
        rejects!(bad, NarError::TokenTooLong(l) if l == len);
    }
    // The length of the name "a" set to u64::MAX.
    let at = nar
        .windows(9)
        .position(|w| w == [1, 0, 0, 0, 0, 0, 0, 0, b'a'])
        .unwrap();
    let mut bad = nar.clone();
    bad[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    rejects!(bad, NarError::NameTooLong(u64::MAX));
    // A symlink target length of u64::MAX.
    let at = nar.len() - 4 * 16;
    assert_eq!(nar[at..at + 9], [1, 0, 0, 0, 0, 0, 0, 0, b'a']);
    let mut bad = nar.clone();
    bad[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    rejects!(bad, NarError::TargetTooLong(u64::MAX));
}

#[tokio::test]
async fn rejects_contents_longer_than_the_input() {
    let nar = build(&valid_tokens());
    let at = nar.windows(5).position(|w| w == b"hello").unwrap() - 8;
    for len in [9u64, 1 << 20, 1 << 40, u64::MAX] {
        let mut bad = nar.clone();
        bad[at..at + 8].copy_from_slice(&len.to_le_bytes());
        let (r, i) = reject(&bad).await;
        // Either the contents run past the end, or they swallow the rest
        // and the tokens after them are garbage.
        assert!(
            matches!(
                r,
                NarError::Truncated
                    | NarError::NonZeroPadding
                    | NarError::TokenTooLong(_)
                    | NarError::UnexpectedToken { .. }
            ),
            "{r:?}"
        );
        assert!(matches!(i, IngestError::Nar(_)), "{i:?}");
    }
}

#[tokio::test]
async fn rejects_every_truncation() {
    let nar = build(&valid_tokens());
    for cut in 0..nar.len() {
        let (r, i) = reject(&nar[..cut]).await;
        let want_magic = cut < 24;
        assert!(
            if want_magic {
                matches!(r, NarError::BadMagic)
            } else {
                matches!(r, NarError::Truncated)
            },
            "cut at {cut}: {r:?}"
        );
        assert!(
            matches!(
                i,
                IngestError::Nar(NarError::Truncated | NarError::BadMagic)
            ),
            "cut at {cut}: {i:?}"
        );
    }
}

#[tokio::test]
async fn rejects_trailing_bytes() {
    let nar = build(&valid_tokens());
    for extra in [&[0u8][..], &[0; 8], b"nix-archive-1", &build(&[b"("])] {
        let mut bad = nar.clone();
        bad.extend_from_slice(extra);
        rejects!(bad, NarError::TrailingData);
    }
    // Also after a root file.
    let mut bad = build(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"regular",
        b"contents",
        b"x",
        b")",
    ]);
    bad.push(b'!');
    rejects!(bad, NarError::TrailingData);
}

#[tokio::test]
async fn reader_stays_failed_after_an_error() {
    let nar = with(3, b"fifo");
    let mut r = NarReader::new(&nar[..]).await.unwrap();
    assert!(matches!(
        r.next().await,
        Err(NarError::UnexpectedToken { .. })
    ));
    assert!(matches!(r.next().await, Err(NarError::Failed)));
}

// ---------------------------------------------------------------- writer and render errors

#[tokio::test]
async fn writer_refuses_misuse() {
    let a = "a".try_into().unwrap();
    let b = "b".try_into().unwrap();
    let mut w = NarWriter::new(Vec::new()).await.unwrap();
    assert!(matches!(
        w.start_directory(Some(&a)).await,
        Err(WriteError::Misuse(_))
    ));
    w.start_directory(None).await.unwrap();
    assert!(matches!(
        w.start_directory(None).await,
        Err(WriteError::Misuse(_))
    ));
    w.symlink(Some(&b), &"t".try_into().unwrap()).await.unwrap();
    assert!(matches!(
        w.symlink(Some(&a), &"t".try_into().unwrap()).await,
        Err(WriteError::NamesOutOfOrder { .. })
    ));
    assert!(matches!(
        w.symlink(Some(&b), &"t".try_into().unwrap()).await,
        Err(WriteError::DuplicateName(_))
    ));
    let c = "c".try_into().unwrap();
    w.start_file(Some(&c), false, 3).await.unwrap();
    assert!(matches!(
        w.write_contents(b"abcd").await,
        Err(WriteError::ContentsLength {
            expected: 3,
            actual: 4
        })
    ));
    w.write_contents(b"ab").await.unwrap();
    assert!(matches!(
        w.end_file().await,
        Err(WriteError::ContentsLength {
            expected: 3,
            actual: 2
        })
    ));
    let mut short = &b"xy"[..];
    let mut w = NarWriter::new(Vec::new()).await.unwrap();
    assert!(matches!(
        w.file(None, false, 3, &mut short).await,
        Err(WriteError::ContentsLength { .. })
    ));
    let w = NarWriter::new(Vec::new()).await.unwrap();
    assert!(matches!(w.finish().await, Err(WriteError::Misuse(_))));
    let mut w = NarWriter::new(Vec::new()).await.unwrap();
    w.start_directory(None).await.unwrap();
    assert!(matches!(w.finish().await, Err(WriteError::Misuse(_))));
}

#[tokio::test]
async fn render_refuses_missing_or_wrong_size_blobs() {
    let (blobs, dirs) = memory();
    let digest = put_bytes(&*blobs, bytes::Bytes::from_static(b"12345"))
        .await
        .unwrap();
    for size in [4, 6] {
        let node = Node::File {
            digest,
            size,
            executable: false,
        };
        let err = render_nar(&node, blobs.clone(), &*dirs, Vec::new())
            .await
            .unwrap_err();
        assert!(matches!(err, RenderError::BlobSize { .. }), "{err:?}");
    }
    let missing = Node::File {
        digest: B3Digest::of(b"nope"),
        size: 4,
        executable: false,
    };
    let err = render_nar(&missing, blobs.clone(), &*dirs, Vec::new())
        .await
        .unwrap_err();
    assert!(matches!(err, RenderError::MissingBlob(_)), "{err:?}");
    let no_dir = Node::Directory {
        digest: B3Digest::of(b"nope"),
        size: 0,
    };
    let err = render_nar(&no_dir, blobs, &*dirs, Vec::new())
        .await
        .unwrap_err();
    assert!(matches!(err, RenderError::Directory(_)), "{err:?}");
}

/// Keeping repeated contents never turns a failed first time into repeats
/// written from nothing: a content missing at its first time fails the
/// render there.
#[tokio::test]
async fn a_repeated_content_missing_at_its_first_time_fails_the_render() {
    let (blobs, dirs) = memory();
    let missing = Node::File {
        digest: B3Digest::of(b"nowhere to be found"),
        size: 19,
        executable: false,
    };
    let mut dir = Directory::new();
    dir.add("a".try_into().unwrap(), missing.clone()).unwrap();
    dir.add("b".try_into().unwrap(), missing).unwrap();
    let root = Node::Directory {
        digest: dir.digest(),
        size: dir.size(),
    };
    arca_castore::directoryservice::put_all(&*dirs, vec![dir])
        .await
        .unwrap();
    let err = arca_store::nar::render_nar_keeping_repeats(
        &root,
        blobs,
        &*dirs,
        Vec::new(),
        arca_store::nar::REPEAT_BUDGET,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, RenderError::MissingBlob(_)), "{err:?}");
}

// ---------------------------------------------------------------- awkward inputs and failing services

/// Hands out at most 3 bytes per read.
struct Trickle<'a>(&'a [u8]);

impl tokio::io::AsyncRead for Trickle<'_> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let n = self.0.len().min(3).min(buf.remaining());
        buf.put_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        std::task::Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn ingest_handles_short_reads() {
    let nar = build(&valid_tokens());
    let (blobs, dirs) = memory();
    let (node, size, sha) = ingest_nar(Trickle(&nar), blobs.clone(), &*dirs)
        .await
        .unwrap();
    assert_eq!(size, nar.len() as u64);
    assert_eq!(NixHash::sha256(sha), NixHash::sha256_of(&nar));
    assert_eq!(
        render_nar(&node, blobs, &*dirs, Vec::new()).await.unwrap(),
        nar
    );
}

/// A blob service whose uploads all fail.
struct FailingBlobs;

struct FailingWriter;

#[async_trait::async_trait]
impl arca_castore::blobservice::BlobWriter for FailingWriter {
    async fn write(&mut self, _data: bytes::Bytes) -> Result<(), arca_castore::Error> {
        Err(arca_castore::Error::Unavailable("no".into()))
    }
    async fn close(&mut self) -> Result<B3Digest, arca_castore::Error> {
        Err(arca_castore::Error::Unavailable("no".into()))
    }
}

#[async_trait::async_trait]
impl BlobService for FailingBlobs {
    async fn has(&self, _: &B3Digest) -> Result<bool, arca_castore::Error> {
        Ok(false)
    }
    async fn open_read(
        &self,
        _: &B3Digest,
    ) -> Result<Option<Box<dyn arca_castore::blobservice::BlobReader>>, arca_castore::Error> {
        Ok(None)
    }
    async fn open_write(&self) -> Box<dyn arca_castore::blobservice::BlobWriter> {
        Box::new(FailingWriter)
    }
}

#[tokio::test]
async fn failed_uploads_fail_the_ingest_and_store_no_directory() {
    let nar = build(&valid_tokens());
    let dirs = CountingDirectories::default();
    let err = ingest_nar(&nar[..], Arc::new(FailingBlobs), &dirs)
        .await
        .unwrap_err();
    assert!(
        matches!(err, IngestError::Blob(arca_castore::Error::Unavailable(_))),
        "{err:?}"
    );
    assert_eq!(dirs.stored(), 0);
}

/// A NAR string token: length (u64 LE), bytes, zero padding to 8.
fn nar_token(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
    out.extend(std::iter::repeat_n(0u8, (8 - s.len() % 8) % 8));
}

#[tokio::test]
async fn a_file_larger_than_the_announced_nar_is_refused_before_streaming() {
    // A file entry announcing 1 TiB, followed by endless zeros: with NarSize
    // known, the ingest must stop at the header, not stream a terabyte.
    let mut header = Vec::new();
    for t in [
        &b"nix-archive-1"[..],
        b"(",
        b"type",
        b"regular",
        b"contents",
    ] {
        nar_token(&mut header, t);
    }
    header.extend_from_slice(&(1u64 << 40).to_le_bytes());
    let reader = tokio::io::AsyncReadExt::chain(&header[..], tokio::io::repeat(0));
    let (blobs, dirs) = memory();
    let expected = ExpectedNar {
        nar_size: Some(4096),
        nar_sha256: None,
    };
    let result = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        ingest_nar_expecting(reader, blobs, &*dirs, expected),
    )
    .await
    .expect("refused at the header, not after streaming the contents");
    let err = result.unwrap_err();
    assert!(
        matches!(
            err,
            IngestError::NarSizeMismatch {
                expected: 4096,
                at_least: true,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(dirs.stored(), 0);
}
