//! Directories in an embedded sled database (the daemon's default).
use super::{DirectoryService, ValidatedClosure};
use crate::{B3Digest, Directory, Error};
use async_trait::async_trait;
use std::path::Path;

/// A sled tree mapping digest → canonical encoding. A closure is written in
/// one atomic batch and flushed before `put_closure` returns.
#[derive(Clone)]
pub struct SledDirectoryService {
    db: sled::Db,
    flusher: SledFlusher,
}

/// Makes everything written to `tree` (and its database) durable.
///
/// Runs sled's synchronous `flush` on Tokio's blocking pool. sled's own
/// `flush_async` runs on sled's small I/O pool, and flushes waiting there
/// for buffers that only that pool's threads can write deadlock under
/// concurrent writers (seen with a 1000-path `arca copy`).
pub async fn flush_sled(tree: &sled::Tree) -> Result<(), Error> {
    let tree = tree.clone();
    tokio::task::spawn_blocking(move || tree.flush())
        .await
        .map_err(Error::storage)?
        .map_err(Error::storage)?;
    Ok(())
}

/// Group commit for one sled database: writers that ask for a flush while
/// one is running share the next one, instead of each paying an fsync.
#[derive(Clone)]
pub struct SledFlusher {
    tree: sled::Tree,
    state: std::sync::Arc<FlushState>,
}

#[derive(Default)]
struct FlushState {
    /// Generation of the last flush started / completed.
    started: std::sync::atomic::AtomicU64,
    completed: std::sync::atomic::AtomicU64,
    /// One flush at a time.
    running: tokio::sync::Mutex<()>,
}

impl SledFlusher {
    /// A flusher for `tree`'s database.
    pub fn new(tree: &sled::Tree) -> Self {
        Self {
            tree: tree.clone(),
            state: Default::default(),
        }
    }

    /// Returns once everything written before the call is durable.
    pub async fn flush(&self) -> Result<(), Error> {
        use std::sync::atomic::Ordering::SeqCst;
        // Any flush of this generation or later starts after our writes.
        let needed = self.state.started.load(SeqCst) + 1;
        let _running = self.state.running.lock().await;
        if self.state.completed.load(SeqCst) >= needed {
            return Ok(());
        }
        let generation = self.state.started.fetch_add(1, SeqCst) + 1;
        flush_sled(&self.tree).await?;
        self.state.completed.store(generation, SeqCst);
        Ok(())
    }
}

/// Opens (creating) the sled database at `path`, or a temporary one
/// (deleted when dropped) for `None`. Shared by every sled backend.
pub fn open_sled(path: Option<&Path>) -> Result<sled::Db, Error> {
    match path {
        Some(path) => sled::Config::new()
            .path(path)
            .open()
            .map_err(|e| Error::Storage(format!("opening sled database {}: {e}", path.display()))),
        None => sled::Config::new()
            .temporary(true)
            .open()
            .map_err(Error::storage),
    }
}

impl SledDirectoryService {
    /// Opens (creating) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, Error> {
        Ok(Self::from_db(open_sled(Some(path))?))
    }

    /// A temporary database, deleted when dropped.
    pub fn temporary() -> Result<Self, Error> {
        Ok(Self::from_db(open_sled(None)?))
    }

    fn from_db(db: sled::Db) -> Self {
        let flusher = SledFlusher::new(&db);
        Self { db, flusher }
    }
}

#[async_trait]
impl DirectoryService for SledDirectoryService {
    #[tracing::instrument(skip(self), level = "debug")]
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>, Error> {
        let Some(raw) = self.db.get(digest.as_bytes()).map_err(Error::storage)? else {
            return Ok(None);
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

    #[tracing::instrument(skip_all, fields(root = %closure.root()), level = "debug")]
    async fn put_closure(&self, closure: ValidatedClosure) -> Result<B3Digest, Error> {
        let root = closure.root();
        // Closures are only ever written whole, so a stored root means a stored closure.
        if self
            .db
            .contains_key(root.as_bytes())
            .map_err(Error::storage)?
        {
            return Ok(root);
        }
        let mut batch = sled::Batch::default();
        for (d, dir) in closure.directories() {
            batch.insert(d.as_bytes().as_slice(), dir.encode());
        }
        self.db.apply_batch(batch).map_err(Error::storage)?;
        self.flusher.flush().await?;
        Ok(root)
    }
}
