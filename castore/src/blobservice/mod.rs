//! Blob storage: the [BlobService] trait and its backends.
//!
//! A blob is addressed by the BLAKE3 digest of its bytes. Backends may split
//! blobs into chunks (content-defined, see [object_store]); chunking never
//! changes a blob's digest.
use crate::{B3Digest, Error};
use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeek};

mod cache;
mod chunked_reader;
mod codec;
mod grpc;
mod memory;
mod object_store;

pub use cache::CacheBlobService;
pub use chunked_reader::{validate_chunk_list, ChunkFetcher, ChunkedReader, MAX_CHUNK_SIZE};
pub use grpc::GrpcBlobService;
pub use memory::MemoryBlobService;
pub use object_store::{
    decode_stored_file, ChunkingParams, Codec, LocalChunking, LocalCompression, LocalFilesOptions,
    ObjectStoreBlobService, MAX_STORED_FILE_SIZE,
};

/// Largest blob [BlobService::read_many] returns (larger ones are read with
/// [BlobService::open_read]).
pub const MAX_BATCH_BLOB_SIZE: u64 = 4 * 1024 * 1024;
/// Most digests in one [BlobService::read_many] call over gRPC.
pub const MAX_BATCH_DIGESTS: usize = 1024;
/// Blobs the default [BlobService::read_many] reads at once.
const READ_MANY_IN_FLIGHT: usize = 8;

/// One answer of [BlobService::read_many]: the digest asked for and the
/// whole blob, `None` if the service does not have it.
pub type BatchItem = (B3Digest, Option<Bytes>);

/// A blob as a backend holds it, for [BlobService::read_many_as_stored].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredBlob {
    /// The blob's bytes.
    Plain(Bytes),
    /// One zstd frame of the blob's bytes, declaring its content size.
    Zstd(Bytes),
    /// The blob's size (`u32` little-endian), then one LZ4 block of its bytes.
    Lz4(Bytes),
}

/// Stored blobs at least this large (as stored) are decoded on the blocking
/// pool rather than where they arrive (the gRPC client's batch answers, the
/// daemon's decoding for clients that did not accept a form).
pub(crate) const DECODE_ELSEWHERE: usize = 32 * 1024;

/// One answer of [BlobService::read_many_as_stored]: the digest asked for
/// and the blob as stored, `None` if the service does not have it.
pub type StoredBatchItem = (B3Digest, Option<StoredBlob>);

/// [BlobService::read_many]'s answers as [StoredBlob::Plain] items: what
/// [BlobService::read_many_as_stored] answers where blobs are not handed
/// out as stored.
pub fn as_plain<'a>(
    answers: BoxStream<'a, Result<BatchItem, Error>>,
) -> BoxStream<'a, Result<StoredBatchItem, Error>> {
    answers
        .map(|r| r.map(|(d, blob)| (d, blob.map(StoredBlob::Plain))))
        .boxed()
}

/// One chunk of a blob: its digest and length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkMeta {
    /// BLAKE3 digest of the chunk's bytes.
    pub digest: B3Digest,
    /// Length in bytes.
    pub size: u64,
}

/// A readable, seekable blob. Readers verify what they return: a corrupted
/// backend yields an error, never wrong bytes.
pub trait BlobReader: AsyncRead + AsyncSeek + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncSeek + Send + Unpin + 'static> BlobReader for T {}

/// Writes one blob. Nothing is visible under the blob's digest before
/// [BlobWriter::close] returns it; a writer dropped unclosed leaves no blob.
#[async_trait]
pub trait BlobWriter: Send {
    /// Appends bytes.
    async fn write(&mut self, data: Bytes) -> Result<(), Error>;
    /// Finishes the blob and returns its digest.
    async fn close(&mut self) -> Result<B3Digest, Error>;

    /// Tells the writer the digest the caller already computed for the data
    /// it will write. A writer may then skip its own hashing where the
    /// backend verifies anyway: the gRPC client compares the server's digest
    /// with this one and `close` fails with [Error::DigestMismatch]. Writers
    /// that hash anyway ignore it and return the digest of what was written,
    /// so a caller compares that too.
    fn expect_digest(&mut self, _digest: B3Digest) {}
}

/// Stores and serves blobs by BLAKE3 digest.
#[async_trait]
pub trait BlobService: Send + Sync {
    /// Whether the blob exists.
    async fn has(&self, digest: &B3Digest) -> Result<bool, Error>;
    /// Opens a blob (or, where the backend stores chunks, a chunk) for reading.
    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>, Error>;
    /// Starts writing a new blob.
    async fn open_write(&self) -> Box<dyn BlobWriter>;
    /// The blob's chunks: `None` if the blob does not exist, an empty list if
    /// the backend keeps it in one piece (read it whole).
    async fn chunks(&self, digest: &B3Digest) -> Result<Option<Vec<ChunkMeta>>, Error> {
        Ok(self.has(digest).await?.then(Vec::new))
    }

