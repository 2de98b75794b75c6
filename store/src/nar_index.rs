//! The NAR index: what Arca remembers about NARs, NAR uploads and
//! binary-cache answers.
//!
//! A [NarIndex] lives beside the store, on one of two backends:
//!
//! - **sled** (the default: `$ARCA_DATA_DIR/narindex.sled`): one small
//!   embedded database, for one process;
//! - **object_store** (`objectstore+file:///…`, `objectstore+s3://…`): small
//!   objects under a prefix, shareable by every replica of an HTTP front
//!   (one replica takes a NAR upload, another its narinfo).
//!
//! It holds three tables:
//!
//! - **NARs**: NarHash (SHA-256 of the uncompressed NAR) → the root castore
//!   [Node] the NAR was ingested as, and its NarSize. A NAR is content
//!   addressed by its NarHash, so once it was ingested and checked it never
//!   needs to be downloaded again, whatever narinfo (or cache) points to it,
//!   and the HTTP front can serve it by its NarHash. Entries are written only
//!   for verified NARs; [NarIndex::put_nar] is durable when it returns.
//!   Beside it, **served NARs**: NarHash → root node and NarSize as a path
//!   info served over HTTP claims them ([NarIndex::record_nar]), so that any
//!   replica can serve the NAR a narinfo names. A path info's NarHash is not
//!   checked against its node, so these entries are only used to find a NAR
//!   to serve ([NarIndex::get_nar_to_serve]), never as proof of ingestion.
//! - **uploads**: the URL path a NAR file was uploaded to (`nar/<hash>.nar.xz`)
//!   → what it held ([NarUpload]: root node, NarHash, NarSize, FileHash,
//!   FileSize, compression), so a later narinfo upload naming that URL can be
//!   checked against it. Durable when [NarIndex::put_upload] returns.
//! - **narinfos**: (binary cache, store-path digest) → when it was fetched and
//!   what the cache answered: the narinfo text, or "absent". Answers are
//!   fresh for a positive / negative TTL ([NarinfoTtl], by default 30 days and
//!   1 hour, as in Nix). This table is a cache: losing it costs requests only,
//!   and an unreadable entry counts as missing.
//!
//! Values carry a format version byte, so later formats can be told apart.
//! On object_store the keys are `nars/<nixbase32 NarHash>`,
//! `served-nars/<nixbase32 NarHash>`,
//! `uploads/<URL path>` and `narinfos/<hex cache id>/<nixbase32 digest>`.
use crate::narinfo::Compression;
use crate::store_path::DIGEST_LEN;
use arca_castore::composition::{object_store_from, ServiceConfig, ServiceKind};
use arca_castore::{Error, Node};
use futures::stream::{StreamExt, TryStreamExt};
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parking_lot::Mutex;
use prost::Message;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Format version of NAR entries.
const NAR_ENTRY_V1: u8 = 1;
/// Format version of narinfo entries.
const NARINFO_ENTRY_V1: u8 = 1;
/// Format version of upload entries.
const UPLOAD_ENTRY_V1: u8 = 1;
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
    pub const NIX_DEFAULT: NarinfoTtl = NarinfoTtl {
        positive: Duration::from_secs(30 * 24 * 3600),
        negative: Duration::from_secs(3600),
    };
    /// Nothing is ever fresh: every lookup asks the cache again.
    pub const NONE: NarinfoTtl = NarinfoTtl {
        positive: Duration::ZERO,
        negative: Duration::ZERO,
    };
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

/// A NAR file uploaded to the HTTP front, as recorded under its URL path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarUpload {
    /// The root node the NAR was ingested as.
    pub node: Node,
    /// SHA-256 of the uncompressed NAR.
    pub nar_sha256: [u8; 32],
    /// Size of the uncompressed NAR.
    pub nar_size: u64,
    /// SHA-256 of the file as uploaded (compressed).
    pub file_sha256: [u8; 32],
    /// Size of the file as uploaded.
    pub file_size: u64,
    /// How the file was compressed.
    pub compression: Compression,
}

/// The two tables of NARs: verified ones, and what served path infos claim.
#[derive(Clone, Copy, Debug)]
enum NarTable {
    /// NARs ingested and checked against their NarHash and NarSize.
    Verified,
    /// NarHash → root node as a served path info claims it (unchecked).
    Served,
}

impl NarTable {
    /// The key prefix on the object_store backend.
    fn prefix(self) -> &'static str {
        match self {
            NarTable::Verified => "nars",
            NarTable::Served => "served-nars",
        }
    }
}

/// Where the index keeps its tables.
enum Backend {
    Sled {
        // Kept so the database lives as long as its trees.
        _db: sled::Db,
        nars: sled::Tree,
        served_nars: sled::Tree,
        narinfos: sled::Tree,
        uploads: sled::Tree,
    },
    ObjectStore {
        store: Arc<dyn ObjectStore>,
        base: object_store::path::Path,
    },
}

