//! Path infos in an embedded sled database (the daemon's default).
use super::{decode_stored, encode, PathInfoService};
use crate::pathinfo::PathInfo;
use crate::store_path::DIGEST_LEN;
use arca_castore::Error;
use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};
use std::path::Path;

/// A sled tree mapping the 20-byte digest → the protobuf encoding. Every
/// read is decoded and validated again; writes are flushed before `put` returns.
#[derive(Clone)]
pub struct SledPathInfoService {
    db: sled::Db,
    flusher: arca_castore::directoryservice::SledFlusher,
}

impl SledPathInfoService {
    /// Opens (creating) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, Error> {
        Ok(Self::from_db(arca_castore::directoryservice::open_sled(
            Some(path),
        )?))
    }

    /// A temporary database, deleted when dropped.
    pub fn temporary() -> Result<Self, Error> {
        Ok(Self::from_db(arca_castore::directoryservice::open_sled(
            None,
        )?))
    }

    fn from_db(db: sled::Db) -> Self {
        let flusher = arca_castore::directoryservice::SledFlusher::new(&db);
        Self { db, flusher }
    }
}

#[async_trait]
impl PathInfoService for SledPathInfoService {
    #[tracing::instrument(skip(self), fields(digest = %crate::nixbase32::encode(&digest)), level = "debug")]
    async fn get(&self, digest: [u8; DIGEST_LEN]) -> Result<Option<PathInfo>, Error> {
        let Some(raw) = self.db.get(digest).map_err(Error::storage)? else {
            return Ok(None);
        };
        let what = format!("stored path info {}", crate::nixbase32::encode(&digest));
        Ok(Some(decode_stored(&raw, Some(&digest), &what)?))
    }

    #[tracing::instrument(skip_all, fields(path = %info.store_path), level = "debug")]
    async fn put(&self, info: PathInfo) -> Result<PathInfo, Error> {
        self.db
            .insert(info.digest(), encode(&info)?)
            .map_err(Error::storage)?;
        self.flusher.flush().await?;
        Ok(info)
    }

    fn list(&self) -> BoxStream<'_, Result<PathInfo, Error>> {
        futures::stream::iter(self.db.iter().map(|kv| {
            let (k, v) = kv.map_err(Error::storage)?;
            let key: [u8; DIGEST_LEN] = k
                .as_ref()
                .try_into()
                .map_err(|_| Error::Storage(format!("sled key of {} bytes", k.len())))?;
            decode_stored(
                &v,
                Some(&key),
                &format!("stored path info {}", crate::nixbase32::encode(&key)),
            )
        }))
        .boxed()
    }
}