    /// Reads many small blobs whole, answering in the order asked (one item
    /// per digest, duplicates included). Every blob is verified like any
    /// read; a blob larger than [MAX_BATCH_BLOB_SIZE] is an error. Backends
    /// override this to answer many blobs per round trip (gRPC: one call)
    /// or per trip to the blocking pool (local files); the default reads
    /// a few blobs at a time with [Self::open_read].
    fn read_many<'a>(&'a self, digests: Vec<B3Digest>) -> BoxStream<'a, Result<BatchItem, Error>> {
        read_each(self, digests)
    }

    /// [Self::read_many] for passing blobs on to a reader that checks them:
    /// a backend may answer a blob as it stores it (compressed) and
    /// without verifying it, saving the decompression and hashing that the
    /// receiver does anyway. Only for callers that decompress and verify
    /// every item themselves (the gRPC server hands these to clients that
    /// asked for them, and those clients verify every answer). The default
    /// answers [Self::read_many]'s verified, plain blobs.
    fn read_many_as_stored<'a>(
        &'a self,
        digests: Vec<B3Digest>,
    ) -> BoxStream<'a, Result<StoredBatchItem, Error>> {
        as_plain(self.read_many(digests))
    }

    /// The whole blob as a stream of byte pieces in order, `None` if absent,
    /// for a caller that reads it to the end: only a stream that ends
    /// without an error is the blob (a corrupt blob ends in an error before
    /// its last piece), but pieces before the last may be handed out before
    /// the blob is verified (the gRPC client hashes a chunked blob once,
    /// whole). Callers that may stop early use [Self::open_read]. Backends
    /// that hold a blob in pieces (chunks, received messages) hand those out
    /// without copying them; the default
    /// reads [Self::open_read] in pieces of [crate::BLOB_MESSAGE_CHUNK].
    async fn read_stream(&self, digest: &B3Digest) -> Result<Option<BlobStream>, Error> {
        Ok(self.open_read(digest).await?.map(|r| {
            tokio_util::io::ReaderStream::with_capacity(r, crate::BLOB_MESSAGE_CHUNK).boxed()
        }))
    }

    /// Stores the content of an open regular file (read from its current
    /// position to its end) and returns the blob's digest and size. With
    /// `expected`, a blob of another digest is [Error::DigestMismatch] (the
    /// file changed since it was hashed): nothing is stored under the
    /// expected digest (the content may be, under its own). Backends that can
    /// take a file more cheaply than as a stream of writes override this: a
    /// local store copies it in the kernel, a gRPC client whose daemon runs
    /// on this machine hands it the open file. The default reads the file
    /// on the blocking pool and writes it through [Self::open_write].
    async fn put_file(
        &self,
        file: std::fs::File,
        expected: Option<B3Digest>,
    ) -> Result<(B3Digest, u64), Error> {
        put_file_by_writes(self, file, expected).await
    }

    /// Whether [Self::put_file] costs no more than hashing the file first
    /// would (no network between here and the storage, or a daemon taking
    /// the open file): an import then puts every file directly instead of
    /// hashing it first to skip files the store has.
    async fn direct_file_puts(&self) -> bool {
        false
    }

    /// The files a store on local disk keeps its single-chunk blobs in,
    /// for readers on this machine that decode and verify what they read
    /// themselves: a daemon passes them to its local clients
    /// ([crate::local_ingest]). `None` (the default) for every other store.
    fn stored_files(&self) -> Option<Arc<dyn StoredFiles>> {
        None
    }
}

/// Opens the files a local store keeps blobs in, as stored (see
/// [BlobService::stored_files]); what is read from them is decoded and
/// verified with [decode_stored_file].
pub trait StoredFiles: Send + Sync {
    /// The file holding blob `digest` as one stored chunk, opened for
    /// reading; `None` if the store holds it otherwise (several chunks, a
    /// whole file not cut yet) or not at all. Blocking.
    fn open(&self, digest: &B3Digest) -> std::io::Result<Option<std::fs::File>>;
}

/// [BlobService::put_file] by [BlobService::open_write]: the file read on
/// the blocking pool in pieces of up to 1 MiB and written in order.
pub async fn put_file_by_writes<S: BlobService + ?Sized>(
    service: &S,
    file: std::fs::File,
    expected: Option<B3Digest>,
) -> Result<(B3Digest, u64), Error> {
    let mut w = service.open_write().await;
    if let Some(d) = expected {
        w.expect_digest(d);
    }
    let mut pieces = crate::import::read_pieces(file);
    let mut size = 0u64;
    while let Some(piece) = pieces.recv().await {
        let piece = piece?;
        size += piece.len() as u64;
        w.write(piece).await?;
    }
    let digest = w.close().await?;
    check_expected(expected, digest)?;
    Ok((digest, size))
}

