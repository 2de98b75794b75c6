//! Service stacks from URLs or a TOML composition file (see `cli.md`).
//!
//! A URL describes one service, and layers nest URLs in their query:
//! `cache://?near=memory://&far=grpc+http://127.0.0.1:8000`. A TOML file
//! names entries in `[blobservices.*]` and `[directoryservices.*]` that
//! refer to each other by name; `default` is the entry point. Unknown names
//! and reference cycles are refused before anything is built.
use crate::blobservice::{
    BlobService, CacheBlobService, ChunkingParams, Codec, GrpcBlobService, LocalChunking,
    LocalCompression, LocalFilesOptions, MemoryBlobService, ObjectStoreBlobService,
};
use crate::directoryservice::{
    CacheDirectoryService, DirectoryService, GrpcDirectoryService, LruDirectoryService,
    MemoryDirectoryService, ObjectStoreDirectoryService, SledDirectoryService,
};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use url::Url;

/// Which kind of service an entry describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceKind {
    /// Blobs.
    Blob,
    /// Directories.
    Directory,
    /// Path infos (built by `arca-store`; parsed and checked here so one
    /// file describes the whole store).
    PathInfo,
}

impl ServiceKind {
    /// The TOML section holding entries of this kind.
    pub fn section(self) -> &'static str {
        match self {
            ServiceKind::Blob => "blobservices",
            ServiceKind::Directory => "directoryservices",
            ServiceKind::PathInfo => "pathinfoservices",
        }
    }
    fn noun(self) -> &'static str {
        match self {
            ServiceKind::Blob => "blob",
            ServiceKind::Directory => "directory",
            ServiceKind::PathInfo => "path-info",
        }
    }
}

/// A configuration problem, with the offending URL or names in the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompositionError {
    /// A URL that cannot be used.
    #[error("invalid service URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A TOML entry that cannot be used.
    #[error("{section}.{name}: {reason}")]
    InvalidEntry {
        /// `blobservices` or `directoryservices`.
        section: String,
        /// The entry's name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A reference to a name that has no entry.
    #[error("{section}.{from} refers to unknown entry {name:?}")]
    UnknownName {
        /// Section of both entries.
        section: String,
        /// The entry holding the reference.
        from: String,
        /// The missing name.
        name: String,
    },
    /// Entries referring to each other in a loop.
    #[error("reference cycle in {section}: {}", cycle.join(" -> "))]
    Cycle {
        /// Section of the entries.
        section: String,
        /// The names along the loop, first repeated at the end.
        cycle: Vec<String>,
    },
    /// The TOML file itself is malformed.
    #[error("composition file: {0}")]
    Toml(String),
    /// Building a service failed (e.g. a database could not be opened).
    #[error("building {0}")]
    Build(String),
}

/// A reference from a layer to another service: inline or by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceRef {
    /// A nested configuration (from a URL).
    Inline(Box<ServiceConfig>),
    /// An entry of the same section of a composition file.
    Named(String),
}

/// One service's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceConfig {
    /// `memory://`
    Memory,
    /// `sled:///abs/path`, or `sled://` for a temporary database.
    Sled {
        /// Database directory; `None` for a temporary one.
        path: Option<PathBuf>,
    },
    /// `objectstore+<object_store URL>`; query pairs are object_store options,
    /// except `compression=inline|background` and `chunking=inline|background`
    /// (blob services on `objectstore+file://` only; see [LocalCompression],
    /// [LocalChunking]) and `codec=lz4|zstd` (blob services; see [Codec]).
    ObjectStore {
        /// The object_store URL (`file:///…`, `memory:///`, `s3://bucket/prefix`).
        url: Url,
        /// Options such as `endpoint`, `region`, `access_key_id`, `allow_http`.
        options: Vec<(String, String)>,
    },
    /// `grpc+http://host:port`, `grpc+https://…`, `grpc+unix:///abs/socket`.
    Grpc {
        /// The URL as given.
        url: Url,
    },
    /// `cache://?near=URL&far=URL`
    Cache {
        /// The fast, local layer.
        near: ServiceRef,
        /// The authoritative layer.
        far: ServiceRef,
    },
    /// `lru://?capacity=N[&inner=URL]`
    Lru {
        /// Most directories kept.
        capacity: NonZeroUsize,
        /// Where misses are read from and writes go to.
        inner: Option<ServiceRef>,
    },
    /// `nix+http://host[:port][/sub/path]`, `nix+https://…`, `nix+file:///abs/dir`,
    /// each with an optional `?trusted-public-keys=name:key%20name2:key2`:
    /// fetch-through from a Nix binary cache (path-info services only; built
    /// by `arca-store`).
    NixBinaryCache {
        /// The cache's own URL: the given one without `nix+` and without the
        /// query (`http://…`, `https://…` or `file:///…`).
        url: Url,
        /// The trusted public keys as written (`name:base64`); their
        /// encoding is checked by `arca-store`, which knows the key format.
        trusted_public_keys: Vec<String>,
    },
}

/// Splits a `trusted-public-keys` value (space-separated, as Nix writes it)
/// and checks each key has the `name:key` shape.
fn split_keys(value: &str) -> Result<Vec<String>, String> {
    value
        .split_whitespace()
        .map(|k| match k.split_once(':') {
            Some((name, key)) if !name.is_empty() && !key.is_empty() => Ok(k.to_string()),
            _ => Err(format!(
                "trusted public key {k:?} is not of the form name:base64key"
            )),
        })
        .collect()
}

