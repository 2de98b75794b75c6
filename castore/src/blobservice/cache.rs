//! Two-level blob cache: read `near`, else `far` (filling `near`).
use super::{BlobReader, BlobService, BlobWriter, ChunkMeta};
use crate::{B3Digest, Error};
use async_trait::async_trait;
use std::sync::Arc;
use tracing::instrument;

/// Reads from `near` when it has the blob, otherwise copies it from `far`
/// into `near` first. Writes go to `far`, the authoritative store.
#[derive(Clone)]
pub struct CacheBlobService {
    near: Arc<dyn BlobService>,
    far: Arc<dyn BlobService>,
}

impl CacheBlobService {
    /// A cache of `far` kept in `near`.
    pub fn new(near: Arc<dyn BlobService>, far: Arc<dyn BlobService>) -> Self {
        Self { near, far }
    }
}

#[async_trait]
impl BlobService for CacheBlobService {
    #[instrument(skip(self), level = "debug")]
    async fn has(&self, digest: &B3Digest) -> Result<bool, Error> {
        Ok(self.near.has(digest).await? || self.far.has(digest).await?)
    }

    #[instrument(skip(self), level = "debug")]
    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>, Error> {
        if self.near.has(digest).await? {
            return self.near.open_read(digest).await;
        }
        let Some(mut far_reader) = self.far.open_read(digest).await? else { return Ok(None) };
        let mut w = self.near.open_write().await;
        let (filled, _) = super::copy_to_blob(&mut far_reader, w.as_mut()).await?;
        if filled != *digest {
            return Err(Error::Storage(format!("far store returned blob {filled} when asked for {digest}")));
        }
        tracing::debug!(%digest, "filled near cache");
        self.near.open_read(digest).await
    }

    async fn open_write(&self) -> Box<dyn BlobWriter> {
        self.far.open_write().await
    }

    async fn chunks(&self, digest: &B3Digest) -> Result<Option<Vec<ChunkMeta>>, Error> {
        match self.near.chunks(digest).await? {
            Some(c) => Ok(Some(c)),
            None => self.far.chunks(digest).await,
        }
    }
}
