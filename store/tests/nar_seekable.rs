//! The seekable NAR reader against `render_nar`: same length (known without
//! reading a blob), same bytes from every offset, and wrong blobs refused.
use arca_castore::blobservice::{put_bytes, BlobReader, BlobWriter, ChunkMeta, MemoryBlobService};
use arca_castore::directoryservice::MemoryDirectoryService;
use arca_castore::import::{import_path, NoProgress};
use arca_castore::{B3Digest, BlobService, Directory, DirectoryService, Node, PathComponent};
use arca_store::nar::{render_nar, RenderError, SeekableNar};
use std::io::SeekFrom;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeek, AsyncSeekExt, ReadBuf};

// ---------------------------------------------------------------- helpers

/// A blob service that counts reads and can hand out slow readers (a few
/// bytes per read, `Pending` every other poll).
struct Counting {
    inner: MemoryBlobService,
    opened: AtomicUsize,
    slow: bool,
}

impl Counting {
    fn new(slow: bool) -> Arc<Self> {
        Arc::new(Self {
            inner: MemoryBlobService::default(),
            opened: AtomicUsize::new(0),
            slow,
        })
    }
    fn opened(&self) -> usize {
        self.opened.load(Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl BlobService for Counting {
    async fn has(&self, digest: &B3Digest) -> Result<bool, arca_castore::Error> {
        self.inner.has(digest).await
    }
    async fn open_read(
        &self,
        digest: &B3Digest,
    ) -> Result<Option<Box<dyn BlobReader>>, arca_castore::Error> {
        self.opened.fetch_add(1, Ordering::SeqCst);
        let r = self.inner.open_read(digest).await?;
        Ok(if self.slow {
            r.map(|r| {
                Box::new(Slow {
                    inner: r,
                    skip: false,
                }) as Box<dyn BlobReader>
            })
        } else {
            r
        })
    }
    async fn open_write(&self) -> Box<dyn BlobWriter> {
        self.inner.open_write().await
    }
    async fn chunks(
        &self,
        digest: &B3Digest,
    ) -> Result<Option<Vec<ChunkMeta>>, arca_castore::Error> {
        self.opened.fetch_add(1, Ordering::SeqCst);
        self.inner.chunks(digest).await
    }
}

struct Slow {
    inner: Box<dyn BlobReader>,
    skip: bool,
}

impl AsyncRead for Slow {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.skip = !self.skip;
        if self.skip {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let want = buf.remaining().min(4093);
        let mut sub = ReadBuf::new(buf.initialize_unfilled_to(want));
        std::task::ready!(Pin::new(&mut self.inner).poll_read(cx, &mut sub))?;
        let n = sub.filled().len();
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncSeek for Slow {
    fn start_seek(mut self: Pin<&mut Self>, position: SeekFrom) -> std::io::Result<()> {
        Pin::new(&mut self.inner).start_seek(position)
    }
    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<u64>> {
        self.skip = !self.skip;
        if self.skip {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_complete(cx)
    }
}

/// xorshift64*: reproducible pseudo-random numbers without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A tree with every kind of node, empty ones, odd-length names, and a multi-MiB file.
fn make_tree(root: &Path) {
    use std::os::unix::fs::symlink;
    std::fs::create_dir_all(root.join("a/bb/ccc/dddd")).unwrap();
    std::fs::create_dir(root.join("empty")).unwrap();
    std::fs::create_dir_all(root.join("x/empty-inside")).unwrap();
    std::fs::write(root.join("empty-file"), b"").unwrap();
    std::fs::write(root.join("a/bb/empty-file2"), b"").unwrap();
    std::fs::write(root.join("a/bb/ccc/dddd/deep"), b"deep down\n").unwrap();
    std::fs::write(root.join("a/hello"), b"hello world").unwrap();
    std::fs::write(root.join("a/bb/eight888"), b"12345678").unwrap();
    std::fs::write(root.join("a/bb/sixteen"), b"1234567812345678").unwrap();
    std::fs::write(root.join("a/bb/nine"), b"123456789").unwrap();
    std::fs::write(root.join("run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(root.join("a/exec-empty"), b"").unwrap();
    std::fs::set_permissions(
        root.join("a/exec-empty"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    symlink("a/hello", root.join("link")).unwrap();
    symlink("../../../nowhere/at/all/x", root.join("a/bb/dangling")).unwrap();
    symlink("1234567", root.join("a/l7")).unwrap();
    std::fs::create_dir(root.join("odd")).unwrap();
    for len in 1..=17 {
        let name = "n".repeat(len);
        std::fs::write(root.join("odd").join(&name), name.repeat(len % 5)).unwrap();
    }
    std::fs::write(
        root.join(std::ffi::OsStr::from_bytes(b"\xff\x01 bytes")),
        b"raw",
    )
    .unwrap();
    std::fs::write(root.join("m".repeat(255)), b"longest name").unwrap();
    // 3 MiB + 5 bytes of pseudo-random data.
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let big: Vec<u8> = (0..(3 << 20) + 5).map(|_| rng.next() as u8).collect();
    std::fs::write(root.join("a/big.bin"), &big).unwrap();
}

async fn import(root: &Path, blobs: Arc<dyn BlobService>) -> (Node, Arc<MemoryDirectoryService>) {
    let dirs = Arc::new(MemoryDirectoryService::default());
    let (node, _) = import_path(root, blobs, dirs.clone(), 4, Arc::new(NoProgress))
        .await
        .unwrap();
    (node, dirs)
}

/// Reads up to `n` bytes (fewer only at EOF).
async fn read_up_to<R: AsyncRead + Unpin>(r: &mut R, n: usize) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(n);
    (&mut *r).take(n as u64).read_to_end(&mut out).await?;
    Ok(out)
}

/// The imported tree, its rendered NAR, and a fresh seekable NAR of it.
struct Fixture {
    _tmp: tempfile::TempDir,
    blobs: Arc<Counting>,
    dirs: Arc<MemoryDirectoryService>,
    node: Node,
    nar: Vec<u8>,
}

async fn fixture(slow: bool) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    std::fs::create_dir(&root).unwrap();
    make_tree(&root);
    let blobs = Counting::new(slow);
    let (node, dirs) = import(&root, blobs.clone()).await;
    let nar = render_nar(&node, blobs.clone(), &*dirs, Vec::new())
        .await
        .unwrap();
    // The reference itself equals what the writer makes of the tree.
    assert_eq!(
        nar,
        arca_store::nar::dump_path(&root, Vec::new()).await.unwrap()
    );
    Fixture {
        _tmp: tmp,
        blobs,
        dirs,
        node,
        nar,
    }
}

impl Fixture {
    async fn seekable(&self) -> SeekableNar {
        SeekableNar::new(self.node.clone(), self.blobs.clone(), &*self.dirs)
            .await
            .unwrap()
    }
}

fn render_error(e: std::io::Error) -> RenderError {
    *e.into_inner()
        .expect("an error with a source")
        .downcast::<RenderError>()
        .expect("a RenderError")
}

// ---------------------------------------------------------------- length and layout

#[tokio::test]
async fn length_is_known_without_reading_any_blob() {
    let f = fixture(false).await;
    let before = f.blobs.opened();
    let s = f.seekable().await;
    assert_eq!(f.blobs.opened(), before, "laying out the NAR read a blob");
    assert_eq!(s.len(), f.nar.len() as u64);
    assert!(!s.is_empty());
    assert_eq!(s.position(), 0);
    let b: Vec<u64> = s.boundaries().collect();
    assert_eq!(b[0], 0);
    assert!(
        b.windows(2).all(|w| w[0] < w[1]),
        "boundaries not strictly increasing: {b:?}"
    );
    assert!(*b.last().unwrap() < s.len());
}

#[tokio::test]
async fn single_nodes_as_root() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path();
    std::fs::write(p.join("file"), b"just a file, 27 bytes long.").unwrap();
    std::fs::write(p.join("exe"), b"x").unwrap();
    std::fs::set_permissions(p.join("exe"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(p.join("empty"), b"").unwrap();
    std::fs::write(p.join("eight"), b"88888888").unwrap();
    std::fs::create_dir(p.join("dir")).unwrap();
    std::os::unix::fs::symlink("target/of/odd/len", p.join("link")).unwrap();
    for name in ["file", "exe", "empty", "eight", "dir", "link"] {
        let blobs = Counting::new(false);
        let (node, dirs) = import(&p.join(name), blobs.clone()).await;
        let nar = render_nar(&node, blobs.clone(), &*dirs, Vec::new())
            .await
            .unwrap();
        let before = blobs.opened();
        let mut s = SeekableNar::new(node, blobs.clone(), &*dirs).await.unwrap();
        assert_eq!(blobs.opened(), before, "{name}");
        assert_eq!(s.len(), nar.len() as u64, "{name}");
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, nar, "{name}");
    }
}

// ---------------------------------------------------------------- sequential reads

#[tokio::test]
async fn sequential_read_equals_render() {
    let f = fixture(false).await;
    let mut s = f.seekable().await;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    assert!(out == f.nar, "sequential read differs from render_nar");
    assert_eq!(s.position(), f.nar.len() as u64);
    // At the end: EOF, again and again.
    assert_eq!(s.read(&mut [0u8; 10]).await.unwrap(), 0);
    assert_eq!(s.read(&mut [0u8; 10]).await.unwrap(), 0);

    // In pieces of awkward sizes.
    let mut s = f.seekable().await;
    let mut out = Vec::new();
    let mut rng = Rng(7);
    loop {
        let mut buf = vec![0u8; 1 + rng.below(20_000) as usize];
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    assert!(out == f.nar, "piecewise read differs from render_nar");
}

#[tokio::test]
async fn sequential_read_with_slow_blob_readers() {
    let f = fixture(true).await;
    let mut s = f.seekable().await;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    assert!(
        out == f.nar,
        "read through slow readers differs from render_nar"
    );
}

// ---------------------------------------------------------------- seeks

async fn check_seeks(f: &Fixture, seed: u64) -> usize {
    let len = f.nar.len() as u64;
    let mut s = f.seekable().await;
    let mut offsets = vec![0, 1, len - 1, len, len + 1, len + 1000];
    for b in s.boundaries().collect::<Vec<_>>() {
        offsets.extend([b.saturating_sub(1), b, b + 1]);
    }
    let mut rng = Rng(seed);
    for _ in 0..200 {
        offsets.push(rng.below(len));
    }
    // Backwards too, and within the big file.
    offsets.extend(
        offsets
            .clone()
            .into_iter()
            .rev()
            .step_by(3)
            .collect::<Vec<_>>(),
    );
    let mut checked = 0;
    for off in offsets {
        let want = match rng.below(10) {
            0 => 0,
            1..=5 => rng.below(64) as usize,
            6..=8 => rng.below(100_000) as usize,
            _ => rng.below(4 << 20) as usize,
        };
        assert_eq!(s.seek(SeekFrom::Start(off)).await.unwrap(), off);
        let got = read_up_to(&mut s, want)
            .await
            .unwrap_or_else(|e| panic!("at {off} (+{want}): {e}"));
        let from = (off as usize).min(f.nar.len());
        let to = (off as usize).saturating_add(want).min(f.nar.len());
        assert!(got == f.nar[from..to], "at {off} (+{want}): wrong bytes");
        checked += 1;
    }
    checked
}

#[tokio::test]
async fn reads_after_seeks_equal_the_slices() {
    let f = fixture(false).await;
    assert!(check_seeks(&f, 42).await > 200);
}

#[tokio::test]
async fn reads_after_seeks_with_slow_blob_readers() {
    let f = fixture(true).await;
    assert!(check_seeks(&f, 4242).await > 200);
}

#[tokio::test]
async fn seeks_from_end_and_current() {
    let f = fixture(false).await;
    let len = f.nar.len() as u64;
    let mut s = f.seekable().await;
    assert_eq!(s.seek(SeekFrom::End(-100)).await.unwrap(), len - 100);
    let got = read_up_to(&mut s, 1000).await.unwrap();
    assert_eq!(got, &f.nar[f.nar.len() - 100..]);
    assert_eq!(s.seek(SeekFrom::Current(-50)).await.unwrap(), len - 50);
    assert_eq!(
        read_up_to(&mut s, 10).await.unwrap(),
        &f.nar[f.nar.len() - 50..f.nar.len() - 40]
    );
    assert_eq!(s.seek(SeekFrom::End(0)).await.unwrap(), len);
    assert_eq!(s.read(&mut [0u8; 4]).await.unwrap(), 0);
    assert!(s.seek(SeekFrom::End(-(len as i64) - 1)).await.is_err());
    assert!(s.seek(SeekFrom::Current(-(len as i64) - 1)).await.is_err());
    // A failed seek leaves the position alone.
    assert_eq!(s.stream_position().await.unwrap(), len);
    // Into the middle of the big file, then read across its end.
    let big_at = f
        .nar
        .windows(8)
        .position(|w| w == ((3u64 << 20) + 5).to_le_bytes())
        .unwrap()
        + 8;
    let off = big_at as u64 + (1 << 20) + 3;
    s.seek(SeekFrom::Start(off)).await.unwrap();
    let got = read_up_to(&mut s, 3 << 20).await.unwrap();
    let end = (off as usize + (3 << 20)).min(f.nar.len());
    assert!(got == f.nar[off as usize..end]);
}

#[tokio::test]
async fn sequential_reads_do_not_reopen_blobs() {
    let f = fixture(false).await;
    let mut s = f.seekable().await;
    let before = f.blobs.opened();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let opened = f.blobs.opened() - before;
    let mut rendered_opens = f.blobs.opened();
    render_nar(&f.node, f.blobs.clone(), &*f.dirs, Vec::new())
        .await
        .unwrap();
    rendered_opens = f.blobs.opened() - rendered_opens;
    assert_eq!(
        opened, rendered_opens,
        "one open per file, as render_nar does"
    );
    // Keeping repeats, the renderer writes the tree's two repeated contents
    // from memory instead, and the NAR is the same.
    let before = f.blobs.opened();
    let kept = arca_store::nar::render_nar_keeping_repeats(
        &f.node,
        f.blobs.clone(),
        &*f.dirs,
        Vec::new(),
        arca_store::nar::REPEAT_BUDGET,
    )
    .await
    .unwrap();
    assert_eq!(f.blobs.opened() - before, opened - 2);
    assert!(kept == out, "the NAR rendered keeping repeats differs");
}

// ---------------------------------------------------------------- wrong blobs

/// A directory holding `inner` under "f" (between two other files), stored.
async fn wrap_in_directory(
    inner: Node,
    blobs: &dyn BlobService,
    dirs: &dyn DirectoryService,
) -> Node {
    let other = put_bytes(blobs, bytes::Bytes::from_static(b"other"))
        .await
        .unwrap();
    let mut d = Directory::new();
    let name = |s: &str| PathComponent::try_from(s.as_bytes()).unwrap();
    d.add(
        name("a"),
        Node::File {
            digest: other,
            size: 5,
            executable: false,
        },
    )
    .unwrap();
    d.add(name("f"), inner).unwrap();
    d.add(
        name("z"),
        Node::File {
            digest: other,
            size: 5,
            executable: true,
        },
    )
    .unwrap();
    let size = d.size();
    let digest = dirs.put(d).await.unwrap();
    Node::Directory { digest, size }
}

#[tokio::test]
async fn blobs_of_the_wrong_size_are_errors() {
    let blobs = Counting::new(false);
    let dirs = MemoryDirectoryService::default();
    // (blob length, claimed size): shorter and longer, with and without padding.
    let cases: [(usize, u64); 8] = [
        (5, 4),
        (5, 6),
        (8, 9),
        (9, 8),
        (8, 7),
        (16, 8),
        (8, 16),
        (3 << 20, (3 << 20) - 1),
    ];
    for (blob_len, claimed) in cases {
        let data: Vec<u8> = (0..blob_len).map(|i| (i * 7) as u8).collect();
        let digest = put_bytes(&*blobs, data.into()).await.unwrap();
        let file = Node::File {
            digest,
            size: claimed,
            executable: false,
        };
        for node in [file.clone(), wrap_in_directory(file, &*blobs, &dirs).await] {
            let mut s = SeekableNar::new(node, blobs.clone(), &dirs).await.unwrap();
            // Sequentially.
            let mut out = Vec::new();
            let err = s.read_to_end(&mut out).await.unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
            assert!(
                matches!(render_error(err), RenderError::BlobSize { expected, .. } if expected == claimed),
                "{blob_len} vs {claimed}"
            );
            // From inside the contents (found after their size in the
            // framing read before the error), to the end.
            let mut token = b"contents".to_vec();
            token.extend_from_slice(&claimed.to_le_bytes());
            let start = out
                .windows(16)
                .position(|w| w == token)
                .expect("contents token") as u64
                + 16;
            let contents_at = start + claimed.min(blob_len as u64) / 2;
            s.seek(SeekFrom::Start(contents_at)).await.unwrap();
            let err = s.read_to_end(&mut Vec::new()).await.unwrap_err();
            assert!(
                matches!(render_error(err), RenderError::BlobSize { .. }),
                "{blob_len} vs {claimed} from {contents_at}"
            );
        }
    }
}

#[tokio::test]
async fn wrong_size_never_yields_wrong_bytes() {
    // Whatever the blob holds beyond the claimed size never reaches the
    // reader: what came out before the error is a prefix of the NAR the
    // node describes with a right-sized blob.
    let blobs = Counting::new(false);
    let dirs = MemoryDirectoryService::default();
    let right = put_bytes(&*blobs, bytes::Bytes::from_static(b"12345678"))
        .await
        .unwrap();
    let long = put_bytes(&*blobs, bytes::Bytes::from_static(b"12345678X"))
        .await
        .unwrap();
    let good = Node::File {
        digest: right,
        size: 8,
        executable: false,
    };
    let bad = Node::File {
        digest: long,
        size: 8,
        executable: false,
    };
    let nar = render_nar(&good, blobs.clone(), &dirs, Vec::new())
        .await
        .unwrap();
    let mut s = SeekableNar::new(bad, blobs.clone(), &dirs).await.unwrap();
    let mut out = Vec::new();
    loop {
        let mut buf = [0u8; 5];
        match s.read(&mut buf).await {
            Ok(0) => panic!("read to the end without noticing the longer blob"),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => {
                assert!(matches!(
                    render_error(e),
                    RenderError::BlobSize {
                        expected: 8,
                        actual: 9,
                        ..
                    }
                ));
                break;
            }
        }
    }
    assert!(nar.starts_with(&out));
    assert!(!out.contains(&b'X'));
}

#[tokio::test]
async fn missing_blobs_and_impossible_nodes() {
    let blobs = Counting::new(false);
    let dirs = MemoryDirectoryService::default();
    let missing = Node::File {
        digest: B3Digest::of(b"nope"),
        size: 4,
        executable: false,
    };
    let mut s = SeekableNar::new(missing, blobs.clone(), &dirs)
        .await
        .unwrap();
    let err = s.read_to_end(&mut Vec::new()).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    assert!(matches!(render_error(err), RenderError::MissingBlob(_)));
    // The error is not sticky: framing before the blob still reads.
    s.seek(SeekFrom::Start(0)).await.unwrap();
    assert_eq!(
        read_up_to(&mut s, 21).await.unwrap(),
        b"\x0d\0\0\0\0\0\0\0nix-archive-1"
    );

    // An empty file whose digest is not the empty blob's: refused up front.
    let zero = Node::File {
        digest: B3Digest::of(b"x"),
        size: 0,
        executable: false,
    };
    let err = SeekableNar::new(zero, blobs.clone(), &dirs)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, RenderError::BlobSize { expected: 0, .. }),
        "{err:?}"
    );

    // A directory that is not stored.
    let no_dir = Node::Directory {
        digest: B3Digest::of(b"nope"),
        size: 0,
    };
    let err = SeekableNar::new(no_dir, blobs.clone(), &dirs)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            RenderError::Directory(_) | RenderError::MissingDirectory(_)
        ),
        "{err:?}"
    );
    assert_eq!(blobs.opened(), 1);
}
