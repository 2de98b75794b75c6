//! In-memory path-info service.
use super::PathInfoService;
use crate::pathinfo::PathInfo;
use crate::store_path::DIGEST_LEN;
use arca_castore::Error;
use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;

/// Keeps path infos in a hash map (process-local).
#[derive(Clone, Default)]
pub struct MemoryPathInfoService {
    infos: Arc<RwLock<HashMap<[u8; DIGEST_LEN], PathInfo>>>,
}

#[async_trait]
impl PathInfoService for MemoryPathInfoService {
    #[tracing::instrument(skip(self), fields(digest = %crate::nixbase32::encode(&digest)), level = "trace")]
    async fn get(&self, digest: [u8; DIGEST_LEN]) -> Result<Option<PathInfo>, Error> {
        Ok(self.infos.read().get(&digest).cloned())
    }

    #[tracing::instrument(skip_all, fields(path = %info.store_path), level = "trace")]
    async fn put(&self, info: PathInfo) -> Result<PathInfo, Error> {
        self.infos.write().insert(*info.digest(), info.clone());
        Ok(info)
    }

    fn list(&self) -> BoxStream<'_, Result<PathInfo, Error>> {
        let all: Vec<PathInfo> = self.infos.read().values().cloned().collect();
        futures::stream::iter(all.into_iter().map(Ok)).boxed()
    }
}
