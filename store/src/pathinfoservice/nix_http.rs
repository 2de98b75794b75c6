//! Fetch-through from a Nix binary cache: `nix+http://`, `nix+https://`,
//! `nix+file://`.
//!
//! [NixHttpPathInfoService::get] answers from the binary cache the way a Nix
//! substituter reads it (see `nix-formats.md`): `GET <hash>.narinfo` (404 and
//! 403 mean absent), then the NAR at the narinfo's `URL`, relative to the
//! cache URL. The NAR streams through a hashing counter (FileHash, FileSize of
//! the compressed bytes), the decompressor the `Compression` field names, and
//! [ingest_nar_expecting] (NarHash, NarSize) into castore; nothing is held in
//! memory whole.
//!
//! Checks, each failing with an error that names it and the store path:
//! - the narinfo parses and its `StorePath` has the requested hash
//!   ("StorePath mismatch");
//! - with trusted keys, a valid signature by one of them ("signature"), or
//!   else a content address that is verified instead ("content address"):
//!   the store path must be the one the `CA` field, name and references give
//!   (what Nix checks before it waives signatures), and the content must
//!   match it: for `fixed:r:sha256` the NarHash is the CA hash; for
//!   `text:sha256` and flat `fixed:sha256` / `fixed:sha512` the NAR must be one
//!   regular file (not executable for `text:`) whose contents hash to it
//!   (read back from castore after ingest). Other content addresses
//!   (`fixed:r:` with another hash than SHA-256, flat MD5/SHA-1) need a
//!   signature. A CA path referring to itself cannot be verified either
//!   (Nix's `:self` path type is not computed here) and needs a signature;
//! - NarHash and NarSize of the decompressed NAR ("NarHash mismatch",
//!   "NarSize mismatch"), a NAR that ends early ("truncated NAR"), a
//!   decompression failure;
//! - FileSize and FileHash when the narinfo gives them ("FileSize mismatch",
//!   "FileHash mismatch"); a NAR file longer than FileSize fails as soon as
//!   that shows.
//!
//! A failed check records nothing. Success records the NarHash → root node
//! in the [NarIndex] and the narinfo in its narinfo cache; cached answers
//! (fresh for the index's TTLs) are used before any request, and a NAR whose
//! NarHash is indexed and whose root node castore still holds is never
//! downloaded again. Concurrent gets of one path share one fetch (which
//! runs as a task of its own and finishes even if every caller gave up).
//!
//! Not supported: NAR `URL`s that are absolute or leave the cache (`..`);
//! `nix-cache-info` is not read (its `StoreDir` is assumed to be `/nix/store`).
use super::PathInfoService;
use crate::compression::{Decoder, Limited, RawFailure, RawTap};
use crate::nar::{ingest_nar_expecting, ExpectedNar, IngestError, NarError};
use crate::nar_index::{CachedNarInfo, NarIndex};
use crate::narinfo::{Compression, NarInfo};
use crate::pathinfo::PathInfo;
use crate::signature::PublicKey;
use crate::store_path::{ContentAddress, DIGEST_LEN};
use crate::{nixbase32, HashAlgo, NixHash};
use arca_castore::{BlobService, DirectoryService, Error, Node};
use async_trait::async_trait;
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use parking_lot::Mutex;
use sha2::{Digest, Sha256, Sha512};
use std::collections::HashMap;
use std::path::{Component, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncReadExt, BufReader};
use tracing::Instrument;
use url::Url;

/// Largest narinfo downloaded, in bytes (parsing then applies
/// [MAX_NARINFO_SIZE](crate::MAX_NARINFO_SIZE)).
pub const MAX_NARINFO_DOWNLOAD: u64 = 1024 * 1024;
/// Trailing bytes read after a compressed NAR whose narinfo gives a
/// FileHash but no FileSize, before giving up.
const MAX_TRAILING: u64 = 1024 * 1024;
/// Read buffer between the download and the decompressor.
const READ_BUFFER: usize = 256 * 1024;
/// TCP connect timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait for any single read of a response.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle connections kept per host (Nix uses up to 25 connections).
const MAX_IDLE_PER_HOST: usize = 32;

type SharedGet = Shared<BoxFuture<'static, Result<Option<PathInfo>, Error>>>;

/// A read-only [PathInfoService] over a Nix binary cache (see the
/// [module docs](self)).
#[derive(Clone)]
pub struct NixHttpPathInfoService {
    inner: Arc<Inner>,
}

