//! Two-level directory cache: read `near`, else `far` (filling `near` with
//! the whole closure, so `near` always holds complete closures).
use super::{
    get_closure, order_leaves_first, ClosureValidator, DirectoryService, ValidatedClosure,
};
use crate::{B3Digest, Directory, Error};
use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};
use std::sync::Arc;

/// Reads from `near`, falling back to `far`; writes go to `far`.
#[derive(Clone)]
pub struct CacheDirectoryService {
    near: Arc<dyn DirectoryService>,
    far: Arc<dyn DirectoryService>,
}

impl CacheDirectoryService {
    /// A cache of `far` kept in `near`.
    pub fn new(near: Arc<dyn DirectoryService>, far: Arc<dyn DirectoryService>) -> Self {
        Self { near, far }
    }

    /// Copies the closure of `root` from far into near; `None` if far lacks it.
    async fn fill(&self, root: &B3Digest) -> Result<Option<Vec<Directory>>, Error> {
        let closure = match get_closure(self.far.as_ref(), root).await {
            Ok(c) => c,
            Err(Error::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut v = ClosureValidator::new();
        for d in order_leaves_first(*root, closure.clone())? {
            v.add(d)?;
        }
        self.near.put_closure(v.finalize()?).await?;
        tracing::debug!(%root, dirs = closure.len(), "filled near cache");
        Ok(Some(closure))
    }
}

#[async_trait]
impl DirectoryService for CacheDirectoryService {
    #[tracing::instrument(skip(self), level = "debug")]
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>, Error> {
        if let Some(d) = self.near.get(digest).await? {
            return Ok(Some(d));
        }
        Ok(self.fill(digest).await?.and_then(|c| c.into_iter().next()))
    }

    async fn put_closure(&self, closure: ValidatedClosure) -> Result<B3Digest, Error> {
        self.far.put_closure(closure).await
    }

    /// Straight to `far`, which checks the children against what it stores
    /// (a gRPC `far` cannot take a closure whose children are not sent).
    async fn put(&self, directory: Directory) -> Result<B3Digest, Error> {
        self.far.put(directory).await
    }

    fn get_recursive(&self, root: &B3Digest) -> BoxStream<'_, Result<Directory, Error>> {
        let root = *root;
        async_stream::try_stream! {
            // near may hold only part of a closure (an evicting lru://): then use far.
            let from_near = if self.near.get(&root).await?.is_some() {
                get_closure(self.near.as_ref(), &root).await.ok()
            } else {
                None
            };
            if let Some(closure) = from_near {
                for d in closure {
                    yield d;
                }
            } else {
                let closure = self.fill(&root).await?.ok_or_else(|| Error::NotFound(format!("directory {root}")))?;
                for d in closure {
                    yield d;
                }
            }
        }
        .boxed()
    }
}