/// Parses `nix+http(s)://…` / `nix+file:///…` (see [ServiceConfig::NixBinaryCache]).
fn nix_cache_from_url(
    s: &str,
    outer: &Url,
    pairs: Vec<(String, String)>,
) -> Result<ServiceConfig, String> {
    if matches!(outer.scheme(), "nix+http" | "nix+https")
        && outer.host_str().is_none_or(|h| h.is_empty())
    {
        return Err(format!(
            "missing host: expected {}://host[:port][/path]",
            outer.scheme()
        ));
    }
    let inner = s.strip_prefix("nix+").ok_or("expected a nix+ URL")?;
    let inner = inner.split_once('?').map(|(a, _)| a).unwrap_or(inner);
    let inner = inner.split_once('#').map(|(a, _)| a).unwrap_or(inner);
    let url = Url::parse(inner).map_err(|e| format!("{inner}: {e}"))?;
    match url.scheme() {
        "http" | "https" => {
            if url.host_str().is_none_or(|h| h.is_empty()) {
                return Err(format!(
                    "missing host: expected nix+{}://host[:port][/path]",
                    url.scheme()
                ));
            }
            if !url.username().is_empty() || url.password().is_some() {
                return Err("credentials in the URL are not supported".into());
            }
        }
        "file" => {
            if !s.starts_with("nix+file:///") || url.host_str().is_some_and(|h| !h.is_empty()) {
                return Err("expected nix+file:///absolute/path (three slashes)".into());
            }
            if url.path().len() <= 1 {
                return Err("expected nix+file:///absolute/path, not the root directory".into());
            }
        }
        other => {
            return Err(format!(
                "unknown scheme nix+{other} (expected nix+http, nix+https, nix+file)"
            ))
        }
    }
    let mut trusted_public_keys = Vec::new();
    for (k, v) in pairs {
        match k.as_str() {
            "trusted-public-keys" => trusted_public_keys.extend(split_keys(&v)?),
            other => {
                return Err(format!(
                    "unknown parameter {other:?} (expected trusted-public-keys)"
                ))
            }
        }
    }
    Ok(ServiceConfig::NixBinaryCache {
        url,
        trusted_public_keys,
    })
}

/// Splits a raw query into decoded pairs. Unlike form decoding, `+` stays a
/// plus (nested URLs such as `grpc+http://…` need it).
fn query_pairs(url: &Url) -> Result<Vec<(String, String)>, String> {
    let Some(q) = url.query() else {
        return Ok(vec![]);
    };
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("query part {pair:?} has no '='"))?;
            let dec = |s: &str| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8()
                    .map(|c| c.into_owned())
                    .map_err(|_| format!("query part {pair:?} is not valid UTF-8 after decoding"))
            };
            Ok((dec(k)?, dec(v)?))
        })
        .collect()
}

/// The `compression` pair of an `objectstore+file://` blob service: how new
/// chunks get compressed (default: in the background).
pub fn local_compression(options: &[(String, String)]) -> Result<LocalCompression, String> {
    match options.iter().rev().find(|(k, _)| k == "compression") {
        None => Ok(LocalCompression::default()),
        Some((_, v)) => v.parse(),
    }
}

/// The options of an `objectstore+file://` blob service from its
/// `compression` and `chunking` pairs. `chunking` defaults to `background`
/// with background compression and is `inline` with inline compression
/// (asking for background chunking with inline compression is an error).
pub fn local_files_options(options: &[(String, String)]) -> Result<LocalFilesOptions, String> {
    let compression = local_compression(options)?;
    let chunking = match options.iter().rev().find(|(k, _)| k == "chunking") {
        Some((_, v)) => v.parse()?,
        None if compression == LocalCompression::Inline => LocalChunking::Inline,
        None => LocalChunking::default(),
    };
    if compression == LocalCompression::Inline && chunking == LocalChunking::Background {
        return Err(
            "chunking=background needs compression=background (the compactor chunks)".into(),
        );
    }
    Ok(LocalFilesOptions {
        compression,
        chunking,
        ..LocalFilesOptions::default()
    })
}

/// The query pair choosing how an object-store blob service compresses
/// chunks (`lz4`, the default, or `zstd`), on any object store.
const CODEC_KEY: &str = "codec";

/// The `codec` pair of an `objectstore+…` blob service (see [Codec]).
pub fn blob_codec(options: &[(String, String)]) -> Result<Codec, String> {
    match options.iter().rev().find(|(k, _)| k == CODEC_KEY) {
        None => Ok(Codec::default()),
        Some((_, v)) => v.parse(),
    }
}

/// The query pairs that are `object_store`'s own options (Arca's `codec`
/// left out).
fn object_store_options(options: &[(String, String)]) -> Vec<(String, String)> {
    options
        .iter()
        .filter(|(k, _)| k != CODEC_KEY)
        .cloned()
        .collect()
}

/// `objectstore+file://` takes three query pairs, `compression`,
/// `chunking` and `codec`, and only for blob services; other object stores
/// compress and chunk inline and take `codec` (blob services only) besides
/// `object_store`'s own options.
fn check_compression_option(
    kind: ServiceKind,
    scheme: &str,
    pairs: &[(String, String)],
) -> Result<(), String> {
    const LOCAL_KEYS: [&str; 2] = ["compression", "chunking"];
    if pairs.iter().any(|(k, _)| k == CODEC_KEY) {
        if kind != ServiceKind::Blob {
            return Err(format!(
                "{CODEC_KEY}= only applies to blob services, not {} services",
                kind.noun()
            ));
        }
        // The pair in effect (the last), as the service is built with it.
        blob_codec(pairs)?;
    }
    let local_key = pairs.iter().find(|(k, _)| LOCAL_KEYS.contains(&k.as_str()));
    if scheme != "file" {
        if let Some((k, _)) = local_key {
            return Err(format!(
                "{k}= is only for objectstore+file:// (objectstore+{scheme}:// always compresses and chunks inline)"
            ));
        }
        return Ok(());
    }
    if let Some((k, _)) = pairs
        .iter()
        .find(|(k, _)| !LOCAL_KEYS.contains(&k.as_str()) && k != CODEC_KEY)
    {
        return Err(format!(
            "unknown parameter {k:?} for objectstore+file:// (expected compression, chunking or codec)"
        ));
    }
    if let (Some((k, _)), true) = (local_key, kind != ServiceKind::Blob) {
        return Err(format!(
            "{k}= only applies to blob services, not {} services",
            kind.noun()
        ));
    }
    local_files_options(pairs).map(|_| ())
}