struct Inner {
    source: Source,
    /// The cache URL (no `nix+`, no query, no trailing slash): names the
    /// cache in messages and in the narinfo cache.
    cache: String,
    keys: Vec<PublicKey>,
    blobs: Arc<dyn BlobService>,
    directories: Arc<dyn DirectoryService>,
    index: Arc<NarIndex>,
    inflight: Mutex<HashMap<[u8; DIGEST_LEN], SharedGet>>,
}

/// Where the cache's files come from.
enum Source {
    /// `http(s)://…`; `base` ends with `/`.
    Http { client: reqwest::Client, base: Url },
    /// A local directory.
    File { dir: PathBuf },
}

/// Why the narinfo is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trust {
    /// No keys configured: nothing to check.
    Unchecked,
    /// A valid signature by a trusted key.
    Signed,
    /// No trusted signature, but a content address that gives the store
    /// path; the content is checked against it once ingested.
    ContentAddressed,
}

impl std::fmt::Debug for NixHttpPathInfoService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NixHttpPathInfoService")
            .field("cache", &self.inner.cache)
            .field("trusted_public_keys", &self.inner.keys)
            .finish_non_exhaustive()
    }
}

/// An error and its sources, joined with `: ` (reqwest hides the cause in
/// the source chain).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let c_s = c.to_string();
        if !s.contains(&c_s) {
            s.push_str(": ");
            s.push_str(&c_s);
        }
        cur = c.source();
    }
    s
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The same kind of castore error with `context` in front.
fn with_context(e: Error, context: &str) -> Error {
    match e {
        Error::InvalidRequest(m) => Error::InvalidRequest(format!("{context}: {m}")),
        Error::NotFound(m) => Error::NotFound(format!("{context}: {m}")),
        Error::Unavailable(m) => Error::Unavailable(format!("{context}: {m}")),
        Error::Storage(m) => Error::Storage(format!("{context}: {m}")),
        e @ Error::DigestMismatch { .. } => Error::Storage(format!("{context}: {e}")),
    }
}

/// Checks a narinfo `URL` is a plain relative path inside the cache.
fn check_relative(rel: &str) -> Result<(), String> {
    if rel.is_empty()
        || rel.starts_with('/')
        || rel.contains("://")
        || rel.contains(['?', '#', '\\', '%'])
        || rel
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err(format!(
            "NAR URL {rel:?} is not a relative path inside the cache"
        ));
    }
    Ok(())
}

impl Source {
    /// The URL (or file path) of `rel`, for messages.
    fn locate(&self, rel: &str) -> String {
        match self {
            Source::Http { base, .. } => base
                .join(rel)
                .map(|u| u.to_string())
                .unwrap_or_else(|_| format!("{base}{rel}")),
            Source::File { dir } => dir.join(rel).display().to_string(),
        }
    }

    fn http_url(base: &Url, rel: &str) -> Result<Url, Error> {
        let url = base
            .join(rel)
            .map_err(|e| Error::Storage(format!("NAR URL {rel:?}: {e}")))?;
        // `check_relative` already keeps it inside; never leave the cache anyway.
        if !url.as_str().starts_with(base.as_str()) {
            return Err(Error::Storage(format!(
                "NAR URL {rel:?} leaves the cache {base}"
            )));
        }
        Ok(url)
    }

