//! The NAR index: what Arca remembers about NARs and binary-cache answers.
//!
//! A [NarIndex] is one small sled database kept with the store (the CLI and
//! daemon open it at `$ARCA_DATA_DIR/narindex.sled`). It has two trees:
//!
//! - **NARs**: NarHash (SHA-256 of the uncompressed NAR) → the root castore
//!   [Node] the NAR was ingested as, and its NarSize. A NAR is content
//!   addressed by its NarHash, so once it was ingested and checked it never
//!   needs to be downloaded again, whatever narinfo (or cache) points to it.
//!   Entries are written only after the NAR was verified, and flushed before
//!   [NarIndex::put_nar] returns.
//! - **narinfos**: (binary cache, store-path digest) → when it was fetched and
//!   what the cache answered: the narinfo text, or "absent". Answers are
//!   fresh for a positive / negative TTL ([NarinfoTtl], by default 30 days and
//!   1 hour, as in Nix). This tree is a cache: losing it costs requests only,
//!   and an unreadable entry counts as missing.
//!
//! Values carry a format version byte, so later formats can be told apart.
use crate::store_path::DIGEST_LEN;
use arca_castore::{Error, Node};
use prost::Message;
use sha2::{Digest, Sha256};
use parking_lot::Mutex;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Format version of NAR entries.
const NAR_ENTRY_V1: u8 = 1;
/// Format version of narinfo entries.
const NARINFO_ENTRY_V1: u8 = 1;
/// Length of the cache identifier prefixed to narinfo keys.
const CACHE_ID_LEN: usize = 16;

/// How long binary-cache answers stay fresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NarinfoTtl {
    /// For a narinfo the cache had (Nix's `narinfo-cache-positive-ttl`).
    pub positive: Duration,
    /// For a narinfo the cache did not have (Nix's `narinfo-cache-negative-ttl`).
    pub negative: Duration,
}

impl NarinfoTtl {
    /// Nix's defaults: 30 days for hits, 1 hour for misses.
    pub const NIX_DEFAULT: NarinfoTtl =
        NarinfoTtl { positive: Duration::from_secs(30 * 24 * 3600), negative: Duration::from_secs(3600) };
    /// Nothing is ever fresh: every lookup asks the cache again.
    pub const NONE: NarinfoTtl = NarinfoTtl { positive: Duration::ZERO, negative: Duration::ZERO };
}

impl Default for NarinfoTtl {
    fn default() -> Self {
        Self::NIX_DEFAULT
    }
}

/// What the narinfo cache knows about a store path in one binary cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CachedNarInfo {
    /// The cache had this narinfo (text as fetched), within the positive TTL.
    Present(String),
    /// The cache did not have it, within the negative TTL.
    Absent,
    /// Nothing fresh is known: never asked, or the answer is too old.
    Missing,
}

/// The persistent NarHash → castore node index and narinfo cache (see the
/// [module docs](self)). Cheap to share behind an `Arc`.
pub struct NarIndex {
    // Kept so the database lives as long as its trees.
    _db: sled::Db,
    nars: sled::Tree,
    narinfos: sled::Tree,
    positive_ttl_secs: AtomicU64,
    negative_ttl_secs: AtomicU64,
}

impl std::fmt::Debug for NarIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NarIndex").field("ttl", &self.ttl()).finish_non_exhaustive()
    }
}

/// The 16-byte identifier of a binary cache in narinfo keys.
fn cache_id(cache: &str) -> [u8; CACHE_ID_LEN] {
    let d = Sha256::digest(cache.as_bytes());
    let mut id = [0u8; CACHE_ID_LEN];
    id.copy_from_slice(&d[..CACHE_ID_LEN]);
    id
}

fn narinfo_key(cache: &str, digest: &[u8; DIGEST_LEN]) -> Vec<u8> {
    let mut k = Vec::with_capacity(CACHE_ID_LEN + DIGEST_LEN);
    k.extend_from_slice(&cache_id(cache));
    k.extend_from_slice(digest);
    k
}

