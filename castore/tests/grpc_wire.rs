//! The gRPC server against raw wire messages (what any client could send),
//! and the gRPC clients against servers that lie.
mod common;

use arca_castore::blobservice::{
    put_bytes, read_all, BlobReader, BlobService, BlobWriter, MemoryBlobService,
};
use arca_castore::directoryservice::{
    get_closure, DirectoryService, MemoryDirectoryService, ValidatedClosure,
};
use arca_castore::{B3Digest, Directory, Error, Node};
use arca_proto::castore as proto;
use arca_proto::castore::blob_service_client::BlobServiceClient;
use arca_proto::castore::directory_service_client::DirectoryServiceClient;
use async_trait::async_trait;
use bytes::Bytes;
use common::*;
use std::sync::Arc;
use tonic::Code;

async fn raw_clients() -> (
    BlobServiceClient<tonic::transport::Channel>,
    DirectoryServiceClient<tonic::transport::Channel>,
    ServerGuard,
) {
    let server = serve(
        Arc::new(MemoryBlobService::default()),
        Arc::new(MemoryDirectoryService::default()),
    )
    .await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect_lazy();
    (
        BlobServiceClient::new(channel.clone()),
        DirectoryServiceClient::new(channel).max_encoding_message_size(usize::MAX),
        server,
    )
}

fn pfile(name: &[u8]) -> proto::FileNode {
    proto::FileNode {
        name: Bytes::copy_from_slice(name),
        digest: B3Digest::of(b"").to_bytes(),
        size: 0,
        executable: false,
    }
}

fn pdir(name: &str, d: &Directory) -> proto::DirectoryNode {
    proto::DirectoryNode {
        name: Bytes::copy_from_slice(name.as_bytes()),
        digest: d.digest().to_bytes(),
        size: d.size(),
    }
}

async fn put_raw(
    client: &mut DirectoryServiceClient<tonic::transport::Channel>,
    dirs: Vec<proto::Directory>,
) -> Result<Bytes, tonic::Status> {
    client
        .put(futures::stream::iter(dirs))
        .await
        .map(|r| r.into_inner().root_digest)
}

fn get_req(digest: Bytes, recursive: bool) -> proto::GetDirectoryRequest {
    proto::GetDirectoryRequest {
        by_what: Some(proto::get_directory_request::ByWhat::Digest(digest)),
        recursive,
    }
}

#[tokio::test]
async fn invalid_directories_are_invalid_argument() {
    let (_b, mut d, _s) = raw_clients().await;
    let cases: Vec<(&str, proto::Directory)> = vec![
        (
            "empty name",
            proto::Directory {
                files: vec![pfile(b"")],
                ..Default::default()
            },
        ),
        (
            "dot",
            proto::Directory {
                files: vec![pfile(b".")],
                ..Default::default()
            },
        ),
        (
            "dotdot",
            proto::Directory {
                files: vec![pfile(b"..")],
                ..Default::default()
            },
        ),
        (
            "slash",
            proto::Directory {
                files: vec![pfile(b"a/b")],
                ..Default::default()
            },
        ),
        (
            "nul",
            proto::Directory {
                files: vec![pfile(b"a\0")],
                ..Default::default()
            },
        ),
        (
            "too long",
            proto::Directory {
                files: vec![pfile(&[b'x'; 256])],
                ..Default::default()
            },
        ),
        (
            "unsorted",
            proto::Directory {
                files: vec![pfile(b"b"), pfile(b"a")],
                ..Default::default()
            },
        ),
        (
            "duplicate across lists",
            proto::Directory {
                files: vec![pfile(b"a")],
                symlinks: vec![proto::SymlinkNode {
                    name: "a".into(),
                    target: "t".into(),
                }],
                ..Default::default()
            },
        ),
        (
            "short digest",
            proto::Directory {
                files: vec![proto::FileNode {
                    name: "a".into(),
                    digest: Bytes::from_static(&[0; 31]),
                    size: 0,
                    executable: false,
                }],
                ..Default::default()
            },
        ),
        (
            "empty symlink target",
            proto::Directory {
                symlinks: vec![proto::SymlinkNode {
                    name: "a".into(),
                    target: Bytes::new(),
                }],
                ..Default::default()
            },
        ),
    ];
    for (what, dir) in cases {
        let err = put_raw(&mut d, vec![dir]).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
    }
}

