//! Turning the service flags into services.
use crate::ServiceArgs;
use anyhow::{Context, Result};
use arca_castore::composition::{Builder, Composition};
use arca_castore::{BlobService, DirectoryService};
use arca_store::pathinfoservice::{PathInfoService, StoreServices};
use arca_store::LazyNarIndex;
use std::sync::Arc;

/// The services of a store.
pub struct Services {
    pub blob: Arc<dyn BlobService>,
    pub directory: Arc<dyn DirectoryService>,
    pub path_info: Arc<dyn PathInfoService>,
    /// The NAR index the services were built with (opened on first use;
    /// share this one: a sled index can be opened once per process).
    pub nar_index: LazyNarIndex,
}

/// The daemon other commands use when no flag says otherwise.
pub const DEFAULT_DAEMON: &str = "grpc+http://127.0.0.1:8000";

/// Where the services live when no flag says otherwise.
pub enum Defaults {
    /// The daemon: the embedded store under the data dir.
    Embedded,
    /// Every other command: a daemon on 127.0.0.1:8000.
    Daemon,
}

/// Builds the services from flags, env vars or a composition file.
pub fn build(args: &ServiceArgs, defaults: Defaults) -> Result<Services> {
    let default_path_info = match defaults {
        Defaults::Embedded => format!(
            "sled://{}",
            crate::data_dir(args)?.join("pathinfo.sled").display()
        ),
        Defaults::Daemon => DEFAULT_DAEMON.to_string(),
    };
    let composition = if let Some(file) = &args.store_composition {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        Composition::from_toml(&text).with_context(|| format!("in {}", file.display()))?
    } else {
        let (blob, dir) = match defaults {
            Defaults::Embedded => {
                let data = crate::data_dir(args)?;
                (
                    format!("objectstore+file://{}", data.join("blobs").display()),
                    format!("sled://{}", data.join("directories.sled").display()),
                )
            }
            Defaults::Daemon => (DEFAULT_DAEMON.to_string(), DEFAULT_DAEMON.to_string()),
        };
        let blob = args.blob_service_addr.clone().unwrap_or(blob);
        let dir = args.directory_service_addr.clone().unwrap_or(dir);
        Composition::from_urls(&blob, &dir)?
    };
    let has_path_info_entry = composition
        .get(arca_castore::composition::ServiceKind::PathInfo, "default")
        .is_some();
    let builder = Builder::new(composition.clone());
    let blob = builder.blob_service("default").context("blob service")?;
    let directory = builder
        .directory_service("default")
        .context("directory service")?;
    let nar_index = nar_index(args)?;
    let store = StoreServices::new(blob.clone(), directory.clone(), nar_index.clone());
    let path_info = match (&args.path_info_service_addr, has_path_info_entry) {
        // The flag wins; then the file's [pathinfoservices.default]; then the default URL.
        (None, true) => arca_store::pathinfoservice::pathinfo_service_from_composition(
            &composition,
            "default",
            &store,
        ),
        (url, _) => arca_store::pathinfoservice::pathinfo_service_from_url(
            url.as_deref().unwrap_or(&default_path_info),
            &store,
        ),
    }
    .context("path-info service")?;
    Ok(Services {
        blob,
        directory,
        path_info,
        nar_index,
    })
}

/// The store's NAR index: `--nar-index-addr` / `NAR_INDEX_ADDR`, else
/// `$ARCA_DATA_DIR/narindex.sled`; opened only when used (a `nix+http(s)://`
/// or `nix+file://` binary cache, or the HTTP binary cache front).
pub fn nar_index(args: &ServiceArgs) -> Result<LazyNarIndex> {
    if let Some(url) = &args.nar_index_addr {
        return LazyNarIndex::from_url(url).context("--nar-index-addr / NAR_INDEX_ADDR");
    }
    Ok(match crate::data_dir_path(args) {
        Ok(data) => LazyNarIndex::at(data.join("narindex.sled")),
        Err(_) => LazyNarIndex::temporary(),
    })
}
