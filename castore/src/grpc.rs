//! gRPC plumbing: server wrappers exposing any [BlobService] /
//! [DirectoryService] as `tvix.castore.v1`, and client channels from URLs.
use crate::blobservice::{
    as_plain, StoredBlob, DECODE_ELSEWHERE, MAX_BATCH_BLOB_SIZE, MAX_BATCH_DIGESTS,
};
use crate::directoryservice::ClosureValidator;
use crate::{B3Digest, BlobService, DirectoryService, Error};
use arca_proto::castore as proto;
use arca_proto::castore::blob_service_server::BlobServiceServer;
use arca_proto::castore::directory_service_server::DirectoryServiceServer;
use arca_proto::castore_batch as batch_proto;
use arca_proto::castore_batch::blob_batch_service_server::BlobBatchServiceServer;
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use std::sync::Arc;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Response, Status, Streaming};
use tracing::instrument;

/// A generated gRPC server whose request streams fail when the client
/// cancels them.
///
/// tonic hands a request stream that the client reset with `CANCEL` (what
/// a client sends when it drops an unfinished call) to the handler as a
/// clean end of stream. `Put` would then store the truncated blob, or the
/// directories sent so far, as if the upload were complete. This wrapper
/// turns that cancellation into an `ABORTED` error before tonic sees it.
#[derive(Debug, Clone)]
pub struct CancelledStreamsFail<S>(S);

impl<S> CancelledStreamsFail<S> {
    /// Wraps `server`.
    pub fn new(server: S) -> Self {
        Self(server)
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for CancelledStreamsFail<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<tonic::codegen::http::Request<tonic::body::Body>> for CancelledStreamsFail<S>
where
    S: tower::Service<tonic::codegen::http::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        use http_body_util::BodyExt;
        self.0.call(req.map(|body| {
            tonic::body::Body::new(body.map_err(|status| {
                if status.code() == tonic::Code::Cancelled {
                    Status::aborted(format!(
                        "the client cancelled the request stream: {}",
                        status.message()
                    ))
                } else {
                    status
                }
            }))
        }))
    }
}

/// A blob as stored, decoded for a client that did not accept its form
/// (not verified here: every batch client verifies what it gets). Large
/// ones ([DECODE_ELSEWHERE]) are decoded on the blocking pool, off the
/// runtime's workers.
async fn plain(digest: B3Digest, blob: StoredBlob) -> Result<Option<StoredBlob>, Error> {
    let large = blob.stored_len() >= DECODE_ELSEWHERE;
    let decode = move || {
        blob.decode(MAX_BATCH_BLOB_SIZE)
            .map(|data| Some(StoredBlob::Plain(data)))
            .map_err(|e| Error::Storage(format!("blob {digest}: corrupt compressed data: {e}")))
    };
    if !large {
        return decode();
    }
    tokio::task::spawn_blocking(decode)
        .await
        .map_err(Error::storage)?
}

fn digest_arg(raw: &bytes::Bytes) -> Result<B3Digest, Status> {
    B3Digest::try_from(raw).map_err(|e| Status::invalid_argument(format!("invalid digest: {e}")))
}

/// Serves a [BlobService] as `tvix.castore.v1.BlobService`.
pub struct GrpcBlobServiceWrapper {
    svc: Arc<dyn BlobService>,
}

impl GrpcBlobServiceWrapper {
    /// Wraps `svc`.
    pub fn new(svc: Arc<dyn BlobService>) -> Self {
        Self { svc }
    }

    /// The tonic server, with Arca's message limits.
    /// A cancelled upload fails instead of storing what was sent so far.
    pub fn into_server(self) -> CancelledStreamsFail<BlobServiceServer<Self>> {
        CancelledStreamsFail::new(
            BlobServiceServer::new(self)
                .max_decoding_message_size(crate::MAX_BLOB_MESSAGE_SIZE)
                .max_encoding_message_size(crate::MAX_BLOB_MESSAGE_SIZE),
        )
    }
}

#[tonic::async_trait]
impl proto::blob_service_server::BlobService for GrpcBlobServiceWrapper {
    type ReadStream = BoxStream<'static, Result<proto::BlobChunk, Status>>;

    #[instrument(skip_all, err(level = "debug"))]
    async fn stat(
        &self,
        request: Request<proto::StatBlobRequest>,
    ) -> Result<Response<proto::StatBlobResponse>, Status> {
        let req = request.into_inner();
        let digest = digest_arg(&req.digest)?;
        let chunks = if req.send_chunks {
            self.svc.chunks(&digest).await?
        } else {
            self.svc.has(&digest).await?.then(Vec::new)
        };
        match chunks {
            None => Err(Status::not_found(format!("blob {digest}"))),
            Some(chunks) => Ok(Response::new(proto::StatBlobResponse {
                chunks: chunks
                    .into_iter()
                    .map(|c| proto::stat_blob_response::ChunkMeta {
                        digest: c.digest.to_bytes(),
                        size: c.size,
                    })
                    .collect(),
                bao: Default::default(),
            })),
        }
    }