impl NarIndex {
    /// Opens (creating) the index at `path`, with Nix's default TTLs.
    pub fn open(path: &Path) -> Result<Self, Error> {
        Self::from_db(arca_castore::directoryservice::open_sled(Some(path))?)
    }

    /// A temporary index (deleted when dropped), with Nix's default TTLs.
    pub fn temporary() -> Result<Self, Error> {
        Self::from_db(arca_castore::directoryservice::open_sled(None)?)
    }

    fn from_db(db: sled::Db) -> Result<Self, Error> {
        let nars = db.open_tree("nars").map_err(|e| Error::Storage(format!("opening the NAR index: {e}")))?;
        let narinfos =
            db.open_tree("narinfos").map_err(|e| Error::Storage(format!("opening the narinfo cache: {e}")))?;
        let ttl = NarinfoTtl::default();
        Ok(Self {
            _db: db,
            nars,
            narinfos,
            positive_ttl_secs: AtomicU64::new(ttl.positive.as_secs()),
            negative_ttl_secs: AtomicU64::new(ttl.negative.as_secs()),
        })
    }

    /// Sets the narinfo TTLs (builder style).
    pub fn with_ttl(self, ttl: NarinfoTtl) -> Self {
        self.set_ttl(ttl);
        self
    }

    /// Sets the narinfo TTLs (whole seconds; they apply to entries already
    /// stored too, since freshness is decided when reading).
    pub fn set_ttl(&self, ttl: NarinfoTtl) {
        self.positive_ttl_secs.store(ttl.positive.as_secs(), Ordering::Relaxed);
        self.negative_ttl_secs.store(ttl.negative.as_secs(), Ordering::Relaxed);
    }

    /// The narinfo TTLs in force.
    pub fn ttl(&self) -> NarinfoTtl {
        NarinfoTtl {
            positive: Duration::from_secs(self.positive_ttl_secs.load(Ordering::Relaxed)),
            negative: Duration::from_secs(self.negative_ttl_secs.load(Ordering::Relaxed)),
        }
    }

    /// The root node and NarSize of the NAR with this SHA-256, if one was
    /// ingested and verified. (Whether castore still holds the node is the
    /// caller's to check.) A stored entry that does not decode is an
    /// [Error::Storage].
    pub fn get_nar(&self, nar_sha256: &[u8; 32]) -> Result<Option<(Node, u64)>, Error> {
        let Some(raw) = self.nars.get(nar_sha256).map_err(Error::storage)? else { return Ok(None) };
        let corrupt = |why: &str| {
            Error::Storage(format!(
                "NAR index entry sha256:{} is corrupt: {why}",
                crate::nixbase32::encode(nar_sha256)
            ))
        };
        let (&version, rest) = raw.split_first().ok_or_else(|| corrupt("empty"))?;
        if version != NAR_ENTRY_V1 {
            return Err(corrupt(&format!("unknown format version {version}")));
        }
        let (size, node) = rest.split_at_checked(8).ok_or_else(|| corrupt("too short"))?;
        let nar_size = u64::from_be_bytes(size.try_into().map_err(|_| corrupt("too short"))?);
        let proto = arca_proto::castore::Node::decode(node).map_err(|e| corrupt(&e.to_string()))?;
        let (name, node) = Node::try_from_proto(proto).map_err(|e| corrupt(&e.to_string()))?;
        if !name.is_empty() {
            return Err(corrupt("the node has a name"));
        }
        Ok(Some((node, nar_size)))
    }

