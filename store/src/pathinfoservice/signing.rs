//! A layer that signs every path info it stores with a Nix secret key.
use super::PathInfoService;
use crate::pathinfo::PathInfo;
use crate::signature::SecretKey;
use crate::store_path::DIGEST_LEN;
use arca_castore::Error;
use async_trait::async_trait;
use futures::stream::BoxStream;
use std::sync::Arc;

/// On `put`, adds a signature made with `key` over the narinfo fingerprint
/// (keeping the signatures already there; re-signing adds nothing), then
/// stores in `inner`. Reads go to `inner` unchanged.
pub struct SigningPathInfoService {
    inner: Arc<dyn PathInfoService>,
    key: SecretKey,
}

impl SigningPathInfoService {
    /// Signs with `key` what is put into `inner`.
    pub fn new(inner: Arc<dyn PathInfoService>, key: SecretKey) -> Self {
        Self { inner, key }
    }
}

#[async_trait]
impl PathInfoService for SigningPathInfoService {
    async fn get(&self, digest: [u8; DIGEST_LEN]) -> Result<Option<PathInfo>, Error> {
        self.inner.get(digest).await
    }

    async fn get_many(&self, digests: &[[u8; DIGEST_LEN]]) -> Result<Vec<Option<PathInfo>>, Error> {
        self.inner.get_many(digests).await
    }

    #[tracing::instrument(skip_all, fields(path = %info.store_path, key = self.key.name()), level = "debug")]
    async fn put(&self, mut info: PathInfo) -> Result<PathInfo, Error> {
        info.sign(&self.key);
        self.inner.put(info).await
    }

    fn list(&self) -> BoxStream<'_, Result<PathInfo, Error>> {
        self.inner.list()
    }
}
