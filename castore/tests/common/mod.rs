//! Test harness shared by castore's integration tests: backend factories,
//! an in-process gRPC server on loopback, and SeaweedFS for S3.
#![allow(dead_code)]
pub mod seaweed;

use arca_castore::blobservice::BlobService;
use arca_castore::composition::{Builder, Composition};
use arca_castore::directoryservice::DirectoryService;
use arca_castore::grpc::{
    GrpcBlobBatchServiceWrapper, GrpcBlobServiceWrapper, GrpcDirectoryServiceWrapper,
};
use arca_castore::{blobservice::GrpcBlobService, directoryservice::GrpcDirectoryService};
use std::sync::Arc;
use tokio::sync::oneshot;

/// Keeps whatever a backend needs alive (temp dirs, servers) until dropped.
#[derive(Default)]
pub struct Guard {
    pub tmp: Option<tempfile::TempDir>,
    pub server: Option<ServerGuard>,
    pub extra: Vec<Box<dyn std::any::Any + Send>>,
}

/// Stops the in-process gRPC server when dropped.
pub struct ServerGuard {
    stop: Option<oneshot::Sender<()>>,
    pub addr: std::net::SocketAddr,
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Serves the given services on 127.0.0.1 (random port), as an Arca daemon
/// does (with Arca's batch reads).
pub async fn serve(blob: Arc<dyn BlobService>, dir: Arc<dyn DirectoryService>) -> ServerGuard {
    serve_with(blob, dir, true).await
}

/// Serves the given services like a Tvix daemon: only the tvix.castore.v1
/// services (no `arca.castore.v1.BlobBatchService`).
pub async fn serve_tvix_like(
    blob: Arc<dyn BlobService>,
    dir: Arc<dyn DirectoryService>,
) -> ServerGuard {
    serve_with(blob, dir, false).await
}

async fn serve_with(
    blob: Arc<dyn BlobService>,
    dir: Arc<dyn DirectoryService>,
    batch: bool,
) -> ServerGuard {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel();
    let batch = batch.then(|| GrpcBlobBatchServiceWrapper::new(blob.clone()).into_server());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_optional_service(batch)
            .add_service(GrpcBlobServiceWrapper::new(blob).into_server())
            .add_service(GrpcDirectoryServiceWrapper::new(dir).into_server())
            .serve_with_incoming_shutdown(
                tokio_stream::StreamExt::map(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    |s| s.and_then(|s| s.set_nodelay(true).map(|_| s)),
                ),
                async {
                    let _ = rx.await;
                },
            )
            .await
            .expect("server runs");
    });
    ServerGuard {
        stop: Some(tx),
        addr,
    }
}

/// Builds blob and directory services from URLs; `{tmp}` is replaced by a fresh temp dir.
pub fn from_urls(
    blob_url: &str,
    dir_url: &str,
) -> (Arc<dyn BlobService>, Arc<dyn DirectoryService>, Guard) {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().display().to_string();
    let b = Builder::new(
        Composition::from_urls(
            &blob_url.replace("{tmp}", &t),
            &dir_url.replace("{tmp}", &t),
        )
        .unwrap(),
    );
    (
        b.blob_service("default").unwrap(),
        b.directory_service("default").unwrap(),
        Guard {
            tmp: Some(tmp),
            ..Default::default()
        },
    )
}

/// Wraps services behind a real gRPC server and returns the gRPC clients.
pub async fn behind_grpc(
    services: (Arc<dyn BlobService>, Arc<dyn DirectoryService>, Guard),
) -> (Arc<dyn BlobService>, Arc<dyn DirectoryService>, Guard) {
    behind(services, true).await
}

/// Like [behind_grpc] with a server that has only the tvix.castore.v1
/// services (the clients fall back to one `Read` per blob).
pub async fn behind_tvix_like_grpc(
    services: (Arc<dyn BlobService>, Arc<dyn DirectoryService>, Guard),
) -> (Arc<dyn BlobService>, Arc<dyn DirectoryService>, Guard) {
    behind(services, false).await
}

async fn behind(
    (blob, dir, mut guard): (Arc<dyn BlobService>, Arc<dyn DirectoryService>, Guard),
    batch: bool,
) -> (Arc<dyn BlobService>, Arc<dyn DirectoryService>, Guard) {
    let server = serve_with(blob, dir, batch).await;
    let url = url::Url::parse(&format!("grpc+http://{}", server.addr)).unwrap();
    let channel = arca_castore::grpc::channel_from_url(&url).unwrap();
    guard.server = Some(server);
    (
        Arc::new(GrpcBlobService::from_channel(channel.clone())),
        Arc::new(GrpcDirectoryService::from_channel(channel)),
        guard,
    )
}

/// A blob read whole through [BlobService::read_stream]: its bytes, or the
/// error the stream ended with. Panics if the call fails or the blob is absent.
pub async fn read_streamed(
    b: &dyn BlobService,
    d: &arca_castore::B3Digest,
) -> std::io::Result<Vec<u8>> {
    use futures::TryStreamExt;
    let stream = b.read_stream(d).await.unwrap().expect("blob present");
    let pieces: Vec<bytes::Bytes> = stream.try_collect().await?;
    Ok(pieces.concat())
}

/// Deterministic pseudo-random bytes (xorshift), partly compressible.
pub fn test_data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Every other 4 KiB block is text-like, so compression has something to do.
        if (out.len() / 4096) % 2 == 0 {
            out.extend_from_slice(&x.to_le_bytes());
        } else {
            out.extend_from_slice(format!("line {} ", x % 1000).as_bytes());
        }
    }
    out.truncate(len);
    out
}