/// The NarHash → castore node index, upload records and narinfo cache (see
/// the [module docs](self)). Cheap to share behind an `Arc`.
pub struct NarIndex {
    backend: Backend,
    positive_ttl_secs: AtomicU64,
    negative_ttl_secs: AtomicU64,
}

impl std::fmt::Debug for NarIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let backend = match &self.backend {
            Backend::Sled { .. } => "sled".to_string(),
            Backend::ObjectStore { store, base } => format!("{store} {base}"),
        };
        f.debug_struct("NarIndex")
            .field("backend", &backend)
            .field("ttl", &self.ttl())
            .finish_non_exhaustive()
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

fn os_err(e: object_store::Error) -> Error {
    Error::from(e)
}

fn corrupt(what: &str, why: &str) -> Error {
    Error::Storage(format!("{what} is corrupt: {why}"))
}

/// `version ‖ size (8, BE) ‖ node` → (node, size).
fn decode_nar_entry(raw: &[u8], what: &str) -> Result<(Node, u64), Error> {
    let (&version, rest) = raw.split_first().ok_or_else(|| corrupt(what, "empty"))?;
    if version != NAR_ENTRY_V1 {
        return Err(corrupt(what, &format!("unknown format version {version}")));
    }
    let (size, node) = rest
        .split_at_checked(8)
        .ok_or_else(|| corrupt(what, "too short"))?;
    let nar_size = u64::from_be_bytes(size.try_into().map_err(|_| corrupt(what, "too short"))?);
    Ok((decode_node(node, what)?, nar_size))
}

fn decode_node(raw: &[u8], what: &str) -> Result<Node, Error> {
    let proto =
        arca_proto::castore::Node::decode(raw).map_err(|e| corrupt(what, &e.to_string()))?;
    let (name, node) = Node::try_from_proto(proto).map_err(|e| corrupt(what, &e.to_string()))?;
    if !name.is_empty() {
        return Err(corrupt(what, "the node has a name"));
    }
    Ok(node)
}

fn encode_node(node: &Node) -> Vec<u8> {
    node.clone().into_proto(bytes::Bytes::new()).encode_to_vec()
}

fn encode_nar_entry(node: &Node, nar_size: u64) -> Vec<u8> {
    let encoded = encode_node(node);
    let mut value = Vec::with_capacity(1 + 8 + encoded.len());
    value.push(NAR_ENTRY_V1);
    value.extend_from_slice(&nar_size.to_be_bytes());
    value.extend_from_slice(&encoded);
    value
}

fn compression_byte(c: Compression) -> u8 {
    match c {
        Compression::None => 0,
        Compression::Xz => 1,
        Compression::Zstd => 2,
        Compression::Bzip2 => 3,
        Compression::Gzip => 4,
        Compression::Brotli => 5,
    }
}

fn compression_from_byte(b: u8) -> Option<Compression> {
    Some(match b {
        0 => Compression::None,
        1 => Compression::Xz,
        2 => Compression::Zstd,
        3 => Compression::Bzip2,
        4 => Compression::Gzip,
        5 => Compression::Brotli,
        _ => return None,
    })
}

/// `version ‖ NarHash (32) ‖ NarSize (8) ‖ FileHash (32) ‖ FileSize (8) ‖ compression (1) ‖ node`.
fn encode_upload(u: &NarUpload) -> Vec<u8> {
    let node = encode_node(&u.node);
    let mut v = Vec::with_capacity(1 + 32 + 8 + 32 + 8 + 1 + node.len());
    v.push(UPLOAD_ENTRY_V1);
    v.extend_from_slice(&u.nar_sha256);
    v.extend_from_slice(&u.nar_size.to_be_bytes());
    v.extend_from_slice(&u.file_sha256);
    v.extend_from_slice(&u.file_size.to_be_bytes());
    v.push(compression_byte(u.compression));
    v.extend_from_slice(&node);
    v
}

fn decode_upload(raw: &[u8], what: &str) -> Result<NarUpload, Error> {
    let short = || corrupt(what, "too short");
    let (&version, rest) = raw.split_first().ok_or_else(|| corrupt(what, "empty"))?;
    if version != UPLOAD_ENTRY_V1 {
        return Err(corrupt(what, &format!("unknown format version {version}")));
    }
    let (nar_sha256, rest) = rest.split_first_chunk::<32>().ok_or_else(short)?;
    let (nar_size, rest) = rest.split_first_chunk::<8>().ok_or_else(short)?;
    let (file_sha256, rest) = rest.split_first_chunk::<32>().ok_or_else(short)?;
    let (file_size, rest) = rest.split_first_chunk::<8>().ok_or_else(short)?;
    let (&compression, node) = rest.split_first().ok_or_else(short)?;
    Ok(NarUpload {
        node: decode_node(node, what)?,
        nar_sha256: *nar_sha256,
        nar_size: u64::from_be_bytes(*nar_size),
        file_sha256: *file_sha256,
        file_size: u64::from_be_bytes(*file_size),
        compression: compression_from_byte(compression)
            .ok_or_else(|| corrupt(what, &format!("unknown compression {compression}")))?,
    })
}