/// Whether a `grpc+…` URL leads to this machine: a Unix socket, or a
/// loopback host (where a daemon may take open files, see
/// [crate::local_ingest]).
pub fn on_this_machine(url: &Url) -> bool {
    if url.scheme() == "grpc+unix" {
        return true;
    }
    match url.host() {
        // `grpc+http` is not a special scheme: IPv4 hosts stay text.
        Some(url::Host::Domain(d)) => {
            d.eq_ignore_ascii_case("localhost")
                || d.parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

impl ServiceConfig {
    /// Parses a service URL for a service of `kind`.
    pub fn from_url(kind: ServiceKind, s: &str) -> Result<Self, CompositionError> {
        let err = |reason: String| CompositionError::InvalidUrl {
            url: s.to_string(),
            reason,
        };
        let url = Url::parse(s).map_err(|e| err(e.to_string()))?;
        let pairs = query_pairs(&url).map_err(err)?;
        let no_query = || {
            if pairs.is_empty() {
                Ok(())
            } else {
                Err(err(format!(
                    "{}:// takes no query parameters",
                    url.scheme()
                )))
            }
        };
        let config = match url.scheme() {
            "memory" => {
                no_query()?;
                if url.has_host() && url.host_str() != Some("")
                    || !(url.path().is_empty() || url.path() == "/")
                {
                    return Err(err("memory:// takes no host or path".into()));
                }
                ServiceConfig::Memory
            }
            "sled" => {
                no_query()?;
                if url.host_str().is_some_and(|h| !h.is_empty()) {
                    return Err(err("expected sled:///absolute/path (three slashes) or sled:// for a temporary database".into()));
                }
                let path = url.path();
                ServiceConfig::Sled {
                    path: (!path.is_empty() && path != "/").then(|| PathBuf::from(path)),
                }
            }
            scheme if scheme.starts_with("objectstore+") => {
                let inner = s.strip_prefix("objectstore+").expect("checked");
                let inner = inner.split_once('?').map(|(a, _)| a).unwrap_or(inner);
                let ourl = Url::parse(inner).map_err(|e| err(e.to_string()))?;
                match ourl.scheme() {
                    "file" if ourl.path().len() <= 1 => {
                        return Err(err("expected objectstore+file:///absolute/path".into()))
                    }
                    "file" if ourl.host_str().is_some_and(|h| !h.is_empty()) => {
                        return Err(err(
                            "expected objectstore+file:///absolute/path (three slashes)".into(),
                        ))
                    }
                    "s3" | "s3a" if ourl.host_str().is_none_or(|h| h.is_empty()) => {
                        return Err(err("expected objectstore+s3://bucket/prefix".into()))
                    }
                    "file" | "memory" | "s3" | "s3a" | "gs" | "az" | "azure" | "abfs" | "abfss"
                    | "http" | "https" => {}
                    other => {
                        return Err(err(format!(
                            "object_store does not know the scheme {other:?}"
                        )))
                    }
                }
                check_compression_option(kind, ourl.scheme(), &pairs).map_err(err)?;
                if ourl.scheme() != "file" && ourl.scheme() != "memory" {
                    // Check options now, so a typo fails at start, not at first use.
                    object_store::parse_url_opts(&ourl, object_store_options(&pairs))
                        .map_err(|e| err(e.to_string()))?;
                }
                ServiceConfig::ObjectStore {
                    url: ourl,
                    options: pairs,
                }
            }
            "grpc+http" | "grpc+https" | "grpc+unix" => {
                no_query()?;
                crate::grpc::parse_grpc_url(&url).map_err(|e| err(e.to_string()))?;
                ServiceConfig::Grpc { url }
            }
            "cache" => {
                let mut near = None;
                let mut far = None;
                for (k, v) in pairs {
                    match k.as_str() {
                        "near" => {
                            near = Some(ServiceRef::Inline(Box::new(Self::from_url(kind, &v)?)))
                        }
                        "far" => {
                            far = Some(ServiceRef::Inline(Box::new(Self::from_url(kind, &v)?)))
                        }
                        other => {
                            return Err(err(format!(
                                "unknown parameter {other:?} (expected near, far)"
                            )))
                        }
                    }
                }
                ServiceConfig::Cache {
                    near: near.ok_or_else(|| err("missing near=URL".into()))?,
                    far: far.ok_or_else(|| err("missing far=URL".into()))?,
                }
            }
            "lru" => {
                let mut capacity = None;
                let mut inner = None;
                for (k, v) in pairs {
                    match k.as_str() {
                        "capacity" => {
                            capacity = Some(v.parse::<NonZeroUsize>().map_err(|_| {
                                err(format!("capacity {v:?} is not a positive integer"))
                            })?)
                        }
                        "inner" => {
                            inner = Some(ServiceRef::Inline(Box::new(Self::from_url(kind, &v)?)))
                        }
                        other => {
                            return Err(err(format!(
                                "unknown parameter {other:?} (expected capacity, inner)"
                            )))
                        }
                    }
                }
                ServiceConfig::Lru {
                    capacity: capacity.ok_or_else(|| err("missing capacity=N".into()))?,
                    inner,
                }
            }
            "nix+http" | "nix+https" | "nix+file" => {
                nix_cache_from_url(s, &url, pairs).map_err(err)?
            }
            other => return Err(err(format!("unknown scheme {other:?}"))),
        };
        config.check_kind(kind).map_err(err)?;
        Ok(config)
    }

    fn check_kind(&self, kind: ServiceKind) -> Result<(), String> {
        match (self, kind) {
            (ServiceConfig::Sled { .. }, ServiceKind::Blob) => Err("sled is not available for blob services".into()),
            (ServiceConfig::Lru { .. }, ServiceKind::Blob) => Err("lru is not available for blob services".into()),
            (ServiceConfig::NixBinaryCache { .. }, ServiceKind::Blob | ServiceKind::Directory) => Err(format!(
                "a Nix binary cache (nix+http://, nix+https://, nix+file://) only serves path infos, not {}s",
                kind.noun()
            )),
            _ => Ok(()),
        }
    }

    fn named_refs(&self) -> Vec<&str> {
        fn of(r: &ServiceRef) -> Vec<&str> {
            match r {
                ServiceRef::Named(n) => vec![n.as_str()],
                ServiceRef::Inline(c) => c.named_refs(),
            }
        }
        match self {
            ServiceConfig::Cache { near, far } => [of(near), of(far)].concat(),
            ServiceConfig::Lru { inner: Some(i), .. } => of(i),
            _ => Vec::new(),
        }
    }
}

fn entry_from_toml(
    kind: ServiceKind,
    name: &str,
    value: &toml::Value,
) -> Result<ServiceConfig, CompositionError> {
    let err = |reason: String| CompositionError::InvalidEntry {
        section: kind.section().into(),
        name: name.into(),
        reason,
    };
    let table = value
        .as_table()
        .ok_or_else(|| err("expected a table".into()))?;
    let get_str = |key: &str| -> Result<Option<String>, CompositionError> {
        match table.get(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(err(format!("{key} must be a string"))),
        }
    };
    let require = |key: &str| get_str(key)?.ok_or_else(|| err(format!("missing {key}")));
    let reference = |key: &str| -> Result<Option<ServiceRef>, CompositionError> {
        Ok(match get_str(key)? {
            None => None,
            Some(v) if v.contains("://") => Some(ServiceRef::Inline(Box::new(
                ServiceConfig::from_url(kind, &v)?,
            ))),
            Some(v) => Some(ServiceRef::Named(v)),
        })
    };
    let ty = require("type")?;
    let allowed: &[&str] = match ty.as_str() {
        "memory" => &["type"],
        "sled" => &["type", "path"],
        "objectstore" => &["type", "url", "options"],
        "grpc" | "url" => &["type", "url"],
        "cache" => &["type", "near", "far"],
        "lru" => &["type", "capacity", "inner"],
        "nix" => &["type", "url", "trusted_public_keys"],
        other => {
            return Err(err(format!(
                "unknown type {other:?} (expected memory, sled, objectstore, grpc, cache, lru, nix or url)"
            )))
        }
    };
    if let Some(k) = table.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(err(format!(
            "unknown key {k:?} for type {ty:?} (allowed: {})",
            allowed.join(", ")
        )));
    }
    let config = match ty.as_str() {
        "memory" => ServiceConfig::Memory,
        "sled" => ServiceConfig::Sled {
            path: get_str("path")?.map(PathBuf::from),
        },
        "objectstore" => {
            let url = require("url")?;
            let url = url.strip_prefix("objectstore+").unwrap_or(&url).to_string();
            let mut full = format!("objectstore+{url}");
            if let Some(opts) = table.get("options") {
                let opts = opts
                    .as_table()
                    .ok_or_else(|| err("options must be a table".into()))?;
                let mut ser = url::form_urlencoded::Serializer::new(String::new());
                for (k, v) in opts {
                    ser.append_pair(
                        k,
                        v.as_str()
                            .ok_or_else(|| err(format!("option {k} must be a string")))?,
                    );
                }
                let q = ser.finish().replace('+', "%20");
                full.push(if full.contains('?') { '&' } else { '?' });
                full.push_str(&q);
            }
            ServiceConfig::from_url(kind, &full)?
        }
        "grpc" | "url" => ServiceConfig::from_url(kind, &require("url")?)?,
        "cache" => ServiceConfig::Cache {
            near: reference("near")?.ok_or_else(|| err("missing near".into()))?,
            far: reference("far")?.ok_or_else(|| err("missing far".into()))?,
        },
        "lru" => {
            let capacity = match table.get("capacity") {
                Some(toml::Value::Integer(n)) if *n > 0 => {
                    NonZeroUsize::new(*n as usize).expect("positive")
                }
                _ => return Err(err("capacity must be a positive integer".into())),
            };
            ServiceConfig::Lru {
                capacity,
                inner: reference("inner")?,
            }
        }
        "nix" => {
            let url = require("url")?;
            let full = if url.starts_with("nix+") {
                url
            } else {
                format!("nix+{url}")
            };
            let mut config = ServiceConfig::from_url(kind, &full)?;
            if let (
                ServiceConfig::NixBinaryCache {
                    trusted_public_keys,
                    ..
                },
                Some(keys),
            ) = (&mut config, table.get("trusted_public_keys"))
            {
                let keys = keys
                    .as_array()
                    .ok_or_else(|| err("trusted_public_keys must be an array of strings".into()))?;
                for k in keys {
                    let k = k.as_str().ok_or_else(|| {
                        err("trusted_public_keys must be an array of strings".into())
                    })?;
                    trusted_public_keys.extend(split_keys(k).map_err(err)?);
                }
            }
            config
        }
        _ => unreachable!("type checked above"),
    };
    config.check_kind(kind).map_err(err)?;
    Ok(config)
}

/// Named service configurations for blobs and directories.
#[derive(Debug, Clone, Default)]
pub struct Composition {
    blob: BTreeMap<String, ServiceConfig>,
    directory: BTreeMap<String, ServiceConfig>,
    pathinfo: BTreeMap<String, ServiceConfig>,
}

impl Composition {
    /// A composition whose `default` entries are the given URLs.
    pub fn from_urls(blob_url: &str, directory_url: &str) -> Result<Self, CompositionError> {
        let mut c = Composition::default();
        c.blob.insert(
            "default".into(),
            ServiceConfig::from_url(ServiceKind::Blob, blob_url)?,
        );
        c.directory.insert(
            "default".into(),
            ServiceConfig::from_url(ServiceKind::Directory, directory_url)?,
        );
        Ok(c)
    }

    /// Parses a composition file and checks every reference (unknown names,
    /// cycles) in `blobservices`, `directoryservices` and `pathinfoservices`.
    pub fn from_toml(text: &str) -> Result<Self, CompositionError> {
        let doc: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| CompositionError::Toml(e.to_string()))?;
        let mut c = Composition::default();
        if let Some(k) = doc.keys().find(|k| {
            ![
                ServiceKind::Blob,
                ServiceKind::Directory,
                ServiceKind::PathInfo,
            ]
            .iter()
            .any(|kind| kind.section() == k.as_str())
        }) {
            return Err(CompositionError::Toml(format!(
                "unknown section {k:?} (expected blobservices, directoryservices, pathinfoservices)"
            )));
        }
        for kind in [
            ServiceKind::Blob,
            ServiceKind::Directory,
            ServiceKind::PathInfo,
        ] {
            let Some(section) = doc.get(kind.section()) else {
                continue;
            };
            let section = section.as_table().ok_or_else(|| {
                CompositionError::Toml(format!("{} must be a table", kind.section()))
            })?;
            let map = c.section_mut(kind);
            for (name, value) in section {
                map.insert(name.clone(), entry_from_toml(kind, name, value)?);
            }
        }
        c.check()?;
        Ok(c)
    }

    fn section(&self, kind: ServiceKind) -> &BTreeMap<String, ServiceConfig> {
        match kind {
            ServiceKind::Blob => &self.blob,
            ServiceKind::Directory => &self.directory,
            ServiceKind::PathInfo => &self.pathinfo,
        }
    }

    /// The entry `name` of `kind`, if any.
    pub fn get(&self, kind: ServiceKind, name: &str) -> Option<&ServiceConfig> {
        self.section(kind).get(name)
    }

    fn section_mut(&mut self, kind: ServiceKind) -> &mut BTreeMap<String, ServiceConfig> {
        match kind {
            ServiceKind::Blob => &mut self.blob,
            ServiceKind::Directory => &mut self.directory,
            ServiceKind::PathInfo => &mut self.pathinfo,
        }
    }

    /// Checks that every named reference exists and that none forms a cycle.
    pub fn check(&self) -> Result<(), CompositionError> {
        for kind in [
            ServiceKind::Blob,
            ServiceKind::Directory,
            ServiceKind::PathInfo,
        ] {
            let section = self.section(kind);
            for (from, config) in section {
                for name in config.named_refs() {
                    if !section.contains_key(name) {
                        return Err(CompositionError::UnknownName {
                            section: kind.section().into(),
                            from: from.clone(),
                            name: name.into(),
                        });
                    }
                }
            }
            // Depth-first search with the current path as the stack.
            let mut done: Vec<&str> = Vec::new();
            for start in section.keys() {
                let mut path: Vec<&str> = Vec::new();
                visit(section, start, &mut path, &mut done).map_err(|cycle| {
                    CompositionError::Cycle {
                        section: kind.section().into(),
                        cycle,
                    }
                })?;
            }
        }
        Ok(())
    }
}

fn visit<'a>(
    section: &'a BTreeMap<String, ServiceConfig>,
    name: &'a str,
    path: &mut Vec<&'a str>,
    done: &mut Vec<&'a str>,
) -> Result<(), Vec<String>> {
    if done.contains(&name) {
        return Ok(());
    }
    if let Some(pos) = path.iter().position(|n| *n == name) {
        let mut cycle: Vec<String> = path[pos..].iter().map(|s| s.to_string()).collect();
        cycle.push(name.to_string());
        return Err(cycle);
    }
    path.push(name);
    if let Some(config) = section.get(name) {
        for r in config.named_refs() {
            visit(section, r, path, done)?;
        }
    }
    path.pop();
    done.push(name);
    Ok(())
}

