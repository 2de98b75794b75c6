//! Path-info service stacks from URLs (see `cli.md`).
//!
//! The schemes path-info services share with directory services
//! (`memory://`, `sled://`, `objectstore+…`, `grpc+…`, `cache://`, `lru://`)
//! have identical syntax, so URLs are parsed by castore's parser
//! ([ServiceConfig::from_url] with [ServiceKind::Directory]) and the
//! resulting [ServiceConfig] is built into path-info services here.
//! `nix+http(s)://` / `nix+file://` (fetch-through from a binary cache) are
//! refused as not yet supported.
use super::{
    CachePathInfoService, GrpcPathInfoService, LruPathInfoService, MemoryPathInfoService,
    ObjectStorePathInfoService, PathInfoService, SledPathInfoService,
};
use arca_castore::composition::{object_store_from, CompositionError, ServiceConfig, ServiceKind, ServiceRef};
use arca_castore::{BlobService, DirectoryService};
use std::sync::Arc;

/// Builds a path-info service from a URL (`memory://`, `sled:///abs/path`,
/// `sled://`, `objectstore+…`, `grpc+http://…`, `grpc+unix://…`,
/// `cache://?near=…&far=…`, `lru://?capacity=N[&inner=…]`).
///
/// The stack is unchecked: wrap it in
/// [CheckedPathInfoService](super::CheckedPathInfoService) where path infos
/// enter the store. `blobs` and `directories` are the castore services the
/// store uses; they are kept for backends that ingest NARs (`nix+http://`).
pub fn pathinfo_service_from_url(
    url: &str,
    blobs: Arc<dyn BlobService>,
    directories: Arc<dyn DirectoryService>,
) -> Result<Arc<dyn PathInfoService>, CompositionError> {
    if let Some(scheme) = ["nix+http:", "nix+https:", "nix+file:"].iter().find(|s| url.starts_with(*s)) {
        return Err(CompositionError::InvalidUrl {
            url: url.to_string(),
            reason: format!("{}// path-info services are not supported yet", scheme.trim_end_matches(':')),
        });
    }
    let config = ServiceConfig::from_url(ServiceKind::Directory, url)?;
    pathinfo_service_from_config(&config, blobs, directories)
}

/// Builds a path-info service from a parsed configuration (inline
/// references only: names belong to a composition file).
pub fn pathinfo_service_from_config(
    config: &ServiceConfig,
    blobs: Arc<dyn BlobService>,
    directories: Arc<dyn DirectoryService>,
) -> Result<Arc<dyn PathInfoService>, CompositionError> {
    build(config, None, &mut std::collections::HashMap::new(), &blobs, &directories)
}

/// Builds the `[pathinfoservices]` entry `name` of a (checked) composition
/// file; named references resolve within the section, each entry built once.
pub fn pathinfo_service_from_composition(
    composition: &arca_castore::composition::Composition,
    name: &str,
    blobs: Arc<dyn BlobService>,
    directories: Arc<dyn DirectoryService>,
) -> Result<Arc<dyn PathInfoService>, CompositionError> {
    named(composition, name, &mut std::collections::HashMap::new(), &blobs, &directories)
}

type Built = std::collections::HashMap<String, Arc<dyn PathInfoService>>;

fn named(
    composition: &arca_castore::composition::Composition,
    name: &str,
    built: &mut Built,
    blobs: &Arc<dyn BlobService>,
    directories: &Arc<dyn DirectoryService>,
) -> Result<Arc<dyn PathInfoService>, CompositionError> {
    if let Some(s) = built.get(name) {
        return Ok(s.clone());
    }
    let config = composition.get(ServiceKind::PathInfo, name).ok_or_else(|| CompositionError::UnknownName {
        section: ServiceKind::PathInfo.section().into(),
        from: "(entry point)".into(),
        name: name.into(),
    })?;
    let svc = build(config, Some(composition), built, blobs, directories)?;
    built.insert(name.to_string(), svc.clone());
    Ok(svc)
}

fn build(
    config: &ServiceConfig,
    composition: Option<&arca_castore::composition::Composition>,
    built: &mut Built,
    blobs: &Arc<dyn BlobService>,
    directories: &Arc<dyn DirectoryService>,
) -> Result<Arc<dyn PathInfoService>, CompositionError> {
    let build_err = |e: String| CompositionError::Build(format!("path-info service: {e}"));
    let mut resolve = |r: &ServiceRef| match (r, composition) {
        (ServiceRef::Inline(c), _) => build(c, composition, built, blobs, directories),
        (ServiceRef::Named(n), Some(comp)) => named(comp, n, built, blobs, directories),
        (ServiceRef::Named(n), None) => Err(build_err(format!("named reference {n:?} outside a composition file"))),
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
        ServiceConfig::Lru { capacity, inner } => {
            Arc::new(LruPathInfoService::new(*capacity, inner.as_ref().map(resolve).transpose()?))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use arca_castore::blobservice::MemoryBlobService;
    use arca_castore::directoryservice::MemoryDirectoryService;

    fn build(url: &str) -> Result<Arc<dyn PathInfoService>, CompositionError> {
        pathinfo_service_from_url(url, Arc::new(MemoryBlobService::default()), Arc::new(MemoryDirectoryService::default()))
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
        ] {
            build(&url).unwrap_or_else(|e| panic!("{url}: {e}"));
        }
    }

    #[test]
    fn refuses_bad_urls_clearly() {
        for (url, needle) in [
            ("ftp://x", "unknown scheme"),
            ("sled://relative", "three slashes"),
            ("lru://?capacity=0", "positive integer"),
            ("cache://?near=memory://", "missing far"),
            ("nix+http://cache.nixos.org", "not supported yet"),
        ] {
            let e = build(url).err().unwrap_or_else(|| panic!("{url} accepted")).to_string();
            assert!(e.contains(needle), "{url}: {e}");
        }
    }
}