    /// The narinfo `<hash>.narinfo`, `None` if the cache does not have it.
    async fn narinfo(&self, hash: &str) -> Result<Option<Vec<u8>>, Error> {
        let rel = format!("{hash}.narinfo");
        let too_large = |what: &str| {
            Error::Storage(format!(
                "narinfo {what} is larger than {MAX_NARINFO_DOWNLOAD} bytes"
            ))
        };
        match self {
            Source::Http { client, base } => {
                let url = Self::http_url(base, &rel)?;
                let mut resp =
                    client.get(url.clone()).send().await.map_err(|e| {
                        Error::Unavailable(format!("fetching {url}: {}", chain(&e)))
                    })?;
                let status = resp.status();
                if status == reqwest::StatusCode::NOT_FOUND
                    || status == reqwest::StatusCode::FORBIDDEN
                {
                    return Ok(None);
                }
                if !status.is_success() {
                    return Err(Error::Unavailable(format!("fetching {url}: HTTP {status}")));
                }
                if resp
                    .content_length()
                    .is_some_and(|l| l > MAX_NARINFO_DOWNLOAD)
                {
                    return Err(too_large(url.as_str()));
                }
                let mut body = Vec::new();
                while let Some(chunk) = resp
                    .chunk()
                    .await
                    .map_err(|e| Error::Unavailable(format!("fetching {url}: {}", chain(&e))))?
                {
                    if (body.len() + chunk.len()) as u64 > MAX_NARINFO_DOWNLOAD {
                        return Err(too_large(url.as_str()));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(Some(body))
            }
            Source::File { dir } => {
                let path = dir.join(&rel);
                let file = match tokio::fs::File::open(&path).await {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => {
                        return Err(Error::Unavailable(format!(
                            "reading {}: {e}",
                            path.display()
                        )))
                    }
                };
                let mut body = Vec::new();
                file.take(MAX_NARINFO_DOWNLOAD + 1)
                    .read_to_end(&mut body)
                    .await
                    .map_err(|e| Error::Unavailable(format!("reading {}: {e}", path.display())))?;
                if body.len() as u64 > MAX_NARINFO_DOWNLOAD {
                    return Err(too_large(&path.display().to_string()));
                }
                Ok(Some(body))
            }
        }
    }

    /// Opens the (compressed) NAR file `rel`.
    async fn open_nar(
        &self,
        rel: &str,
        path: &str,
    ) -> Result<Box<dyn AsyncRead + Send + Unpin>, Error> {
        check_relative(rel).map_err(|e| Error::Storage(format!("{e} (narinfo of {path})")))?;
        match self {
            Source::Http { client, base } => {
                let url = Self::http_url(base, rel)?;
                let resp = client.get(url.clone()).send().await.map_err(|e| {
                    Error::Unavailable(format!("fetching {url} (NAR of {path}): {}", chain(&e)))
                })?;
                let status = resp.status();
                if matches!(status.as_u16(), 403 | 404 | 410) {
                    return Err(Error::Storage(format!(
                        "the binary cache has a narinfo for {path} but not its NAR {url} (HTTP {status})"
                    )));
                }
                if !status.is_success() {
                    return Err(Error::Unavailable(format!(
                        "fetching {url} (NAR of {path}): HTTP {status}"
                    )));
                }
                let stream = resp
                    .bytes_stream()
                    .map_err(|e| std::io::Error::other(chain(&e)));
                Ok(Box::new(tokio_util::io::StreamReader::new(stream)))
            }
            Source::File { dir } => {
                let file_path = dir.join(rel);
                if file_path.strip_prefix(dir).map_or(true, |p| {
                    p.components().any(|c| !matches!(c, Component::Normal(_)))
                }) {
                    return Err(Error::Storage(format!(
                        "NAR URL {rel:?} leaves the cache (narinfo of {path})"
                    )));
                }
                match tokio::fs::File::open(&file_path).await {
                    Ok(f) => Ok(Box::new(f)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        Err(Error::Storage(format!(
                            "the binary cache has a narinfo for {path} but not its NAR {}",
                            file_path.display()
                        )))
                    }
                    Err(e) => Err(Error::Unavailable(format!(
                        "reading {}: {e}",
                        file_path.display()
                    ))),
                }
            }
        }
    }
}

impl NixHttpPathInfoService {
    /// A service over the binary cache at `url` (`http://…`, `https://…`,
    /// `file:///abs/dir`, with or without a `nix+` prefix; a query is
    /// ignored). With `trusted_public_keys`, every path needs a valid
    /// signature by one of them or a verifiable content address. NARs go into
    /// `blobs` and `directories`; `index` remembers NARs and narinfo answers
    /// (its TTLs apply).
    pub fn new(
        url: &str,
        trusted_public_keys: Vec<PublicKey>,
        blobs: Arc<dyn BlobService>,
        directories: Arc<dyn DirectoryService>,
        index: Arc<NarIndex>,
    ) -> Result<Self, Error> {
        let bad = |why: String| Error::InvalidRequest(format!("binary cache URL {url:?}: {why}"));
        let plain = url.strip_prefix("nix+").unwrap_or(url);
        let plain = plain
            .split_once(['?', '#'])
            .map(|(a, _)| a)
            .unwrap_or(plain);
        let parsed = Url::parse(plain).map_err(|e| bad(e.to_string()))?;
        let (source, cache) = match parsed.scheme() {
            "http" | "https" => {
                if parsed.host_str().is_none_or(|h| h.is_empty()) {
                    return Err(bad("missing host".into()));
                }
                let cache = parsed.as_str().trim_end_matches('/').to_string();
                let base = Url::parse(&format!("{cache}/")).map_err(|e| bad(e.to_string()))?;
                let client = reqwest::Client::builder()
                    .user_agent(concat!("arca/", env!("CARGO_PKG_VERSION")))
                    .connect_timeout(CONNECT_TIMEOUT)
                    .read_timeout(READ_TIMEOUT)
                    .pool_max_idle_per_host(MAX_IDLE_PER_HOST)
                    .build()
                    .map_err(|e| bad(format!("building the HTTP client: {}", chain(&e))))?;
                (Source::Http { client, base }, cache)
            }
            "file" => {
                if parsed.host_str().is_some_and(|h| !h.is_empty()) {
                    return Err(bad("expected file:///absolute/path".into()));
                }
                let dir = parsed
                    .to_file_path()
                    .map_err(|_| bad("expected file:///absolute/path".into()))?;
                if !dir.is_absolute() || dir.parent().is_none() {
                    return Err(bad("expected file:///absolute/path".into()));
                }
                let cache = format!("file://{}", dir.display())
                    .trim_end_matches('/')
                    .to_string();
                (Source::File { dir }, cache)
            }
            other => {
                return Err(bad(format!(
                    "unsupported scheme {other:?} (expected http, https or file)"
                )))
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                source,
                cache,
                keys: trusted_public_keys,
                blobs,
                directories,
                index,
                inflight: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The cache's URL, as used in messages and narinfo-cache keys.
    pub fn cache_url(&self) -> &str {
        &self.inner.cache
    }

    /// The checked narinfo of the path with this digest (StorePath and
    /// signatures, as for `get`), without downloading its NAR: for walking a
    /// closure before the content arrives. Answers from the narinfo cache
    /// when fresh and records absence like `get`.
    pub async fn lookup(&self, digest: [u8; DIGEST_LEN]) -> Result<Option<NarInfo>, Error> {
        Ok(self
            .inner
            .lookup(digest, unix_now())
            .await?
            .map(|(narinfo, _, _)| narinfo))
    }

    /// The path info for a narinfo returned by [Self::lookup]: its NAR is
    /// downloaded, checked and ingested (unless the NAR index has it), and
    /// recorded like `get` does. The narinfo's trust is checked again.
    pub async fn fetch_narinfo(&self, narinfo: NarInfo) -> Result<PathInfo, Error> {
        let trust = self.inner.trust(&narinfo)?;
        self.inner.complete(narinfo, trust, false, unix_now()).await
    }

    /// The NAR index this service records into.
    pub fn nar_index(&self) -> &Arc<NarIndex> {
        &self.inner.index
    }
}

/// Removes a finished fetch from the in-flight map, even if it panicked.
struct InflightGuard {
    inner: Arc<Inner>,
    digest: [u8; DIGEST_LEN],
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.inner.inflight.lock().remove(&self.digest);
    }
}

impl Inner {
    /// Parses and checks a narinfo for `digest`: StorePath, then signatures
    /// or content address.
    fn check_narinfo(
        &self,
        digest: &[u8; DIGEST_LEN],
        raw: &[u8],
    ) -> Result<(NarInfo, Trust), Error> {
        let hash = nixbase32::encode(digest);
        let at = self.source.locate(&format!("{hash}.narinfo"));
        let narinfo = NarInfo::parse(raw)
            .map_err(|e| Error::Storage(format!("invalid narinfo {at}: {e}")))?;
        if narinfo.store_path().digest() != digest {
            return Err(Error::Storage(format!(
                "StorePath mismatch: {at} describes {}, not a path with hash {hash}",
                narinfo.store_path()
            )));
        }
        let trust = self.trust(&narinfo)?;
        Ok((narinfo, trust))
    }

    fn trust(&self, narinfo: &NarInfo) -> Result<Trust, Error> {
        if self.keys.is_empty() {
            return Ok(Trust::Unchecked);
        }
        if narinfo.verify(&self.keys) {
            return Ok(Trust::Signed);
        }
        let path = narinfo.store_path();
        let trusted = self
            .keys
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", ");
        let Some(ca) = narinfo.ca() else {
            let signers = narinfo
                .signatures()
                .iter()
                .map(|s| s.name())
                .collect::<Vec<_>>();
            let hint = if signers
                .iter()
                .any(|s| self.keys.iter().any(|k| k.name() == *s))
            {
                " (a signature under a trusted key's name does not verify: the narinfo was altered, or signed by another key of that name)"
            } else {
                ""
            };
            let signers = if signers.is_empty() {
                "none".to_string()
            } else {
                signers.join(", ")
            };
            return Err(Error::Storage(format!(
                "signature check failed for {path}: no valid signature by a trusted key ({trusted}); signed by: {signers}{hint}"
            )));
        };
        match ca.store_path(path.name(), narinfo.references()) {
            Some(Ok(p)) if p == *path => {}
            _ => {
                return Err(Error::Storage(format!(
                    "signature check failed for {path}: no valid signature by a trusted key ({trusted}), \
                     and its content address {ca} does not give this store path"
                )))
            }
        }
        match ca {
            ContentAddress::Fixed { recursive: true, hash } if hash.algo() == HashAlgo::Sha256 => {
                if hash.as_sha256() != Some(narinfo.nar_sha256()) {
                    return Err(Error::Storage(format!(
                        "content address mismatch for {path}: CA {ca} but NarHash {}",
                        narinfo.nar_hash()
                    )));
                }
                Ok(Trust::ContentAddressed)
            }
            ContentAddress::Text(_) => Ok(Trust::ContentAddressed),
            ContentAddress::Fixed { recursive: false, hash } if matches!(hash.algo(), HashAlgo::Sha256 | HashAlgo::Sha512) => {
                Ok(Trust::ContentAddressed)
            }
            _ => Err(Error::Storage(format!(
                "signature check failed for {path}: no valid signature by a trusted key ({trusted}), \
                 and its content address {ca} cannot be verified here"
            ))),
        }
    }

    /// Checks ingested content against a text or flat content address
    /// (recursive SHA-256 was checked against NarHash already).
    async fn verify_ca(&self, narinfo: &NarInfo, node: &Node) -> Result<(), Error> {
        let path = narinfo.store_path();
        let Some(ca) = narinfo.ca() else {
            return Ok(());
        };
        let (hash, text) = match ca {
            ContentAddress::Text(h) => (h, true),
            ContentAddress::Fixed {
                recursive: false,
                hash,
            } => (hash, false),
            ContentAddress::Fixed {
                recursive: true, ..
            } => return Ok(()),
        };
        let mismatch =
            |why: String| Error::Storage(format!("content address mismatch for {path}: {why}"));
        let Node::File {
            digest,
            size,
            executable,
        } = node
        else {
            return Err(mismatch(format!(
                "CA {ca} needs a single regular file, the NAR holds something else"
            )));
        };
        if text && *executable {
            return Err(mismatch(format!("CA {ca} needs a non-executable file")));
        }
        let mut reader = self
            .blobs
            .open_read(digest)
            .await
            .map_err(|e| with_context(e, &format!("reading {path} to check its content address")))?
            .ok_or_else(|| {
                Error::Storage(format!(
                    "blob {digest} of {path} vanished while checking its content address"
                ))
            })?;
        enum H {
            S256(Sha256),
            S512(Sha512),
        }
        let mut h = match hash.algo() {
            HashAlgo::Sha256 => H::S256(Sha256::new()),
            HashAlgo::Sha512 => H::S512(Sha512::new()),
            other => return Err(mismatch(format!("cannot check a {other} content address"))),
        };
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            let n = reader.read(&mut buf).await.map_err(|e| {
                with_context(
                    e.into(),
                    &format!("reading {path} to check its content address"),
                )
            })?;
            if n == 0 {
                break;
            }
            total += n as u64;
            let chunk = buf.get(..n).unwrap_or_default();
            match &mut h {
                H::S256(s) => s.update(chunk),
                H::S512(s) => s.update(chunk),
            }
        }
        if total != *size {
            return Err(Error::Storage(format!(
                "blob {digest} of {path} has {total} bytes, expected {size}"
            )));
        }
        let actual = match h {
            H::S256(s) => NixHash::new(HashAlgo::Sha256, &s.finalize()),
            H::S512(s) => NixHash::new(HashAlgo::Sha512, &s.finalize()),
        };
        if actual.as_ref() != Some(hash) {
            return Err(mismatch(format!(
                "CA {ca}, but the content has {}",
                actual.map(|a| a.to_string()).unwrap_or_default()
            )));
        }
        Ok(())
    }

    /// Whether castore still holds `node` (a directory's root, a file's blob).
    async fn present(&self, node: &Node) -> Result<bool, Error> {
        match node {
            Node::Directory { digest, .. } => Ok(self.directories.get(digest).await?.is_some()),
            Node::File { digest, .. } => self.blobs.has(digest).await,
            Node::Symlink { .. } => Ok(true),
        }
    }

    /// Downloads, decompresses, checks and ingests the NAR of `narinfo`;
    /// returns its root node. Records nothing.
    async fn download(&self, narinfo: &NarInfo) -> Result<Node, Error> {
        let path = narinfo.store_path().to_absolute_path();
        let at = self.source.locate(narinfo.url());
        let started = Instant::now();
        let raw = self.source.open_nar(narinfo.url(), &path).await?;
        let tap = RawTap::new(raw, narinfo.file_size());
        // Sized to the download: most NARs are small, and the buffer is
        // zeroed when allocated.
        let buffer = narinfo
            .file_size()
            .unwrap_or(narinfo.nar_size())
            .clamp(8 * 1024, READ_BUFFER as u64) as usize;
        let decoder = Decoder::new(narinfo.compression(), BufReader::with_capacity(buffer, tap));
        let mut nar = Limited::new(decoder, narinfo.nar_size());
        let expected = ExpectedNar {
            nar_size: Some(narinfo.nar_size()),
            nar_sha256: Some(narinfo.nar_sha256()),
        };
        let result =
            ingest_nar_expecting(&mut nar, self.blobs.clone(), &*self.directories, expected).await;

        let file_size_note = |count: u64| match narinfo.file_size() {
            Some(n) => format!("{count} bytes of FileSize {n} read"),
            None => format!("{count} bytes read"),
        };
        let node = match result {
            Ok((node, _, _)) => node,
            Err(e) => {
                let tap = nar.inner.get_ref().get_ref();
                return Err(match (&tap.failure, nar.exceeded, e) {
                    (Some(RawFailure::TooLong), _, _) => Error::Storage(format!(
                        "FileSize mismatch for {path}: {at} is longer than FileSize {}",
                        narinfo.file_size().unwrap_or_default()
                    )),
                    (Some(RawFailure::Read(why)), _, _) => {
                        Error::Unavailable(format!("reading {at} (NAR of {path}): {why}"))
                    }
                    (None, true, _) => Error::Storage(format!(
                        "NarSize mismatch for {path}: the NAR from {at} is longer than NarSize {}",
                        narinfo.nar_size()
                    )),
                    (None, false, IngestError::NarHashMismatch { expected, actual }) => Error::Storage(format!(
                        "NarHash mismatch for {path}: the narinfo says {}, the NAR from {at} has {}",
                        NixHash::sha256(expected),
                        NixHash::sha256(actual)
                    )),
                    (None, false, IngestError::NarSizeMismatch { expected, actual, at_least }) => {
                        Error::Storage(format!(
                            "NarSize mismatch for {path}: the narinfo says {expected}, the NAR from {at} has {}{actual} bytes",
                            if at_least { "at least " } else { "" }
                        ))
                    }
                    (None, false, IngestError::Nar(NarError::Truncated)) => Error::Storage(format!(
                        "truncated NAR for {path}: {at} ended early ({})",
                        file_size_note(tap.count)
                    )),
                    (None, false, IngestError::Nar(NarError::Io(io))) if narinfo.compression() != Compression::None => {
                        Error::Storage(format!(
                            "decompressing ({}) the NAR of {path} from {at} failed: {io}",
                            narinfo.compression()
                        ))
                    }
                    (None, false, IngestError::Nar(other)) => {
                        Error::Storage(format!("invalid NAR for {path} from {at}: {other}"))
                    }
                    (None, false, IngestError::Blob(e)) => with_context(e, &format!("storing the files of {path}")),
                    (None, false, IngestError::Directory(e)) => {
                        with_context(e, &format!("storing the directories of {path}"))
                    }
                    (None, false, other) => Error::Storage(format!("ingesting the NAR of {path}: {other}")),
                });
            }
        };

        // Read what follows the compressed stream (nothing, normally), so
        // FileSize and FileHash cover the whole file.
        let mut raw = nar.inner.into_inner();
        if narinfo.file_size().is_some() || narinfo.file_hash().is_some() {
            if narinfo.file_size().is_none() {
                let tap = raw.get_mut();
                tap.limit = Some(tap.count + MAX_TRAILING);
            }
            if let Err(e) = tokio::io::copy(&mut raw, &mut tokio::io::sink()).await {
                return Err(match &raw.get_ref().failure {
                    Some(RawFailure::TooLong) if narinfo.file_size().is_some() => Error::Storage(format!(
                        "FileSize mismatch for {path}: {at} is longer than FileSize {}",
                        narinfo.file_size().unwrap_or_default()
                    )),
                    Some(RawFailure::TooLong) => {
                        Error::Storage(format!("FileHash mismatch for {path}: {at} has more than {MAX_TRAILING} trailing bytes"))
                    }
                    _ => Error::Unavailable(format!("reading {at} (NAR of {path}): {e}")),
                });
            }
        }
        let (file_size, file_sha256) = raw.into_inner().finalize();
        if let Some(expected) = narinfo.file_size() {
            if expected != file_size {
                return Err(Error::Storage(format!(
                    "FileSize mismatch for {path}: the narinfo says {expected}, {at} has {file_size} bytes"
                )));
            }
        }
        if let Some(expected) = narinfo.file_hash() {
            let actual = NixHash::sha256(file_sha256);
            if *expected != actual {
                return Err(Error::Storage(format!(
                    "FileHash mismatch for {path}: the narinfo says {expected}, {at} has {actual}"
                )));
            }
        }
        tracing::info!(
            path,
            compression = %narinfo.compression(),
            file_size,
            nar_size = narinfo.nar_size(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "ingested NAR from binary cache"
        );
        Ok(node)
    }

    /// The whole get, run once per digest at a time.
    async fn fetch(&self, digest: [u8; DIGEST_LEN]) -> Result<Option<PathInfo>, Error> {
        let now = unix_now();
        let Some((narinfo, trust, from_cache)) = self.lookup(digest, now).await? else {
            return Ok(None);
        };
        self.complete(narinfo, trust, from_cache, now)
            .await
            .map(Some)
    }

    /// The checked narinfo of `digest` (from the narinfo cache when fresh),
    /// whether it came from the cache; `None` if the cache lacks the path.
    async fn lookup(
        &self,
        digest: [u8; DIGEST_LEN],
        now: u64,
    ) -> Result<Option<(NarInfo, Trust, bool)>, Error> {
        let hash = nixbase32::encode(&digest);
        let mut cached = None;
        match self.index.get_narinfo(&self.cache, &digest, now).await? {
            CachedNarInfo::Absent => {
                tracing::debug!("absent (cached answer)");
                return Ok(None);
            }
            CachedNarInfo::Present(text) => match self.check_narinfo(&digest, text.as_bytes()) {
                Ok(checked) => cached = Some(checked),
                // E.g. stored by a service trusting other keys: ask again.
                Err(e) => {
                    tracing::debug!(error = %e, "cached narinfo not accepted, fetching it again")
                }
            },
            CachedNarInfo::Missing => {}
        }
        if let Some((narinfo, trust)) = cached {
            return Ok(Some((narinfo, trust, true)));
        }
        let Some(raw) = self.source.narinfo(&hash).await? else {
            tracing::debug!("absent");
            self.index
                .put_narinfo(&self.cache, &digest, now, None)
                .await?;
            return Ok(None);
        };
        let (narinfo, trust) = self.check_narinfo(&digest, &raw)?;
        Ok(Some((narinfo, trust, false)))
    }

    /// Turns a checked narinfo into a path info: the NAR comes from the NAR
    /// index when castore still holds it, else it is downloaded and
    /// ingested; then the NAR and the narinfo are recorded.
    async fn complete(
        &self,
        narinfo: NarInfo,
        trust: Trust,
        from_cache: bool,
        now: u64,
    ) -> Result<PathInfo, Error> {
        let digest = *narinfo.store_path().digest();
        let path = narinfo.store_path();
        let nar_sha256 = narinfo.nar_sha256();

        let known = match self.index.get_nar(&nar_sha256).await? {
            Some((_, size)) if size != narinfo.nar_size() => {
                return Err(Error::Storage(format!(
                    "NarSize mismatch for {path}: the narinfo says {}, the NAR with its NarHash {} has {size} bytes",
                    narinfo.nar_size(),
                    narinfo.nar_hash()
                )));
            }
            Some((node, _)) if self.present(&node).await? => Some(node),
            _ => None,
        };
        let downloaded = known.is_none();
        let node = match known {
            Some(node) => {
                tracing::debug!(%path, "NAR already ingested (NAR index)");
                node
            }
            None => self.download(&narinfo).await?,
        };
        if trust == Trust::ContentAddressed {
            self.verify_ca(&narinfo, &node).await?;
        }
        if downloaded {
            self.index
                .put_nar(&nar_sha256, &node, narinfo.nar_size())
                .await?;
        }
        if !from_cache {
            self.index
                .put_narinfo(&self.cache, &digest, now, Some(&narinfo.to_string()))
                .await?;
        }
        Ok(PathInfo::from_narinfo(&narinfo, node))
    }
}

#[async_trait]
impl PathInfoService for NixHttpPathInfoService {
    #[tracing::instrument(skip(self), fields(cache = %self.inner.cache, digest = %nixbase32::encode(&digest)), level = "debug")]
    async fn get(&self, digest: [u8; DIGEST_LEN]) -> Result<Option<PathInfo>, Error> {
        let shared = {
            let mut inflight = self.inner.inflight.lock();
            match inflight.get(&digest) {
                Some(f) => f.clone(),
                None => {
                    let guard = InflightGuard {
                        inner: self.inner.clone(),
                        digest,
                    };
                    let task = tokio::spawn(
                        async move {
                            let result = guard.inner.fetch(guard.digest).await;
                            drop(guard);
                            result
                        }
                        .instrument(tracing::Span::current()),
                    );
                    let f: SharedGet = async move {
                        task.await.map_err(|e| {
                            Error::Storage(format!("binary cache fetch task failed: {e}"))
                        })?
                    }
                    .boxed()
                    .shared();
                    inflight.insert(digest, f.clone());
                    f
                }
            }
        };
        shared.await
    }

    async fn put(&self, info: PathInfo) -> Result<PathInfo, Error> {
        Err(Error::InvalidRequest(format!(
            "cannot store {}: {} is a read-only binary cache",
            info.store_path, self.inner.cache
        )))
    }

    fn list(&self) -> BoxStream<'_, Result<PathInfo, Error>> {
        let msg = format!(
            "{} is a Nix binary cache: binary caches cannot be listed",
            self.inner.cache
        );
        futures::stream::once(async move { Err(Error::InvalidRequest(msg)) }).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arca_castore::blobservice::MemoryBlobService;
    use arca_castore::directoryservice::MemoryDirectoryService;

    fn service(url: &str, keys: Vec<PublicKey>) -> Result<NixHttpPathInfoService, Error> {
        NixHttpPathInfoService::new(
            url,
            keys,
            Arc::new(MemoryBlobService::default()),
            Arc::new(MemoryDirectoryService::default()),
            Arc::new(NarIndex::temporary().unwrap()),
        )
    }

    #[test]
    fn relative_nar_urls_only() {
        for ok in ["nar/abc.nar.xz", "abc.nar", "a/b/c.nar.zst"] {
            check_relative(ok).unwrap();
        }
        for bad in [
            "",
            "/nar/x",
            "http://evil/x",
            "../x",
            "nar/../../x",
            "nar//x",
            "./x",
            "nar/x?y",
            "nar/x#y",
            "a\\b",
            "nar/%2e%2e/x",
        ] {
            assert!(check_relative(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn urls() {
        let s = service("nix+http://127.0.0.1:1/sub/path/", vec![]).unwrap();
        assert_eq!(s.cache_url(), "http://127.0.0.1:1/sub/path");
        let s = service("https://cache.example.org?trusted-public-keys=x", vec![]).unwrap();
        assert_eq!(s.cache_url(), "https://cache.example.org");
        let s = service("nix+file:///var/cache/x", vec![]).unwrap();
        assert_eq!(s.cache_url(), "file:///var/cache/x");
        for bad in ["ftp://x", "nix+file://host/x", "file:///", "not a url"] {
            let e = service(bad, vec![]).unwrap_err();
            assert!(matches!(e, Error::InvalidRequest(_)), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn read_only_and_not_listable() {
        let s = service("nix+http://127.0.0.1:1", vec![]).unwrap();
        let e = s.list().next().await.unwrap().unwrap_err();
        assert!(e.to_string().contains("cannot be listed"), "{e}");
        let info = PathInfo {
            store_path: crate::StorePath::from_basename("00000000000000000000000000000000-x")
                .unwrap(),
            node: Node::Symlink {
                target: arca_castore::SymlinkTarget::try_from(bytes::Bytes::from_static(b"/x"))
                    .unwrap(),
            },
            references: vec![],
            nar_size: 1,
            nar_sha256: [0; 32],
            signatures: vec![],
            deriver: None,
            ca: None,
        };
        let e = s.put(info).await.unwrap_err();
        assert!(
            matches!(&e, Error::InvalidRequest(m) if m.contains("read-only binary cache")),
            "{e}"
        );
    }

    #[tokio::test]
    async fn unreachable_cache_is_unavailable_and_names_the_url() {
        // Port 1 on loopback: connection refused.
        let s = service("nix+http://127.0.0.1:1/c", vec![]).unwrap();
        let e = s.get([1; DIGEST_LEN]).await.unwrap_err();
        assert!(
            matches!(&e, Error::Unavailable(m) if m.contains("http://127.0.0.1:1/c/")),
            "{e}"
        );
        // Nothing was cached negatively.
        assert_eq!(
            s.nar_index()
                .get_narinfo(s.cache_url(), &[1; DIGEST_LEN], unix_now())
                .await
                .unwrap(),
            CachedNarInfo::Missing
        );
    }
}