    #[instrument(skip_all, err(level = "debug"))]
    async fn read(
        &self,
        request: Request<proto::ReadBlobRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let digest = digest_arg(&request.into_inner().digest)?;
        let pieces = self
            .svc
            .read_stream(&digest)
            .await?
            .ok_or_else(|| Status::not_found(format!("blob {digest}")))?;
        // The backend's pieces as they are, cut to at most one message each.
        let stream = pieces.flat_map(|r| {
            futures::stream::iter(match r {
                Ok(data) => crate::blobservice::pieces_of(data, crate::BLOB_MESSAGE_CHUNK)
                    .map(|data| Ok(proto::BlobChunk { data }))
                    .collect(),
                Err(e) => vec![Err(Status::from(Error::from(e)))],
            })
        });
        Ok(Response::new(stream.boxed()))
    }

    #[instrument(skip_all, err(level = "debug"))]
    async fn put(
        &self,
        request: Request<Streaming<proto::BlobChunk>>,
    ) -> Result<Response<proto::PutBlobResponse>, Status> {
        let mut stream = request.into_inner();
        let mut writer = self.svc.open_write().await;
        while let Some(msg) = stream.message().await? {
            writer.write(msg.data).await?;
        }
        let digest = writer.close().await?;
        Ok(Response::new(proto::PutBlobResponse {
            digest: digest.to_bytes(),
        }))
    }
}

/// Serves Arca's `arca.castore.v1.LocalIngestService`: where this daemon
/// takes open files from clients on its machine ([crate::local_ingest]).
pub struct GrpcLocalIngestWrapper {
    socket_path: String,
    token: [u8; crate::local_ingest::TOKEN_LEN],
    exports: bool,
    reads: bool,
}

impl GrpcLocalIngestWrapper {
    /// Describes the socket at `socket_path` that greets with `token`.
    pub fn new(socket_path: String, token: [u8; crate::local_ingest::TOKEN_LEN]) -> Self {
        Self {
            socket_path,
            token,
            exports: false,
            reads: false,
        }
    }

    /// Says the socket takes read requests too (its daemon's blob store
    /// keeps files: [crate::BlobService::stored_files]).
    pub fn with_reads(mut self, reads: bool) -> Self {
        self.reads = reads;
        self
    }

    /// Says the socket takes export requests too
    /// ([crate::local_ingest::LocalExport]).
    pub fn with_exports(mut self, exports: bool) -> Self {
        self.exports = exports;
        self
    }

