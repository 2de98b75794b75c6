//! Referential integrity on `put`: the layer the daemon puts in front of its
//! path-info service (and that `arca` commands writing locally use).
//!
//! It is a separate layer rather than part of every backend so that stacks
//! check once, at their top: a `cache://` or `lru://` below it, or a gRPC
//! client whose server checks again, need not repeat the work.
//! [pathinfo_service_from_url](super::pathinfo_service_from_url) builds
//! unchecked stacks; wrap the result in [CheckedPathInfoService] where path
//! infos enter the store.
use super::PathInfoService;
use crate::pathinfo::PathInfo;
use crate::store_path::DIGEST_LEN;
use arca_castore::{B3Digest, BlobService, DirectoryService, Error, Node};
use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use std::collections::BTreeSet;
use std::sync::Arc;

/// Concurrent blob checks.
const HAS_CONCURRENCY: usize = 16;

/// Stores a path info only when the whole castore closure of its root node
/// is present (directories via `get_recursive`, blobs via `has`), and — on
/// by default — every reference other than the path itself is already a
/// stored path info. Refusals are [Error::InvalidRequest] naming the
/// missing digest or path. Reads go to `inner` unchanged.
pub struct CheckedPathInfoService {
    inner: Arc<dyn PathInfoService>,
    blobs: Arc<dyn BlobService>,
    directories: Arc<dyn DirectoryService>,
    require_references: bool,
}

impl CheckedPathInfoService {
    /// Checks puts into `inner` against the given castore services.
    pub fn new(
        inner: Arc<dyn PathInfoService>,
        blobs: Arc<dyn BlobService>,
        directories: Arc<dyn DirectoryService>,
    ) -> Self {
        Self {
            inner,
            blobs,
            directories,
            require_references: true,
        }
    }

    /// Whether references must already be stored (default `true`; turn off
    /// to accept paths before their references, e.g. when copying a closure
    /// in arbitrary order).
    pub fn require_references(mut self, on: bool) -> Self {
        self.require_references = on;
        self
    }

    /// Checks that the castore closure of `node` is complete.
    #[tracing::instrument(skip_all, level = "debug")]
    pub async fn check_closure(&self, node: &Node) -> Result<(), Error> {
        let mut blobs: BTreeSet<B3Digest> = BTreeSet::new();
        match node {
            Node::Symlink { .. } => {}
            Node::File { digest, .. } => {
                blobs.insert(*digest);
            }
            Node::Directory { digest, size } => {
                let mut stream = self.directories.get_recursive(digest);
                let mut first = true;
                while let Some(dir) = stream.next().await {
                    let dir = dir.map_err(|e| match e {
                        Error::NotFound(_) => Error::InvalidRequest(format!(
                            "root directory {digest} is not in the directory service"
                        )),
                        e => e,
                    })?;
                    if first && dir.size() != *size {
                        return Err(Error::InvalidRequest(format!(
                            "root node claims size {size}, directory {digest} has size {}",
                            dir.size()
                        )));
                    }
                    first = false;
                    for (_, n) in dir.entries() {
                        if let Node::File { digest, .. } = n {
                            blobs.insert(*digest);
                        }
                    }
                }
            }
        }
        futures::stream::iter(blobs)
            .map(|d| async move {
                match self.blobs.has(&d).await? {
                    true => Ok(()),
                    false => Err(Error::InvalidRequest(format!(
                        "blob {d} is not in the blob service"
                    ))),
                }
            })
            .buffer_unordered(HAS_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Checks that every reference other than `info` itself is stored.
    pub async fn check_references(&self, info: &PathInfo) -> Result<(), Error> {
        let others: Vec<_> = info
            .references
            .iter()
            .filter(|r| r.digest() != info.digest())
            .collect();
        let digests: Vec<[u8; DIGEST_LEN]> = others.iter().map(|r| *r.digest()).collect();
        let found = self.inner.get_many(&digests).await?;
        if let Some((r, _)) = others.iter().zip(&found).find(|(_, f)| f.is_none()) {
            return Err(Error::InvalidRequest(format!(
                "{} refers to {}, which is not stored (digest {})",
                info.store_path,
                r,
                r.hash_part()
            )));
        }
        Ok(())
    }
}

#[async_trait]
impl PathInfoService for CheckedPathInfoService {
    async fn get(&self, digest: [u8; DIGEST_LEN]) -> Result<Option<PathInfo>, Error> {
        self.inner.get(digest).await
    }

    async fn get_many(&self, digests: &[[u8; DIGEST_LEN]]) -> Result<Vec<Option<PathInfo>>, Error> {
        self.inner.get_many(digests).await
    }

    #[tracing::instrument(skip_all, fields(path = %info.store_path), level = "debug")]
    async fn put(&self, info: PathInfo) -> Result<PathInfo, Error> {
        if self.require_references {
            self.check_references(&info).await?;
        }
        self.check_closure(&info.node).await?;
        self.inner.put(info).await
    }

    fn list(&self) -> BoxStream<'_, Result<PathInfo, Error>> {
        self.inner.list()
    }
}