    /// Records that the NAR with this SHA-256 and size was ingested as
    /// `node` (call only once the NAR was verified against both). Durable
    /// when it returns.
    pub async fn put_nar(&self, nar_sha256: &[u8; 32], node: &Node, nar_size: u64) -> Result<(), Error> {
        let encoded = node.clone().into_proto(bytes::Bytes::new()).encode_to_vec();
        let mut value = Vec::with_capacity(1 + 8 + encoded.len());
        value.push(NAR_ENTRY_V1);
        value.extend_from_slice(&nar_size.to_be_bytes());
        value.extend_from_slice(&encoded);
        self.nars.insert(nar_sha256, value).map_err(Error::storage)?;
        self.nars.flush_async().await.map_err(Error::storage)?;
        Ok(())
    }

    /// Forgets a NAR (e.g. when its node turned out to be gone from castore).
    pub fn remove_nar(&self, nar_sha256: &[u8; 32]) -> Result<(), Error> {
        self.nars.remove(nar_sha256).map_err(Error::storage)?;
        Ok(())
    }

    /// Number of NARs indexed.
    pub fn nar_count(&self) -> usize {
        self.nars.len()
    }

    /// What binary cache `cache` (any stable identifier, e.g. its URL)
    /// answered for the store path `digest`, if that answer is still fresh at
    /// `now` (Unix seconds). Answers from the future (a clock set back) are
    /// not fresh; an unreadable entry is [CachedNarInfo::Missing].
    pub fn get_narinfo(&self, cache: &str, digest: &[u8; DIGEST_LEN], now: u64) -> Result<CachedNarInfo, Error> {
        let Some(raw) = self.narinfos.get(narinfo_key(cache, digest)).map_err(Error::storage)? else {
            return Ok(CachedNarInfo::Missing);
        };
        let Some((fetched_at, entry)) = decode_narinfo_entry(&raw) else {
            tracing::warn!(cache, path = %crate::nixbase32::encode(digest), "ignoring an unreadable narinfo cache entry");
            return Ok(CachedNarInfo::Missing);
        };
        let ttl = self.ttl();
        let ttl = if entry.is_some() { ttl.positive } else { ttl.negative };
        let fresh = fetched_at <= now && now - fetched_at < ttl.as_secs();
        Ok(match (fresh, entry) {
            (false, _) => CachedNarInfo::Missing,
            (true, Some(text)) => CachedNarInfo::Present(text),
            (true, None) => CachedNarInfo::Absent,
        })
    }

    /// Records what binary cache `cache` answered for the store path `digest`
    /// at `fetched_at` (Unix seconds): the narinfo text, or `None` for
    /// "absent". Not flushed: the narinfo cache may lose recent entries in
    /// a crash.
    pub fn put_narinfo(
        &self,
        cache: &str,
        digest: &[u8; DIGEST_LEN],
        fetched_at: u64,
        narinfo: Option<&str>,
    ) -> Result<(), Error> {
        let text = narinfo.unwrap_or("");
        let mut value = Vec::with_capacity(10 + text.len());
        value.push(NARINFO_ENTRY_V1);
        value.extend_from_slice(&fetched_at.to_be_bytes());
        value.push(u8::from(narinfo.is_some()));
        value.extend_from_slice(text.as_bytes());
        self.narinfos.insert(narinfo_key(cache, digest), value).map_err(Error::storage)?;
        Ok(())
    }

    /// Forgets every cached narinfo answer (of every cache); NARs stay.
    pub fn clear_narinfos(&self) -> Result<(), Error> {
        self.narinfos.clear().map_err(Error::storage)
    }
}

/// A [NarIndex] opened on first use: service builders get one of these, so
/// the database is only opened (and locked: sled allows one process at a
/// time) when a stack actually holds a binary-cache service. Clones share
/// the opened index.
#[derive(Clone)]
pub struct LazyNarIndex {
    /// Where to open it; `None` for a temporary index.
    path: Option<PathBuf>,
    opened: Arc<Mutex<Option<Arc<NarIndex>>>>,
}

impl std::fmt::Debug for LazyNarIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyNarIndex").field("path", &self.path).finish_non_exhaustive()
    }
}

impl LazyNarIndex {
    /// The index at `path`, opened (created) on first use.
    pub fn at(path: impl Into<PathBuf>) -> Self {
        Self { path: Some(path.into()), opened: Default::default() }
    }