    /// The tonic server.
    pub fn into_server(
        self,
    ) -> batch_proto::local_ingest_service_server::LocalIngestServiceServer<Self> {
        batch_proto::local_ingest_service_server::LocalIngestServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl batch_proto::local_ingest_service_server::LocalIngestService for GrpcLocalIngestWrapper {
    async fn describe(
        &self,
        _request: Request<batch_proto::DescribeLocalIngestRequest>,
    ) -> Result<Response<batch_proto::DescribeLocalIngestResponse>, Status> {
        Ok(Response::new(batch_proto::DescribeLocalIngestResponse {
            socket_path: self.socket_path.clone(),
            token: bytes::Bytes::copy_from_slice(&self.token),
            exports: self.exports,
            reads: self.reads,
        }))
    }
}

/// Serves [BlobService::read_many] as Arca's `arca.castore.v1.BlobBatchService`
/// (many small blobs in one call; see `proto/protos/arca/castore/v1/batch.proto`).
pub struct GrpcBlobBatchServiceWrapper {
    svc: Arc<dyn BlobService>,
}

impl GrpcBlobBatchServiceWrapper {
    /// Wraps `svc`.
    pub fn new(svc: Arc<dyn BlobService>) -> Self {
        Self { svc }
    }

    /// The tonic server, with Arca's message limits.
    pub fn into_server(self) -> BlobBatchServiceServer<Self> {
        BlobBatchServiceServer::new(self)
            .max_decoding_message_size(crate::MAX_BLOB_MESSAGE_SIZE)
            .max_encoding_message_size(crate::MAX_BLOB_MESSAGE_SIZE)
    }
}

#[tonic::async_trait]
impl batch_proto::blob_batch_service_server::BlobBatchService for GrpcBlobBatchServiceWrapper {
    type ReadBlobsStream = BoxStream<'static, Result<batch_proto::ReadBlobsResponse, Status>>;

    #[instrument(skip_all, fields(blobs), err(level = "debug"))]
    async fn read_blobs(
        &self,
        request: Request<batch_proto::ReadBlobsRequest>,
    ) -> Result<Response<Self::ReadBlobsStream>, Status> {
        let req = request.into_inner();
        tracing::Span::current().record("blobs", req.digests.len());
        if req.digests.len() > MAX_BATCH_DIGESTS {
            return Err(Status::invalid_argument(format!(
                "{} digests asked for; at most {MAX_BATCH_DIGESTS} per call",
                req.digests.len()
            )));
        }
        let digests = req
            .digests
            .iter()
            .map(digest_arg)
            .collect::<Result<Vec<_>, _>>()?;
        let svc = self.svc.clone();
        let (accept_zstd, accept_lz4) = (req.accept_zstd, req.accept_lz4);
        let stream = async_stream::stream! {
            // Blobs as stored (compressed, unverified) only for clients that
            // said they decompress and verify them; a form a client did not
            // accept is decoded here (the client verifies it all the same).
            let mut items = if accept_zstd || accept_lz4 {
                svc.read_many_as_stored(digests)
            } else {
                as_plain(svc.read_many(digests))
            };
            while let Some(item) = items.next().await {
                match item {
                    Ok((digest, blob)) => {
                        let blob = match blob {
                            Some(b @ StoredBlob::Zstd(_)) if !accept_zstd => plain(digest, b).await,
                            Some(b @ StoredBlob::Lz4(_)) if !accept_lz4 => plain(digest, b).await,
                            other => Ok(other),
                        };
                        let blob = match blob {
                            Ok(b) => b,
                            Err(e) => {
                                yield Err(Status::from(e));
                                break;
                            }
                        };
                        let (found, zstd, lz4, data) = match blob {
                            None => (false, false, false, Bytes::new()),
                            Some(StoredBlob::Plain(data)) => (true, false, false, data),
                            Some(StoredBlob::Zstd(frame)) => (true, true, false, frame),
                            Some(StoredBlob::Lz4(payload)) => (true, false, true, payload),
                        };
                        yield Ok(batch_proto::ReadBlobsResponse {
                            digest: digest.to_bytes(),
                            found,
                            data,
                            zstd,
                            lz4,
                        })
                    }
                    Err(e) => {
                        yield Err(Status::from(e));
                        break;
                    }
                }
            }
        };
        Ok(Response::new(stream.boxed()))
    }
}

/// Directories of a closure walked ahead of what its call has sent.
const CLOSURE_BUFFER: usize = 64;

/// Serves a [DirectoryService] as `tvix.castore.v1.DirectoryService`.
pub struct GrpcDirectoryServiceWrapper {
    svc: Arc<dyn DirectoryService>,
}

impl GrpcDirectoryServiceWrapper {
    /// Wraps `svc`.
    pub fn new(svc: Arc<dyn DirectoryService>) -> Self {
        Self { svc }
    }

    /// The tonic server, accepting directories larger than tonic's default limit.
    /// A cancelled `Put` fails instead of storing the directories sent so far.
    pub fn into_server(self) -> CancelledStreamsFail<DirectoryServiceServer<Self>> {
        CancelledStreamsFail::new(
            DirectoryServiceServer::new(self)
                .max_decoding_message_size(crate::MAX_DIRECTORY_MESSAGE_SIZE)
                .max_encoding_message_size(crate::MAX_DIRECTORY_MESSAGE_SIZE),
        )
    }
}

#[tonic::async_trait]
impl proto::directory_service_server::DirectoryService for GrpcDirectoryServiceWrapper {
    type GetStream = BoxStream<'static, Result<proto::Directory, Status>>;

    #[instrument(skip_all, err(level = "debug"))]
    async fn get(
        &self,
        request: Request<proto::GetDirectoryRequest>,
    ) -> Result<Response<Self::GetStream>, Status> {
        let req = request.into_inner();
        let digest = match &req.by_what {
            Some(proto::get_directory_request::ByWhat::Digest(d)) => digest_arg(d)?,
            None => return Err(Status::invalid_argument("no digest given")),
        };
        if !req.recursive {
            let dir = self
                .svc
                .get(&digest)
                .await?
                .ok_or_else(|| Status::not_found(format!("directory {digest}")))?;
            return Ok(Response::new(
                futures::stream::once(async move { Ok(dir.to_proto()) }).boxed(),
            ));
        }
        // The closure is walked by a task of its own into a bounded
        // channel: the response sends what is there and waits for more, so
        // the root goes out at once instead of after the whole closure
        // (a walk over a store whose reads never wait would otherwise keep
        // this call's task busy, and its frames unsent, until the end).
        let svc = self.svc.clone();
        let (tx, rx) =
            tokio::sync::mpsc::channel::<Result<proto::Directory, Status>>(CLOSURE_BUFFER);
        tokio::spawn(async move {
            let mut inner = svc.get_recursive(&digest);
            let mut first = true;
            while let Some(d) = inner.next().await {
                let item = d.map(|d| d.to_proto()).map_err(Status::from);
                let stop = item.is_err();
                // The client went away: stop walking.
                if tx.send(item).await.is_err() || stop {
                    return;
                }
                if std::mem::take(&mut first) {
                    // The call's task sends the root before the walk goes on.
                    tokio::task::yield_now().await;
                }
            }
        });
        let mut stream = tokio_stream::wrappers::ReceiverStream::new(rx).boxed();
        // Look at the first item so an unknown root is NOT_FOUND on the call itself.
        let head = match stream.next().await {
            Some(Ok(d)) => d,
            Some(Err(e)) => return Err(e),
            None => return Err(Status::not_found(format!("directory {digest}"))),
        };
        let stream = futures::stream::once(async move { Ok(head) }).chain(stream);
        Ok(Response::new(stream.boxed()))
    }

    #[instrument(skip_all, err(level = "debug"))]
    async fn put(
        &self,
        request: Request<Streaming<proto::Directory>>,
    ) -> Result<Response<proto::PutDirectoryResponse>, Status> {
        let mut stream = request.into_inner();
        let mut validator = ClosureValidator::new();
        while let Some(msg) = stream.message().await? {
            let dir = crate::Directory::try_from(msg).map_err(Error::from)?;
            validator.add(dir)?;
        }
        let root = self.svc.put_closure(validator.finalize()?).await?;
        Ok(Response::new(proto::PutDirectoryResponse {
            root_digest: root.to_bytes(),
        }))
    }
}

/// Where a gRPC URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrpcTarget {
    /// A Unix domain socket.
    Unix(std::path::PathBuf),
    /// `http://host:port` or `https://host:port`.
    Tcp {
        /// The endpoint URI.
        uri: String,
        /// Whether TLS is used.
        tls: bool,
    },
}

/// Checks a `grpc+http://host:port`, `grpc+https://…` or
/// `grpc+unix:///abs/socket` URL.
pub fn parse_grpc_url(url: &url::Url) -> Result<GrpcTarget, Error> {
    let bad = |m: &str| Error::InvalidRequest(format!("{url}: {m}"));
    match url.scheme() {
        "grpc+unix" => {
            if url.host_str().is_some_and(|h| !h.is_empty()) || url.path().len() <= 1 {
                return Err(bad("expected grpc+unix:///absolute/path/to/socket"));
            }
            Ok(GrpcTarget::Unix(url.path().into()))
        }
        "grpc+http" | "grpc+https" => {
            let host = url
                .host_str()
                .filter(|h| !h.is_empty())
                .ok_or_else(|| bad("missing host"))?;
            if url.path().len() > 1 {
                return Err(bad("gRPC URLs take no path"));
            }
            let scheme = url.scheme().trim_start_matches("grpc+");
            let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
            let uri = format!("{scheme}://{host}{port}");
            Endpoint::from_shared(uri.clone()).map_err(|e| bad(&e.to_string()))?;
            Ok(GrpcTarget::Tcp {
                uri,
                tls: scheme == "https",
            })
        }
        other => Err(bad(&format!("unknown gRPC scheme {other:?}"))),
    }
}

/// A lazy gRPC channel for a URL accepted by [parse_grpc_url]. Needs a Tokio runtime.
pub fn channel_from_url(url: &url::Url) -> Result<Channel, Error> {
    let bad = |m: &str| Error::InvalidRequest(format!("{url}: {m}"));
    match parse_grpc_url(url)? {
        GrpcTarget::Unix(path) => {
            let endpoint = Endpoint::from_static("http://[::1]:1")
                .initial_stream_window_size(crate::HTTP2_STREAM_WINDOW)
                .initial_connection_window_size(crate::HTTP2_CONNECTION_WINDOW)
                .max_frame_size(crate::HTTP2_MAX_FRAME_SIZE);
            Ok(endpoint.connect_with_connector_lazy(tower::service_fn(
                move |_: tonic::transport::Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                    }
                },
            )))
        }
        GrpcTarget::Tcp { uri, tls } => {
            let mut endpoint = Endpoint::from_shared(uri).map_err(|e| bad(&e.to_string()))?;
            if tls {
                endpoint = endpoint
                    .tls_config(ClientTlsConfig::new().with_native_roots())
                    .map_err(|e| bad(&e.to_string()))?;
            }
            Ok(endpoint
                .tcp_nodelay(true)
                .initial_stream_window_size(crate::HTTP2_STREAM_WINDOW)
                .initial_connection_window_size(crate::HTTP2_CONNECTION_WINDOW)
                .max_frame_size(crate::HTTP2_MAX_FRAME_SIZE)
                .connect_timeout(std::time::Duration::from_secs(10))
                .connect_lazy())
        }
    }
}
