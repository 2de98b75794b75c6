//! Directory storage: the [DirectoryService] trait, closure validation, and backends.
//!
//! Directories form a Merkle DAG. Closures are written leaves first (a
//! directory only after every directory it refers to) and read root first,
//! breadth-first.
use crate::{B3Digest, Directory, Error};
use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};
use std::collections::{HashMap, HashSet};

mod cache;
mod grpc;
mod lru;
mod memory;
mod object_store;
mod sled;
mod validators;

pub use cache::CacheDirectoryService;
pub use grpc::GrpcDirectoryService;
pub use lru::LruDirectoryService;
pub use memory::MemoryDirectoryService;
pub use object_store::ObjectStoreDirectoryService;
pub use sled::{flush_sled, open_sled, SledDirectoryService, SledFlusher};
pub use validators::{ClosureValidator, RecursiveReceiveValidator, ValidatedClosure};

/// Concurrent fetches while walking a closure.
const TRAVERSAL_CONCURRENCY: usize = 16;

/// Stores and serves directories by digest.
#[async_trait]
pub trait DirectoryService: Send + Sync {
    /// One directory; `None` if absent. Backends verify the digest of what they return.
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>, Error>;

    /// Stores a validated closure atomically as far as the backend allows:
    /// never a directory before the directories it refers to. Returns the root digest.
    async fn put_closure(&self, closure: ValidatedClosure) -> Result<B3Digest, Error>;

    /// Stores one directory whose child directories are already stored
    /// (with matching sizes); dangling references are refused.
    async fn put(&self, directory: Directory) -> Result<B3Digest, Error> {
        for (name, digest, size) in directory.child_directories() {
            match self.get(&digest).await? {
                None => {
                    return Err(Error::InvalidRequest(format!(
                        "entry {name:?} refers to directory {digest}, which is not stored"
                    )))
                }
                Some(child) if child.size() != size => {
                    return Err(Error::InvalidRequest(format!(
                        "entry {name:?} claims size {size}, directory {digest} has size {}",
                        child.size()
                    )))
                }
                Some(_) => {}
            }
        }
        self.put_closure(ValidatedClosure::with_stored_children(directory))
            .await
    }

    /// The closure of `root`: root first, then breadth-first, each directory
    /// once. An unknown root yields a single `NotFound` error.
    fn get_recursive(&self, root: &B3Digest) -> BoxStream<'_, Result<Directory, Error>> {
        traverse(self, *root)
    }
}

/// Breadth-first walk over `get`, a level at a time with concurrent fetches,
/// checking each child's size against its parent's claim.
pub fn traverse<S: DirectoryService + ?Sized>(
    svc: &S,
    root: B3Digest,
) -> BoxStream<'_, Result<Directory, Error>> {
    async_stream::try_stream! {
        // digest -> size first claimed for it (None: the root, whose size nobody claims)
        let mut seen: HashMap<B3Digest, Option<u64>> = HashMap::from([(root, None)]);
        // (digest, size claimed by the parent; None for the root)
        let mut level: Vec<(B3Digest, Option<u64>)> = vec![(root, None)];
        while !level.is_empty() {
            let digests: Vec<B3Digest> = level.iter().map(|(d, _)| *d).collect();
            let fetched: Vec<Result<Option<Directory>, Error>> = futures::stream::iter(digests)
                .map(|d| async move { svc.get(&d).await })
                .buffered(TRAVERSAL_CONCURRENCY)
                .collect()
                .await;
            let mut next = Vec::new();
            for ((digest, claimed), dir) in level.iter().zip(fetched) {
                let dir = match dir? {
                    Some(d) => d,
                    None if claimed.is_none() => Err(Error::NotFound(format!("directory {digest}")))?,
                    None => Err(Error::Storage(format!("directory {digest} is referred to but missing")))?,
                };
                if let Some(size) = claimed {
                    if dir.size() != *size {
                        Err(Error::Storage(format!("directory {digest} has size {}, its parent claims {size}", dir.size())))?;
                    }
                }
                for (_, child, size) in dir.child_directories() {
                    match seen.get(&child) {
                        None => {
                            seen.insert(child, Some(size));
                            next.push((child, Some(size)));
                        }
                        Some(Some(claimed)) if *claimed != size => {
                            Err(Error::Storage(format!("directory {child} is claimed with sizes {claimed} and {size}")))?;
                        }
                        Some(_) => {}
                    }
                }
                // Backends whose `get` never waits (sled, memory) would
                // otherwise walk a whole closure without giving the worker
                // back: the other tasks on it (another client's call, the
                // connection's own) would wait for the walk.
                tokio::task::consume_budget().await;
                yield dir;
            }
            level = next;
        }
    }
    .boxed()
}

/// Orders a closure (given in any order, root digest known) leaves first by
/// a depth-first post-order walk. Fails if a referred directory is missing.
pub fn order_leaves_first(root: B3Digest, dirs: Vec<Directory>) -> Result<Vec<Directory>, Error> {
    let mut by_digest: HashMap<B3Digest, Directory> =
        dirs.into_iter().map(|d| (d.digest(), d)).collect();
    let mut out = Vec::with_capacity(by_digest.len());
    let mut done = HashSet::new();
    // Explicit stack: (digest, children pushed?)
    let mut stack = vec![(root, false)];
    while let Some((d, expanded)) = stack.pop() {
        if done.contains(&d) {
            continue;
        }
        if expanded {
            done.insert(d);
            out.push(
                by_digest
                    .remove(&d)
                    .ok_or_else(|| Error::Storage(format!("directory {d} missing from closure")))?,
            );
            continue;
        }
        let dir = by_digest
            .get(&d)
            .ok_or_else(|| Error::Storage(format!("directory {d} missing from closure")))?;
        stack.push((d, true));
        for (_, child, _) in dir.child_directories() {
            if !done.contains(&child) {
                stack.push((child, false));
            }
        }
    }
    Ok(out)
}

/// Collects a whole closure with [DirectoryService::get_recursive].
pub async fn get_closure(
    svc: &dyn DirectoryService,
    root: &B3Digest,
) -> Result<Vec<Directory>, Error> {
    let mut s = svc.get_recursive(root);
    let mut out = Vec::new();
    while let Some(d) = s.next().await {
        out.push(d?);
    }
    Ok(out)
}

/// Validates directories given leaves first and stores them as one closure.
pub async fn put_all(
    svc: &dyn DirectoryService,
    dirs: impl IntoIterator<Item = Directory>,
) -> Result<B3Digest, Error> {
    let mut v = ClosureValidator::new();
    for d in dirs {
        v.add(d)?;
    }
    svc.put_closure(v.finalize()?).await
}