fn encode_narinfo_entry(fetched_at: u64, narinfo: Option<&str>) -> Vec<u8> {
    let text = narinfo.unwrap_or("");
    let mut value = Vec::with_capacity(10 + text.len());
    value.push(NARINFO_ENTRY_V1);
    value.extend_from_slice(&fetched_at.to_be_bytes());
    value.push(u8::from(narinfo.is_some()));
    value.extend_from_slice(text.as_bytes());
    value
}

impl NarIndex {
    /// Opens (creating) a sled index at `path`, with Nix's default TTLs.
    pub fn open(path: &Path) -> Result<Self, Error> {
        Self::from_db(arca_castore::directoryservice::open_sled(Some(path))?)
    }

    /// A temporary sled index (deleted when dropped), with Nix's default TTLs.
    pub fn temporary() -> Result<Self, Error> {
        Self::from_db(arca_castore::directoryservice::open_sled(None)?)
    }

    /// An index stored as objects under `base` in `store`.
    pub fn object_store(store: Arc<dyn ObjectStore>, base: object_store::path::Path) -> Self {
        Self::with_backend(Backend::ObjectStore { store, base })
    }

    /// An index from a URL: `sled:///abs/path`, `sled://` (temporary), or
    /// any `objectstore+…` URL (`objectstore+file:///abs/dir`,
    /// `objectstore+s3://bucket/prefix?endpoint=…`, `objectstore+memory:///`).
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let bad = |why: String| Error::InvalidRequest(format!("NAR index URL {url:?}: {why}"));
        match ServiceConfig::from_url(ServiceKind::Directory, url)
            .map_err(|e| bad(e.to_string()))?
        {
            ServiceConfig::Sled { path: None } => Self::temporary(),
            ServiceConfig::Sled { path: Some(p) } => Self::open(&p),
            ServiceConfig::ObjectStore { url: ourl, options } => {
                let (store, base) = object_store_from(&ourl, &options).map_err(bad)?;
                Ok(Self::object_store(store, base))
            }
            _ => Err(bad(
                "expected sled:///path, sled:// or objectstore+…://…".into()
            )),
        }
    }

    fn from_db(db: sled::Db) -> Result<Self, Error> {
        let open = |name: &str| {
            db.open_tree(name)
                .map_err(|e| Error::Storage(format!("opening the NAR index ({name}): {e}")))
        };
        let nars = open("nars")?;
        let served_nars = open("served-nars")?;
        let narinfos = open("narinfos")?;
        let uploads = open("uploads")?;
        Ok(Self::with_backend(Backend::Sled {
            _db: db,
            nars,
            served_nars,
            narinfos,
            uploads,
        }))
    }

    fn with_backend(backend: Backend) -> Self {
        let ttl = NarinfoTtl::default();
        Self {
            backend,
            positive_ttl_secs: AtomicU64::new(ttl.positive.as_secs()),
            negative_ttl_secs: AtomicU64::new(ttl.negative.as_secs()),
        }
    }

    /// Sets the narinfo TTLs (builder style).
    pub fn with_ttl(self, ttl: NarinfoTtl) -> Self {
        self.set_ttl(ttl);
        self
    }

    /// Sets the narinfo TTLs (whole seconds; they apply to entries already
    /// stored too, since freshness is decided when reading).
    pub fn set_ttl(&self, ttl: NarinfoTtl) {
        self.positive_ttl_secs
            .store(ttl.positive.as_secs(), Ordering::Relaxed);
        self.negative_ttl_secs
            .store(ttl.negative.as_secs(), Ordering::Relaxed);
    }

    /// The narinfo TTLs in force.
    pub fn ttl(&self) -> NarinfoTtl {
        NarinfoTtl {
            positive: Duration::from_secs(self.positive_ttl_secs.load(Ordering::Relaxed)),
            negative: Duration::from_secs(self.negative_ttl_secs.load(Ordering::Relaxed)),
        }
    }

    fn os_key(
        base: &object_store::path::Path,
        table: &str,
        parts: &[&str],
    ) -> object_store::path::Path {
        let mut p = base.clone().join(table);
        for part in parts {
            p = p.join(*part);
        }
        p
    }

    /// Reads an object, `None` if absent.
    async fn os_get(
        store: &dyn ObjectStore,
        key: &object_store::path::Path,
    ) -> Result<Option<bytes::Bytes>, Error> {
        match store.get(key).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(os_err)?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(os_err(e)),
        }
    }

    /// The root node and NarSize of the NAR with this SHA-256, if one was
    /// ingested and verified. (Whether castore still holds the node is the
    /// caller's to check.) A stored entry that does not decode is an
    /// [Error::Storage].
    pub async fn get_nar(&self, nar_sha256: &[u8; 32]) -> Result<Option<(Node, u64)>, Error> {
        self.read_nar(NarTable::Verified, nar_sha256).await
    }

    /// Where to find the NAR with this SHA-256 to serve it: a verified entry
    /// ([Self::get_nar]), else what a served path info claims
    /// ([Self::record_nar]). Never proof that the NAR was checked: a client
    /// of the NAR checks it against its narinfo.
    pub async fn get_nar_to_serve(
        &self,
        nar_sha256: &[u8; 32],
    ) -> Result<Option<(Node, u64)>, Error> {
        match self.read_nar(NarTable::Verified, nar_sha256).await? {
            Some(found) => Ok(Some(found)),
            None => self.read_nar(NarTable::Served, nar_sha256).await,
        }
    }

    async fn read_nar(
        &self,
        table: NarTable,
        nar_sha256: &[u8; 32],
    ) -> Result<Option<(Node, u64)>, Error> {
        let what = || {
            format!(
                "NAR index entry sha256:{}",
                crate::nixbase32::encode(nar_sha256)
            )
        };
        let raw = match &self.backend {
            Backend::Sled { .. } => self
                .sled_nars(table)
                .get(nar_sha256)
                .map_err(Error::storage)?
                .map(|v| v.to_vec()),
            Backend::ObjectStore { store, base } => {
                let key = Self::os_key(
                    base,
                    table.prefix(),
                    &[&crate::nixbase32::encode(nar_sha256)],
                );
                Self::os_get(store.as_ref(), &key)
                    .await?
                    .map(|b| b.to_vec())
            }
        };
        raw.map(|raw| decode_nar_entry(&raw, &what())).transpose()
    }

    /// The sled tree of a NAR table (sled backend only).
    fn sled_nars(&self, table: NarTable) -> &sled::Tree {
        match (&self.backend, table) {
            (Backend::Sled { nars, .. }, NarTable::Verified) => nars,
            (Backend::Sled { served_nars, .. }, NarTable::Served) => served_nars,
            (Backend::ObjectStore { .. }, _) => unreachable!("sled_nars on an object store"),
        }
    }

    /// Records that the NAR with this SHA-256 and size was ingested as
    /// `node` (call only once the NAR was verified against both). Durable
    /// when it returns.
    pub async fn put_nar(
        &self,
        nar_sha256: &[u8; 32],
        node: &Node,
        nar_size: u64,
    ) -> Result<(), Error> {
        self.write_nar(NarTable::Verified, nar_sha256, node, nar_size, true)
            .await
    }

    /// Records what a served path info claims: its NarHash, root node and
    /// NarSize, so that another replica can resolve the NAR a narinfo names
    /// ([Self::get_nar_to_serve]). Kept apart from verified entries: a path
    /// info's NarHash was not checked against its node, so this is never
    /// taken as proof that the NAR was ingested ([Self::get_nar] does not
    /// see it). Not flushed on the sled backend (it can be derived again).
    pub async fn record_nar(
        &self,
        nar_sha256: &[u8; 32],
        node: &Node,
        nar_size: u64,
    ) -> Result<(), Error> {
        self.write_nar(NarTable::Served, nar_sha256, node, nar_size, false)
            .await
    }

    async fn write_nar(
        &self,
        table: NarTable,
        nar_sha256: &[u8; 32],
        node: &Node,
        nar_size: u64,
        flush: bool,
    ) -> Result<(), Error> {
        let value = encode_nar_entry(node, nar_size);
        match &self.backend {
            Backend::Sled { .. } => {
                let tree = self.sled_nars(table);
                tree.insert(nar_sha256, value).map_err(Error::storage)?;
                if flush {
                    arca_castore::directoryservice::flush_sled(tree).await?;
                }
            }
            Backend::ObjectStore { store, base } => {
                let key = Self::os_key(
                    base,
                    table.prefix(),
                    &[&crate::nixbase32::encode(nar_sha256)],
                );
                store
                    .put(&key, PutPayload::from(value))
                    .await
                    .map_err(os_err)?;
            }
        }
        Ok(())
    }

    /// Forgets a NAR, verified or claimed (e.g. when its node turned out to
    /// be gone from castore).
    pub async fn remove_nar(&self, nar_sha256: &[u8; 32]) -> Result<(), Error> {
        for table in [NarTable::Verified, NarTable::Served] {
            match &self.backend {
                Backend::Sled { .. } => {
                    self.sled_nars(table)
                        .remove(nar_sha256)
                        .map_err(Error::storage)?;
                }
                Backend::ObjectStore { store, base } => {
                    let key = Self::os_key(
                        base,
                        table.prefix(),
                        &[&crate::nixbase32::encode(nar_sha256)],
                    );
                    match store.delete(&key).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => return Err(os_err(e)),
                    }
                }
            }
        }
        Ok(())
    }

    /// Number of NARs indexed.
    pub async fn nar_count(&self) -> Result<usize, Error> {
        match &self.backend {
            Backend::Sled { nars, .. } => Ok(nars.len()),
            Backend::ObjectStore { store, base } => {
                let prefix = base.clone().join("nars");
                store
                    .list(Some(&prefix))
                    .map_err(os_err)
                    .try_fold(0usize, |n, _| async move { Ok(n + 1) })
                    .await
            }
        }
    }

    fn upload_key(base: &object_store::path::Path, url_path: &str) -> object_store::path::Path {
        let parts: Vec<&str> = url_path.split('/').collect();
        Self::os_key(base, "uploads", &parts)
    }

    /// What was uploaded to `url_path` (e.g. `nar/<hash>.nar.xz`), if anything.
    pub async fn get_upload(&self, url_path: &str) -> Result<Option<NarUpload>, Error> {
        let what = format!("NAR upload record {url_path:?}");
        let raw = match &self.backend {
            Backend::Sled { uploads, .. } => uploads
                .get(url_path)
                .map_err(Error::storage)?
                .map(|v| v.to_vec()),
            Backend::ObjectStore { store, base } => {
                Self::os_get(store.as_ref(), &Self::upload_key(base, url_path))
                    .await?
                    .map(|b| b.to_vec())
            }
        };
        raw.map(|raw| decode_upload(&raw, &what)).transpose()
    }

    /// Records what was uploaded to `url_path` (call only once the NAR was
    /// ingested and checked). Durable when it returns.
    pub async fn put_upload(&self, url_path: &str, upload: &NarUpload) -> Result<(), Error> {
        let value = encode_upload(upload);
        match &self.backend {
            Backend::Sled { uploads, .. } => {
                uploads.insert(url_path, value).map_err(Error::storage)?;
                arca_castore::directoryservice::flush_sled(uploads).await?;
            }
            Backend::ObjectStore { store, base } => {
                store
                    .put(&Self::upload_key(base, url_path), PutPayload::from(value))
                    .await
                    .map_err(os_err)?;
            }
        }
        Ok(())
    }

    /// What binary cache `cache` (any stable identifier, e.g. its URL)
    /// answered for the store path `digest`, if that answer is still fresh at
    /// `now` (Unix seconds). Answers from the future (a clock set back) are
    /// not fresh; an unreadable entry is [CachedNarInfo::Missing].
    pub async fn get_narinfo(
        &self,
        cache: &str,
        digest: &[u8; DIGEST_LEN],
        now: u64,
    ) -> Result<CachedNarInfo, Error> {
        let raw = match &self.backend {
            Backend::Sled { narinfos, .. } => narinfos
                .get(narinfo_key(cache, digest))
                .map_err(Error::storage)?
                .map(|v| v.to_vec()),
            Backend::ObjectStore { store, base } => {
                let key = Self::narinfo_os_key(base, cache, digest);
                Self::os_get(store.as_ref(), &key)
                    .await?
                    .map(|b| b.to_vec())
            }
        };
        let Some(raw) = raw else {
            return Ok(CachedNarInfo::Missing);
        };
        let Some((fetched_at, entry)) = decode_narinfo_entry(&raw) else {
            tracing::warn!(cache, path = %crate::nixbase32::encode(digest), "ignoring an unreadable narinfo cache entry");
            return Ok(CachedNarInfo::Missing);
        };
        let ttl = self.ttl();
        let ttl = if entry.is_some() {
            ttl.positive
        } else {
            ttl.negative
        };
        let fresh = fetched_at <= now && now - fetched_at < ttl.as_secs();
        Ok(match (fresh, entry) {
            (false, _) => CachedNarInfo::Missing,
            (true, Some(text)) => CachedNarInfo::Present(text),
            (true, None) => CachedNarInfo::Absent,
        })
    }

    fn narinfo_os_key(
        base: &object_store::path::Path,
        cache: &str,
        digest: &[u8; DIGEST_LEN],
    ) -> object_store::path::Path {
        Self::os_key(
            base,
            "narinfos",
            &[
                &cache_id(cache)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>(),
                &crate::nixbase32::encode(digest),
            ],
        )
    }

    /// Records what binary cache `cache` answered for the store path `digest`
    /// at `fetched_at` (Unix seconds): the narinfo text, or `None` for
    /// "absent". Not flushed: the narinfo cache may lose recent entries in
    /// a crash.
    pub async fn put_narinfo(
        &self,
        cache: &str,
        digest: &[u8; DIGEST_LEN],
        fetched_at: u64,
        narinfo: Option<&str>,
    ) -> Result<(), Error> {
        let value = encode_narinfo_entry(fetched_at, narinfo);
        match &self.backend {
            Backend::Sled { narinfos, .. } => {
                narinfos
                    .insert(narinfo_key(cache, digest), value)
                    .map_err(Error::storage)?;
            }
            Backend::ObjectStore { store, base } => {
                let key = Self::narinfo_os_key(base, cache, digest);
                store
                    .put(&key, PutPayload::from(value))
                    .await
                    .map_err(os_err)?;
            }
        }
        Ok(())
    }

    /// Forgets every cached narinfo answer (of every cache); NARs and
    /// uploads stay.
    pub async fn clear_narinfos(&self) -> Result<(), Error> {
        match &self.backend {
            Backend::Sled { narinfos, .. } => narinfos.clear().map_err(Error::storage),
            Backend::ObjectStore { store, base } => {
                let prefix = base.clone().join("narinfos");
                let locations = store.list(Some(&prefix)).map_ok(|m| m.location).boxed();
                store
                    .delete_stream(locations)
                    .map_err(os_err)
                    .try_for_each(|_| async { Ok(()) })
                    .await
            }
        }
    }
}

