//! Two-level blob cache: read `near`, else `far` (filling `near`).
use super::{BatchItem, BlobReader, BlobService, BlobWriter, ChunkMeta};
use crate::{B3Digest, Error};
use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use std::sync::Arc;
use tracing::instrument;

/// Blobs looked up in `near` (then `far`) per group of a batch read.
const FILL_GROUP: usize = 64;

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
        let Some(mut far_reader) = self.far.open_read(digest).await? else {
            return Ok(None);
        };
        let mut w = self.near.open_write().await;
        let (filled, _) = super::copy_to_blob(&mut far_reader, w.as_mut()).await?;
        if filled != *digest {
            return Err(Error::Storage(format!(
                "far store returned blob {filled} when asked for {digest}"
            )));
        }
        tracing::debug!(%digest, "filled near cache");
        self.near.open_read(digest).await
    }

    async fn open_write(&self) -> Box<dyn BlobWriter> {
        self.far.open_write().await
    }

    /// In groups: `near` answers what it has, `far` the rest in one batch
    /// (filling `near`), answers merged back into the order asked.
    fn read_many<'a>(&'a self, digests: Vec<B3Digest>) -> BoxStream<'a, Result<BatchItem, Error>> {
        let groups = super::in_groups(&digests, FILL_GROUP);
        futures::stream::iter(groups)
            .then(move |group| async move {
                let mut answers: Vec<BatchItem> = self.near.read_many(group).try_collect().await?;
                let missing: Vec<B3Digest> = answers
                    .iter()
                    .filter(|(_, data)| data.is_none())
                    .map(|(d, _)| *d)
                    .collect();
                if !missing.is_empty() {
                    let mut from_far = self.far.read_many(missing);
                    for slot in answers.iter_mut().filter(|(_, data)| data.is_none()) {
                        let (digest, data) = from_far.try_next().await?.ok_or_else(|| {
                            Error::Storage("far store answered fewer blobs than asked".into())
                        })?;
                        if digest != slot.0 {
                            return Err(Error::Storage(format!(
                                "far store answered {digest} for {}",
                                slot.0
                            )));
                        }
                        if let Some(data) = &data {
                            let filled = super::put_bytes(self.near.as_ref(), data.clone()).await?;
                            if filled != digest {
                                return Err(Error::Storage(format!(
                                    "far store returned blob {filled} for {digest}"
                                )));
                            }
                        }
                        slot.1 = data;
                    }
                }
                Ok::<_, Error>(futures::stream::iter(answers.into_iter().map(Ok)))
            })
            .try_flatten()
            .boxed()
    }

    async fn chunks(&self, digest: &B3Digest) -> Result<Option<Vec<ChunkMeta>>, Error> {
        match self.near.chunks(digest).await? {
            Some(c) => Ok(Some(c)),
            None => self.far.chunks(digest).await,
        }
    }
}
