//! In-memory blob service (process-local; for tests and caches).
use super::{BlobReader, BlobService, BlobWriter};
use crate::{B3Digest, Error};
use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::io::SeekFrom;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncSeek, ReadBuf};

/// A blob as the pieces it was written in (never joined: no copy, no
/// second buffer of the blob's size at close).
type Pieces = Arc<[Bytes]>;

/// Keeps blobs in a hash map, each as the pieces it was written in.
#[derive(Clone, Default)]
pub struct MemoryBlobService {
    blobs: Arc<RwLock<HashMap<B3Digest, Pieces>>>,
}

/// Reads a blob's pieces as one seekable stream.
struct PiecesReader {
    pieces: Pieces,
    /// Offset where each piece starts (ascending), and the total length.
    starts: Vec<u64>,
    len: u64,
    pos: u64,
}

impl PiecesReader {
    fn new(pieces: Pieces) -> Self {
        let mut starts = Vec::with_capacity(pieces.len());
        let mut len = 0u64;
        for p in pieces.iter() {
            starts.push(len);
            len += p.len() as u64;
        }
        Self {
            pieces,
            starts,
            len,
            pos: 0,
        }
    }
}

impl AsyncRead for PiecesReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        while buf.remaining() > 0 && self.pos < self.len {
            // The last piece starting at or before pos (empty pieces are skipped over).
            let i = self.starts.partition_point(|&s| s <= self.pos) - 1;
            let within = (self.pos - self.starts[i]) as usize;
            let piece = &self.pieces[i];
            if within >= piece.len() {
                self.pos = self.starts.get(i + 1).copied().unwrap_or(self.len);
                continue;
            }
            let n = (piece.len() - within).min(buf.remaining());
            buf.put_slice(&piece[within..within + n]);
            self.pos += n as u64;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncSeek for PiecesReader {
    fn start_seek(mut self: Pin<&mut Self>, position: SeekFrom) -> std::io::Result<()> {
        self.pos = super::seek_target(position, self.pos, self.len)?;
        Ok(())
    }

    fn poll_complete(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<u64>> {
        Poll::Ready(Ok(self.pos))
    }
}

#[async_trait]
impl BlobService for MemoryBlobService {
    #[tracing::instrument(skip(self), level = "trace")]
    async fn has(&self, digest: &B3Digest) -> Result<bool, Error> {
        Ok(self.blobs.read().contains_key(digest))
    }

    #[tracing::instrument(skip(self), level = "trace")]
    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>, Error> {
        Ok(self
            .blobs
            .read()
            .get(digest)
            .map(|p| Box::new(PiecesReader::new(p.clone())) as Box<dyn BlobReader>))
    }

    async fn read_stream(&self, digest: &B3Digest) -> Result<Option<super::BlobStream>, Error> {
        let pieces = self.blobs.read().get(digest).cloned();
        Ok(pieces.map(|p| {
            let pieces: Vec<Bytes> = p.iter().filter(|b| !b.is_empty()).cloned().collect();
            futures::StreamExt::boxed(futures::stream::iter(pieces.into_iter().map(Ok)))
        }))
    }

    /// In memory: nothing between here and the storage.
    async fn direct_file_puts(&self) -> bool {
        true
    }

    async fn open_write(&self) -> Box<dyn BlobWriter> {
        Box::new(MemoryBlobWriter {
            blobs: self.blobs.clone(),
            hasher: blake3::Hasher::new(),
            pieces: Vec::new(),
            written: 0,
            block: None,
            done: None,
        })
    }
}

struct MemoryBlobWriter {
    blobs: Arc<RwLock<HashMap<B3Digest, Pieces>>>,
    hasher: blake3::Hasher,
    /// The pieces as written, kept as they are; past [LARGE_BLOB] bytes,
    /// filled [HugeBlock]s.
    pieces: Vec<Bytes>,
    /// Bytes written so far.
    written: u64,
    /// The block being filled, once the blob is large.
    block: Option<HugeBlock>,
    done: Option<B3Digest>,
}

/// Past this many bytes a blob's further bytes are copied into
/// [HugeBlock]s instead of kept as written.
const LARGE_BLOB: u64 = 4 * 1024 * 1024;
/// Size and alignment of a transparent huge page.
const HUGE_PAGE: usize = 2 * 1024 * 1024;
/// Size of a [HugeBlock].
const BLOCK: usize = 4 * HUGE_PAGE;

/// Memory for the bytes of a large blob: [BLOCK] bytes aligned to a huge
/// page and marked for transparent huge pages (`MADV_HUGEPAGE`), so that
/// filling it costs the kernel four page faults instead of 2,048. The
/// pieces a large blob arrives in (gRPC messages, each a fresh buffer)
/// would otherwise be faulted in 4 KiB at a time: about 40 % of a daemon's
/// time when a 1 GiB blob is uploaded into memory.
struct HugeBlock {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the block owns its allocation; it is written only through
// `&mut self` and read only through shared slices after `Bytes::from_owner`.
unsafe impl Send for HugeBlock {}
// SAFETY: as above; shared access is read-only.
unsafe impl Sync for HugeBlock {}

impl HugeBlock {
    fn layout() -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(BLOCK, HUGE_PAGE).expect("valid layout")
    }

    fn new() -> Self {
        let layout = Self::layout();
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc(layout) };
        let Some(ptr) = std::ptr::NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        // SAFETY: ptr..ptr+BLOCK is this allocation; madvise only hints.
        unsafe { libc::madvise(ptr.as_ptr().cast(), BLOCK, libc::MADV_HUGEPAGE) };
        Self { ptr, len: 0 }
    }

    /// Copies as much of `data` as fits; returns how much that was.
    fn fill(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(BLOCK - self.len);
        // SAFETY: len + n <= BLOCK, the source is another allocation.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(self.len), n) };
        self.len += n;
        n
    }

    fn is_full(&self) -> bool {
        self.len == BLOCK
    }

    /// The filled bytes, as a piece. A block less than half full is
    /// copied into a buffer of its size instead (the last one of a blob).
    fn into_piece(self) -> Bytes {
        if self.len < BLOCK / 2 {
            return Bytes::copy_from_slice(self.as_ref());
        }
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for HugeBlock {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the first len bytes were written by `fill`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for HugeBlock {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout()) }
    }
}

#[async_trait]
impl BlobWriter for MemoryBlobWriter {
    async fn write(&mut self, data: Bytes) -> Result<(), Error> {
        if self.done.is_some() {
            return Err(Error::InvalidRequest("write after close".into()));
        }
        self.hasher.update(&data);
        self.written += data.len() as u64;
        if self.written <= LARGE_BLOB {
            self.pieces.push(data);
            return Ok(());
        }
        let mut rest = &data[..];
        while !rest.is_empty() {
            let block = self.block.get_or_insert_with(HugeBlock::new);
            rest = &rest[block.fill(rest)..];
            if block.is_full() {
                let full = self.block.take().expect("just filled");
                self.pieces.push(full.into_piece());
            }
        }
        Ok(())
    }