/// Where a [LazyNarIndex] opens its index.
#[derive(Clone, Debug)]
enum Location {
    /// A temporary sled database.
    Temporary,
    /// A sled database at this path.
    Sled(PathBuf),
    /// A URL for [NarIndex::from_url].
    Url(String),
}

/// A [NarIndex] opened on first use: service builders get one of these, so
/// the database is only opened (and, for sled, locked: sled allows one
/// process at a time) when a stack actually uses it. Clones share the
/// opened index.
#[derive(Clone)]
pub struct LazyNarIndex {
    location: Location,
    opened: Arc<Mutex<Option<Arc<NarIndex>>>>,
}

impl std::fmt::Debug for LazyNarIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyNarIndex")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

impl LazyNarIndex {
    /// A sled index at `path`, opened (created) on first use.
    pub fn at(path: impl Into<PathBuf>) -> Self {
        Self {
            location: Location::Sled(path.into()),
            opened: Default::default(),
        }
    }

    /// A temporary index, created on first use.
    pub fn temporary() -> Self {
        Self {
            location: Location::Temporary,
            opened: Default::default(),
        }
    }

    /// The index a URL names ([NarIndex::from_url]), opened on first use.
    /// The URL is checked now: an invalid one is an error here, not later.
    pub fn from_url(url: &str) -> Result<Self, Error> {
        match ServiceConfig::from_url(ServiceKind::Directory, url) {
            Ok(ServiceConfig::Sled { path: None }) => Ok(Self::temporary()),
            Ok(ServiceConfig::Sled { path: Some(p) }) => Ok(Self::at(p)),
            Ok(ServiceConfig::ObjectStore { .. }) => Ok(Self {
                location: Location::Url(url.to_string()),
                opened: Default::default(),
            }),
            Ok(_) => Err(Error::InvalidRequest(format!(
                "NAR index URL {url:?}: expected sled:///path, sled:// or objectstore+…://…"
            ))),
            Err(e) => Err(Error::InvalidRequest(format!("NAR index URL {url:?}: {e}"))),
        }
    }

