//! The Nix binary cache over HTTP: what `arca serve-cache` and
//! `arca daemon --http-listen` serve, for real `nix` clients (substituters,
//! `nix copy --from http://…` and `nix copy --to http://…`).
//!
//! [router] builds an axum [Router] over a store's services ([CacheServices]:
//! blobs, directories, path infos, the [NarIndex]) with [HttpCacheOptions]
//! (priority, signing key, NAR compression, uploads); [serve] runs it on a
//! TCP listener until a shutdown future completes.
//!
//! URL layout (relative to the cache's root):
//!
//! | request | answer |
//! |---|---|
//! | `GET`/`HEAD /nix-cache-info` | `StoreDir: /nix/store`, `WantMassQuery: 1`, `Priority: N` (`text/x-nix-cache-info`) |
//! | `PUT /nix-cache-info` | accepted and ignored (204) |
//! | `GET`/`HEAD /<hash>.narinfo` | the narinfo generated from the path info (`text/x-nix-narinfo`), signed on the fly; 404 if absent |
//! | `PUT /<hash>.narinfo` | checked against the NAR uploaded to its `URL`, then stored as a path info (204) |
//! | `GET`/`HEAD /nar/<nixbase32 sha256>.nar[.zst\|.xz\|.bz2\|.gz\|.br]` | the NAR, rendered from castore as it streams, compressed on the fly; `.nar` supports `Range` |
//! | `PUT /nar/<nixbase32 sha256>.nar[.xz\|.zst\|.bz2\|.gz\|.br]` | a NAR file, decompressed and ingested as it streams (204) |
//! | `PUT /<hash>.ls` | NAR listings (`write-nar-listing=true`): accepted and discarded |
//! | `POST /_arca/narinfos` | batch lookup: hash parts in, `{"<hash>": "<narinfo>" \| null}` out |
//!
//! Served narinfos carry `URL: nar/<nixbase32 NarHash>.nar.zst` and
//! `Compression: zstd` (or `.nar` and `none`, [HttpCacheOptions::nar_compression]),
//! no FileHash/FileSize (the file is compressed on the fly). A NAR is found
//! by its NarHash: in memory (every narinfo served records its NarHash → root
//! node), then in the [NarIndex] (where narinfo serving also records it, so
//! that other replicas sharing the index find it), then under the upload
//! records (a NAR file requested under the URL it was uploaded to).
//!
//! Every bad request gets a 4xx with a plain-text message naming the
//! problem, and stores nothing (but blobs and directories a failed NAR upload
//! already stored: they are content-addressed and unreferenced).
mod nar;
mod narinfo;
mod upload;

use crate::nar_index::NarIndex;
use crate::narinfo::Compression;
use crate::pathinfoservice::{CheckedPathInfoService, PathInfoService};
use crate::signature::SecretKey;
use crate::store_path::DIGEST_LEN;
use arca_castore::{BlobService, DirectoryService, Node};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
pub use axum::Router;
use bytes::Bytes;
use futures::StreamExt;
use lru::LruCache;
use parking_lot::Mutex;
use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::Arc;

/// `Content-Type` of `/nix-cache-info`.
pub const CACHE_INFO_TYPE: &str = "text/x-nix-cache-info";
/// `Content-Type` of narinfos.
pub const NARINFO_TYPE: &str = "text/x-nix-narinfo";
/// `Content-Type` of NAR files (compressed or not).
pub const NAR_TYPE: &str = "application/x-nix-nar";
/// `Cache-Control` of NAR files: a NAR URL names its content.
pub const NAR_CACHE_CONTROL: &str = "public, max-age=31536000, immutable";
/// `Cache-Control` of narinfos (they may gain signatures).
pub const NARINFO_CACHE_CONTROL: &str = "public, max-age=300";
/// `Cache-Control` of errors and absent paths.
pub const NO_CACHE: &str = "no-cache";
/// Most hash parts in one batch lookup.
pub const MAX_BATCH: usize = 5000;
/// Largest batch lookup body.
pub const MAX_BATCH_BODY: usize = 512 * 1024;
/// Unread request body read and discarded before an error answer (so a
/// client still sending gets to read the answer rather than a reset).
const DRAIN_LIMIT: u64 = 1024 * 1024;
/// Longest wait for draining an unread request body.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The services the cache serves from and stores into.
#[derive(Clone)]
pub struct CacheServices {
    /// The store's blobs.
    pub blobs: Arc<dyn BlobService>,
    /// The store's directories.
    pub directories: Arc<dyn DirectoryService>,
    /// The store's path infos. Reads go here directly; uploads go through a
    /// [CheckedPathInfoService] in front of it (so put any signing layer
    /// here, below the check).
    pub path_info: Arc<dyn PathInfoService>,
    /// The NAR index (NarHash → root node, upload records).
    pub nar_index: Arc<NarIndex>,
}