/// [Error::DigestMismatch] unless `actual` is the `expected` digest (if
/// one is given): the check of every [BlobService::put_file].
pub(crate) fn check_expected(expected: Option<B3Digest>, actual: B3Digest) -> Result<(), Error> {
    match expected {
        Some(expected) if expected != actual => Err(Error::DigestMismatch { expected, actual }),
        _ => Ok(()),
    }
}

/// `data` cut into slices of at most `max` bytes (none if empty), without
/// copying: how a [BlobService::read_stream] piece becomes messages or
/// writes of a bounded size.
pub fn pieces_of(data: Bytes, max: usize) -> impl Iterator<Item = Bytes> {
    (0..data.len())
        .step_by(max.max(1))
        .map(move |start| data.slice(start..(start + max.max(1)).min(data.len())))
}

/// A blob's bytes, in order, as [BlobService::read_stream] gives them.
pub type BlobStream = BoxStream<'static, std::io::Result<Bytes>>;

/// [BlobService::read_many] by one [BlobService::open_read] per blob, a few at a time.
pub fn read_each<S: BlobService + ?Sized>(
    svc: &S,
    digests: Vec<B3Digest>,
) -> BoxStream<'_, Result<BatchItem, Error>> {
    futures::stream::iter(digests)
        .map(move |d| async move { Ok((d, read_small(svc, &d).await?)) })
        .buffered(READ_MANY_IN_FLIGHT)
        .boxed()
}

/// Reads a whole blob of at most [MAX_BATCH_BLOB_SIZE] bytes.
pub async fn read_small<S: BlobService + ?Sized>(
    svc: &S,
    digest: &B3Digest,
) -> Result<Option<Bytes>, Error> {
    read_small_from(svc.open_read(digest).await?, digest).await
}

/// The error for a blob too large for a batch read.
pub(crate) fn too_large_for_batch(digest: &B3Digest) -> Error {
    Error::InvalidRequest(format!(
        "blob {digest} is larger than {MAX_BATCH_BLOB_SIZE} bytes: read it on its own, not in a batch"
    ))
}

/// [read_small] from a reader already opened (`None`: the blob is absent).
pub async fn read_small_from(
    reader: Option<Box<dyn BlobReader>>,
    digest: &B3Digest,
) -> Result<Option<Bytes>, Error> {
    let Some(reader) = reader else {
        return Ok(None);
    };
    let mut buf = Vec::new();
    reader
        .take(MAX_BATCH_BLOB_SIZE + 1)
        .read_to_end(&mut buf)
        .await?;
    if buf.len() as u64 > MAX_BATCH_BLOB_SIZE {
        return Err(too_large_for_batch(digest));
    }
    Ok(Some(Bytes::from(buf)))
}

/// `digests` cut into groups of at most `size`, in order: how the
/// [BlobService::read_many] implementations split their work.
pub(crate) fn in_groups(digests: &[B3Digest], size: usize) -> Vec<Vec<B3Digest>> {
    digests.chunks(size).map(<[_]>::to_vec).collect()
}

/// Where a seek lands in a stream of `len` bytes read up to `pos`: past
/// the end is allowed (reads return EOF), before the start is an error.
pub fn seek_target(position: std::io::SeekFrom, pos: u64, len: u64) -> std::io::Result<u64> {
    match position {
        std::io::SeekFrom::Start(p) => Some(p),
        std::io::SeekFrom::End(d) => len.checked_add_signed(d),
        std::io::SeekFrom::Current(d) => pos.checked_add_signed(d),
    }
    .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before the start"))
}

/// Copies everything from `reader` into a new blob and returns its digest and size.
pub async fn copy_to_blob<R: AsyncRead + Unpin>(
    reader: &mut R,
    writer: &mut dyn BlobWriter,
) -> Result<(B3Digest, u64), Error> {
    let mut total = 0u64;
    loop {
        let mut buf = bytes::BytesMut::with_capacity(crate::BLOB_MESSAGE_CHUNK);
        while buf.len() < crate::BLOB_MESSAGE_CHUNK {
            if reader.read_buf(&mut buf).await? == 0 {
                break;
            }
        }
        if buf.is_empty() {
            break;
        }
        total += buf.len() as u64;
        writer.write(buf.freeze()).await?;
    }
    Ok((writer.close().await?, total))
}

/// Reads a whole blob into memory (for tests and small blobs only).
pub async fn read_all(svc: &dyn BlobService, digest: &B3Digest) -> Result<Option<Vec<u8>>, Error> {
    match svc.open_read(digest).await? {
        None => Ok(None),
        Some(mut r) => {
            let mut v = Vec::new();
            r.read_to_end(&mut v).await?;
            Ok(Some(v))
        }
    }
}

/// Stores bytes as a blob (convenience for small blobs).
pub async fn put_bytes(svc: &dyn BlobService, data: Bytes) -> Result<B3Digest, Error> {
    let mut w = svc.open_write().await;
    w.write(data).await?;
    w.close().await
}
