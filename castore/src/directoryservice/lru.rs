//! A bounded in-memory layer: the most recently used directories, in front
//! of an optional inner service.
use super::{DirectoryService, ValidatedClosure};
use crate::{B3Digest, Directory, Error};
use async_trait::async_trait;
use parking_lot::Mutex;
use std::num::NonZeroUsize;
use std::sync::Arc;

/// Keeps at most `capacity` directories. With an inner service, misses are
/// read from it and writes go through to it; without one it is a bounded
/// store that forgets the least recently used directories.
pub struct LruDirectoryService {
    cache: Mutex<lru::LruCache<B3Digest, Directory>>,
    inner: Option<Arc<dyn DirectoryService>>,
}

impl LruDirectoryService {
    /// A layer holding up to `capacity` directories.
    pub fn new(capacity: NonZeroUsize, inner: Option<Arc<dyn DirectoryService>>) -> Self {
        Self {
            cache: Mutex::new(lru::LruCache::new(capacity)),
            inner,
        }
    }
}

#[async_trait]
impl DirectoryService for LruDirectoryService {
    #[tracing::instrument(skip(self), level = "trace")]
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>, Error> {
        if let Some(d) = self.cache.lock().get(digest) {
            return Ok(Some(d.clone()));
        }
        let Some(inner) = &self.inner else {
            return Ok(None);
        };
        let found = inner.get(digest).await?;
        if let Some(d) = &found {
            self.cache.lock().put(*digest, d.clone());
        }
        Ok(found)
    }

    async fn put_closure(&self, closure: ValidatedClosure) -> Result<B3Digest, Error> {
        if let Some(inner) = &self.inner {
            inner.put_closure(closure.clone()).await?;
        }
        let root = closure.root();
        let mut cache = self.cache.lock();
        for (d, dir) in closure.into_directories() {
            cache.put(d, dir);
        }
        Ok(root)
    }
}
