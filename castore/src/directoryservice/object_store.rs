//! Directories on any `object_store` backend, one object per directory
//! (`directories/<2 hex>/<digest hex>`), so any directory can be fetched.
use super::{DirectoryService, ValidatedClosure};
use crate::{B3Digest, Directory, Error};
use async_trait::async_trait;
use futures::stream::{StreamExt, TryStreamExt};
use object_store::{path::Path, ObjectStore, ObjectStoreExt, PutPayload};
use std::sync::Arc;

const WRITE_CONCURRENCY: usize = 16;

/// Directory service on an object store.
#[derive(Clone)]
pub struct ObjectStoreDirectoryService {
    store: Arc<dyn ObjectStore>,
    base: Path,
}

impl ObjectStoreDirectoryService {
    /// A service storing under `base` in `store`.
    pub fn new(store: Arc<dyn ObjectStore>, base: Path) -> Self {
        Self { store, base }
    }

    fn path(&self, d: &B3Digest) -> Path {
        let h = d.to_hex();
        self.base.clone().join("directories").join(&h[..2]).join(h)
    }
}

#[async_trait]
impl DirectoryService for ObjectStoreDirectoryService {
    #[tracing::instrument(skip(self), level = "debug")]
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>, Error> {
        let raw = match self.store.get(&self.path(digest)).await {
            Ok(r) => r.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let dir = Directory::decode(&raw)
            .map_err(|e| Error::Storage(format!("stored directory {digest} is corrupt: {e}")))?;
        if dir.digest() != *digest {
            return Err(Error::Storage(format!(
                "stored directory {digest} failed verification"
            )));
        }
        Ok(Some(dir))
    }

    /// Writes level by level from the leaves, each level concurrently, so no
    /// directory becomes visible before its children.
    #[tracing::instrument(skip_all, fields(root = %closure.root()), level = "debug")]
    async fn put_closure(&self, closure: ValidatedClosure) -> Result<B3Digest, Error> {
        let root = closure.root();
        // Closures are only ever written whole, leaves first, so a stored root means a stored closure.
        match self.store.head(&self.path(&root)).await {
            Ok(_) => return Ok(root),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let levels = closure.levels();
        let max_level = levels.iter().copied().max().unwrap_or(0);
        let dirs = closure.into_directories();
        for level in 0..=max_level {
            let batch: Vec<(Path, PutPayload)> = dirs
                .iter()
                .zip(&levels)
                .filter(|(_, l)| **l == level)
                .map(|((d, dir), _)| (self.path(d), PutPayload::from(dir.encode())))
                .collect();
            futures::stream::iter(batch)
                .map(|(path, payload)| {
                    let store = self.store.clone();
                    async move { store.put(&path, payload).await.map(|_| ()) }
                })
                .buffer_unordered(WRITE_CONCURRENCY)
                .try_collect::<Vec<()>>()
                .await?;
        }
        Ok(root)
    }
}