/// Builds services from a [Composition], each named entry once.
pub struct Builder {
    composition: Composition,
    blobs: Mutex<HashMap<String, Arc<dyn BlobService>>>,
    directories: Mutex<HashMap<String, Arc<dyn DirectoryService>>>,
}

impl Builder {
    /// A builder over a checked composition.
    pub fn new(composition: Composition) -> Self {
        Self {
            composition,
            blobs: Default::default(),
            directories: Default::default(),
        }
    }

    /// The blob service named `name` (usually `default`).
    pub fn blob_service(&self, name: &str) -> Result<Arc<dyn BlobService>, CompositionError> {
        if let Some(s) = self.blobs.lock().get(name) {
            return Ok(s.clone());
        }
        let config = self.named(ServiceKind::Blob, name)?;
        let svc = self.build_blob(&config, name)?;
        self.blobs.lock().insert(name.to_string(), svc.clone());
        Ok(svc)
    }

    /// The directory service named `name` (usually `default`).
    pub fn directory_service(
        &self,
        name: &str,
    ) -> Result<Arc<dyn DirectoryService>, CompositionError> {
        if let Some(s) = self.directories.lock().get(name) {
            return Ok(s.clone());
        }
        let config = self.named(ServiceKind::Directory, name)?;
        let svc = self.build_directory(&config, name)?;
        self.directories
            .lock()
            .insert(name.to_string(), svc.clone());
        Ok(svc)
    }

