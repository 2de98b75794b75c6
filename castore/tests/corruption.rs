//! Stored data that was tampered with is detected on read, never returned.
mod common;

use arca_castore::blobservice::{put_bytes, read_all};
use arca_castore::directoryservice::put_all;
use arca_castore::{B3Digest, Directory, Error, Node};
use common::*;
use futures::TryStreamExt;
use std::path::{Path, PathBuf};

fn files_under(p: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![p.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// Where a local store rooted at `root` keeps `d`: its chunk file
/// (`kind` "chunks") or its chunk list ("blobs").
fn stored_file(root: &Path, kind: &str, d: &B3Digest) -> PathBuf {
    let h = d.to_hex();
    root.join(kind).join(&h[..2]).join(&h)
}

/// A local store compressing inline, behind a gRPC server: the client, the
/// store's directory, and what keeps both alive.
async fn inline_store_behind_grpc() -> (
    std::sync::Arc<dyn arca_castore::BlobService>,
    PathBuf,
    Guard,
) {
    inline_store_behind_grpc_with("lz4").await
}

/// [inline_store_behind_grpc] with this codec.
async fn inline_store_behind_grpc_with(
    codec: &str,
) -> (
    std::sync::Arc<dyn arca_castore::BlobService>,
    PathBuf,
    Guard,
) {
    let local = from_urls(
        &format!("objectstore+file://{{tmp}}/blobs?compression=inline&codec={codec}"),
        "memory://",
    );
    let root = local.2.tmp.as_ref().unwrap().path().join("blobs");
    let (b, _d, guard) = behind_grpc(local).await;
    (b, root, guard)
}

fn flip_last_byte(p: &Path) {
    let mut data = std::fs::read(p).unwrap();
    let last = data.len() - 1;
    data[last] ^= 0x55;
    std::fs::write(p, data).unwrap();
}

/// Local-files blob URLs in both compression modes and with both codecs,
/// chunks cut while writing (tampering with whole-blob files: see
/// compaction.rs).
const LOCAL_BLOBS: [&str; 3] = [
    "objectstore+file://{tmp}/blobs?compression=inline",
    "objectstore+file://{tmp}/blobs?compression=inline&codec=zstd",
    "objectstore+file://{tmp}/blobs?compression=background&chunking=inline",
];

#[tokio::test]
async fn tampered_chunks_fail_verification() {
    for url in LOCAL_BLOBS {
        tampered_chunks_fail_verification_on(url).await;
    }
}

async fn tampered_chunks_fail_verification_on(url: &str) {
    let (b, _d, g) = from_urls(url, "memory://");
    let root = g.tmp.as_ref().unwrap().path().join("blobs");
    // multi-chunk blob
    let data = test_data(4 * 1024 * 1024, 9);
    let digest = put_bytes(&*b, data.clone().into()).await.unwrap();
    assert_eq!(read_all(&*b, &digest).await.unwrap().unwrap(), data);
    let chunks = files_under(&root.join("chunks"));
    assert!(chunks.len() > 1);
    flip_last_byte(&chunks[chunks.len() / 2]);
    let r = read_all(&*b, &digest).await;
    assert!(matches!(r, Err(Error::Storage(_))), "{r:?}");
    // Streamed, too: the pieces before the bad chunk, then an error.
    assert!(
        read_streamed(&*b, &digest).await.is_err(),
        "a tampered chunk was streamed"
    );

    // single-chunk blob
    let small = put_bytes(&*b, bytes::Bytes::from_static(b"small blob"))
        .await
        .unwrap();
    flip_last_byte(&stored_file(&root, "chunks", &small));
    let r = read_all(&*b, &small).await;
    assert!(
        matches!(r, Err(Error::Storage(ref m)) if m.contains("verification")),
        "{r:?}"
    );
    let r = b.read_stream(&small).await.map(|s| s.is_some());
    assert!(
        matches!(r, Err(Error::Storage(ref m)) if m.contains("verification")),
        "{r:?}"
    );
}

#[tokio::test]
async fn tampered_directories_fail_verification() {
    let (_b, d, g) = from_urls("memory://", "objectstore+file://{tmp}/dirs");
    let mut leaf = Directory::new();
    leaf.add(
        "file".try_into().unwrap(),
        Node::File {
            digest: B3Digest::of(b"x"),
            size: 1,
            executable: false,
        },
    )
    .unwrap();
    let root = put_all(&*d, vec![leaf.clone()]).await.unwrap();
    let h = root.to_hex();
    let path = g
        .tmp
        .as_ref()
        .unwrap()
        .path()
        .join("dirs/directories")
        .join(&h[..2])
        .join(&h);
    // Replace with another valid directory: still caught by the digest check.
    std::fs::write(&path, Directory::new().encode()).unwrap();
    let r = d.get(&root).await;
    assert!(
        matches!(r, Err(Error::Storage(ref m)) if m.contains("verification")),
        "{r:?}"
    );
    // Garbage: caught by decoding.
    std::fs::write(&path, b"\xff\xff\xff garbage").unwrap();
    assert!(matches!(d.get(&root).await, Err(Error::Storage(_))));
}

#[tokio::test]
async fn a_reordered_chunk_list_fails_whole_blob_verification() {
    for url in LOCAL_BLOBS {
        a_reordered_chunk_list_fails_whole_blob_verification_on(url).await;
    }
}

async fn a_reordered_chunk_list_fails_whole_blob_verification_on(url: &str) {
    use arca_proto::castore as proto;
    use prost::Message;
    let (b, _d, g) = from_urls(url, "memory://");
    let root = g.tmp.as_ref().unwrap().path().join("blobs");
    let data = test_data(4 * 1024 * 1024, 11);
    let digest = put_bytes(&*b, data.clone().into()).await.unwrap();
    let list_path = stored_file(&root, "blobs", &digest);
    let mut list =
        proto::StatBlobResponse::decode(&std::fs::read(&list_path).unwrap()[..]).unwrap();
    assert!(list.chunks.len() > 2);
    // Every chunk is intact and verifies on its own; only their order is wrong.
    list.chunks.swap(0, 1);
    std::fs::write(&list_path, list.encode_to_vec()).unwrap();
    let r = read_all(&*b, &digest).await;
    assert!(
        matches!(r, Err(Error::Storage(ref m)) if m.contains("verification")),
        "{r:?}"
    );
    // An absurd chunk size is refused before anything is read.
    list.chunks.swap(0, 1);
    list.chunks[0].size = u64::MAX;
    std::fs::write(&list_path, list.encode_to_vec()).unwrap();
    assert!(matches!(
        b.open_read(&digest).await.map(|_| ()),
        Err(Error::Storage(_))
    ));
}

/// Batch reads through gRPC: the server hands out chunk files as stored
/// (a compressed one as its zstd frame) without decoding or verifying them,
/// so the client's checks are what stands between a tampered file and the
/// caller. Both kinds of chunk file, tampered, must fail there.
#[tokio::test]
async fn tampered_chunks_fail_verification_in_batch_reads_through_grpc() {
    // Both codecs: LZ4 blocks (tag 2, the default) and zstd frames (tag 1).
    for (codec, tag) in [("lz4", 2u8), ("zstd", 1)] {
        tampered_batch_reads_with(codec, tag).await;
    }
}

async fn tampered_batch_reads_with(codec: &str, tag: u8) {
    let (b, root, _g) = inline_store_behind_grpc_with(codec).await;
    let text = b"a line of text that compresses well\n".repeat(2000);
    let mut incompressible = vec![0u8; 3000];
    blake3::Hasher::new()
        .update(b"seed")
        .finalize_xof()
        .fill(&mut incompressible);
    let compressed = put_bytes(&*b, text.clone().into()).await.unwrap();
    let raw = put_bytes(&*b, incompressible.clone().into()).await.unwrap();
    let chunk_file = |d: &B3Digest| stored_file(&root, "chunks", d);
    // The two ways chunks are stored: compressed and raw bytes.
    assert_eq!(std::fs::read(chunk_file(&compressed)).unwrap()[0], tag);
    assert_eq!(std::fs::read(chunk_file(&raw)).unwrap()[0], 0);
    let got: Vec<_> = b
        .read_many(vec![compressed, raw])
        .try_collect()
        .await
        .unwrap();
    assert_eq!(
        got,
        vec![
            (compressed, Some(bytes::Bytes::from(text))),
            (raw, Some(bytes::Bytes::from(incompressible)))
        ]
    );
    for d in [compressed, raw] {
        flip_last_byte(&chunk_file(&d));
        let r: Result<Vec<_>, Error> = b.read_many(vec![d]).try_collect().await;
        assert!(
            matches!(r, Err(Error::Storage(ref m)) if m.contains("verification") || m.contains("compressed data")),
            "{r:?}"
        );
    }
}

/// A blob of 4 MiB (`test_data` with `seed`) stored in several chunks in
/// [inline_store_behind_grpc]: the client, the store's directory, the
/// guard, the data, its digest and its chunks.
async fn chunked_blob_behind_grpc(
    seed: u64,
) -> (
    std::sync::Arc<dyn arca_castore::BlobService>,
    PathBuf,
    Guard,
    Vec<u8>,
    B3Digest,
    Vec<arca_castore::blobservice::ChunkMeta>,
) {
    let (b, root, g) = inline_store_behind_grpc().await;
    let data = test_data(4 * 1024 * 1024, seed);
    let digest = put_bytes(&*b, data.clone().into()).await.unwrap();
    let chunks = b.chunks(&digest).await.unwrap().unwrap();
    assert!(chunks.len() > 1);
    (b, root, g, data, digest, chunks)
}

/// A reader opened on a chunked blob through gRPC may stop (or seek away)
/// before the end, where the whole blob is checked: every chunk it hands
/// out must have been verified on its own, so a tampered first chunk fails
/// even a read of its first bytes.
#[tokio::test]
async fn readers_never_hand_out_bytes_of_a_tampered_chunk() {
    use tokio::io::AsyncReadExt;
    let (b, root, _g, data, digest, chunks) = chunked_blob_behind_grpc(22).await;
    let mut head = [0u8; 100];
    let mut reader = b.open_read(&digest).await.unwrap().unwrap();
    reader.read_exact(&mut head).await.unwrap();
    assert_eq!(&head[..], &data[..100]);
    flip_last_byte(&stored_file(&root, "chunks", &chunks[0].digest));
    let mut reader = b.open_read(&digest).await.unwrap().unwrap();
    assert!(
        reader.read_exact(&mut head).await.is_err(),
        "bytes of a tampered chunk were handed out"
    );
}

/// A blob of several chunks read through gRPC as a stream: the client takes
/// its chunks from batch reads, as stored, so a tampered chunk file is
/// caught by the client.
#[tokio::test]
async fn tampered_chunks_fail_verification_in_chunkwise_streams_through_grpc() {
    let (b, root, _g, data, digest, chunks) = chunked_blob_behind_grpc(21).await;
    assert_eq!(read_streamed(&*b, &digest).await.unwrap(), data);
    flip_last_byte(&stored_file(
        &root,
        "chunks",
        &chunks[chunks.len() / 2].digest,
    ));
    assert!(
        read_streamed(&*b, &digest).await.is_err(),
        "a tampered chunk was streamed"
    );
}

/// A chunk list with no chunks can only describe the empty blob: for any
/// other digest it is corruption, reported as an error on every read path
/// (it used to read as zero bytes, unchecked).
#[tokio::test]
async fn an_empty_chunk_list_is_an_error_not_an_empty_blob() {
    let (b, _d, g) = from_urls("objectstore+file://{tmp}/blobs", "memory://");
    let root = g.tmp.as_ref().unwrap().path().join("blobs");
    let digest = B3Digest::of(b"hello");
    let list = stored_file(&root, "blobs", &digest);
    std::fs::create_dir_all(list.parent().unwrap()).unwrap();
    std::fs::write(&list, b"").unwrap();
    let r = read_all(&*b, &digest).await;
    assert!(
        matches!(r, Err(Error::Storage(ref m)) if m.contains("empty chunk list")),
        "{r:?}"
    );
    let r = b.read_stream(&digest).await.map(|s| s.is_some());
    assert!(r.is_err(), "{r:?}");
    let r: Result<Vec<_>, Error> = b.read_many(vec![digest]).try_collect().await;
    assert!(r.is_err(), "{r:?}");
}

/// Empty files where a chunk or a chunk list should be (what an OS crash
/// can leave of writes that were not synced) are not taken as stored:
/// storing the same content again writes them anew, and reads work again.
#[tokio::test]
async fn storing_again_repairs_empty_chunk_files_and_lists() {
    for url in LOCAL_BLOBS {
        let (b, _d, g) = from_urls(url, "memory://");
        let root = g.tmp.as_ref().unwrap().path().join("blobs");
        let data = test_data(3 * 1024 * 1024, 44);
        let digest = put_bytes(&*b, data.clone().into()).await.unwrap();
        let chunks = b.chunks(&digest).await.unwrap().unwrap();
        assert!(chunks.len() > 1);
        std::fs::write(stored_file(&root, "chunks", &chunks[1].digest), b"").unwrap();
        std::fs::write(stored_file(&root, "blobs", &digest), b"").unwrap();
        assert!(read_all(&*b, &digest).await.is_err(), "{url}");
        assert_eq!(put_bytes(&*b, data.clone().into()).await.unwrap(), digest);
        assert_eq!(
            read_all(&*b, &digest).await.unwrap().unwrap(),
            data,
            "{url}"
        );
    }
}

/// The same on a local store, where a stream read from the start hashes the
/// whole blob instead of each chunk (one BLAKE3 pass): chunks kept raw, so a
/// flipped byte is only caught by hashing. A reader that may stop early
/// still verifies each chunk; a stream never ends without an error.
#[tokio::test]
async fn local_readers_and_streams_catch_a_tampered_raw_chunk() {
    use tokio::io::AsyncReadExt;
    let (b, _d, g) = from_urls(
        "objectstore+file://{tmp}/blobs?compression=background&chunking=inline",
        "memory://",
    );
    let root = g.tmp.as_ref().unwrap().path().join("blobs");
    let data = test_data(4 * 1024 * 1024, 23);
    let digest = put_bytes(&*b, data.clone().into()).await.unwrap();
    let chunks = b.chunks(&digest).await.unwrap().unwrap();
    assert!(chunks.len() > 2);
    assert_eq!(read_streamed(&*b, &digest).await.unwrap(), data);
    for (which, chunk) in [("first", &chunks[0]), ("last", chunks.last().unwrap())] {
        let file = stored_file(&root, "chunks", &chunk.digest);
        let before = std::fs::read(&file).unwrap();
        assert_eq!(before[0], 0, "the chunk is stored raw");
        flip_last_byte(&file);
        assert!(
            read_streamed(&*b, &digest).await.is_err(),
            "a stream with a tampered {which} chunk ended without an error"
        );
        if which == "first" {
            let mut head = [0u8; 100];
            let mut reader = b.open_read(&digest).await.unwrap().unwrap();
            assert!(
                reader.read_exact(&mut head).await.is_err(),
                "bytes of a tampered chunk were handed out"
            );
        }
        std::fs::write(&file, before).unwrap();
        assert_eq!(read_streamed(&*b, &digest).await.unwrap(), data);
    }
}
