//! Two-level path-info cache: read `near`, else `far` (and copy what far
//! had into near).
use super::PathInfoService;
use crate::pathinfo::PathInfo;
use crate::store_path::DIGEST_LEN;
use arca_castore::Error;
use async_trait::async_trait;
use futures::stream::BoxStream;
use std::sync::Arc;

/// Reads from `near`, falling back to `far` and filling `near`; writes go
/// to `far` (the authority), then to `near`. `list` is far's.
#[derive(Clone)]
pub struct CachePathInfoService {
    near: Arc<dyn PathInfoService>,
    far: Arc<dyn PathInfoService>,
}

impl CachePathInfoService {
    /// A cache of `far` kept in `near`.
    pub fn new(near: Arc<dyn PathInfoService>, far: Arc<dyn PathInfoService>) -> Self {
        Self { near, far }
    }
}

#[async_trait]
impl PathInfoService for CachePathInfoService {
    #[tracing::instrument(skip(self), fields(digest = %crate::nixbase32::encode(&digest)), level = "debug")]
    async fn get(&self, digest: [u8; DIGEST_LEN]) -> Result<Option<PathInfo>, Error> {
        if let Some(i) = self.near.get(digest).await? {
            return Ok(Some(i));
        }
        let Some(info) = self.far.get(digest).await? else {
            return Ok(None);
        };
        self.near.put(info.clone()).await?;
        tracing::debug!(path = %info.store_path, "filled near cache");
        Ok(Some(info))
    }

    #[tracing::instrument(skip_all, fields(path = %info.store_path), level = "debug")]
    async fn put(&self, info: PathInfo) -> Result<PathInfo, Error> {
        let stored = self.far.put(info).await?;
        self.near.put(stored.clone()).await?;
        Ok(stored)
    }

    fn list(&self) -> BoxStream<'_, Result<PathInfo, Error>> {
        self.far.list()
    }
}
