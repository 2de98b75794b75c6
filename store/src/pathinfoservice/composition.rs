//! Path-info service stacks from URLs (see `cli.md`).
//!
//! URLs are parsed by castore's parser ([ServiceConfig::from_url] with
//! [ServiceKind::PathInfo]: the schemes path-info services share with
//! directory services have identical syntax, and `nix+http(s)://` /
//! `nix+file://` binary caches are accepted for path infos only), and the
//! resulting [ServiceConfig] is built into path-info services here, over the
//! store's castore services and NAR index ([StoreServices]).
use super::{
    CachePathInfoService, GrpcPathInfoService, LruPathInfoService, MemoryPathInfoService,
    NixHttpPathInfoService, ObjectStorePathInfoService, PathInfoService, SledPathInfoService,
};
use crate::nar_index::LazyNarIndex;
use crate::signature::PublicKey;
use arca_castore::composition::{
    object_store_from, CompositionError, ServiceConfig, ServiceKind, ServiceRef,
};
use arca_castore::{BlobService, DirectoryService};
use std::sync::Arc;

/// What path-info services are built over: the store's castore services
/// (binary-cache backends ingest NARs into them) and its NAR index (opened
/// only if a binary-cache backend is built).
#[derive(Clone)]
pub struct StoreServices {
    /// The store's blobs.
    pub blobs: Arc<dyn BlobService>,
    /// The store's directories.
    pub directories: Arc<dyn DirectoryService>,
    /// The store's NAR index (usually `$ARCA_DATA_DIR/narindex.sled`).
    pub nar_index: LazyNarIndex,
}

impl StoreServices {
    /// Bundles the services.
    pub fn new(
        blobs: Arc<dyn BlobService>,
        directories: Arc<dyn DirectoryService>,
        nar_index: LazyNarIndex,
    ) -> Self {
        Self {
            blobs,
            directories,
            nar_index,
        }
    }
}

/// Builds a path-info service from a URL (`memory://`, `sled:///abs/path`,
/// `sled://`, `objectstore+…`, `grpc+http://…`, `grpc+unix://…`,
/// `nix+http://host[:port][/path]`, `nix+https://…`, `nix+file:///abs/dir`
/// (each with `?trusted-public-keys=name:key%20…`),
/// `cache://?near=…&far=…`, `lru://?capacity=N[&inner=…]`).
///
/// The stack is unchecked: wrap it in
/// [CheckedPathInfoService](super::CheckedPathInfoService) where path infos
/// enter the store.
pub fn pathinfo_service_from_url(
    url: &str,
    services: &StoreServices,
) -> Result<Arc<dyn PathInfoService>, CompositionError> {
    let config = ServiceConfig::from_url(ServiceKind::PathInfo, url)?;
    pathinfo_service_from_config(&config, services)
}

/// The binary-cache service a `nix+http(s)://` or `nix+file://` URL names,
/// as its concrete type (for its narinfo-level API, used by `arca copy`);
/// `None` for URLs of other schemes.
pub fn binary_cache_from_url(
    url: &str,
    services: &StoreServices,
) -> Result<Option<NixHttpPathInfoService>, CompositionError> {
    if !url.starts_with("nix+") {
        return Ok(None);
    }
    match ServiceConfig::from_url(ServiceKind::PathInfo, url)? {
        ServiceConfig::NixBinaryCache {
            url,
            trusted_public_keys,
        } => binary_cache(&url, &trusted_public_keys, services).map(Some),
        _ => Ok(None),
    }
}

