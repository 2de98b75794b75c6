//! Arca's content-addressed store ("castore").
//!
//! Blobs are addressed by their BLAKE3 digest; directories form a Merkle DAG
//! whose nodes are addressed by the BLAKE3 digest of their canonical protobuf
//! encoding. Two small service traits, [BlobService] and [DirectoryService],
//! have one module per backend; layers (cache, lru) compose them, and
//! [composition] builds any stack from URLs or a TOML file.
#![warn(missing_docs)]

pub mod blobservice;
pub mod composition;
mod digest;
mod directory;
pub mod directoryservice;
mod errors;
pub mod grpc;
pub mod import;
pub mod local_ingest;
mod names;
mod node;

pub use blobservice::BlobService;
pub use digest::{B3Digest, DigestError, B3_LEN};
pub use directory::{Directory, DirectoryError};
pub use directoryservice::DirectoryService;
pub use errors::Error;
pub use names::{NameError, PathComponent, SymlinkTarget};
pub use node::Node;

/// Largest gRPC message Arca accepts for directories: far above any real
/// directory (a 255-byte name per entry gives ~3.3 million entries), far
/// below what could exhaust memory.
pub const MAX_DIRECTORY_MESSAGE_SIZE: usize = 1024 * 1024 * 1024;
/// Largest gRPC message Arca accepts for blob data and everything else.
pub const MAX_BLOB_MESSAGE_SIZE: usize = 16 * 1024 * 1024;
/// Size of the data messages Arca sends when streaming blobs.
pub const BLOB_MESSAGE_CHUNK: usize = 1024 * 1024;
/// HTTP/2 connections a gRPC blob client spreads its calls over.
pub const GRPC_BLOB_CONNECTIONS: usize = 4;
/// HTTP/2 flow-control window per stream. Fixed (not adaptive): on loopback
/// the adaptive window grows without bound and a fast sender can park
/// gigabytes in a slow receiver's buffers.
pub const HTTP2_STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// HTTP/2 flow-control window per connection (bounds buffering per client).
pub const HTTP2_CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;
/// Largest HTTP/2 frame Arca accepts (the default of 16 KiB makes bulk
/// transfers frame-bound).
pub const HTTP2_MAX_FRAME_SIZE: u32 = 1024 * 1024;

/// Runs CPU-bound work (hashing, compression) on the blocking pool, at most
/// one job per core at a time: the blocking pool would otherwise grow a
/// thread (and a compression context) for every chunk in flight.
pub(crate) async fn cpu_bound<F, R>(f: F) -> Result<R, Error>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    static PERMITS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    let permits = PERMITS.get_or_init(|| {
        tokio::sync::Semaphore::new(
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
        )
    });
    // Waiting for the permit and the work both run in a task of their own,
    // not in the caller's future: a caller inside a stream that is polled
    // lazily (a gRPC response waiting for flow-control credit) would
    // otherwise hold a permit, or be handed one as the next waiter, while
    // nobody polls it, and every other caller would wait forever.
    tokio::spawn(async move {
        let _permit = permits.acquire().await.map_err(Error::storage)?;
        tokio::task::spawn_blocking(f).await.map_err(Error::storage)
    })
    .await
    .map_err(Error::storage)?
}