#[tokio::test]
async fn put_order_rules_are_enforced_on_the_wire() {
    let (_b, mut d, _s) = raw_clients().await;
    let leaf = {
        let mut l = Directory::new();
        l.add(
            "f".try_into().unwrap(),
            Node::File {
                digest: B3Digest::of(b""),
                size: 0,
                executable: false,
            },
        )
        .unwrap();
        l
    };
    let parent = proto::Directory {
        directories: vec![pdir("l", &leaf)],
        ..Default::default()
    };
    // root first
    let err = put_raw(&mut d, vec![parent.clone(), leaf.to_proto()])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // dangling: child never sent
    let err = put_raw(&mut d, vec![parent.clone()]).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // wrong size
    let mut wrong = parent.clone();
    wrong.directories[0].size += 1;
    let err = put_raw(&mut d, vec![leaf.to_proto(), wrong])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // disconnected
    let err = put_raw(&mut d, vec![leaf.to_proto(), Directory::new().to_proto()])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // empty stream
    let err = put_raw(&mut d, vec![]).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // nothing of the above was stored
    let err = d
        .get(get_req(leaf.digest().to_bytes(), false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // the right order works and returns the root
    let root = put_raw(&mut d, vec![leaf.to_proto(), parent.clone()])
        .await
        .unwrap();
    assert_eq!(root.len(), 32);
}

#[tokio::test]
async fn bad_requests_and_unknown_digests_have_precise_codes() {
    let (mut b, mut d, _s) = raw_clients().await;
    let short = Bytes::from_static(&[1; 5]);
    assert_eq!(
        d.get(get_req(short.clone(), false))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        d.get(proto::GetDirectoryRequest {
            by_what: None,
            recursive: false
        })
        .await
        .unwrap_err()
        .code(),
        Code::InvalidArgument
    );
    let unknown = B3Digest::of(b"unknown").to_bytes();
    assert_eq!(
        d.get(get_req(unknown.clone(), false))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        d.get(get_req(unknown.clone(), true))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let stat = |digest: Bytes| proto::StatBlobRequest {
        digest,
        send_chunks: true,
        send_bao: false,
    };
    assert_eq!(
        b.stat(stat(short.clone())).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        b.stat(stat(unknown.clone())).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        b.read(proto::ReadBlobRequest { digest: short })
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        b.read(proto::ReadBlobRequest { digest: unknown })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn oversized_blob_messages_are_refused() {
    let (b, _d, _s) = raw_clients().await;
    let mut b = b.max_encoding_message_size(usize::MAX);
    let huge = proto::BlobChunk {
        data: Bytes::from(vec![0u8; arca_castore::MAX_BLOB_MESSAGE_SIZE + 1]),
    };
    let err = b.put(futures::stream::iter(vec![huge])).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    // nothing stored under the digest of those bytes
    let digest = B3Digest::of(&vec![0u8; arca_castore::MAX_BLOB_MESSAGE_SIZE + 1]).to_bytes();
    let stat = proto::StatBlobRequest {
        digest,
        send_chunks: false,
        send_bao: false,
    };
    assert_eq!(b.stat(stat).await.unwrap_err().code(), Code::NotFound);
}

/// A blob service that returns other bytes than asked for.
struct LyingBlobs(MemoryBlobService);

#[async_trait]
impl BlobService for LyingBlobs {
    async fn has(&self, d: &B3Digest) -> Result<bool, Error> {
        self.0.has(d).await
    }
    async fn open_read(&self, d: &B3Digest) -> Result<Option<Box<dyn BlobReader>>, Error> {
        if self.0.has(d).await? {
            return Ok(Some(Box::new(std::io::Cursor::new(Bytes::from_static(
                b"not what you asked for",
            )))));
        }
        Ok(None)
    }
    async fn open_write(&self) -> Box<dyn BlobWriter> {
        Box::new(LyingWriter)
    }
}

/// Accepts any upload and claims a fixed digest.
struct LyingWriter;

#[async_trait]
impl BlobWriter for LyingWriter {
    async fn write(&mut self, _data: Bytes) -> Result<(), Error> {
        Ok(())
    }
    async fn close(&mut self) -> Result<B3Digest, Error> {
        Ok(B3Digest::of(b"something else"))
    }
}

/// A directory service that answers with another directory.
struct LyingDirectories(MemoryDirectoryService);

#[async_trait]
impl DirectoryService for LyingDirectories {
    async fn get(&self, d: &B3Digest) -> Result<Option<Directory>, Error> {
        Ok(self.0.get(d).await?.map(|_| {
            let mut other = Directory::new();
            other
                .add(
                    "evil".try_into().unwrap(),
                    Node::Symlink {
                        target: "/etc/shadow".try_into().unwrap(),
                    },
                )
                .unwrap();
            other
        }))
    }
    async fn put_closure(&self, c: ValidatedClosure) -> Result<B3Digest, Error> {
        self.0.put_closure(c).await
    }
}

#[tokio::test]
async fn clients_verify_what_servers_send() {
    let mem_blobs = MemoryBlobService::default();
    let mem_dirs = MemoryDirectoryService::default();
    let digest = put_bytes(&mem_blobs, Bytes::from_static(b"real content"))
        .await
        .unwrap();
    let dir_digest = mem_dirs.put(Directory::new()).await.unwrap();
    let (b, d, _g) = behind_grpc((
        Arc::new(LyingBlobs(mem_blobs)),
        Arc::new(LyingDirectories(mem_dirs)),
        Guard::default(),
    ))
    .await;
    // read: the bytes do not hash to the digest
    let r = read_all(&*b, &digest).await;
    assert!(
        matches!(r, Err(Error::Storage(ref m)) if m.contains("verification")),
        "{r:?}"
    );
    // streamed: the one (lying) message is held back, then the error
    let mut pieces = b.read_stream(&digest).await.unwrap().unwrap();
    let first = futures::StreamExt::next(&mut pieces).await.unwrap();
    assert!(
        matches!(&first, Err(e) if e.to_string().contains("verification")),
        "{first:?}"
    );
    // write: the server's digest does not match the data
    let r = put_bytes(&*b, Bytes::from_static(b"upload")).await;
    assert!(
        matches!(r, Err(Error::Storage(ref m)) if m.contains("server returned digest")),
        "{r:?}"
    );
    // directories: another directory than asked for
    let r = d.get(&dir_digest).await;
    assert!(matches!(r, Err(Error::Storage(_))), "{r:?}");
    let r = get_closure(&*d, &dir_digest).await;
    assert!(matches!(r, Err(Error::Storage(_))), "{r:?}");
}

/// A writer dropped without `close` must reset its call: ending the
/// request stream instead would make the server store the truncated data.
/// The drop happens right after the last write, many times, so a race
/// between the abort and the end of the stream shows up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_writers_never_store_their_data() {
    let (b, _d, _g) = behind_grpc(from_urls("memory://", "memory://")).await;
    let mut digests = Vec::new();
    for i in 0..200u64 {
        let data = test_data(1000 + i as usize, i);
        let mut w = b.open_write().await;
        w.write(data.clone().into()).await.unwrap();
        drop(w);
        digests.push(B3Digest::of(&data));
    }
    // A closed writer on the same channel: its data is stored, so the
    // calls before it have all been answered or reset.
    assert_eq!(
        put_bytes(&*b, Bytes::from_static(b"closed")).await.unwrap(),
        B3Digest::of(b"closed")
    );
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let mut stored = vec![];
    for (i, d) in digests.iter().enumerate() {
        if b.has(d).await.unwrap() {
            stored.push(i);
        }
    }
    assert!(stored.is_empty(), "dropped uploads were stored: {stored:?}");
}

/// A raw `Put` call the client cancels (RST_STREAM CANCEL) after sending
/// a whole directory: the server must not store it. tonic alone would hand
/// the handler a clean end of stream.
#[tokio::test]
async fn cancelled_directory_puts_store_nothing() {
    let (_blobs, mut dirs, _server) = raw_clients().await;
    let mut leaf = Directory::new();
    leaf.add(
        "a".try_into().unwrap(),
        Node::File {
            digest: B3Digest::of(b"a"),
            size: 1,
            executable: false,
        },
    )
    .unwrap();
    let digest = leaf.digest();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(proto::Directory::from(&leaf)).await.unwrap();
    let mut putter = dirs.clone();
    let call = tokio::spawn(async move {
        // The stream never ends: `tx` stays alive until the call is dropped.
        putter
            .put(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    // Let the directory reach the server, then drop the call.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    drop(tx);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let r = dirs.get(get_req(digest.to_bytes(), false)).await;
    assert_eq!(r.unwrap_err().code(), Code::NotFound);
}

#[tokio::test]
async fn expected_digest_is_checked_against_the_server() {
    let (b, _d, _g) = behind_grpc(from_urls("memory://", "memory://")).await;
    let mut w = b.open_write().await;
    w.expect_digest(B3Digest::of(b"what the caller hashed"));
    w.write(Bytes::from_static(b"what was actually sent"))
        .await
        .unwrap();
    let r = w.close().await;
    assert!(
        matches!(r, Err(Error::DigestMismatch { expected, actual })
            if expected == B3Digest::of(b"what the caller hashed") && actual == B3Digest::of(b"what was actually sent")),
        "{r:?}"
    );
    let mut w = b.open_write().await;
    w.expect_digest(B3Digest::of(b"right"));
    w.write(Bytes::from_static(b"right")).await.unwrap();
    assert_eq!(w.close().await.unwrap(), B3Digest::of(b"right"));
}

#[tokio::test]
async fn batch_reads_refuse_bad_requests() {
    use arca_proto::castore_batch::blob_batch_service_client::BlobBatchServiceClient;
    use arca_proto::castore_batch::ReadBlobsRequest;
    let server = serve(
        Arc::new(MemoryBlobService::default()),
        Arc::new(MemoryDirectoryService::default()),
    )
    .await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect_lazy();
    let mut client = BlobBatchServiceClient::new(channel);
    let unknown = B3Digest::of(b"unknown").to_bytes();
    let too_many = ReadBlobsRequest {
        digests: vec![unknown.clone(); arca_castore::blobservice::MAX_BATCH_DIGESTS + 1],
        ..Default::default()
    };
    let err = client.read_blobs(too_many).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("at most"), "{err:?}");
    let short = ReadBlobsRequest {
        digests: vec![unknown.clone(), Bytes::from_static(&[1; 5])],
        ..Default::default()
    };
    assert_eq!(
        client.read_blobs(short).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    // unknown digests are answered, not errors
    let mut answers = client
        .read_blobs(ReadBlobsRequest {
            digests: vec![unknown.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = answers.message().await.unwrap().unwrap();
    assert_eq!(
        (first.digest, first.found, first.data.len()),
        (unknown, false, 0)
    );
    assert!(answers.message().await.unwrap().is_none());
}

/// How [BatchLiar] answers batch reads.
#[derive(Clone, Copy, Debug)]
enum BatchLie {
    /// Answers in reverse order.
    Reordered,
    /// Leaves out the last answer.
    Short,
    /// Other bytes than the blob's.
    WrongBytes,
    /// A zstd frame of other bytes than the blob's.
    ZstdWrongBytes,
    /// A small zstd frame that claims 5 MiB (more than a batch allows).
    ZstdBomb,
    /// Bytes that are no zstd frame, flagged as one.
    ZstdGarbage,
    /// An LZ4 block of other bytes than the blob's.
    Lz4WrongBytes,
    /// A small LZ4 payload that claims 5 MiB.
    Lz4Bomb,
    /// Bytes that are no LZ4 block, flagged as one.
    Lz4Garbage,
}

/// A blob service whose batch reads lie (single reads are honest).
struct BatchLiar(MemoryBlobService, BatchLie);

#[async_trait]
impl BlobService for BatchLiar {
    async fn has(&self, d: &B3Digest) -> Result<bool, Error> {
        self.0.has(d).await
    }
    async fn open_read(&self, d: &B3Digest) -> Result<Option<Box<dyn BlobReader>>, Error> {
        self.0.open_read(d).await
    }
    async fn open_write(&self) -> Box<dyn BlobWriter> {
        self.0.open_write().await
    }
    fn read_many<'a>(
        &'a self,
        digests: Vec<B3Digest>,
    ) -> futures::stream::BoxStream<'a, Result<arca_castore::blobservice::BatchItem, Error>> {
        use futures::StreamExt;
        let lie = self.1;
        async_stream::stream! {
            let mut answers = Vec::new();
            for d in &digests {
                answers.push((*d, read_all(&self.0, d).await.unwrap().map(Bytes::from)));
            }
            match lie {
                BatchLie::Reordered => answers.reverse(),
                BatchLie::Short => { answers.pop(); }
                BatchLie::WrongBytes => answers[0].1 = Some(Bytes::from_static(b"not what you asked for")),
                // Honest plain answers; the lie is in read_many_as_stored.
                _ => {}
            }
            for a in answers {
                yield Ok(a);
            }
        }
        .boxed()
    }
    fn read_many_as_stored<'a>(
        &'a self,
        digests: Vec<B3Digest>,
    ) -> futures::stream::BoxStream<'a, Result<arca_castore::blobservice::StoredBatchItem, Error>>
    {
        use arca_castore::blobservice::StoredBlob;
        use futures::StreamExt;
        let lz4 = |data: &[u8]| lz4::block::compress(data, None, true).unwrap();
        let blob = match self.1 {
            BatchLie::ZstdWrongBytes => StoredBlob::Zstd(
                zstd::bulk::compress(b"not what you asked for", 3)
                    .unwrap()
                    .into(),
            ),
            BatchLie::ZstdBomb => {
                StoredBlob::Zstd(zstd::bulk::compress(&vec![0u8; 5 << 20], 3).unwrap().into())
            }
            BatchLie::ZstdGarbage => StoredBlob::Zstd(Bytes::from_static(b"no zstd frame at all")),
            BatchLie::Lz4WrongBytes => StoredBlob::Lz4(lz4(b"not what you asked for").into()),
            BatchLie::Lz4Bomb => StoredBlob::Lz4(lz4(&vec![0u8; 5 << 20]).into()),
            BatchLie::Lz4Garbage => {
                StoredBlob::Lz4(Bytes::from_static(b"\x10\0\0\0no lz4 block at all"))
            }
            _ => return arca_castore::blobservice::as_plain(self.read_many(digests)),
        };
        let answers: Vec<_> = digests
            .into_iter()
            .map(|d| Ok((d, Some(blob.clone()))))
            .collect();
        futures::stream::iter(answers).boxed()
    }
}

#[tokio::test]
async fn clients_verify_batch_answers() {
    use futures::TryStreamExt;
    for (lie, expected) in [
        (BatchLie::Reordered, "another blob"),
        (BatchLie::Short, "1 of the 2"),
        (BatchLie::WrongBytes, "verification"),
        (BatchLie::ZstdWrongBytes, "verification"),
        (BatchLie::ZstdBomb, "more than 4194304"),
        (BatchLie::ZstdGarbage, "bad compressed data"),
        (BatchLie::Lz4WrongBytes, "verification"),
        (BatchLie::Lz4Bomb, "more than 4194304"),
        (BatchLie::Lz4Garbage, "bad compressed data"),
    ] {
        let mem = MemoryBlobService::default();
        let a = put_bytes(&mem, Bytes::from_static(b"first blob"))
            .await
            .unwrap();
        let b = put_bytes(&mem, Bytes::from_static(b"second blob"))
            .await
            .unwrap();
        let (client, _d, _g) = behind_grpc((
            Arc::new(BatchLiar(mem, lie)),
            Arc::new(MemoryDirectoryService::default()),
            Guard::default(),
        ))
        .await;
        let r: Result<Vec<_>, Error> = client.read_many(vec![a, b]).try_collect().await;
        assert!(
            matches!(r, Err(Error::Storage(ref m)) if m.contains(expected)),
            "{lie:?}: {r:?}"
        );
        // single reads of the same server are fine
        assert_eq!(
            read_all(&*client, &a).await.unwrap().unwrap(),
            b"first blob"
        );
    }
}

/// `accept_zstd` and `accept_lz4` on the wire: a client that accepts the
/// form a blob is stored in gets it so (`zstd` or `lz4` set; it decodes to
/// the blob); a client that does not (older Arca clients, anyone else)
/// gets the blob itself, whatever else it accepts.
#[tokio::test]
async fn batch_reads_send_compressed_forms_only_to_clients_that_accept_them() {
    use arca_proto::castore_batch::blob_batch_service_client::BlobBatchServiceClient;
    use arca_proto::castore_batch::ReadBlobsRequest;
    let text = Bytes::from(b"compressible line of text\n".repeat(1000));
    for codec in ["zstd", "lz4"] {
        let local = from_urls(
            &format!("objectstore+file://{{tmp}}/blobs?compression=inline&codec={codec}"),
            "memory://",
        );
        let digest = put_bytes(&*local.0, text.clone()).await.unwrap();
        let server = serve(local.0.clone(), local.1.clone()).await;
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
            .unwrap()
            .connect_lazy();
        let mut client = BlobBatchServiceClient::new(channel);
        for (accept_zstd, accept_lz4) in
            [(false, false), (true, false), (false, true), (true, true)]
        {
            let mut answers = client
                .read_blobs(ReadBlobsRequest {
                    digests: vec![digest.to_bytes()],
                    accept_zstd,
                    accept_lz4,
                })
                .await
                .unwrap()
                .into_inner();
            let msg = answers.message().await.unwrap().unwrap();
            let case = format!("{codec} store, accept zstd {accept_zstd} lz4 {accept_lz4}");
            assert!(msg.found, "{case}");
            assert_eq!(msg.zstd, codec == "zstd" && accept_zstd, "{case}");
            assert_eq!(msg.lz4, codec == "lz4" && accept_lz4, "{case}");
            if msg.zstd {
                assert!(
                    msg.data.len() < text.len() / 4,
                    "{case}: {} bytes",
                    msg.data.len()
                );
                assert_eq!(zstd::bulk::decompress(&msg.data, text.len()).unwrap(), text);
            } else if msg.lz4 {
                assert!(
                    msg.data.len() < text.len() / 4,
                    "{case}: {} bytes",
                    msg.data.len()
                );
                let size = u32::from_le_bytes(msg.data[..4].try_into().unwrap());
                assert_eq!(size as usize, text.len(), "{case}");
                assert_eq!(lz4::block::decompress(&msg.data, None).unwrap(), text);
            } else {
                assert_eq!(msg.data, text, "{case}");
            }
            assert!(answers.message().await.unwrap().is_none());
        }
    }
}

/// A blob service whose chunk lists lie: every blob is said to be made of
/// the chunks of `other`.
struct ChunkListLiar {
    inner: Arc<dyn BlobService>,
    other: B3Digest,
}

#[async_trait]
impl BlobService for ChunkListLiar {
    async fn has(&self, d: &B3Digest) -> Result<bool, Error> {
        self.inner.has(d).await
    }
    async fn open_read(&self, d: &B3Digest) -> Result<Option<Box<dyn BlobReader>>, Error> {
        self.inner.open_read(d).await
    }
    async fn open_write(&self) -> Box<dyn BlobWriter> {
        self.inner.open_write().await
    }
    async fn chunks(
        &self,
        _d: &B3Digest,
    ) -> Result<Option<Vec<arca_castore::blobservice::ChunkMeta>>, Error> {
        self.inner.chunks(&self.other).await
    }
    fn read_many<'a>(
        &'a self,
        digests: Vec<B3Digest>,
    ) -> futures::stream::BoxStream<'a, Result<arca_castore::blobservice::BatchItem, Error>> {
        self.inner.read_many(digests)
    }
    fn read_many_as_stored<'a>(
        &'a self,
        digests: Vec<B3Digest>,
    ) -> futures::stream::BoxStream<'a, Result<arca_castore::blobservice::StoredBatchItem, Error>>
    {
        self.inner.read_many_as_stored(digests)
    }
}

/// Streaming a blob chunk by chunk trusts each chunk only after checking
/// it, and the chunk list not at all: a server listing another blob's
/// (genuine) chunks fails the whole-blob check, and its last piece is never
/// handed out.
#[tokio::test]
async fn chunkwise_streams_check_the_whole_blob() {
    let (local, _d, guard) = from_urls(
        "objectstore+file://{tmp}/blobs?chunking=inline",
        "memory://",
    );
    let wanted = test_data(4 * 1024 * 1024, 31);
    let other = test_data(4 * 1024 * 1024, 32);
    let wanted_digest = put_bytes(&*local, wanted.clone().into()).await.unwrap();
    let other_digest = put_bytes(&*local, other.clone().into()).await.unwrap();
    let liar: Arc<dyn BlobService> = Arc::new(ChunkListLiar {
        inner: local,
        other: other_digest,
    });
    let (b, _d, _g) = behind_grpc((liar, Arc::new(MemoryDirectoryService::default()), guard)).await;
    let e = read_streamed(&*b, &wanted_digest).await.unwrap_err();
    assert!(e.to_string().contains("failed verification"), "{e}");
    // The other blob, whose chunk list is true, streams fine.
    assert_eq!(read_streamed(&*b, &other_digest).await.unwrap(), other);
}

/// A blob service that serves one chunk with a flipped byte in batch reads
/// (what a faulty disk, transport or server could do); all else is honest.
struct OneBadChunk {
    inner: Arc<dyn BlobService>,
    bad: B3Digest,
    /// Where the bad chunk starts in the blob: `Read` streams carry the
    /// flipped byte too.
    bad_offset: usize,
}

#[async_trait]
impl BlobService for OneBadChunk {
    async fn has(&self, d: &B3Digest) -> Result<bool, Error> {
        self.inner.has(d).await
    }
    async fn open_read(&self, d: &B3Digest) -> Result<Option<Box<dyn BlobReader>>, Error> {
        let Some(mut data) = read_all(&*self.inner, d).await? else {
            return Ok(None);
        };
        if data.len() > self.bad_offset + 100 {
            data[self.bad_offset + 100] ^= 1;
        }
        Ok(Some(Box::new(std::io::Cursor::new(data))))
    }
    async fn open_write(&self) -> Box<dyn BlobWriter> {
        self.inner.open_write().await
    }
    async fn chunks(
        &self,
        d: &B3Digest,
    ) -> Result<Option<Vec<arca_castore::blobservice::ChunkMeta>>, Error> {
        self.inner.chunks(d).await
    }
    fn read_many<'a>(
        &'a self,
        digests: Vec<B3Digest>,
    ) -> futures::stream::BoxStream<'a, Result<arca_castore::blobservice::BatchItem, Error>> {
        use futures::StreamExt;
        let bad = self.bad;
        self.inner
            .read_many(digests)
            .map(move |r| {
                r.map(|(d, data)| {
                    let data = data.map(|b| {
                        if d == bad {
                            let mut v = b.to_vec();
                            v[100] ^= 1;
                            Bytes::from(v)
                        } else {
                            b
                        }
                    });
                    (d, data)
                })
            })
            .boxed()
    }
}

/// Reading a large remote blob from the start (as `arca mount` does for
/// big files) hands out only verified bytes: every byte read before the
/// error is the blob's, and nothing of the bad chunk is handed out.
#[tokio::test]
async fn remote_reads_hand_out_no_byte_of_a_bad_chunk() {
    use tokio::io::AsyncReadExt;
    let (local, _d, guard) = from_urls(
        "objectstore+file://{tmp}/blobs?chunking=inline",
        "memory://",
    );
    let data = test_data(6 * 1024 * 1024, 51);
    let digest = put_bytes(&*local, data.clone().into()).await.unwrap();
    let chunks = local.chunks(&digest).await.unwrap().unwrap();
    assert!(chunks.len() > 3);
    let bad_index = chunks.len() / 2;
    let bad_offset: u64 = chunks[..bad_index].iter().map(|c| c.size).sum();
    let served: Arc<dyn BlobService> = Arc::new(OneBadChunk {
        inner: local,
        bad: chunks[bad_index].digest,
        bad_offset: bad_offset as usize,
    });
    let (b, _d, _g) =
        behind_grpc((served, Arc::new(MemoryDirectoryService::default()), guard)).await;
    let mut reader = b.open_read(&digest).await.unwrap().unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let failed = loop {
        match reader.read(&mut buf).await {
            Ok(0) => break false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => break true,
        }
    };
    assert!(failed, "a bad chunk was read without an error");
    assert!(
        got.len() as u64 <= bad_offset,
        "{} > {bad_offset}",
        got.len()
    );
    assert_eq!(got, data[..got.len()], "wrong bytes were handed out");
}
