//! Local-files blob stores write chunks raw and compress them in the
//! background: the files change form, the blobs never do.
mod common;

use arca_castore::blobservice::{
    put_bytes, read_all, BlobService, ChunkingParams, Codec, LocalChunking, LocalCompression,
    LocalFilesOptions, ObjectStoreBlobService,
};
use arca_castore::composition::{Builder, Composition};
use arca_castore::{B3Digest, Error};
use bytes::Bytes;
use common::*;
use futures::TryStreamExt;
use rand::RngCore;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const TAG_RAW: u8 = 0;
const TAG_ZSTD: u8 = 1;
/// The tag of chunks compressed with the default codec (LZ4).
const TAG_COMPRESSED: u8 = 2;
const JOURNAL: &str = "pending-compression";
/// Longest a test waits for the compactor.
const PATIENCE: Duration = Duration::from_secs(120);

/// A local-files service on `dir`, background compression, chunks cut
/// while writing (the tests of compression look at chunk files), with this
/// idle delay (at normal priority: other tests keep the cores busy).
fn open(dir: &Path, idle_delay: Duration) -> ObjectStoreBlobService {
    open_with(dir, idle_delay, LocalChunking::Inline)
}

/// [open] with background chunking: blobs larger than a chunk written whole.
fn open_whole_first(dir: &Path, idle_delay: Duration) -> ObjectStoreBlobService {
    open_with(dir, idle_delay, LocalChunking::Background)
}

fn open_with(dir: &Path, idle_delay: Duration, chunking: LocalChunking) -> ObjectStoreBlobService {
    open_with_codec(dir, idle_delay, chunking, Codec::default())
}

fn open_with_codec(
    dir: &Path,
    idle_delay: Duration,
    chunking: LocalChunking,
    codec: Codec,
) -> ObjectStoreBlobService {
    let url = url::Url::from_directory_path(dir).expect("absolute dir");
    let (store, base) =
        arca_castore::composition::object_store_from(&url, &[]).expect("local store");
    let options = LocalFilesOptions {
        compression: LocalCompression::Background,
        chunking,
        idle_delay,
        low_priority: false,
    };
    ObjectStoreBlobService::with_params(store, base, ChunkingParams::default(), codec)
        .with_local_files(dir.to_path_buf(), options)
        .expect("service")
}

/// Every file under `chunks/` (staging files included), sorted.
fn chunk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(subdirs) = std::fs::read_dir(dir.join("chunks")) else {
        return out;
    };
    for sub in subdirs.flatten() {
        for f in std::fs::read_dir(sub.path()).expect("chunk dir").flatten() {
            out.push(f.path());
        }
    }
    out.sort();
    out
}

fn staging_files(dir: &Path) -> Vec<PathBuf> {
    chunk_files(dir)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("#arca-"))
        .collect()
}

/// A chunk file's tag byte.
fn tag(p: &Path) -> u8 {
    use std::io::Read;
    let mut b = [0u8; 1];
    std::fs::File::open(p)
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("chunk file");
    b[0]
}

fn disk_bytes(files: &[PathBuf]) -> u64 {
    files
        .iter()
        .map(|f| std::fs::metadata(f).expect("chunk file").len())
        .sum()
}

fn journal_len(dir: &Path) -> u64 {
    std::fs::metadata(dir.join(JOURNAL)).map_or(0, |m| m.len())
}

