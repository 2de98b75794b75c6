//! In-memory directory service.
use super::{DirectoryService, ValidatedClosure};
use crate::{B3Digest, Directory, Error};
use async_trait::async_trait;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;

/// Keeps directories in a hash map (process-local).
#[derive(Clone, Default)]
pub struct MemoryDirectoryService {
    dirs: Arc<RwLock<HashMap<B3Digest, Directory>>>,
}

#[async_trait]
impl DirectoryService for MemoryDirectoryService {
    #[tracing::instrument(skip(self), level = "trace")]
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>, Error> {
        Ok(self.dirs.read().get(digest).cloned())
    }

    #[tracing::instrument(skip_all, fields(root = %closure.root()), level = "trace")]
    async fn put_closure(&self, closure: ValidatedClosure) -> Result<B3Digest, Error> {
        let root = closure.root();
        let mut map = self.dirs.write();
        for (d, dir) in closure.into_directories() {
            map.insert(d, dir);
        }
        Ok(root)
    }
}
