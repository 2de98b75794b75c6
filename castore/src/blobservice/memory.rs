//! In-memory blob service (process-local; for tests and caches).
use super::{BlobReader, BlobService, BlobWriter};
use crate::{B3Digest, Error};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;

/// Keeps blobs whole in a hash map.
#[derive(Clone, Default)]
pub struct MemoryBlobService {
    blobs: Arc<RwLock<HashMap<B3Digest, Bytes>>>,
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
            .map(|b| Box::new(std::io::Cursor::new(b.clone())) as Box<dyn BlobReader>))
    }

    async fn open_write(&self) -> Box<dyn BlobWriter> {
        Box::new(MemoryBlobWriter { blobs: self.blobs.clone(), hasher: blake3::Hasher::new(), pieces: Vec::new(), done: None })
    }
}

struct MemoryBlobWriter {
    blobs: Arc<RwLock<HashMap<B3Digest, Bytes>>>,
    hasher: blake3::Hasher,
    /// The pieces as written; joined once on close (no repeated regrowth).
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
        let pieces = std::mem::take(&mut self.pieces);
        let data = if pieces.len() == 1 {
            pieces.into_iter().next().expect("one piece")
        } else {
            let mut buf = BytesMut::with_capacity(pieces.iter().map(|p| p.len()).sum());
            for p in pieces {
                buf.extend_from_slice(&p);
            }
            buf.freeze()
        };
        self.blobs.write().entry(digest).or_insert(data);
        self.done = Some(digest);
        Ok(digest)
    }
}
