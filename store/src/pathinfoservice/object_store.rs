//! Path infos on any `object_store` backend, one object per path info
//! (`pathinfos/<nixbase32 hash part>`), holding its protobuf encoding.
use super::{decode_stored, encode, PathInfoService};
use crate::pathinfo::PathInfo;
use crate::store_path::DIGEST_LEN;
use arca_castore::Error;
use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};
use object_store::{path::Path, ObjectStore, ObjectStoreExt, PutPayload};
use std::sync::Arc;

const LIST_CONCURRENCY: usize = 16;

/// Path-info service on an object store.
#[derive(Clone)]
pub struct ObjectStorePathInfoService {
    store: Arc<dyn ObjectStore>,
    base: Path,
}

impl ObjectStorePathInfoService {
    /// A service storing under `base` in `store`.
    pub fn new(store: Arc<dyn ObjectStore>, base: Path) -> Self {
        Self { store, base }
    }

    fn dir(&self) -> Path {
        self.base.clone().join("pathinfos")
    }

    fn path(&self, d: &[u8; DIGEST_LEN]) -> Path {
        self.dir().join(crate::nixbase32::encode(d))
    }

    async fn read(
        &self,
        path: &Path,
        expected: Option<&[u8; DIGEST_LEN]>,
    ) -> Result<Option<PathInfo>, Error> {
        let raw = match self.store.get(path).await {
            Ok(r) => r.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(Some(decode_stored(
            &raw,
            expected,
            &format!("stored path info {path}"),
        )?))
    }
}

#[async_trait]
impl PathInfoService for ObjectStorePathInfoService {
    #[tracing::instrument(skip(self), fields(digest = %crate::nixbase32::encode(&digest)), level = "debug")]
    async fn get(&self, digest: [u8; DIGEST_LEN]) -> Result<Option<PathInfo>, Error> {
        self.read(&self.path(&digest), Some(&digest)).await
    }

    #[tracing::instrument(skip_all, fields(path = %info.store_path), level = "debug")]
    async fn put(&self, info: PathInfo) -> Result<PathInfo, Error> {
        self.store
            .put(&self.path(info.digest()), PutPayload::from(encode(&info)?))
            .await?;
        Ok(info)
    }

    fn list(&self) -> BoxStream<'_, Result<PathInfo, Error>> {
        let dir = self.dir();
        async_stream::try_stream! {
            let mut listing = self.store.list(Some(&dir))
                .map(|meta| async move {
                    let meta = meta?;
                    let name = meta.location.filename().unwrap_or_default().to_string();
                    let digest = crate::nixbase32::decode_fixed::<DIGEST_LEN>(&name)
                        .map_err(|e| Error::Storage(format!("unexpected object {}: {e}", meta.location)))?;
                    self.read(&meta.location, Some(&digest)).await
                })
                .buffered(LIST_CONCURRENCY);
            while let Some(info) = listing.next().await {
                // Deleted between listing and reading: skip it.
                if let Some(info) = info? {
                    yield info;
                }
            }
        }
        .boxed()
    }
}