/// Waits (bounded) until the compactor has dealt with everything and
/// emptied its journal.
async fn wait_compacted(svc: &ObjectStoreBlobService, dir: &Path) {
    let start = Instant::now();
    while svc.pending_compression() > 0 || journal_len(dir) > 0 {
        assert!(
            start.elapsed() < PATIENCE,
            "not compacted after {PATIENCE:?}: {} pending, journal {} bytes",
            svc.pending_compression(),
            journal_len(dir)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Stores `data` with a compactor that never starts in this test's
/// lifetime, then drops the service: its chunks stay raw and journaled.
async fn store_uncompacted(dir: &Path, data: &[u8]) -> B3Digest {
    let svc = open(dir, Duration::from_secs(3600));
    put_bytes(&svc, data.to_vec().into()).await.unwrap()
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rng().fill_bytes(&mut v);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_are_written_raw_then_compressed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Long enough that the checks of the raw state run before compaction.
    let svc = open(dir, Duration::from_secs(2));
    let data = test_data(3 * 1024 * 1024, 21);
    let digest = put_bytes(&svc, data.clone().into()).await.unwrap();
    let files = chunk_files(dir);
    assert!(files.len() > 2, "{files:?}");
    assert!(
        files.iter().all(|f| tag(f) == TAG_RAW),
        "every new chunk is raw"
    );
    let raw_bytes = disk_bytes(&files);
    assert_eq!(
        raw_bytes,
        data.len() as u64 + files.len() as u64,
        "raw: one tag byte per chunk"
    );
    assert_eq!(
        journal_len(dir),
        32 * files.len() as u64,
        "one journal record per new chunk"
    );
    assert_eq!(svc.pending_compression(), files.len());
    assert_eq!(
        read_all(&svc, &digest).await.unwrap().unwrap(),
        data,
        "raw chunks read back"
    );

    wait_compacted(&svc, dir).await;
    let after = chunk_files(dir);
    assert_eq!(after, files, "same chunks, no staging files left");
    assert!(
        after.iter().all(|f| tag(f) == TAG_COMPRESSED),
        "every chunk compressed"
    );
    let compressed = disk_bytes(&after);
    assert!(
        compressed < raw_bytes * 3 / 4,
        "{compressed} of {raw_bytes}"
    );
    assert_eq!(
        read_all(&svc, &digest).await.unwrap().unwrap(),
        data,
        "compressed chunks read back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incompressible_chunks_stay_raw() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let svc = open(dir, Duration::from_millis(50));
    let data = random_bytes(2 * 1024 * 1024);
    let digest = put_bytes(&svc, data.clone().into()).await.unwrap();
    // Smaller than anything zstd is tried on, though very compressible.
    let tiny = put_bytes(&svc, vec![b'a'; 300].into()).await.unwrap();
    let files = chunk_files(dir);
    let before = disk_bytes(&files);
    wait_compacted(&svc, dir).await;
    let after = chunk_files(dir);
    assert_eq!(after, files);
    assert!(after.iter().all(|f| tag(f) == TAG_RAW));
    assert_eq!(disk_bytes(&after), before);
    assert_eq!(read_all(&svc, &digest).await.unwrap().unwrap(), data);
    assert_eq!(
        read_all(&svc, &tiny).await.unwrap().unwrap(),
        vec![b'a'; 300]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_during_compaction_are_correct() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let svc = open(&dir, Duration::from_millis(100));
    let mut blobs = Vec::new();
    for seed in 0..6 {
        let data = test_data(2 * 1024 * 1024 + seed * 1000, 100 + seed as u64);
        blobs.push((put_bytes(&svc, data.clone().into()).await.unwrap(), data));
    }
    let chunks = chunk_files(&dir).len();
    assert!(chunks > 10);
    // Readers loop over every blob while the compactor rewrites the files.
    let mut readers = Vec::new();
    for r in 0..2 {
        let svc = svc.clone();
        let blobs = blobs.clone();
        readers.push(tokio::spawn(async move {
            let mut reads = 0u64;
            let start = Instant::now();
            loop {
                let done = svc.pending_compression() == 0;
                for (i, (digest, data)) in blobs.iter().enumerate().skip(r) {
                    let got = read_all(&svc, digest)
                        .await
                        .unwrap_or_else(|e| panic!("blob {i}: {e}"));
                    assert!(
                        got.as_deref() == Some(&data[..]),
                        "blob {i} read back different bytes"
                    );
                    reads += 1;
                }
                if done {
                    return reads;
                }
                assert!(start.elapsed() < PATIENCE, "compaction did not finish");
                // Leave the compactor some CPU.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    let mut reads = 0;
    for r in readers {
        reads += r.await.unwrap();
    }
    wait_compacted(&svc, &dir).await;
    assert!(chunk_files(&dir).iter().all(|f| tag(f) == TAG_COMPRESSED));
    assert!(reads >= 11, "{reads} reads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_journal_resumes_compaction_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = test_data(3 * 1024 * 1024, 31);
    let digest = store_uncompacted(dir, &data).await;
    let files = chunk_files(dir);
    assert_eq!(journal_len(dir), 32 * files.len() as u64);
    assert!(files.iter().all(|f| tag(f) == TAG_RAW));
    let svc = open(dir, Duration::from_millis(20));
    assert_eq!(
        svc.pending_compression(),
        files.len(),
        "the journal was read back"
    );
    wait_compacted(&svc, dir).await;
    assert_eq!(chunk_files(dir), files);
    assert!(files.iter().all(|f| tag(f) == TAG_COMPRESSED));
    assert_eq!(read_all(&svc, &digest).await.unwrap().unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_mid_compaction_leaves_a_consistent_store() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = test_data(16 * 1024 * 1024, 41);
    let digest = store_uncompacted(dir, &data).await;
    let files = chunk_files(dir);
    {
        let svc = open(dir, Duration::ZERO);
        // Stop as soon as compaction has begun.
        let start = Instant::now();
        while !files.iter().any(|f| tag(f) == TAG_COMPRESSED) {
            assert!(start.elapsed() < PATIENCE);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        drop(svc);
    }
    // Give the thread time to notice; it stops between two chunks.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(chunk_files(dir), files, "no staging file left behind");
    assert!(staging_files(dir).is_empty());
    // Every chunk still raw is still in the journal.
    let journal = std::fs::read(dir.join(JOURNAL)).unwrap();
    let listed: Vec<B3Digest> = journal
        .chunks_exact(32)
        .map(|r| B3Digest::try_from(r).unwrap())
        .collect();
    for f in files.iter().filter(|f| tag(f) == TAG_RAW) {
        let name = f.file_name().unwrap().to_str().unwrap();
        assert!(
            listed.iter().any(|d| d.to_hex() == name),
            "raw chunk {name} fell out of the journal"
        );
    }
    let svc = open(dir, Duration::from_millis(20));
    wait_compacted(&svc, dir).await;
    assert!(chunk_files(dir).iter().all(|f| tag(f) == TAG_COMPRESSED));
    assert_eq!(read_all(&svc, &digest).await.unwrap().unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_raw_chunk_is_not_compressed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = test_data(3 * 1024 * 1024, 51);
    let digest = store_uncompacted(dir, &data).await;
    let files = chunk_files(dir);
    let victim = &files[files.len() / 2];
    let mut bytes = std::fs::read(victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(victim, &bytes).unwrap();

    let svc = open(dir, Duration::from_millis(20));
    wait_compacted(&svc, dir).await;
    assert_eq!(
        std::fs::read(victim).unwrap(),
        bytes,
        "the corrupt chunk is left exactly as it was"
    );
    for f in files.iter().filter(|f| *f != victim) {
        assert_eq!(tag(f), TAG_COMPRESSED, "{}", f.display());
    }
    let r = read_all(&svc, &digest).await;
    assert!(
        matches!(r, Err(Error::Storage(ref m)) if m.contains("verification")),
        "{r:?}"
    );
}

/// The compactor compresses (and chunks whole files) with the store's
/// codec: zstd frames in a `?codec=zstd` store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compactor_uses_the_stores_codec() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("blobs");
    let svc = open_with_codec(
        &dir,
        Duration::from_millis(50),
        LocalChunking::Background,
        Codec::Zstd(1),
    );
    let data = test_data(3 * 1024 * 1024, 71);
    let digest = put_bytes(&svc, data.clone().into()).await.unwrap();
    let text = Bytes::from(b"a line of compressible text\n".repeat(5000));
    let small = put_bytes(&svc, text.clone()).await.unwrap();
    wait_compacted(&svc, &dir).await;
    let files = chunk_files(&dir);
    assert!(files.len() > 2, "the whole file was chunked");
    assert!(whole_files(&dir).is_empty());
    assert!(files.iter().all(|f| tag(f) == TAG_ZSTD));
    assert_eq!(read_all(&svc, &digest).await.unwrap().unwrap(), data);
    assert_eq!(read_all(&svc, &small).await.unwrap().unwrap(), text);
}

/// `?codec=zstd` stores zstd frames (tag 1), the default LZ4 blocks (tag
/// 2), and either store reads the other's chunks: the tag byte decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_codec_is_chosen_by_the_url_and_every_codec_is_read() {
    let data = Bytes::from(test_data(3 * 1024 * 1024, 67));
    let small_text = |n: u32| Bytes::from(format!("line {n} of some text\n").repeat(4000));
    let (zstd_store, _d, g) = from_urls(
        "objectstore+file://{tmp}/blobs?compression=inline&codec=zstd",
        "memory://",
    );
    let dir = g.tmp.as_ref().unwrap().path().join("blobs");
    let digest = put_bytes(&*zstd_store, data.clone()).await.unwrap();
    let small_zstd = put_bytes(&*zstd_store, small_text(1)).await.unwrap();
    let files = chunk_files(&dir);
    assert!(files.len() > 2);
    assert!(files.iter().all(|f| tag(f) == TAG_ZSTD));
    drop(zstd_store);
    // The same directory opened with the default codec reads the zstd
    // chunks; what it writes is LZ4.
    let blob_at = |url: String| {
        Builder::new(Composition::from_urls(&url, "memory://").unwrap())
            .blob_service("default")
            .unwrap()
    };
    let lz4_store = blob_at(format!(
        "objectstore+file://{}?compression=inline",
        dir.display()
    ));
    assert_eq!(read_all(&*lz4_store, &digest).await.unwrap().unwrap(), data);
    let other = Bytes::from(test_data(3 * 1024 * 1024, 68));
    let other_digest = put_bytes(&*lz4_store, other.clone()).await.unwrap();
    let small_lz4 = put_bytes(&*lz4_store, small_text(2)).await.unwrap();
    let lz4_files: Vec<PathBuf> = chunk_files(&dir)
        .into_iter()
        .filter(|f| !files.contains(f))
        .collect();
    assert!(lz4_files.len() > 2);
    assert!(lz4_files.iter().all(|f| tag(f) == TAG_COMPRESSED));
    // Both codecs compress text well, zstd better.
    let on_disk =
        |d: &B3Digest| disk_bytes(&[dir.join("chunks").join(&d.to_hex()[..2]).join(d.to_hex())]);
    assert!(on_disk(&small_zstd) < on_disk(&small_lz4));
    assert!(on_disk(&small_lz4) < small_text(2).len() as u64 / 4);
    // A zstd store reads LZ4 chunks, and batch reads decode both.
    let zstd_store = blob_at(format!(
        "objectstore+file://{}?compression=inline&codec=zstd",
        dir.display()
    ));
    assert_eq!(
        read_all(&*zstd_store, &other_digest)
            .await
            .unwrap()
            .unwrap(),
        other
    );
    let both = vec![small_zstd, small_lz4];
    let answers: Vec<_> = zstd_store
        .read_many(both.clone())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(answers.len(), 2);
    for ((asked, got), (digest, n)) in answers.into_iter().zip(both.into_iter().zip([1, 2])) {
        assert_eq!(asked, digest);
        assert_eq!(got.unwrap(), small_text(n));
    }
    // Unknown codecs, and codecs for directory services, are refused when the URL is read.
    let e = Composition::from_urls("objectstore+file:///tmp/x?codec=brotli", "memory://")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("expected lz4 or zstd"), "{e}");
    let e = Composition::from_urls("memory://", "objectstore+file:///tmp/x?codec=zstd")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("only applies to blob services"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_is_chosen_by_the_url() {
    // inline: compressed at once, no journal.
    let (b, _d, g) = from_urls(
        "objectstore+file://{tmp}/blobs?compression=inline",
        "memory://",
    );
    let dir = g.tmp.as_ref().unwrap().path().join("blobs");
    let data = test_data(2 * 1024 * 1024, 61);
    let digest = put_bytes(&*b, data.clone().into()).await.unwrap();
    let files = chunk_files(&dir);
    assert!(!files.is_empty());
    assert!(files.iter().all(|f| tag(f) == TAG_COMPRESSED));
    assert!(!dir.join(JOURNAL).exists());
    assert_eq!(read_all(&*b, &digest).await.unwrap().unwrap(), data);

    // background compression, chunks cut while writing: raw first, journaled.
    for url in [
        "objectstore+file://{tmp}/blobs?chunking=inline",
        "objectstore+file://{tmp}/blobs?compression=background&chunking=inline",
    ] {
        let (b, _d, g) = from_urls(url, "memory://");
        let dir = g.tmp.as_ref().unwrap().path().join("blobs");
        put_bytes(&*b, data.clone().into()).await.unwrap();
        let files = chunk_files(&dir);
        assert!(files.len() > 1, "{url}");
        assert!(files.iter().all(|f| tag(f) == TAG_RAW), "{url}");
        assert_eq!(journal_len(&dir), 32 * files.len() as u64, "{url}");
        assert!(whole_files(&dir).is_empty(), "{url}");
    }

    // background chunking too (the default, and spelled out): a blob larger
    // than one chunk is one whole file, one journal record.
    for url in [
        "objectstore+file://{tmp}/blobs",
        "objectstore+file://{tmp}/blobs?compression=background&chunking=background",
    ] {
        let (b, _d, g) = from_urls(url, "memory://");
        let dir = g.tmp.as_ref().unwrap().path().join("blobs");
        let digest = put_bytes(&*b, data.clone().into()).await.unwrap();
        assert!(chunk_files(&dir).is_empty(), "{url}");
        assert_eq!(whole_files(&dir), vec![whole_file(&dir, &digest)], "{url}");
        assert_eq!(journal_len(&dir), 32, "{url}");
    }

    // Background chunking needs the compactor.
    let e = arca_castore::composition::Composition::from_urls(
        "objectstore+file:///tmp/x?compression=inline&chunking=background",
        "memory://",
    )
    .expect_err("needs background compression");
    assert!(
        e.to_string()
            .contains("chunking=background needs compression=background"),
        "{e}"
    );
    let e = arca_castore::composition::Composition::from_urls(
        "objectstore+file:///tmp/x?chunking=later",
        "memory://",
    )
    .expect_err("unknown chunking");
    assert!(e.to_string().contains("later"), "{e}");

    // Unknown values are refused when the URL is parsed.
    let e = arca_castore::composition::Composition::from_urls(
        "objectstore+file:///tmp/x?compression=later",
        "memory://",
    )
    .map(|_| ())
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("unknown compression \"later\" (expected inline or background)"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewritten_chunk_is_compressed_again() {
    // A chunk deleted behind the store's back and written again raw is
    // queued again; an already compressed chunk is left alone.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let svc = open(dir, Duration::from_millis(20));
    let data = test_data(300 * 1024, 71);
    let digest = put_bytes(&svc, data.clone().into()).await.unwrap();
    wait_compacted(&svc, dir).await;
    let files = chunk_files(dir);
    assert!(files.iter().all(|f| tag(f) == TAG_COMPRESSED));
    let first = files[0].clone();
    let compressed = std::fs::read(&first).unwrap();
    std::fs::remove_file(&first).unwrap();
    put_bytes(&svc, data.clone().into()).await.unwrap();
    wait_compacted(&svc, dir).await;
    assert_eq!(std::fs::read(&first).unwrap(), compressed);
    assert_eq!(read_all(&svc, &digest).await.unwrap().unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn has_ignores_staging_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let svc = open(dir, Duration::from_secs(3600));
    let data = b"not stored under its own name";
    let digest = B3Digest::of(data);
    let hex = digest.to_hex();
    let sub = dir.join("chunks").join(&hex[..2]);
    std::fs::create_dir_all(&sub).unwrap();
    let mut staged = vec![TAG_RAW];
    staged.extend_from_slice(data);
    std::fs::write(sub.join(format!("{hex}#arca-1-1")), staged).unwrap();
    assert!(!svc.has(&digest).await.unwrap());
    assert!(svc.open_read(&digest).await.unwrap().is_none());
}

/// Every file under `whole/` (staging files at its top included), sorted.
fn whole_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir.join("whole")) else {
        return out;
    };
    for e in entries.flatten() {
        if e.path().is_dir() {
            out.extend(
                std::fs::read_dir(e.path())
                    .unwrap()
                    .flatten()
                    .map(|f| f.path()),
            );
        } else {
            out.push(e.path());
        }
    }
    out.sort();
    out
}

fn list_file(dir: &Path, d: &B3Digest) -> PathBuf {
    let hex = d.to_hex();
    dir.join("blobs").join(&hex[..2]).join(hex)
}

fn whole_file(dir: &Path, d: &B3Digest) -> PathBuf {
    let hex = d.to_hex();
    dir.join("whole").join(&hex[..2]).join(hex)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_blobs_are_written_whole_then_chunked() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let svc = open_whole_first(dir, Duration::from_secs(2));
    // Two blobs sharing their first 3 MiB: chunking later deduplicates them.
    let shared = test_data(3 * 1024 * 1024, 31);
    let mut a = shared.clone();
    a.extend(test_data(1024 * 1024, 32));
    let mut b = shared.clone();
    b.extend(test_data(1024 * 1024, 33));
    let da = put_bytes(&svc, a.clone().into()).await.unwrap();
    let db = put_bytes(&svc, b.clone().into()).await.unwrap();
    // A small blob is cut into chunks at once, as always.
    let small = test_data(100 * 1024, 34);
    let ds = put_bytes(&svc, small.clone().into()).await.unwrap();

    assert_eq!(
        whole_files(dir),
        vec![whole_file(dir, &da), whole_file(dir, &db)]
    );
    assert_eq!(
        std::fs::read(whole_file(dir, &da)).unwrap(),
        a,
        "stored as written"
    );
    assert!(!list_file(dir, &da).exists(), "not chunked yet");
    assert!(chunk_files(dir).iter().all(|f| !f.ends_with(da.to_hex())));
    for (d, data) in [(&da, &a), (&db, &b), (&ds, &small)] {
        assert!(svc.has(d).await.unwrap());
        assert_eq!(&read_all(&svc, d).await.unwrap().unwrap(), data);
    }
    assert_eq!(
        svc.chunks(&da).await.unwrap(),
        Some(vec![]),
        "one piece for now"
    );

    wait_compacted(&svc, dir).await;
    assert!(whole_files(dir).is_empty(), "{:?}", whole_files(dir));
    for (d, data) in [(&da, &a), (&db, &b)] {
        assert!(list_file(dir, d).exists());
        let chunks = svc.chunks(d).await.unwrap().expect("stored");
        assert!(chunks.len() > 1);
        assert_eq!(
            chunks.iter().map(|c| c.size).sum::<u64>(),
            data.len() as u64
        );
        assert_eq!(&read_all(&svc, d).await.unwrap().unwrap(), data);
    }
    // Deduplicated and compressed: less on disk than the two blobs' 8 MiB.
    let files = chunk_files(dir);
    assert!(files
        .iter()
        .all(|f| !f.to_string_lossy().contains("#arca-")));
    let stored = disk_bytes(&files);
    assert!(
        stored < (a.len() + b.len()) as u64 * 3 / 4,
        "{stored} bytes stored for {} written",
        a.len() + b.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_whole_blob_is_an_error_and_never_chunked() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = random_bytes(2 * 1024 * 1024 + 17);
    let digest = {
        let svc = open_whole_first(dir, Duration::from_secs(3600));
        put_bytes(&svc, data.clone().into()).await.unwrap()
    };
    let file = whole_file(dir, &digest);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[1000] ^= 1;
    std::fs::write(&file, &bytes).unwrap();

    let svc = open_whole_first(dir, Duration::from_millis(10));
    let err = read_all(&svc, &digest).await.expect_err("corrupt");
    assert!(err.to_string().contains("failed verification"), "{err}");
    assert!(
        svc.read_stream(&digest).await.is_err(),
        "no stream of unverified bytes"
    );
    wait_compacted(&svc, dir).await;
    assert!(file.exists(), "left for reads to report");
    assert!(
        !list_file(dir, &digest).exists(),
        "never listed as if valid"
    );
    assert!(read_all(&svc, &digest).await.is_err());

    // Storing the blob again repairs it (the bad whole file is replaced).
    assert_eq!(put_bytes(&svc, data.clone().into()).await.unwrap(), digest);
    assert_eq!(read_all(&svc, &digest).await.unwrap().unwrap(), data);
    wait_compacted(&svc, dir).await;
    assert!(list_file(dir, &digest).exists());
    assert_eq!(read_all(&svc, &digest).await.unwrap().unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_whole_file_is_no_blob_and_is_stored_again() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let svc = open_whole_first(dir, Duration::from_secs(3600));
    let data = test_data(2 * 1024 * 1024, 38);
    let digest = put_bytes(&svc, data.clone().into()).await.unwrap();
    std::fs::write(whole_file(dir, &digest), b"").unwrap();
    assert!(
        !svc.has(&digest).await.unwrap(),
        "an empty whole file is no blob"
    );
    assert!(read_all(&svc, &digest).await.unwrap().is_none());
    put_bytes(&svc, data.clone().into()).await.unwrap();
    assert!(svc.has(&digest).await.unwrap());
    assert_eq!(read_all(&svc, &digest).await.unwrap().unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compactor_rewrites_a_corrupt_chunk_before_dropping_a_whole_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Blob X cut into chunks at once; its first chunk file then damaged.
    let x = test_data(4 * 1024 * 1024, 39);
    let first_chunk = {
        let svc = open(dir, Duration::from_secs(3600));
        let dx = put_bytes(&svc, x.clone().into()).await.unwrap();
        svc.chunks(&dx).await.unwrap().unwrap()[0].digest
    };
    let dx = B3Digest::of(&x);
    let hex = first_chunk.to_hex();
    let chunk_path = dir.join("chunks").join(&hex[..2]).join(&hex);
    let mut bytes = std::fs::read(&chunk_path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&chunk_path, &bytes).unwrap();
    // Blob Y starts with X's bytes: written whole, its chunks include X's
    // first one, which the compactor must not take as stored.
    let mut y = x.clone();
    y.extend(test_data(1024 * 1024, 40));
    let svc = open_whole_first(dir, Duration::from_millis(10));
    assert!(read_all(&svc, &dx).await.is_err(), "X is damaged");
    let dy = put_bytes(&svc, y.clone().into()).await.unwrap();
    wait_compacted(&svc, dir).await;
    assert!(!whole_file(dir, &dy).exists());
    assert_eq!(read_all(&svc, &dy).await.unwrap().unwrap(), y);
    assert_eq!(
        read_all(&svc, &dx).await.unwrap().unwrap(),
        x,
        "X repaired too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_reads_refuse_large_whole_blobs_and_read_small_ones() {
    use futures::StreamExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let svc = open_whole_first(dir, Duration::from_secs(3600));
    let small = test_data(2 * 1024 * 1024, 41);
    let large = test_data(5 * 1024 * 1024, 42);
    let ds = put_bytes(&svc, small.clone().into()).await.unwrap();
    let dl = put_bytes(&svc, large.clone().into()).await.unwrap();
    assert!(whole_file(dir, &ds).exists() && whole_file(dir, &dl).exists());
    let got: Vec<_> = svc.read_many(vec![ds]).collect().await;
    let (d, data) = got.into_iter().next().unwrap().unwrap();
    assert_eq!((d, data.unwrap().to_vec()), (ds, small));
    let got: Vec<_> = svc.read_many(vec![dl]).collect().await;
    let err = got
        .into_iter()
        .next()
        .unwrap()
        .expect_err("too large for a batch");
    assert!(err.to_string().contains("larger than"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_blobs_left_behind_are_chunked_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = test_data(5 * 1024 * 1024, 35);
    let digest = {
        let svc = open_whole_first(dir, Duration::from_secs(3600));
        put_bytes(&svc, data.clone().into()).await.unwrap()
    };
    // The journal lost (it is not synced), and a staging file of a writer
    // that died (pid 1 is alive: kept; an impossible pid is gone: removed).
    std::fs::remove_file(dir.join(JOURNAL)).unwrap();
    let dead = dir.join("whole").join("#arca-2147483646-0");
    let alive = dir.join("whole").join("#arca-1-0");
    std::fs::write(&dead, b"partial").unwrap();
    std::fs::write(&alive, b"in progress").unwrap();
    // Names carry this boot's id: a file of another boot is a dead
    // writer's even if its pid is alive now (pid 1 always is).
    let boot: String = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap()
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(16)
        .collect();
    let other_boot = if boot.starts_with('0') { "1" } else { "0" }.repeat(16);
    let earlier_boot = dir.join("whole").join(format!("#arca-b{other_boot}-1-0"));
    let this_boot = dir.join("whole").join(format!("#arca-b{boot}-1-0"));
    let this_boot_dead = dir
        .join("whole")
        .join(format!("#arca-b{boot}-2147483646-0"));
    for f in [&earlier_boot, &this_boot, &this_boot_dead] {
        std::fs::write(f, b"partial").unwrap();
    }

    let svc = open_whole_first(dir, Duration::from_millis(10));
    assert!(!dead.exists(), "a dead writer's staging file is removed");
    assert!(alive.exists(), "a live writer's staging file is kept");
    assert!(
        !earlier_boot.exists(),
        "a staging file of an earlier boot is removed"
    );
    assert!(
        this_boot.exists(),
        "a live writer of this boot keeps its staging file"
    );
    assert!(!this_boot_dead.exists());
    wait_compacted(&svc, dir).await;
    assert!(!whole_file(dir, &digest).exists());
    assert!(list_file(dir, &digest).exists());
    assert_eq!(read_all(&svc, &digest).await.unwrap().unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_whole_write_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let svc = open_whole_first(dir, Duration::from_secs(3600));
    let data = test_data(3 * 1024 * 1024, 36);
    let mut w = svc.open_write().await;
    for piece in data.chunks(512 * 1024) {
        w.write(bytes::Bytes::copy_from_slice(piece)).await.unwrap();
    }
    assert_eq!(whole_files(dir).len(), 1, "a staging file while writing");
    let staging = whole_files(dir)[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        staging.starts_with("#arca-b") && staging.contains(&format!("-{}-", std::process::id())),
        "{staging}: boot tag and pid"
    );
    drop(w);
    assert!(whole_files(dir).is_empty(), "{:?}", whole_files(dir));
    assert!(!svc.has(&B3Digest::of(&data)).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_put_whole_by_a_kernel_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let svc = open_whole_first(&dir, Duration::from_secs(3600));
    assert!(svc.direct_file_puts().await);
    let src = tmp.path().join("src");
    let data = test_data(3 * 1024 * 1024 + 5, 37);
    std::fs::write(&src, &data).unwrap();
    let digest = B3Digest::of(&data);

    // The wrong expected digest: an error, and nothing stored.
    let other = B3Digest::of(b"other");
    let err = svc
        .put_file(std::fs::File::open(&src).unwrap(), Some(other))
        .await
        .expect_err("mismatch");
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    assert!(whole_files(&dir).is_empty(), "{:?}", whole_files(&dir));
    assert!(!svc.has(&digest).await.unwrap());

    let stored = svc
        .put_file(std::fs::File::open(&src).unwrap(), Some(digest))
        .await
        .unwrap();
    assert_eq!(stored, (digest, data.len() as u64));
    assert_eq!(whole_files(&dir), vec![whole_file(&dir, &digest)]);
    // Stored already: the second copy goes.
    let again = svc
        .put_file(std::fs::File::open(&src).unwrap(), None)
        .await
        .unwrap();
    assert_eq!(again, stored);
    assert_eq!(whole_files(&dir).len(), 1);
    assert_eq!(read_all(&svc, &digest).await.unwrap().unwrap(), data);

    // A large file read from a late position: what is left is one chunk,
    // stored as chunks are (no new whole file).
    let big = test_data(2 * 1024 * 1024, 43);
    std::fs::write(&src, &big).unwrap();
    let mut f = std::fs::File::open(&src).unwrap();
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(1_800_000)).unwrap();
    let (d, n) = svc.put_file(f, None).await.unwrap();
    let rest = &big[1_800_000..];
    assert_eq!((d, n), (B3Digest::of(rest), rest.len() as u64));
    assert_eq!(whole_files(&dir).len(), 1, "{:?}", whole_files(&dir));
    assert_eq!(read_all(&svc, &d).await.unwrap().unwrap(), rest);

    // A small file goes the usual way (chunks), from the file's position.
    std::fs::write(&src, b"0123456789").unwrap();
    let mut f = std::fs::File::open(&src).unwrap();
    std::io::Read::read_exact(&mut f, &mut [0u8; 4]).unwrap();
    let (d, n) = svc.put_file(f, None).await.unwrap();
    assert_eq!((d, n), (B3Digest::of(b"456789"), 6));
    assert_eq!(read_all(&svc, &d).await.unwrap().unwrap(), b"456789");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_files_are_put_as_a_writer_stores_them() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, data) in [
        ("empty", Vec::new()),
        ("one-chunk", test_data(10_000, 44)),
        ("several-chunks", test_data(1024 * 1024, 45)),
    ] {
        let by_writer = tmp.path().join(format!("{name}-w"));
        let by_file = tmp.path().join(format!("{name}-f"));
        let w = open_whole_first(&by_writer, Duration::from_secs(3600));
        let f = open_whole_first(&by_file, Duration::from_secs(3600));
        let digest = put_bytes(&w, data.clone().into()).await.unwrap();
        let src = tmp.path().join(format!("{name}.src"));
        std::fs::write(&src, &data).unwrap();
        let put = f
            .put_file(std::fs::File::open(&src).unwrap(), Some(digest))
            .await
            .unwrap();
        assert_eq!(put, (digest, data.len() as u64), "{name}");
        assert_eq!(
            f.chunks(&digest).await.unwrap(),
            w.chunks(&digest).await.unwrap(),
            "{name}"
        );
        let names = |d: &Path| {
            chunk_files(d)
                .iter()
                .map(|p| p.file_name().unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(&by_file),
            names(&by_writer),
            "{name}: same chunk files"
        );
        assert_eq!(journal_len(&by_file), journal_len(&by_writer), "{name}");
        assert_eq!(
            read_all(&f, &digest).await.unwrap().unwrap(),
            data,
            "{name}"
        );
        // The wrong expected digest is an error.
        let err = f
            .put_file(std::fs::File::open(&src).unwrap(), Some(B3Digest::of(b"x")))
            .await
            .expect_err("mismatch");
        assert!(matches!(err, Error::DigestMismatch { .. }), "{name}: {err}");
    }
}