/// How the cache behaves.
#[derive(Clone)]
pub struct HttpCacheOptions {
    /// `Priority` in `/nix-cache-info` (lower is preferred by Nix).
    pub priority: u32,
    /// Signs every narinfo served (signatures already there are kept).
    pub signing_key: Option<SecretKey>,
    /// The compression served narinfos name (`zstd` or `none`; any NAR can
    /// still be fetched with any supported extension).
    pub nar_compression: Compression,
    /// zstd level for on-the-fly compression.
    pub zstd_level: i32,
    /// Whether PUT uploads are accepted.
    pub uploads: bool,
    /// Signed narinfos kept in memory (0: none; each is re-rendered and re-signed per request).
    pub narinfo_cache_capacity: usize,
}

impl Default for HttpCacheOptions {
    fn default() -> Self {
        Self {
            priority: 30,
            signing_key: None,
            nar_compression: Compression::Zstd,
            zstd_level: 1,
            uploads: true,
            narinfo_cache_capacity: 16384,
        }
    }
}

impl std::fmt::Debug for HttpCacheOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpCacheOptions")
            .field("priority", &self.priority)
            .field(
                "signing_key",
                &self.signing_key.as_ref().map(SecretKey::name),
            )
            .field("nar_compression", &self.nar_compression)
            .field("zstd_level", &self.zstd_level)
            .field("uploads", &self.uploads)
            .finish_non_exhaustive()
    }
}

/// NarHash → (root node, NarSize) remembered in memory.
const NAR_MEMORY: usize = 65536;

/// Store-path digest → the path info a narinfo was rendered from, and the text.
type NarinfoLru = LruCache<[u8; DIGEST_LEN], (crate::PathInfo, Bytes)>;

pub(crate) struct Inner {
    blobs: Arc<dyn BlobService>,
    directories: Arc<dyn DirectoryService>,
    path_info: Arc<dyn PathInfoService>,
    /// Where uploaded path infos go: checked (closure, references).
    checked: CheckedPathInfoService,
    index: Arc<NarIndex>,
    options: HttpCacheOptions,
    cache_info: Bytes,
    /// Store-path digest → the path info a narinfo was rendered from, and the text.
    narinfos: Option<Mutex<NarinfoLru>>,
    /// NarHash → (root node, NarSize).
    nars: Mutex<LruCache<[u8; 32], (Node, u64)>>,
}

/// An error answer: a status and a plain-text message.
#[derive(Debug)]
pub(crate) struct HttpError {
    status: StatusCode,
    message: String,
}

impl HttpError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
}

impl From<arca_castore::Error> for HttpError {
    fn from(e: arca_castore::Error) -> Self {
        use arca_castore::Error as E;
        match e {
            E::InvalidRequest(m) => Self::new(StatusCode::BAD_REQUEST, m),
            E::NotFound(m) => Self::new(StatusCode::NOT_FOUND, m),
            E::Unavailable(m) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("backend unavailable: {m}"),
            ),
            E::Storage(m) => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("storage error: {m}"),
            ),
            e @ E::DigestMismatch { .. } => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, "{}", self.message);
        } else {
            tracing::debug!(status = %self.status, "{}", self.message);
        }
        let mut text = self.message;
        text.push('\n');
        let mut r = (self.status, text).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static(NO_CACHE));
        r
    }
}

pub(crate) type Answer = Result<Response, HttpError>;

/// A response with a body, a content type and a cache policy.
pub(crate) fn answer(
    status: StatusCode,
    content_type: &'static str,
    cache_control: &'static str,
    body: Body,
) -> Response {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(cache_control),
    );
    r
}

/// 204 No Content (what uploads answer).
pub(crate) fn no_content() -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

fn method_not_allowed(method: &Method, path: &str, allow: &'static str) -> Response {
    let mut r = HttpError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {path} (allowed: {allow})"),
    )
    .into_response();
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

/// The router of the binary cache over `services` (see the [module docs](self)).
pub fn router(services: CacheServices, options: HttpCacheOptions) -> Router {
    let cache_info = Bytes::from(format!(
        "StoreDir: {}\nWantMassQuery: 1\nPriority: {}\n",
        crate::STORE_DIR,
        options.priority
    ));
    let inner = Inner {
        checked: CheckedPathInfoService::new(
            services.path_info.clone(),
            services.blobs.clone(),
            services.directories.clone(),
        ),
        blobs: services.blobs,
        directories: services.directories,
        path_info: services.path_info,
        index: services.nar_index,
        narinfos: NonZeroUsize::new(options.narinfo_cache_capacity)
            .map(|n| Mutex::new(LruCache::new(n))),
        options,
        cache_info,
        nars: Mutex::new(LruCache::new(
            NonZeroUsize::new(NAR_MEMORY).unwrap_or(NonZeroUsize::MIN),
        )),
    };
    Router::new().fallback(dispatch).with_state(Arc::new(inner))
}

