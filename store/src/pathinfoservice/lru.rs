//! A bounded in-memory layer: the most recently used path infos, in front
//! of an optional inner service.
use super::PathInfoService;
use crate::pathinfo::PathInfo;
use crate::store_path::DIGEST_LEN;
use arca_castore::Error;
use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};
use parking_lot::Mutex;
use std::num::NonZeroUsize;
use std::sync::Arc;

/// Keeps at most `capacity` path infos. With an inner service, misses are
/// read from it and writes go through to it (and `list` is the inner's);
/// without one it is a bounded store that forgets the least recently used.
pub struct LruPathInfoService {
    cache: Mutex<lru::LruCache<[u8; DIGEST_LEN], PathInfo>>,
    inner: Option<Arc<dyn PathInfoService>>,
}

impl LruPathInfoService {
    /// A layer holding up to `capacity` path infos.
    pub fn new(capacity: NonZeroUsize, inner: Option<Arc<dyn PathInfoService>>) -> Self {
        Self {
            cache: Mutex::new(lru::LruCache::new(capacity)),
            inner,
        }
    }
}

#[async_trait]
impl PathInfoService for LruPathInfoService {
    #[tracing::instrument(skip(self), fields(digest = %crate::nixbase32::encode(&digest)), level = "trace")]
    async fn get(&self, digest: [u8; DIGEST_LEN]) -> Result<Option<PathInfo>, Error> {
        if let Some(i) = self.cache.lock().get(&digest) {
            return Ok(Some(i.clone()));
        }
        let Some(inner) = &self.inner else {
            return Ok(None);
        };
        let found = inner.get(digest).await?;
        if let Some(i) = &found {
            self.cache.lock().put(digest, i.clone());
        }
        Ok(found)
    }

    #[tracing::instrument(skip_all, fields(path = %info.store_path), level = "trace")]
    async fn put(&self, info: PathInfo) -> Result<PathInfo, Error> {
        let stored = match &self.inner {
            Some(inner) => inner.put(info).await?,
            None => info,
        };
        self.cache.lock().put(*stored.digest(), stored.clone());
        Ok(stored)
    }

    fn list(&self) -> BoxStream<'_, Result<PathInfo, Error>> {
        match &self.inner {
            Some(inner) => inner.list(),
            None => {
                let all: Vec<PathInfo> = self.cache.lock().iter().map(|(_, v)| v.clone()).collect();
                futures::stream::iter(all.into_iter().map(Ok)).boxed()
            }
        }
    }
}
