//! Generated wire types and gRPC stubs for the `tvix.castore.v1` and
//! `tvix.store.v1` protocols that Arca speaks, and Arca's additions
//! (`arca.castore.v1`).
//!
//! These are *wire* types: they are not validated. Arca's domain types in
//! `arca-castore` (and `arca-store`) convert from them with `TryFrom`, which
//! is where every protocol rule is enforced.
#![allow(clippy::all, missing_docs)]

/// The protocol packages, nested as their proto package names.
pub mod tvix {
    /// `tvix.castore`
    pub mod castore {
        /// `tvix.castore.v1`: blobs and directories.
        pub mod v1 {
            tonic::include_proto!("tvix.castore.v1");
        }
    }
    /// `tvix.store`
    pub mod store {
        /// `tvix.store.v1`: path infos.
        pub mod v1 {
            tonic::include_proto!("tvix.store.v1");
        }
    }
}

/// Arca's own additions (served next to the Tvix protocols).
pub mod arca {
    /// `arca.castore`
    pub mod castore {
        /// `arca.castore.v1`: reading many small blobs in one call.
        pub mod v1 {
            tonic::include_proto!("arca.castore.v1");
        }
    }
}

/// `arca.castore.v1`
pub use arca::castore::v1 as castore_batch;
pub use tvix::castore::v1 as castore;
pub use tvix::store::v1 as store;

/// Encoded `FileDescriptorSet` of all protocols, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/arca_descriptor.bin"));
