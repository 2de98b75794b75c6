//! Path-info storage: the [PathInfoService] trait and its backends.
//!
//! Path infos are keyed by the 20-byte digest of their store path. Backends
//! only store and return validated [PathInfo]s: whatever they read back
//! (from disk, an object store, a remote server) is decoded and validated
//! again. [NixHttpPathInfoService] reads through from a Nix binary cache,
//! ingesting NARs into castore. Layers ([LruPathInfoService], [CachePathInfoService],
//! [SigningPathInfoService], [CheckedPathInfoService]) compose them, and
//! [pathinfo_service_from_url] builds a stack from a URL.
use crate::pathinfo::PathInfo;
use crate::store_path::DIGEST_LEN;
use arca_castore::Error;
use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};

mod cache;
mod checked;
mod composition;
mod grpc;
mod lru;
mod memory;
mod nix_http;
mod object_store;
mod signing;
mod sled;

pub use self::cache::CachePathInfoService;
pub use self::checked::CheckedPathInfoService;
pub use self::composition::{
    binary_cache_from_url, pathinfo_service_from_composition, pathinfo_service_from_config,
    pathinfo_service_from_url, StoreServices,
};
pub use self::grpc::GrpcPathInfoService;
pub use self::lru::LruPathInfoService;
pub use self::memory::MemoryPathInfoService;
pub use self::nix_http::{NixHttpPathInfoService, MAX_NARINFO_DOWNLOAD};
pub use self::object_store::ObjectStorePathInfoService;
pub use self::signing::SigningPathInfoService;
pub use self::sled::SledPathInfoService;

/// Concurrent gets in the default [PathInfoService::get_many].
const GET_MANY_CONCURRENCY: usize = 16;

/// Stores and serves path infos by store path digest.
#[async_trait]
pub trait PathInfoService: Send + Sync {
    /// The path info of the store path with this digest; `None` if absent.
    async fn get(&self, digest: [u8; DIGEST_LEN]) -> Result<Option<PathInfo>, Error>;

    /// Several path infos, in the order asked (by default, concurrent gets).
    async fn get_many(&self, digests: &[[u8; DIGEST_LEN]]) -> Result<Vec<Option<PathInfo>>, Error> {
        futures::stream::iter(digests.iter().copied())
            .map(|d| self.get(d))
            .buffered(GET_MANY_CONCURRENCY)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect()
    }

    /// Stores a path info (replacing one stored under the same digest) and
    /// returns it as stored (layers may have added signatures).
    async fn put(&self, info: PathInfo) -> Result<PathInfo, Error>;

    /// Every stored path info, in no particular order.
    fn list(&self) -> BoxStream<'_, Result<PathInfo, Error>>;
}

/// Decodes and validates a stored or received encoding of a path info, and
/// checks it is stored under the right digest. Failures are
/// [Error::Storage]: the backend holds (or sent) something invalid.
pub(crate) fn decode_stored(
    raw: &[u8],
    expected: Option<&[u8; DIGEST_LEN]>,
    what: &str,
) -> Result<PathInfo, Error> {
    use prost::Message;
    let p = arca_proto::store::PathInfo::decode(raw)
        .map_err(|e| Error::Storage(format!("{what} is corrupt: {e}")))?;
    let info =
        PathInfo::try_from(p).map_err(|e| Error::Storage(format!("{what} is invalid: {e}")))?;
    if let Some(d) = expected {
        if info.digest() != d {
            return Err(Error::Storage(format!(
                "{what} holds {}, expected digest {}",
                info.store_path,
                crate::nixbase32::encode(d)
            )));
        }
    }
    Ok(info)
}

/// The canonical encoding of a path info (for backends storing bytes).
pub(crate) fn encode(info: &PathInfo) -> Result<Vec<u8>, Error> {
    use prost::Message;
    Ok(info.to_proto()?.encode_to_vec())
}