/// Serves `router` on `listener` (TCP_NODELAY on every connection) until
/// `shutdown` completes; then stops accepting and lets running requests
/// finish.
pub async fn serve<F>(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: F,
) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("setting TCP_NODELAY: {e}");
        }
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// A request's headers, and its body until a handler takes it.
pub(crate) struct Req {
    pub(crate) headers: HeaderMap,
    body: Option<Body>,
}

impl Req {
    /// The body (empty if taken already).
    pub(crate) fn take_body(&mut self) -> Body {
        self.body.take().unwrap_or_else(Body::empty)
    }

    /// The declared `Content-Length`.
    pub(crate) fn content_length(&self) -> Option<u64> {
        self.headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    }
}

/// Reads and discards up to `limit` bytes of `body` (at most [DRAIN_TIMEOUT]).
pub(crate) async fn drain(body: Body, limit: u64) {
    let mut stream = body.into_data_stream();
    let mut read = 0u64;
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while let Some(Ok(chunk)) = stream.next().await {
            read += chunk.len() as u64;
            if read > limit {
                break;
            }
        }
    })
    .await;
}

async fn dispatch(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let method = parts.method;
    let path = parts.uri.path().to_string();
    let started = std::time::Instant::now();
    let mut req = Req {
        headers: parts.headers,
        body: Some(body),
    };
    let response = match route(&inner, &method, &path, &mut req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    // Refused before the body was read: read it (if small) so the client,
    // still sending, reads the answer instead of a reset. Not when the client
    // waits for `100 Continue`: it sends no body then.
    if let Some(body) = req.body.take() {
        let expects_continue = req
            .headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if !expects_continue && req.content_length().is_none_or(|n| n <= DRAIN_LIMIT) {
            drain(body, DRAIN_LIMIT).await;
        }
    }
    tracing::debug!(%method, path, status = response.status().as_u16(), us = started.elapsed().as_micros() as u64, "request");
    response
}

async fn route(inner: &Arc<Inner>, method: &Method, path: &str, req: &mut Req) -> Answer {
    let is_read = *method == Method::GET || *method == Method::HEAD;
    if path == "/nix-cache-info" {
        return match *method {
            Method::GET | Method::HEAD => Ok(answer(
                StatusCode::OK,
                CACHE_INFO_TYPE,
                NARINFO_CACHE_CONTROL,
                Body::from(inner.cache_info.clone()),
            )),
            Method::PUT => upload::put_cache_info(inner, req).await,
            _ => Ok(method_not_allowed(method, path, "GET, HEAD, PUT")),
        };
    }
    if path == "/_arca/narinfos" {
        return match *method {
            Method::POST => narinfo::batch(inner, req).await,
            _ => Ok(method_not_allowed(method, path, "POST")),
        };
    }
    if let Some(file) = path.strip_prefix("/nar/") {
        return match *method {
            Method::GET | Method::HEAD => nar::get(inner, method, file, &req.headers).await,
            Method::PUT => upload::put_nar(inner, file, req).await,
            _ => Ok(method_not_allowed(method, path, "GET, HEAD, PUT")),
        };
    }
    let Some(name) = path.strip_prefix('/').filter(|n| !n.contains('/')) else {
        return Err(HttpError::not_found(format!(
            "{path}: no such file in this binary cache"
        )));
    };
    if let Some(hash) = name.strip_suffix(".narinfo") {
        return match *method {
            Method::GET | Method::HEAD => narinfo::get(inner, hash).await,
            Method::PUT => upload::put_narinfo(inner, hash, req).await,
            _ => Ok(method_not_allowed(method, path, "GET, HEAD, PUT")),
        };
    }
    if let Some(hash) = name.strip_suffix(".ls") {
        return match *method {
            Method::PUT => upload::put_listing(inner, hash, req).await,
            _ if is_read => Err(HttpError::not_found(format!(
                "{path}: NAR listings are not served"
            ))),
            _ => Ok(method_not_allowed(method, path, "PUT")),
        };
    }
    Err(HttpError::not_found(format!(
        "{path}: no such file in this binary cache"
    )))
}

/// The 20-byte digest of a `<hash>` of a URL (32 nixbase32 characters).
pub(crate) fn parse_hash_part(hash: &str, what: &str) -> Result<[u8; DIGEST_LEN], HttpError> {
    if hash.len() != crate::store_path::ENCODED_DIGEST_LEN {
        return Err(HttpError::bad_request(format!(
            "malformed {what} {hash:?}: expected a store path hash of 32 nixbase32 characters"
        )));
    }
    crate::nixbase32::decode_fixed::<DIGEST_LEN>(hash)
        .map_err(|e| HttpError::bad_request(format!("malformed {what} {hash:?}: {e}")))
}

/// A NAR file's name: `<nixbase32 sha256>.nar<ext>`.
#[derive(Debug, Clone)]
pub(crate) struct NarFile {
    /// The SHA-256 the name gives (NarHash for served NARs, the file's
    /// hash for uploads by Nix).
    pub(crate) hash: [u8; 32],
    /// The compression the extension names.
    pub(crate) compression: Compression,
    /// `nar/<name>`, as narinfo `URL`s write it.
    pub(crate) url_path: String,
}

/// Parses the part after `/nar/`.
pub(crate) fn parse_nar_file(file: &str) -> Result<NarFile, HttpError> {
    let bad =
        |why: &str| HttpError::bad_request(format!("malformed NAR file name {file:?}: {why}"));
    let Some((hash, rest)) = file.split_once('.') else {
        return Err(bad(
            "expected <nixbase32 sha256>.nar[.xz|.zst|.bz2|.gz|.br]",
        ));
    };
    let Some(ext) = rest.strip_prefix("nar") else {
        return Err(bad(
            "expected <nixbase32 sha256>.nar[.xz|.zst|.bz2|.gz|.br]",
        ));
    };
    if !ext.is_empty() && !ext.starts_with('.') {
        return Err(bad(
            "expected <nixbase32 sha256>.nar[.xz|.zst|.bz2|.gz|.br]",
        ));
    }
    if hash.len() != 52 {
        return Err(bad(
            "the hash must be a SHA-256 in nixbase32 (52 characters)",
        ));
    }
    let hash = crate::nixbase32::decode_fixed::<32>(hash).map_err(|e| bad(&e.to_string()))?;
    let compression = crate::compression::from_nar_extension(ext).ok_or_else(|| {
        HttpError::bad_request(format!(
            "unknown compression {ext:?} in NAR file name {file:?} (supported: none (.nar), .xz, .zst, .bz2, .gz, .br)"
        ))
    })?;
    Ok(NarFile {
        hash,
        compression,
        url_path: format!("nar/{file}"),
    })
}

impl Inner {
    /// Remembers NarHash → root node in memory, and in the NAR index if it
    /// does not have it yet (unflushed: it can be derived again), so that a
    /// NAR named by a served narinfo can be found by any replica.
    async fn remember_nar(&self, nar_sha256: [u8; 32], node: &Node, nar_size: u64) {
        {
            let mut nars = self.nars.lock();
            if nars
                .get(&nar_sha256)
                .is_some_and(|(n, s)| n == node && *s == nar_size)
            {
                return;
            }
            nars.put(nar_sha256, (node.clone(), nar_size));
        }
        let known = match self.index.get_nar_to_serve(&nar_sha256).await {
            Ok(Some((n, s))) => n == *node && s == nar_size,
            Ok(None) => false,
            Err(e) => {
                tracing::warn!("reading the NAR index: {e}");
                false
            }
        };
        if !known {
            if let Err(e) = self.index.record_nar(&nar_sha256, node, nar_size).await {
                tracing::warn!("recording a NAR in the NAR index: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nar_file_names() {
        let h = "1".repeat(52);
        let f = parse_nar_file(&format!("{h}.nar.xz")).unwrap();
        assert_eq!(f.compression, Compression::Xz);
        assert_eq!(f.url_path, format!("nar/{h}.nar.xz"));
        assert_eq!(
            parse_nar_file(&format!("{h}.nar")).unwrap().compression,
            Compression::None
        );
        assert_eq!(
            parse_nar_file(&format!("{h}.nar.zst")).unwrap().compression,
            Compression::Zstd
        );
        for bad in [
            h.clone(),
            format!("{h}.tar"),
            format!("{h}.narx"),
            format!("{}.nar", "1".repeat(51)),
            format!("{}.nar", "e".repeat(52)),
            format!("{h}.nar.lz4"),
            "../x.nar".to_string(),
            String::new(),
        ] {
            let e = parse_nar_file(&bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
        }
        assert!(parse_nar_file(&format!("{h}.nar.lz4"))
            .unwrap_err()
            .message
            .contains("unknown compression"));
    }

    #[test]
    fn hash_parts() {
        assert!(parse_hash_part(&"0".repeat(32), "x").is_ok());
        for bad in ["", "abc", &"e".repeat(32), &"0".repeat(33)] {
            assert_eq!(
                parse_hash_part(bad, "x").unwrap_err().status,
                StatusCode::BAD_REQUEST
            );
        }
    }
}
