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

    async fn open_write(&self) -> Box<dyn BlobWriter> {
        Box::new(MemoryBlobWriter {
            blobs: self.blobs.clone(),
            hasher: blake3::Hasher::new(),
            pieces: Vec::new(),
            done: None,
        })
    }
}

struct MemoryBlobWriter {
    blobs: Arc<RwLock<HashMap<B3Digest, Pieces>>>,
    hasher: blake3::Hasher,
    /// The pieces as written, kept as they are.
    pieces: Vec<Bytes>,
    done: Option<B3Digest>,
}

#[async_trait]
impl BlobWriter for MemoryBlobWriter {
    async fn write(&mut self, data: Bytes) -> Result<(), Error> {
        if self.done.is_some() {
            return Err(Error::InvalidRequest("write after close".into()));
        }
        self.hasher.update(&data);
        self.pieces.push(data);
        Ok(())
    }

    async fn close(&mut self) -> Result<B3Digest, Error> {
        if let Some(d) = self.done {
            return Ok(d);
        }
        let digest = B3Digest::from(self.hasher.finalize());
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
}