fn binary_cache(
    url: &url::Url,
    trusted_public_keys: &[String],
    services: &StoreServices,
) -> Result<NixHttpPathInfoService, CompositionError> {
    let build_err = |e: String| CompositionError::Build(format!("path-info service: {e}"));
    let keys = trusted_public_keys
        .iter()
        .map(|k| {
            k.parse::<PublicKey>()
                .map_err(|e| build_err(format!("{url}: invalid trusted public key {k:?}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let index = services
        .nar_index
        .get()
        .map_err(|e| build_err(format!("{url}: NAR index: {e}")))?;
    NixHttpPathInfoService::new(
        url.as_str(),
        keys,
        services.blobs.clone(),
        services.directories.clone(),
        index,
    )
    .map_err(|e| build_err(e.to_string()))
}

/// Builds a path-info service from a parsed configuration (inline
/// references only: names belong to a composition file).
pub fn pathinfo_service_from_config(
    config: &ServiceConfig,
    services: &StoreServices,
) -> Result<Arc<dyn PathInfoService>, CompositionError> {
    build(
        config,
        None,
        &mut std::collections::HashMap::new(),
        services,
    )
}

/// Builds the `[pathinfoservices]` entry `name` of a (checked) composition
/// file; named references resolve within the section, each entry built once.
pub fn pathinfo_service_from_composition(
    composition: &arca_castore::composition::Composition,
    name: &str,
    services: &StoreServices,
) -> Result<Arc<dyn PathInfoService>, CompositionError> {
    named(
        composition,
        name,
        &mut std::collections::HashMap::new(),
        services,
    )
}

type Built = std::collections::HashMap<String, Arc<dyn PathInfoService>>;

fn named(
    composition: &arca_castore::composition::Composition,
    name: &str,
    built: &mut Built,
    services: &StoreServices,
) -> Result<Arc<dyn PathInfoService>, CompositionError> {
    if let Some(s) = built.get(name) {
        return Ok(s.clone());
    }
    let config = composition
        .get(ServiceKind::PathInfo, name)
        .ok_or_else(|| CompositionError::UnknownName {
            section: ServiceKind::PathInfo.section().into(),
            from: "(entry point)".into(),
            name: name.into(),
        })?;
    let svc = build(config, Some(composition), built, services)?;
    built.insert(name.to_string(), svc.clone());
    Ok(svc)
}

fn build(
    config: &ServiceConfig,
    composition: Option<&arca_castore::composition::Composition>,
    built: &mut Built,
    services: &StoreServices,
) -> Result<Arc<dyn PathInfoService>, CompositionError> {
    let build_err = |e: String| CompositionError::Build(format!("path-info service: {e}"));
    let mut resolve = |r: &ServiceRef| match (r, composition) {
        (ServiceRef::Inline(c), _) => build(c, composition, built, services),
        (ServiceRef::Named(n), Some(comp)) => named(comp, n, built, services),
        (ServiceRef::Named(n), None) => Err(build_err(format!(
            "named reference {n:?} outside a composition file"
        ))),
    };
    Ok(match config {
        ServiceConfig::Memory => Arc::new(MemoryPathInfoService::default()),
        ServiceConfig::Sled { path: None } => {
            Arc::new(SledPathInfoService::temporary().map_err(|e| build_err(e.to_string()))?)
        }
        ServiceConfig::Sled { path: Some(p) } => {
            Arc::new(SledPathInfoService::open(p).map_err(|e| build_err(e.to_string()))?)
        }
        ServiceConfig::ObjectStore { url, options } => {
            let (store, base) = object_store_from(url, options).map_err(build_err)?;
            Arc::new(ObjectStorePathInfoService::new(store, base))
        }
        ServiceConfig::Grpc { url } => Arc::new(GrpcPathInfoService::from_channel(
            arca_castore::grpc::channel_from_url(url).map_err(|e| build_err(e.to_string()))?,
        )),
        ServiceConfig::Cache { near, far } => {
            let near = resolve(near)?;
            Arc::new(CachePathInfoService::new(near, resolve(far)?))
        }
        ServiceConfig::Lru { capacity, inner } => Arc::new(LruPathInfoService::new(
            *capacity,
            inner.as_ref().map(resolve).transpose()?,
        )),
        ServiceConfig::NixBinaryCache {
            url,
            trusted_public_keys,
        } => Arc::new(binary_cache(url, trusted_public_keys, services)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use arca_castore::blobservice::MemoryBlobService;
    use arca_castore::directoryservice::MemoryDirectoryService;

    fn services() -> StoreServices {
        StoreServices::new(
            Arc::new(MemoryBlobService::default()),
            Arc::new(MemoryDirectoryService::default()),
            LazyNarIndex::temporary(),
        )
    }

    fn build(url: &str) -> Result<Arc<dyn PathInfoService>, CompositionError> {
        pathinfo_service_from_url(url, &services())
    }

    #[tokio::test]
    async fn builds_every_scheme() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path().display();
        for url in [
            "memory://".to_string(),
            "sled://".to_string(),
            format!("sled://{t}/pi.sled"),
            "objectstore+memory:///".to_string(),
            format!("objectstore+file://{t}/os"),
            "grpc+http://127.0.0.1:1".to_string(),
            "grpc+unix:///run/arca.sock".to_string(),
            "cache://?near=memory://&far=grpc+http://127.0.0.1:1".to_string(),
            format!("lru://?capacity=10&inner=sled://{t}/lru.sled"),
            "lru://?capacity=10".to_string(),
            "nix+http://127.0.0.1:1".to_string(),
            "nix+https://cache.example.org/sub/path?trusted-public-keys=arca-fixture-1:nrGoLk/cwd2MLPt+gIczFjRLMvgLxAqOztHJDE3w6w0=".to_string(),
            format!("nix+file://{t}/cache"),
            format!("cache://?near=sled://{t}/near.sled&far=nix+http://127.0.0.1:1"),
        ] {
            build(&url).unwrap_or_else(|e| panic!("{url}: {e}"));
        }
    }

    #[test]
    fn nested_binary_cache_keys() {
        let k1 = "a-1:nrGoLk/cwd2MLPt+gIczFjRLMvgLxAqOztHJDE3w6w0=";
        let k2 = "b-1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
        // As the user guide says: `?` as %3F, spaces as %2520 inside `far=`.
        let url = format!("cache://?near=memory://&far=nix+http://127.0.0.1:1/c%3Ftrusted-public-keys={k1}%2520{k2}");
        let config = ServiceConfig::from_url(ServiceKind::PathInfo, &url).unwrap();
        let ServiceConfig::Cache {
            far: ServiceRef::Inline(far),
            ..
        } = &config
        else {
            panic!("{config:?}")
        };
        let ServiceConfig::NixBinaryCache {
            url: cache,
            trusted_public_keys,
        } = &**far
        else {
            panic!("{far:?}")
        };
        assert_eq!(cache.as_str(), "http://127.0.0.1:1/c");
        assert_eq!(trusted_public_keys, &vec![k1.to_string(), k2.to_string()]);
        pathinfo_service_from_config(&config, &services()).unwrap();
    }

    #[test]
    fn refuses_bad_urls_clearly() {
        for (url, needle) in [
            ("ftp://x", "unknown scheme"),
            ("sled://relative", "three slashes"),
            ("lru://?capacity=0", "positive integer"),
            ("cache://?near=memory://", "missing far"),
            ("nix+http://", "missing host"),
            ("nix+file://relative/cache", "three slashes"),
            ("nix+file:relative", "three slashes"),
            (
                "nix+http://h?trusted-public-keys=k-1:notbase64!",
                "k-1:notbase64!",
            ),
            (
                "nix+http://h?trusted-public-keys=k-1:AAAA",
                "invalid trusted public key",
            ),
            ("nix+http://h?trusted-public-keys=nocolon", "name:base64key"),
            ("nix+http://h?priority=1", "unknown parameter"),
        ] {
            let e = build(url)
                .err()
                .unwrap_or_else(|| panic!("{url} accepted"))
                .to_string();
            assert!(e.contains(needle), "{url}: {e}");
        }
    }
}
