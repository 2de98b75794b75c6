//! A seekable reader over a blob stored as a list of chunks, fetching
//! upcoming chunks ahead of sequential reads.
use super::ChunkMeta;
use crate::{B3Digest, Error};
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use std::io::SeekFrom;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncSeek, ReadBuf};
use tokio_util::io::StreamReader;
use tokio_util::task::AbortOnDropHandle;

/// How many chunks are fetched ahead of the one being read.
const READ_AHEAD: usize = 4;
/// Largest chunk accepted in a chunk list (FastCDC's maximum).
pub const MAX_CHUNK_SIZE: u64 = 16 * 1024 * 1024;

/// Checks an untrusted chunk list: every chunk 1..=16 MiB, total without
/// overflow. Returns the total size.
pub fn validate_chunk_list(chunks: &[ChunkMeta]) -> Result<u64, Error> {
    let mut total = 0u64;
    for c in chunks {
        if c.size == 0 || c.size > MAX_CHUNK_SIZE {
            return Err(Error::Storage(format!(
                "chunk {} has an invalid size {}",
                c.digest, c.size
            )));
        }
        total = total
            .checked_add(c.size)
            .ok_or_else(|| Error::Storage("chunk sizes overflow".into()))?;
    }
    Ok(total)
}

/// Fetches one chunk, whole and verified against its digest.
#[async_trait::async_trait]
pub trait ChunkFetcher: Send + Sync + 'static {
    /// The chunk's bytes; an error if it is missing or fails verification.
    async fn fetch_chunk(&self, chunk: &ChunkMeta) -> Result<Bytes, Error>;

    /// The chunk's bytes with its length checked but not its digest, for a
    /// reader that hashes the whole blob instead (a read from the start, see
    /// [ChunkedReader::into_stream]): one BLAKE3 pass over the bytes instead
    /// of two. The default verifies anyway.
    async fn fetch_chunk_unhashed(&self, chunk: &ChunkMeta) -> Result<Bytes, Error> {
        self.fetch_chunk(chunk).await
    }
}

/// Checks fetched chunk bytes' length against their metadata.
pub(crate) fn check_chunk_size(chunk: &ChunkMeta, data: &Bytes) -> Result<(), Error> {
    if data.len() as u64 != chunk.size {
        return Err(Error::Storage(format!(
            "chunk {} has {} bytes, expected {}",
            chunk.digest,
            data.len(),
            chunk.size
        )));
    }
    Ok(())
}

/// Checks fetched chunk bytes against their metadata.
pub(crate) fn verify_chunk(chunk: &ChunkMeta, data: &Bytes) -> Result<(), Error> {
    check_chunk_size(chunk, data)?;
    let actual = B3Digest::of(data);
    if actual != chunk.digest {
        return Err(Error::Storage(format!(
            "chunk {} failed verification (got {actual})",
            chunk.digest
        )));
    }
    Ok(())
}

type ByteStream = super::BlobStream;

/// Reads a chunked blob. Every chunk read is verified against its digest; a
/// read from the start also checks the whole blob's digest before the last
/// chunk is handed out (so a wrong or reordered chunk list is caught). The
/// stream of [Self::into_stream], read to its end, skips the chunks' own
/// hashing where the fetcher can ([ChunkFetcher::fetch_chunk_unhashed]). Seeking drops
/// the read-ahead and restarts at the chunk holding the new position.
pub struct ChunkedReader {
    /// (offset, chunk) pairs, offsets ascending.
    chunks: Arc<[(u64, ChunkMeta)]>,
    size: u64,
    fetcher: Arc<dyn ChunkFetcher>,
    blob_digest: B3Digest,
    pos: u64,
    inner: Option<StreamReader<ByteStream, Bytes>>,
}

impl ChunkedReader {
    /// A reader over `chunks` (validated: sizes bounded, no overflow), in order,
    /// of the blob `blob_digest`.
    pub fn new(
        chunks: Vec<ChunkMeta>,
        fetcher: Arc<dyn ChunkFetcher>,
        blob_digest: B3Digest,
    ) -> Result<Self, Error> {
        validate_chunk_list(&chunks)?;
        // No chunks is the empty blob and nothing else; any other digest
        // would read as empty bytes without ever being checked.
        if chunks.is_empty() && blob_digest != B3Digest::of(b"") {
            return Err(Error::Storage(format!(
                "blob {blob_digest} has an empty chunk list"
            )));
        }
        let mut offset = 0u64;
        let chunks: Vec<(u64, ChunkMeta)> = chunks
            .into_iter()
            .map(|c| {
                let o = offset;
                offset += c.size;
                (o, c)
            })
            .collect();
        Ok(Self {
            chunks: chunks.into(),
            size: offset,
            fetcher,
            blob_digest,
            pos: 0,
            inner: None,
        })
    }