    /// A temporary index, created on first use.
    pub fn temporary() -> Self {
        Self { path: None, opened: Default::default() }
    }

    /// Where the index lives (`None`: temporary).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The index, opening it if this is the first use.
    pub fn get(&self) -> Result<Arc<NarIndex>, Error> {
        let mut opened = self.opened.lock();
        if let Some(index) = &*opened {
            return Ok(index.clone());
        }
        let index = Arc::new(match &self.path {
            Some(p) => NarIndex::open(p)?,
            None => NarIndex::temporary()?,
        });
        *opened = Some(index.clone());
        Ok(index)
    }
}

impl From<Arc<NarIndex>> for LazyNarIndex {
    /// An index that is already open.
    fn from(index: Arc<NarIndex>) -> Self {
        Self { path: None, opened: Arc::new(Mutex::new(Some(index))) }
    }
}

/// `(fetched_at, Some(text) | None for absent)`, or `None` if unreadable.
fn decode_narinfo_entry(raw: &[u8]) -> Option<(u64, Option<String>)> {
    let (&version, rest) = raw.split_first()?;
    if version != NARINFO_ENTRY_V1 {
        return None;
    }
    let (at, rest) = rest.split_at_checked(8)?;
    let fetched_at = u64::from_be_bytes(at.try_into().ok()?);
    let (&present, text) = rest.split_first()?;
    match present {
        0 if text.is_empty() => Some((fetched_at, None)),
        1 => Some((fetched_at, Some(String::from_utf8(text.to_vec()).ok()?))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arca_castore::{B3Digest, SymlinkTarget};

    const D: [u8; DIGEST_LEN] = [3; DIGEST_LEN];
    const CACHE: &str = "http://127.0.0.1:1/cache";

    fn nodes() -> Vec<Node> {
        vec![
            Node::Directory { digest: B3Digest::of(b"dir"), size: 7 },
            Node::File { digest: B3Digest::of(b"file"), size: 4, executable: true },
            Node::File { digest: B3Digest::of(b""), size: 0, executable: false },
            Node::Symlink { target: SymlinkTarget::try_from(bytes::Bytes::from_static(b"../x")).unwrap() },
        ]
    }

    #[tokio::test]
    async fn nars_round_trip_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("narindex.sled");
        {
            let idx = NarIndex::open(&path).unwrap();
            for (i, n) in nodes().into_iter().enumerate() {
                let h = [i as u8; 32];
                assert_eq!(idx.get_nar(&h).unwrap(), None);
                idx.put_nar(&h, &n, 100 + i as u64).await.unwrap();
                assert_eq!(idx.get_nar(&h).unwrap(), Some((n, 100 + i as u64)));
            }
            assert_eq!(idx.nar_count(), 4);
        }
        // sled releases its lock from a background thread after the drop: retry briefly.
        let mut tries = 0;
        let idx = loop {
            match NarIndex::open(&path) {
                Ok(idx) => break idx,
                Err(e) if tries < 50 => {
                    tries += 1;
                    eprintln!("reopening: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("reopening: {e}"),
            }
        };
        for (i, n) in nodes().into_iter().enumerate() {
            assert_eq!(idx.get_nar(&[i as u8; 32]).unwrap(), Some((n, 100 + i as u64)));
        }
        idx.remove_nar(&[0; 32]).unwrap();
        assert_eq!(idx.get_nar(&[0; 32]).unwrap(), None);
    }

    #[test]
    fn corrupt_nar_entries_are_storage_errors() {
        let idx = NarIndex::temporary().unwrap();
        for bad in [&b""[..], &[9, 0, 0][..], &[1, 0, 0, 0][..], &[1, 0, 0, 0, 0, 0, 0, 0, 5, 0xff][..]] {
            idx.nars.insert([7u8; 32], bad).unwrap();
            let e = idx.get_nar(&[7; 32]).unwrap_err();
            assert!(matches!(&e, Error::Storage(m) if m.contains("corrupt")), "{bad:?}: {e}");
        }
    }

    #[test]
    fn narinfo_ttls() {
        let idx = NarIndex::temporary().unwrap();
        assert_eq!(idx.ttl(), NarinfoTtl::NIX_DEFAULT);
        assert_eq!(idx.get_narinfo(CACHE, &D, 1000).unwrap(), CachedNarInfo::Missing);

        idx.put_narinfo(CACHE, &D, 1000, Some("StorePath: x\n")).unwrap();
        assert_eq!(idx.get_narinfo(CACHE, &D, 1000).unwrap(), CachedNarInfo::Present("StorePath: x\n".into()));
        let month = 30 * 24 * 3600;
        assert_eq!(
            idx.get_narinfo(CACHE, &D, 1000 + month - 1).unwrap(),
            CachedNarInfo::Present("StorePath: x\n".into())
        );
        assert_eq!(idx.get_narinfo(CACHE, &D, 1000 + month).unwrap(), CachedNarInfo::Missing);
        // From the future: not trusted.
        assert_eq!(idx.get_narinfo(CACHE, &D, 999).unwrap(), CachedNarInfo::Missing);
        // Per cache.
        assert_eq!(idx.get_narinfo("http://other", &D, 1000).unwrap(), CachedNarInfo::Missing);

        idx.put_narinfo(CACHE, &D, 2000, None).unwrap();
        assert_eq!(idx.get_narinfo(CACHE, &D, 2000 + 3599).unwrap(), CachedNarInfo::Absent);
        assert_eq!(idx.get_narinfo(CACHE, &D, 2000 + 3600).unwrap(), CachedNarInfo::Missing);

        idx.set_ttl(NarinfoTtl { positive: Duration::from_secs(10), negative: Duration::from_secs(5) });
        assert_eq!(idx.get_narinfo(CACHE, &D, 2004).unwrap(), CachedNarInfo::Absent);
        assert_eq!(idx.get_narinfo(CACHE, &D, 2005).unwrap(), CachedNarInfo::Missing);

        idx.set_ttl(NarinfoTtl::NONE);
        idx.put_narinfo(CACHE, &D, 3000, Some("x\n")).unwrap();
        assert_eq!(idx.get_narinfo(CACHE, &D, 3000).unwrap(), CachedNarInfo::Missing);

        idx.set_ttl(NarinfoTtl::NIX_DEFAULT);
        assert_eq!(idx.get_narinfo(CACHE, &D, 3000).unwrap(), CachedNarInfo::Present("x\n".into()));
        idx.clear_narinfos().unwrap();
        assert_eq!(idx.get_narinfo(CACHE, &D, 3000).unwrap(), CachedNarInfo::Missing);
    }

    #[test]
    fn lazy_index_opens_once_on_first_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/narindex.sled");
        let lazy = LazyNarIndex::at(&path);
        assert!(!path.exists(), "opened before first use");
        let a = lazy.clone().get().unwrap();
        let b = lazy.get().unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert!(path.exists());
        let shared = LazyNarIndex::from(a.clone());
        assert!(Arc::ptr_eq(&shared.get().unwrap(), &a));
        assert!(LazyNarIndex::temporary().get().is_ok());
    }

    #[test]
    fn unreadable_narinfo_entries_are_missing() {
        let idx = NarIndex::temporary().unwrap();
        for bad in [&b""[..], &[2, 0, 0, 0, 0, 0, 0, 0, 0, 1][..], &[1, 0, 0][..], &[1, 0, 0, 0, 0, 0, 0, 0, 0, 2][..], &[1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff][..]] {
            idx.narinfos.insert(narinfo_key(CACHE, &D), bad).unwrap();
            assert_eq!(idx.get_narinfo(CACHE, &D, 0).unwrap(), CachedNarInfo::Missing, "{bad:?}");
        }
    }
}