    async fn close(&mut self) -> Result<B3Digest, Error> {
        if let Some(d) = self.done {
            return Ok(d);
        }
        let digest = B3Digest::from(self.hasher.finalize());
        if let Some(last) = self.block.take() {
            self.pieces.push(last.into_piece());
        }
        let pieces: Pieces = std::mem::take(&mut self.pieces)
            .into_iter()
            .filter(|p| !p.is_empty())
            .collect();
        self.blobs.write().entry(digest).or_insert(pieces);
        self.done = Some(digest);
        Ok(digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncSeekExt};

    #[tokio::test]
    async fn pieces_read_and_seek_as_one_blob() {
        let whole: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let pieces: Pieces = [&whole[..1], &whole[1..400], &whole[400..401], &whole[401..]]
            .iter()
            .map(|p| Bytes::copy_from_slice(p))
            .collect();
        let mut r = PiecesReader::new(pieces);
        let mut all = Vec::new();
        r.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, whole);
        for (from, pos) in [
            (SeekFrom::Start(399), 399u64),
            (SeekFrom::End(-1), 999),
            (SeekFrom::Start(0), 0),
        ] {
            assert_eq!(r.seek(from).await.unwrap(), pos);
            let mut rest = Vec::new();
            r.read_to_end(&mut rest).await.unwrap();
            assert_eq!(rest, &whole[pos as usize..]);
        }
        r.seek(SeekFrom::Start(5000)).await.unwrap();
        let mut past = Vec::new();
        assert_eq!(r.read_to_end(&mut past).await.unwrap(), 0);
        assert!(r.seek(SeekFrom::Current(-6000)).await.is_err());
    }

    /// Large blobs go into huge-page blocks past the first few MiB: any
    /// way of cutting the writes, every size around the thresholds, reads
    /// back as written and under its digest.
    #[tokio::test]
    async fn large_blobs_in_blocks_read_back_whole() {
        let svc = MemoryBlobService::default();
        let sizes = [
            LARGE_BLOB as usize - 1,
            LARGE_BLOB as usize + 1,
            LARGE_BLOB as usize + BLOCK,
            LARGE_BLOB as usize + BLOCK + 1,
            LARGE_BLOB as usize + BLOCK / 2 - 1,
            LARGE_BLOB as usize + 3 * BLOCK + 12345,
        ];
        for (i, size) in sizes.into_iter().enumerate() {
            let data: Vec<u8> = (0..size).map(|j| (j * 31 + i) as u8).collect();
            let mut w = svc.open_write().await;
            for piece in data.chunks(700_001 + i * 999) {
                w.write(Bytes::copy_from_slice(piece)).await.unwrap();
            }
            let digest = w.close().await.unwrap();
            assert_eq!(digest, B3Digest::of(&data), "{size}");
            let mut r = svc.open_read(&digest).await.unwrap().unwrap();
            let mut back = Vec::new();
            r.read_to_end(&mut back).await.unwrap();
            assert!(back == data, "{size}: read back differs");
            r.seek(SeekFrom::Start(size as u64 - 10)).await.unwrap();
            let mut tail = Vec::new();
            r.read_to_end(&mut tail).await.unwrap();
            assert_eq!(tail, data[size - 10..], "{size}");
        }
    }
}
