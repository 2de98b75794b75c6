//! Arca's Nix layer: the pure formats Nix uses to name and describe store
//! paths.
//!
//! - [nixbase32]: Nix's base-32 encoding of hashes.
//! - [hash]: typed hashes (`sha256:<nixbase32>`, SRI) as narinfo files write them.
//! - [store_path]: `/nix/store/<hash>-<name>` paths, and how content-addressed
//!   ones (`nix-store --add`, `builtins.toFile`, fixed outputs) are computed.
//! - [nar]: NAR archives: streaming reader and writer, ingest into castore, rendering from it.
//! - [nar_index]: the persistent NarHash → castore node index, NAR upload records and narinfo cache.
//! - [compression]: the compressions of binary caches, as stream decoders and encoders.
//! - [http_cache]: the Nix binary cache over HTTP (serving and accepting uploads).
//! - [narinfo]: binary-cache `.narinfo` files, parsed and written back byte for byte.
//! - [signature]: ed25519 signatures over store path fingerprints, with Nix's key formats.
//! - [pathinfo]: [PathInfo], what the store knows about a store path, validated from the wire.
//! - [pathinfoservice]: the [PathInfoService] trait, its backends and layers, and URL composition.
//! - [grpc]: the `tvix.store.v1.PathInfoService` server wrapper.
//!
//! Everything here is checked against the real Nix: the tests hold values Nix
//! 2.8 printed, and narinfo files it wrote.
#![warn(missing_docs)]

pub mod compression;
pub mod grpc;
pub mod hash;
pub mod http_cache;
pub mod nar;
pub mod nar_index;
pub mod narinfo;
pub mod nixbase32;
pub mod pathinfo;
pub mod pathinfoservice;
pub mod signature;
pub mod store_path;

pub use hash::{HashAlgo, HashError, NixHash};
pub use nar_index::{CachedNarInfo, LazyNarIndex, NarIndex, NarUpload, NarinfoTtl};
pub use narinfo::{Compression, NarInfo, NarInfoError, MAX_NARINFO_SIZE};
pub use nixbase32::Nixbase32Error;
pub use pathinfo::{PathInfo, PathInfoError};
pub use pathinfoservice::PathInfoService;
pub use signature::{fingerprint, PublicKey, SecretKey, Signature, SignatureError};
pub use store_path::{
    compress_hash, ContentAddress, ContentAddressError, StorePath, StorePathError, STORE_DIR,
};