    /// Total length of the blob.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The blob from its start as a stream of its chunks (fetched ahead),
    /// without copying them, for a reader that reads it to the end: the
    /// whole blob is hashed and checked before its last chunk goes out, the
    /// chunks are not hashed one by one where the fetcher can skip it.
    pub fn into_stream(self) -> ByteStream {
        self.stream_from(0, true)
    }

    /// The blob from `pos`. With `whole_only` (a stream from the start that
    /// its reader consumes to the end), chunks are not hashed on their own
    /// where the fetcher can skip it: the whole blob is, before its last
    /// chunk goes out. A reader that may stop early never gets bytes of an
    /// unverified chunk.
    fn stream_from(&self, pos: u64, whole_only: bool) -> ByteStream {
        // First chunk whose end is beyond pos.
        let idx = self.chunks.partition_point(|(off, c)| off + c.size <= pos);
        let skip_first = self.chunks.get(idx).map(|(off, _)| pos - off).unwrap_or(0) as usize;
        let chunks = self.chunks.clone();
        let fetcher = self.fetcher.clone();
        let count = chunks.len();
        // Each fetch is its own task: futures inside `buffered` only progress
        // while the consumer polls, and a consumer busy writing its output
        // would stall the read-ahead.
        let whole = pos == 0;
        let unhashed = whole && whole_only;
        let fetched = stream::iter(idx..count)
            .map(move |i| {
                let chunk = chunks[i].1.clone();
                let fetcher = fetcher.clone();
                // Cancelled when the reader no longer wants it (a seek, a drop).
                let fetch = AbortOnDropHandle::new(tokio::spawn(async move {
                    if unhashed {
                        fetcher.fetch_chunk_unhashed(&chunk).await
                    } else {
                        fetcher.fetch_chunk(&chunk).await
                    }
                }));
                futures::FutureExt::map(fetch, |joined| {
                    joined
                        .unwrap_or_else(|e| Err(Error::Storage(format!("chunk fetch failed: {e}"))))
                })
            })
            .buffered(READ_AHEAD);
        if whole {
            // From the start: hash everything, check before the last chunk goes out.
            let expected = self.blob_digest;
            let verified: BoxStream<'static, Result<Bytes, Error>> = async_stream::try_stream! {
                let mut hasher = blake3::Hasher::new();
                let mut seen = 0usize;
                futures::pin_mut!(fetched);
                while let Some(chunk) = fetched.next().await {
                    let chunk = chunk?;
                    hasher.update(&chunk);
                    seen += 1;
                    if seen == count {
                        let actual = B3Digest::from(hasher.finalize());
                        if actual != expected {
                            Err(Error::Storage(format!("blob {expected} failed verification (got {actual})")))?;
                        }
                    }
                    yield chunk;
                }
            }
            .boxed();
            return verified.map_err(std::io::Error::from).boxed();
        }
        fetched
            .enumerate()
            .map(move |(n, r)| {
                r.map(|b| {
                    if n == 0 {
                        b.slice(skip_first.min(b.len())..)
                    } else {
                        b
                    }
                })
            })
            .map_err(std::io::Error::from)
            .boxed()
    }
}

impl AsyncRead for ChunkedReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.pos >= self.size {
            return Poll::Ready(Ok(()));
        }
        if self.inner.is_none() {
            let s = self.stream_from(self.pos, false);
            self.inner = Some(StreamReader::new(s));
        }
        let before = buf.filled().len();
        let inner = self.inner.as_mut().expect("set above");
        match Pin::new(inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                self.pos += (buf.filled().len() - before) as u64;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                // The stream ended with the error; a later read restarts at pos.
                self.inner = None;
                Poll::Ready(Err(e))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncSeek for ChunkedReader {
    fn start_seek(mut self: Pin<&mut Self>, position: SeekFrom) -> std::io::Result<()> {
        let new = super::seek_target(position, self.pos, self.size)?;
        if new != self.pos {
            self.pos = new;
            self.inner = None;
        }
        Ok(())
    }

    fn poll_complete(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<u64>> {
        Poll::Ready(Ok(self.pos))
    }
}