    fn named(&self, kind: ServiceKind, name: &str) -> Result<ServiceConfig, CompositionError> {
        self.composition
            .section(kind)
            .get(name)
            .cloned()
            .ok_or_else(|| CompositionError::UnknownName {
                section: kind.section().into(),
                from: "(entry point)".into(),
                name: name.into(),
            })
    }

    fn build_blob(
        &self,
        config: &ServiceConfig,
        name: &str,
    ) -> Result<Arc<dyn BlobService>, CompositionError> {
        let resolve = |r: &ServiceRef| match r {
            ServiceRef::Named(n) => self.blob_service(n),
            ServiceRef::Inline(c) => self.build_blob(c, name),
        };
        let build_err = |e: String| {
            CompositionError::Build(format!(
                "{} service {name:?}: {e}",
                ServiceKind::Blob.noun()
            ))
        };
        Ok(match config {
            ServiceConfig::Memory => Arc::new(MemoryBlobService::default()),
            ServiceConfig::ObjectStore { url, options } => {
                let (store, base) = object_store_from(url, options).map_err(build_err)?;
                let codec = blob_codec(options).map_err(build_err)?;
                let svc = ObjectStoreBlobService::with_params(
                    store,
                    base,
                    ChunkingParams::default(),
                    codec,
                );
                if url.scheme() == "file" {
                    // Same files, fewer trips: see `with_local_files`.
                    let options = local_files_options(options).map_err(build_err)?;
                    Arc::new(
                        svc.with_local_files(PathBuf::from(url.path()), options)
                            .map_err(|e| build_err(e.to_string()))?,
                    )
                } else {
                    Arc::new(svc)
                }
            }
            ServiceConfig::Grpc { url } => {
                let channels = (0..crate::GRPC_BLOB_CONNECTIONS)
                    .map(|_| {
                        crate::grpc::channel_from_url(url).map_err(|e| build_err(e.to_string()))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Arc::new(
                    GrpcBlobService::from_channels(channels)
                        .ok_or_else(|| build_err("no channel".into()))?
                        .with_local_ingest(on_this_machine(url)),
                )
            }
            ServiceConfig::Cache { near, far } => {
                Arc::new(CacheBlobService::new(resolve(near)?, resolve(far)?))
            }
            ServiceConfig::Sled { .. }
            | ServiceConfig::Lru { .. }
            | ServiceConfig::NixBinaryCache { .. } => {
                return Err(build_err("not available for blob services".into()))
            }
        })
    }

    fn build_directory(
        &self,
        config: &ServiceConfig,
        name: &str,
    ) -> Result<Arc<dyn DirectoryService>, CompositionError> {
        let resolve = |r: &ServiceRef| match r {
            ServiceRef::Named(n) => self.directory_service(n),
            ServiceRef::Inline(c) => self.build_directory(c, name),
        };
        let build_err = |e: String| {
            CompositionError::Build(format!(
                "{} service {name:?}: {e}",
                ServiceKind::Directory.noun()
            ))
        };
        Ok(match config {
            ServiceConfig::Memory => Arc::new(MemoryDirectoryService::default()),
            ServiceConfig::Sled { path: None } => {
                Arc::new(SledDirectoryService::temporary().map_err(|e| build_err(e.to_string()))?)
            }
            ServiceConfig::Sled { path: Some(p) } => {
                Arc::new(SledDirectoryService::open(p).map_err(|e| build_err(e.to_string()))?)
            }
            ServiceConfig::ObjectStore { url, options } => {
                let (store, base) = object_store_from(url, options).map_err(build_err)?;
                Arc::new(ObjectStoreDirectoryService::new(store, base))
            }
            ServiceConfig::Grpc { url } => Arc::new(GrpcDirectoryService::from_channel(
                crate::grpc::channel_from_url(url).map_err(|e| build_err(e.to_string()))?,
            )),
            ServiceConfig::Cache { near, far } => {
                Arc::new(CacheDirectoryService::new(resolve(near)?, resolve(far)?))
            }
            ServiceConfig::Lru { capacity, inner } => Arc::new(LruDirectoryService::new(
                *capacity,
                inner.as_ref().map(resolve).transpose()?,
            )),
            ServiceConfig::NixBinaryCache { .. } => {
                return Err(build_err(
                    "a Nix binary cache only serves path infos".into(),
                ))
            }
        })
    }
}

/// Opens an object store from its URL and options.
pub fn object_store_from(
    url: &Url,
    options: &[(String, String)],
) -> Result<(Arc<dyn object_store::ObjectStore>, object_store::path::Path), String> {
    if url.scheme() == "file" {
        // Local files: the directory is created, keys are relative to it.
        let dir = PathBuf::from(url.path());
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)
            .map_err(|e| e.to_string())?
            .with_automatic_cleanup(true);
        return Ok((Arc::new(fs), object_store::path::Path::default()));
    }
    let (store, path) = object_store::parse_url_opts(url, object_store_options(options))
        .map_err(|e| e.to_string())?;
    Ok((Arc::from(store), path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(s: &str) -> Result<ServiceConfig, CompositionError> {
        ServiceConfig::from_url(ServiceKind::Blob, s)
    }
    fn dir(s: &str) -> Result<ServiceConfig, CompositionError> {
        ServiceConfig::from_url(ServiceKind::Directory, s)
    }

    #[test]
    fn parses_every_scheme() {
        assert_eq!(blob("memory://").unwrap(), ServiceConfig::Memory);
        assert_eq!(dir("sled://").unwrap(), ServiceConfig::Sled { path: None });
        assert_eq!(
            dir("sled:///var/lib/x").unwrap(),
            ServiceConfig::Sled {
                path: Some("/var/lib/x".into())
            }
        );
        assert!(matches!(
            blob("objectstore+file:///tmp/b").unwrap(),
            ServiceConfig::ObjectStore { .. }
        ));
        assert!(matches!(
            blob("objectstore+memory:///").unwrap(),
            ServiceConfig::ObjectStore { .. }
        ));
        for (query, mode) in [
            ("", LocalCompression::Background),
            ("?compression=background", LocalCompression::Background),
            ("?compression=inline", LocalCompression::Inline),
        ] {
            match blob(&format!("objectstore+file:///tmp/b{query}")).unwrap() {
                ServiceConfig::ObjectStore { url, options } => {
                    assert_eq!(url.as_str(), "file:///tmp/b");
                    assert_eq!(local_compression(&options), Ok(mode), "{query}");
                }
                other => panic!("{other:?}"),
            }
        }
        match blob("objectstore+s3://bucket/prefix?endpoint=http://127.0.0.1:9000&region=us-east-1&allow_http=true").unwrap() {
            ServiceConfig::ObjectStore { url, options } => {
                assert_eq!(url.as_str(), "s3://bucket/prefix");
                assert!(options.contains(&("endpoint".into(), "http://127.0.0.1:9000".into())));
            }
            other => panic!("{other:?}"),
        }
        // `codec` is Arca's, on any object store, and never reaches
        // object_store (which refuses options it does not know).
        match blob("objectstore+s3://bucket/prefix?endpoint=http://127.0.0.1:9000&region=us-east-1&codec=zstd").unwrap() {
            ServiceConfig::ObjectStore { url, options } => {
                assert_eq!(blob_codec(&options), Ok(Codec::Zstd(1)));
                assert!(!object_store_options(&options).iter().any(|(k, _)| k == "codec"));
                object_store_from(&url, &options).unwrap();
            }
            other => panic!("{other:?}"),
        }
        match blob("objectstore+memory:///?codec=lz4").unwrap() {
            ServiceConfig::ObjectStore { options, .. } => {
                assert_eq!(blob_codec(&options), Ok(Codec::Lz4))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(blob_codec(&[]), Ok(Codec::Lz4), "the default");
        assert!(matches!(
            blob("grpc+http://127.0.0.1:8000").unwrap(),
            ServiceConfig::Grpc { .. }
        ));
        assert!(matches!(
            blob("grpc+unix:///run/arca.sock").unwrap(),
            ServiceConfig::Grpc { .. }
        ));
        assert!(matches!(
            dir("lru://?capacity=10").unwrap(),
            ServiceConfig::Lru { inner: None, .. }
        ));
    }

    #[test]
    fn nested_urls_keep_their_plus() {
        let c = blob("cache://?near=memory://&far=grpc+http://127.0.0.1:8000").unwrap();
        match c {
            ServiceConfig::Cache { near, far } => {
                assert_eq!(near, ServiceRef::Inline(Box::new(ServiceConfig::Memory)));
                match far {
                    ServiceRef::Inline(f) => assert!(
                        matches!(*f, ServiceConfig::Grpc { ref url } if url.scheme() == "grpc+http")
                    ),
                    other => panic!("{other:?}"),
                }
            }
            other => panic!("{other:?}"),
        }
        // Percent-encoded nested queries.
        let c = dir(
            "lru://?capacity=5&inner=cache%3A%2F%2F%3Fnear%3Dmemory%3A%2F%2F%26far%3Dsled%3A%2F%2F",
        )
        .unwrap();
        assert!(matches!(c, ServiceConfig::Lru { inner: Some(_), .. }));
    }

    #[test]
    fn malformed_urls_have_clear_errors() {
        for (url, needle) in [
            ("nonsense", "relative URL"),
            ("ftp://x", "unknown scheme"),
            ("sled://relative/path", "three slashes"),
            ("memory://?x=1", "no query"),
            ("cache://?near=memory://", "missing far"),
            (
                "cache://?near=memory://&far=memory://&extra=1",
                "unknown parameter",
            ),
            ("lru://?capacity=0", "positive integer"),
            ("lru://", "missing capacity"),
            ("grpc+http://", "missing host"),
            ("objectstore+file://", "absolute/path"),
            ("objectstore+s3://", "bucket"),
            ("objectstore+bogus://x", "does not know"),
        ] {
            let e = dir(url).unwrap_err().to_string();
            assert!(e.contains(needle), "{url}: {e}");
        }
        assert!(blob("sled:///x")
            .unwrap_err()
            .to_string()
            .contains("not available for blob"));
        for (url, needle) in [
            (
                "objectstore+file:///tmp/b?compression=lazy",
                "unknown compression \"lazy\" (expected inline or background)",
            ),
            (
                "objectstore+file:///tmp/b?compression=",
                "unknown compression \"\"",
            ),
            (
                "objectstore+file:///tmp/b?compresion=inline",
                "unknown parameter \"compresion\"",
            ),
            (
                "objectstore+memory:///?compression=inline",
                "only for objectstore+file://",
            ),
            (
                "objectstore+s3://bucket/p?endpoint=http://h:1&compression=background",
                "only for objectstore+file://",
            ),
            (
                "objectstore+file:///tmp/b?codec=brotli",
                "expected lz4 or zstd",
            ),
            // The pair in effect is the last one.
            ("objectstore+memory:///?codec=zstd&codec=bogus", "\"bogus\""),
        ] {
            let e = blob(url).unwrap_err().to_string();
            assert!(e.contains(needle), "{url}: {e}");
        }
        let e = dir("objectstore+file:///tmp/d?compression=inline")
            .unwrap_err()
            .to_string();
        assert!(e.contains("only applies to blob services"), "{e}");
        assert!(blob("objectstore+memory:///?codec=bogus&codec=zstd").is_ok());
        for url in [
            "objectstore+file:///tmp/d?codec=zstd",
            "objectstore+memory:///?codec=lz4",
        ] {
            let e = dir(url).unwrap_err().to_string();
            assert!(
                e.contains("codec= only applies to blob services"),
                "{url}: {e}"
            );
        }
        assert!(blob("lru://?capacity=3")
            .unwrap_err()
            .to_string()
            .contains("not available for blob"));
    }

    fn pathinfo(s: &str) -> Result<ServiceConfig, CompositionError> {
        ServiceConfig::from_url(ServiceKind::PathInfo, s)
    }

    #[test]
    fn nix_binary_cache_urls() {
        match pathinfo("nix+http://127.0.0.1:8080/sub/path?trusted-public-keys=a-1:AAAA%20b-1:B+/=")
            .unwrap()
        {
            ServiceConfig::NixBinaryCache {
                url,
                trusted_public_keys,
            } => {
                assert_eq!(url.as_str(), "http://127.0.0.1:8080/sub/path");
                // `+` stays a plus, `%20` separates keys, `=` inside a value is kept.
                assert_eq!(
                    trusted_public_keys,
                    vec!["a-1:AAAA".to_string(), "b-1:B+/=".to_string()]
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            pathinfo("nix+https://cache.example.org").unwrap(),
            ServiceConfig::NixBinaryCache { ref url, ref trusted_public_keys } if url.as_str() == "https://cache.example.org/" && trusted_public_keys.is_empty()
        ));
        assert!(matches!(
            pathinfo("nix+file:///var/cache/nix").unwrap(),
            ServiceConfig::NixBinaryCache { ref url, .. } if url.scheme() == "file" && url.path() == "/var/cache/nix"
        ));
        // Nested in a layer.
        let c = pathinfo(
            "cache://?near=sled:///tmp/x&far=nix+http://127.0.0.1:1?trusted-public-keys=k:AAAA",
        )
        .unwrap();
        assert!(
            matches!(c, ServiceConfig::Cache { far: ServiceRef::Inline(ref f), .. } if matches!(**f, ServiceConfig::NixBinaryCache { .. }))
        );

        for (url, needle) in [
            ("nix+http://", "host"),
            ("nix+https:///path", "host"),
            ("nix+file://relative/path", "three slashes"),
            ("nix+file:relative", "three slashes"),
            ("nix+file:///", "absolute/path"),
            ("nix+ftp://x", "unknown scheme"),
            ("nix+http://h?priority=10", "unknown parameter"),
            ("nix+http://h?trusted-public-keys=nocolon", "name:base64key"),
            ("nix+http://h?trusted-public-keys=:x", "name:base64key"),
            ("nix+http://user:pw@h", "credentials"),
        ] {
            let e = pathinfo(url).unwrap_err().to_string();
            assert!(e.contains(needle), "{url}: {e}");
        }
        for bad in [
            blob("nix+http://h"),
            dir("nix+http://h"),
            dir("cache://?near=memory://&far=nix+file:///x"),
        ] {
            let e = bad.unwrap_err().to_string();
            assert!(e.contains("only serves path infos"), "{e}");
        }
    }

    #[test]
    fn toml_nix_entries() {
        let c = Composition::from_toml(
            "[pathinfoservices.default]\ntype = \"nix\"\nurl = \"https://cache.example.org\"\ntrusted_public_keys = [\"a-1:AAAA\", \"b-1:BBBB c-1:CCCC\"]\n",
        )
        .unwrap();
        match c.get(ServiceKind::PathInfo, "default").unwrap() {
            ServiceConfig::NixBinaryCache {
                url,
                trusted_public_keys,
            } => {
                assert_eq!(url.as_str(), "https://cache.example.org/");
                assert_eq!(trusted_public_keys.len(), 3);
            }
            other => panic!("{other:?}"),
        }
        for (text, needle) in [
            ("[pathinfoservices.a]\ntype=\"nix\"\n", "missing url"),
            ("[pathinfoservices.a]\ntype=\"nix\"\nurl=\"http://h\"\ntrusted_public_keys=\"k:A\"\n", "array"),
            ("[pathinfoservices.a]\ntype=\"nix\"\nurl=\"http://h\"\ntrusted_public_keys=[\"bad\"]\n", "name:base64key"),
            ("[blobservices.a]\ntype=\"nix\"\nurl=\"http://h\"\n", "only serves path infos"),
        ] {
            let e = Composition::from_toml(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn toml_composition_with_names() {
        let c = Composition::from_toml(
            r#"
            [blobservices.default]
            type = "cache"
            near = "local"
            far = "upstream"
            [blobservices.local]
            type = "memory"
            [blobservices.upstream]
            type = "objectstore"
            url = "memory:///"
            [directoryservices.default]
            type = "lru"
            capacity = 100
            inner = "sled://"
            "#,
        )
        .unwrap();
        let b = Builder::new(c);
        b.blob_service("default").unwrap();
        b.directory_service("default").unwrap();
        assert!(Arc::ptr_eq(
            &b.blob_service("local").unwrap(),
            &b.blob_service("local").unwrap()
        ));
    }

    #[test]
    fn toml_unknown_names_and_cycles_are_refused_with_names() {
        let e = Composition::from_toml("[blobservices.default]\ntype = \"cache\"\nnear = \"a\"\nfar = \"nowhere\"\n[blobservices.a]\ntype=\"memory\"\n")
            .unwrap_err();
        assert!(
            matches!(&e, CompositionError::UnknownName { from, name, .. } if from == "default" && name == "nowhere"),
            "{e}"
        );
        assert!(e.to_string().contains("nowhere"));

        let e = Composition::from_toml(
            "[directoryservices.a]\ntype=\"lru\"\ncapacity=1\ninner=\"b\"\n[directoryservices.b]\ntype=\"cache\"\nnear=\"a\"\nfar=\"a\"\n",
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, CompositionError::Cycle { .. }), "{msg}");
        assert!(msg.contains("a -> b -> a"), "{msg}");

        let e = Composition::from_toml("[blobservices.x]\ntype=\"cache\"\nnear=\"x\"\nfar=\"x\"\n")
            .unwrap_err();
        assert!(e.to_string().contains("x -> x"), "{e}");
    }

    #[test]
    fn toml_bad_entries() {
        for (text, needle) in [
            ("[blobservices.a]\ntype=\"weird\"\n", "unknown type"),
            (
                "[blobservices.a]\ntype=\"memory\"\nurl=\"x\"\n",
                "unknown key",
            ),
            ("[blobservices.a]\nurl=\"x\"\n", "missing type"),
            (
                "[directoryservices.a]\ntype=\"lru\"\ncapacity=-1\n",
                "positive integer",
            ),
            (
                "[blobservices.a]\ntype=\"sled\"\n",
                "not available for blob",
            ),
            ("[blobservices]\na = 1\n", "expected a table"),
            ("not toml", "composition file"),
            ("[blobservice.a]\ntype=\"memory\"\n", "unknown section"),
            (
                "[pathinfoservices.a]\ntype=\"cache\"\nnear=\"a\"\nfar=\"a\"\n",
                "a -> a",
            ),
        ] {
            let e = Composition::from_toml(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }
}