    /// Where a sled index lives (`None`: temporary, or not sled).
    pub fn path(&self) -> Option<&Path> {
        match &self.location {
            Location::Sled(p) => Some(p),
            _ => None,
        }
    }

    /// The index, opening it if this is the first use.
    pub fn get(&self) -> Result<Arc<NarIndex>, Error> {
        let mut opened = self.opened.lock();
        if let Some(index) = &*opened {
            return Ok(index.clone());
        }
        let index = Arc::new(match &self.location {
            Location::Sled(p) => NarIndex::open(p)?,
            Location::Temporary => NarIndex::temporary()?,
            Location::Url(u) => NarIndex::from_url(u)?,
        });
        *opened = Some(index.clone());
        Ok(index)
    }
}

impl From<Arc<NarIndex>> for LazyNarIndex {
    /// An index that is already open.
    fn from(index: Arc<NarIndex>) -> Self {
        Self {
            location: Location::Temporary,
            opened: Arc::new(Mutex::new(Some(index))),
        }
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
            Node::Directory {
                digest: B3Digest::of(b"dir"),
                size: 7,
            },
            Node::File {
                digest: B3Digest::of(b"file"),
                size: 4,
                executable: true,
            },
            Node::File {
                digest: B3Digest::of(b""),
                size: 0,
                executable: false,
            },
            Node::Symlink {
                target: SymlinkTarget::try_from(bytes::Bytes::from_static(b"../x")).unwrap(),
            },
        ]
    }

    /// One index of each backend.
    fn indexes(dir: &Path) -> Vec<NarIndex> {
        vec![
            NarIndex::temporary().unwrap(),
            NarIndex::from_url(&format!("objectstore+file://{}/os", dir.display())).unwrap(),
            NarIndex::from_url("objectstore+memory:///").unwrap(),
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
                assert_eq!(idx.get_nar(&h).await.unwrap(), None);
                idx.put_nar(&h, &n, 100 + i as u64).await.unwrap();
                assert_eq!(idx.get_nar(&h).await.unwrap(), Some((n, 100 + i as u64)));
            }
            assert_eq!(idx.nar_count().await.unwrap(), 4);
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
            assert_eq!(
                idx.get_nar(&[i as u8; 32]).await.unwrap(),
                Some((n, 100 + i as u64))
            );
        }
        idx.remove_nar(&[0; 32]).await.unwrap();
        assert_eq!(idx.get_nar(&[0; 32]).await.unwrap(), None);
    }

    #[tokio::test]
    async fn every_backend_keeps_nars_uploads_and_narinfos() {
        let dir = tempfile::tempdir().unwrap();
        for idx in indexes(dir.path()) {
            for (i, n) in nodes().into_iter().enumerate() {
                let h = [i as u8; 32];
                assert_eq!(idx.get_nar(&h).await.unwrap(), None, "{idx:?}");
                if i % 2 == 0 {
                    idx.put_nar(&h, &n, 100 + i as u64).await.unwrap();
                    assert_eq!(
                        idx.get_nar(&h).await.unwrap(),
                        Some((n.clone(), 100 + i as u64)),
                        "{idx:?}"
                    );
                } else {
                    // What a served path info claims is only for serving:
                    // never proof that the NAR was ingested and checked.
                    idx.record_nar(&h, &n, 100 + i as u64).await.unwrap();
                    assert_eq!(idx.get_nar(&h).await.unwrap(), None, "{idx:?}");
                }
                assert_eq!(
                    idx.get_nar_to_serve(&h).await.unwrap(),
                    Some((n, 100 + i as u64)),
                    "{idx:?}"
                );
            }
            assert_eq!(idx.nar_count().await.unwrap(), 2, "{idx:?}");
            // A claim never shadows a verified entry.
            idx.record_nar(&[0; 32], &nodes()[1], 1).await.unwrap();
            assert_eq!(
                idx.get_nar_to_serve(&[0; 32]).await.unwrap(),
                Some((nodes()[0].clone(), 100))
            );
            idx.remove_nar(&[0; 32]).await.unwrap();
            idx.remove_nar(&[0; 32]).await.unwrap();
            assert_eq!(idx.get_nar(&[0; 32]).await.unwrap(), None);
            assert_eq!(idx.get_nar_to_serve(&[0; 32]).await.unwrap(), None);
            idx.remove_nar(&[1; 32]).await.unwrap();
            assert_eq!(idx.get_nar_to_serve(&[1; 32]).await.unwrap(), None);
            assert_eq!(idx.nar_count().await.unwrap(), 1);

            for (i, node) in nodes().into_iter().enumerate() {
                let url = format!("nar/{i}abc.nar.xz");
                assert_eq!(idx.get_upload(&url).await.unwrap(), None);
                let up = NarUpload {
                    node,
                    nar_sha256: [i as u8; 32],
                    nar_size: 1000 + i as u64,
                    file_sha256: [9; 32],
                    file_size: 77,
                    compression: Compression::Xz,
                };
                idx.put_upload(&url, &up).await.unwrap();
                assert_eq!(idx.get_upload(&url).await.unwrap(), Some(up));
            }
            // Odd keys stay keys.
            assert_eq!(idx.get_upload("nar/../x").await.unwrap(), None);

            assert_eq!(
                idx.get_narinfo(CACHE, &D, 1000).await.unwrap(),
                CachedNarInfo::Missing
            );
            idx.put_narinfo(CACHE, &D, 1000, Some("StorePath: x\n"))
                .await
                .unwrap();
            assert_eq!(
                idx.get_narinfo(CACHE, &D, 1000).await.unwrap(),
                CachedNarInfo::Present("StorePath: x\n".into())
            );
            idx.put_narinfo("http://other", &D, 1000, None)
                .await
                .unwrap();
            assert_eq!(
                idx.get_narinfo("http://other", &D, 1000).await.unwrap(),
                CachedNarInfo::Absent
            );
            idx.clear_narinfos().await.unwrap();
            assert_eq!(
                idx.get_narinfo(CACHE, &D, 1000).await.unwrap(),
                CachedNarInfo::Missing
            );
            assert_eq!(
                idx.get_narinfo("http://other", &D, 1000).await.unwrap(),
                CachedNarInfo::Missing
            );
            // NARs and uploads survive clearing the narinfo cache.
            assert_eq!(idx.nar_count().await.unwrap(), 1);
            assert!(idx.get_upload("nar/1abc.nar.xz").await.unwrap().is_some());
        }
    }

    #[tokio::test]
    async fn object_store_index_is_shared_between_handles() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("objectstore+file://{}/shared", dir.path().display());
        let a = NarIndex::from_url(&url).unwrap();
        let b = LazyNarIndex::from_url(&url).unwrap().get().unwrap();
        let n = nodes().remove(0);
        a.put_nar(&[5; 32], &n, 42).await.unwrap();
        assert_eq!(b.get_nar(&[5; 32]).await.unwrap(), Some((n, 42)));
    }

    #[test]
    fn urls() {
        let dir = tempfile::tempdir().unwrap();
        assert!(LazyNarIndex::from_url("sled://").unwrap().path().is_none());
        let p = dir.path().join("x.sled");
        let lazy = LazyNarIndex::from_url(&format!("sled://{}", p.display())).unwrap();
        assert_eq!(lazy.path(), Some(p.as_path()));
        assert!(!p.exists(), "opened before first use");
        for bad in [
            "memory://",
            "grpc+http://127.0.0.1:1",
            "ftp://x",
            "sled://relative",
            "nix+http://x",
        ] {
            let e = LazyNarIndex::from_url(bad).unwrap_err();
            assert!(e.to_string().contains("NAR index URL"), "{bad}: {e}");
            assert!(NarIndex::from_url(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn corrupt_entries_are_storage_errors() {
        let idx = NarIndex::temporary().unwrap();
        let Backend::Sled { nars, uploads, .. } = &idx.backend else {
            unreachable!()
        };
        for bad in [
            &b""[..],
            &[9, 0, 0][..],
            &[1, 0, 0, 0][..],
            &[1, 0, 0, 0, 0, 0, 0, 0, 5, 0xff][..],
        ] {
            nars.insert([7u8; 32], bad).unwrap();
            let e = idx.get_nar(&[7; 32]).await.unwrap_err();
            assert!(
                matches!(&e, Error::Storage(m) if m.contains("corrupt")),
                "{bad:?}: {e}"
            );
            uploads.insert("u", bad).unwrap();
            let e = idx.get_upload("u").await.unwrap_err();
            assert!(
                matches!(&e, Error::Storage(m) if m.contains("corrupt")),
                "{bad:?}: {e}"
            );
        }
    }

    #[tokio::test]
    async fn narinfo_ttls() {
        let idx = NarIndex::temporary().unwrap();
        assert_eq!(idx.ttl(), NarinfoTtl::NIX_DEFAULT);
        assert_eq!(
            idx.get_narinfo(CACHE, &D, 1000).await.unwrap(),
            CachedNarInfo::Missing
        );

        idx.put_narinfo(CACHE, &D, 1000, Some("StorePath: x\n"))
            .await
            .unwrap();
        assert_eq!(
            idx.get_narinfo(CACHE, &D, 1000).await.unwrap(),
            CachedNarInfo::Present("StorePath: x\n".into())
        );
        let month = 30 * 24 * 3600;
        assert_eq!(
            idx.get_narinfo(CACHE, &D, 1000 + month - 1).await.unwrap(),
            CachedNarInfo::Present("StorePath: x\n".into())
        );
        assert_eq!(
            idx.get_narinfo(CACHE, &D, 1000 + month).await.unwrap(),
            CachedNarInfo::Missing
        );
        // From the future: not trusted.
        assert_eq!(
            idx.get_narinfo(CACHE, &D, 999).await.unwrap(),
            CachedNarInfo::Missing
        );
        // Per cache.
        assert_eq!(
            idx.get_narinfo("http://other", &D, 1000).await.unwrap(),
            CachedNarInfo::Missing
        );

        idx.put_narinfo(CACHE, &D, 2000, None).await.unwrap();
        assert_eq!(
            idx.get_narinfo(CACHE, &D, 2000 + 3599).await.unwrap(),
            CachedNarInfo::Absent
        );
        assert_eq!(
            idx.get_narinfo(CACHE, &D, 2000 + 3600).await.unwrap(),
            CachedNarInfo::Missing
        );

        idx.set_ttl(NarinfoTtl {
            positive: Duration::from_secs(10),
            negative: Duration::from_secs(5),
        });
        assert_eq!(
            idx.get_narinfo(CACHE, &D, 2004).await.unwrap(),
            CachedNarInfo::Absent
        );
        assert_eq!(
            idx.get_narinfo(CACHE, &D, 2005).await.unwrap(),
            CachedNarInfo::Missing
        );

        idx.set_ttl(NarinfoTtl::NONE);
        idx.put_narinfo(CACHE, &D, 3000, Some("x\n")).await.unwrap();
        assert_eq!(
            idx.get_narinfo(CACHE, &D, 3000).await.unwrap(),
            CachedNarInfo::Missing
        );

        idx.set_ttl(NarinfoTtl::NIX_DEFAULT);
        assert_eq!(
            idx.get_narinfo(CACHE, &D, 3000).await.unwrap(),
            CachedNarInfo::Present("x\n".into())
        );
        idx.clear_narinfos().await.unwrap();
        assert_eq!(
            idx.get_narinfo(CACHE, &D, 3000).await.unwrap(),
            CachedNarInfo::Missing
        );
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

    #[tokio::test]
    async fn unreadable_narinfo_entries_are_missing() {
        let idx = NarIndex::temporary().unwrap();
        let Backend::Sled { narinfos, .. } = &idx.backend else {
            unreachable!()
        };
        for bad in [
            &b""[..],
            &[2, 0, 0, 0, 0, 0, 0, 0, 0, 1][..],
            &[1, 0, 0][..],
            &[1, 0, 0, 0, 0, 0, 0, 0, 0, 2][..],
            &[1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff][..],
        ] {
            narinfos.insert(narinfo_key(CACHE, &D), bad).unwrap();
            assert_eq!(
                idx.get_narinfo(CACHE, &D, 0).await.unwrap(),
                CachedNarInfo::Missing,
                "{bad:?}"
            );
        }
    }
}
