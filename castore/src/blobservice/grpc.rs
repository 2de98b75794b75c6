//! gRPC client for a remote blob service (an Arca or Tvix daemon).
//!
//! Every byte received is verified: chunks before they are returned, whole
//! streams before their last bytes are handed out. Uploads are hashed
//! locally and the server's digest must match.
use super::chunked_reader::{verify_chunk, ChunkFetcher, ChunkedReader};
use super::{BlobReader, BlobService, BlobWriter, ChunkMeta};
use crate::{B3Digest, Error, BLOB_MESSAGE_CHUNK};
use arca_proto::castore as proto;
use arca_proto::castore::blob_service_client::BlobServiceClient;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::stream::{BoxStream, StreamExt};
use std::io::SeekFrom;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncBufRead, AsyncRead, AsyncSeek, ReadBuf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::io::StreamReader;
use tonic::transport::Channel;
use tonic::Code;
use tracing::instrument;

/// A blob service reached over gRPC.
#[derive(Clone)]
pub struct GrpcBlobService {
    client: BlobServiceClient<Channel>,
}

impl GrpcBlobService {
    /// A client over an established (or lazy) channel.
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            client: BlobServiceClient::new(channel)
                .max_decoding_message_size(crate::MAX_BLOB_MESSAGE_SIZE)
                .max_encoding_message_size(crate::MAX_BLOB_MESSAGE_SIZE),
        }
    }
}

#[async_trait]
impl BlobService for GrpcBlobService {
    #[instrument(skip(self), level = "debug")]
    async fn has(&self, digest: &B3Digest) -> Result<bool, Error> {
        let req = proto::StatBlobRequest { digest: digest.to_bytes(), send_chunks: false, send_bao: false };
        match self.client.clone().stat(req).await {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(s.into()),
        }
    }

    #[instrument(skip(self), level = "debug")]
    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>, Error> {
        match self.chunks(digest).await? {
            None => Ok(None),
            Some(chunks) if chunks.len() > 1 => Ok(Some(Box::new(ChunkedReader::new(
                chunks,
                Arc::new(GrpcChunkFetcher { client: self.client.clone() }),
                *digest,
            )?))),
            Some(_) => Ok(Some(Box::new(GrpcStreamReader::new(self.client.clone(), *digest)))),
        }
    }

    async fn open_write(&self) -> Box<dyn BlobWriter> {
        Box::new(GrpcBlobWriter {
            client: self.client.clone(),
            hasher: blake3::Hasher::new(),
            tx: None,
            task: None,
            done: None,
            failed: false,
            expected: None,
        })
    }

    #[instrument(skip(self), level = "debug")]
    async fn chunks(&self, digest: &B3Digest) -> Result<Option<Vec<ChunkMeta>>, Error> {
        let req = proto::StatBlobRequest { digest: digest.to_bytes(), send_chunks: true, send_bao: false };
        let resp = match self.client.clone().stat(req).await {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::NotFound => return Ok(None),
            Err(s) => return Err(s.into()),
        };
        resp.chunks
            .into_iter()
            .map(|c| {
                Ok(ChunkMeta {
                    digest: B3Digest::try_from(&c.digest)
                        .map_err(|e| Error::Storage(format!("server sent an invalid chunk digest: {e}")))?,
                    size: c.size,
                })
            })
            .collect::<Result<Vec<_>, Error>>()
            .and_then(|list| {
                super::validate_chunk_list(&list).map_err(|e| Error::Storage(format!("server sent a bad chunk list: {e}")))?;
                Ok(Some(list))
            })
    }
}

struct GrpcChunkFetcher {
    client: BlobServiceClient<Channel>,
}

#[async_trait]
impl ChunkFetcher for GrpcChunkFetcher {
    async fn fetch_chunk(&self, chunk: &ChunkMeta) -> Result<Bytes, Error> {
        let req = proto::ReadBlobRequest { digest: chunk.digest.to_bytes() };
        let mut stream = self.client.clone().read(req).await?.into_inner();
        let mut buf = BytesMut::with_capacity(chunk.size as usize);
        while let Some(msg) = stream.message().await? {
            if (buf.len() + msg.data.len()) as u64 > chunk.size {
                return Err(Error::Storage(format!("chunk {} is longer than {} bytes", chunk.digest, chunk.size)));
            }
            buf.extend_from_slice(&msg.data);
        }
        let data = buf.freeze();
        verify_chunk(chunk, &data)?;
        Ok(data)
    }
}

/// Streams one blob's bytes, verifying the digest; the last message is held
/// back until the digest matched.
fn verified_stream(client: BlobServiceClient<Channel>, digest: B3Digest) -> BoxStream<'static, std::io::Result<Bytes>> {
    async_stream::try_stream! {
        let req = proto::ReadBlobRequest { digest: digest.to_bytes() };
        let mut resp = client.clone().read(req).await.map_err(Error::from)?.into_inner();
        let mut hasher = blake3::Hasher::new();
        let mut held: Option<Bytes> = None;
        while let Some(msg) = resp.message().await.map_err(Error::from)? {
            hasher.update(&msg.data);
            if let Some(prev) = held.replace(msg.data) {
                yield prev;
            }
        }
        let actual = B3Digest::from(hasher.finalize());
        if actual != digest {
            Err(std::io::Error::from(Error::Storage(format!("blob {digest} failed verification (got {actual})"))))?;
        }
        if let Some(last) = held {
            yield last;
        }
    }
    .boxed()
}

/// A seekable reader over an unchunked remote blob: forward seeks skip,
/// backward seeks reopen the stream.
struct GrpcStreamReader {
    client: BlobServiceClient<Channel>,
    digest: B3Digest,
    inner: StreamReader<BoxStream<'static, std::io::Result<Bytes>>, Bytes>,
    inner_pos: u64,
    target: u64,
    /// Once failed, every later call fails too (never a silent EOF or a wrong position).
    failed: Option<(std::io::ErrorKind, String)>,
}

impl GrpcStreamReader {
    fn new(client: BlobServiceClient<Channel>, digest: B3Digest) -> Self {
        let inner = StreamReader::new(verified_stream(client.clone(), digest));
        Self { client, digest, inner, inner_pos: 0, target: 0, failed: None }
    }

    fn check(&self) -> std::io::Result<()> {
        match &self.failed {
            Some((kind, msg)) => Err(std::io::Error::new(*kind, msg.clone())),
            None => Ok(()),
        }
    }

    fn fail(&mut self, e: std::io::Error) -> std::io::Error {
        self.failed = Some((e.kind(), e.to_string()));
        e
    }
}

impl AsyncRead for GrpcStreamReader {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        self.check()?;
        let before = buf.filled().len();
        if let Err(e) = ready!(Pin::new(&mut self.inner).poll_read(cx, buf)) {
            return Poll::Ready(Err(self.fail(e)));
        }
        let n = (buf.filled().len() - before) as u64;
        self.inner_pos += n;
        self.target = self.inner_pos;
        Poll::Ready(Ok(()))
    }
}

impl AsyncSeek for GrpcStreamReader {
    fn start_seek(mut self: Pin<&mut Self>, position: SeekFrom) -> std::io::Result<()> {
        self.check()?;
        let target = match position {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::Current(d) => self.inner_pos.checked_add_signed(d),
            SeekFrom::End(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "seeking from the end of an unchunked remote blob",
                ))
            }
        }
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before start"))?;
        if target < self.inner_pos {
            self.inner = StreamReader::new(verified_stream(self.client.clone(), self.digest));
            self.inner_pos = 0;
        }
        self.target = target;
        Ok(())
    }

    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<u64>> {
        self.check()?;
        while self.inner_pos < self.target {
            let available = match ready!(Pin::new(&mut self.inner).poll_fill_buf(cx)) {
                Ok(b) => b.len() as u64,
                Err(e) => return Poll::Ready(Err(self.fail(e))),
            };
            if available == 0 {
                // Past the end: later reads return EOF.
                self.inner_pos = self.target;
                break;
            }
            let n = available.min(self.target - self.inner_pos);
            Pin::new(&mut self.inner).consume(n as usize);
            self.inner_pos += n;
        }
        Poll::Ready(Ok(self.inner_pos))
    }
}

struct GrpcBlobWriter {
    client: BlobServiceClient<Channel>,
    hasher: blake3::Hasher,
    tx: Option<mpsc::Sender<proto::BlobChunk>>,
    task: Option<JoinHandle<Result<Bytes, tonic::Status>>>,
    done: Option<B3Digest>,
    failed: bool,
    /// Set by `expect_digest`: the server's digest is compared with it and
    /// the data is not hashed again here.
    expected: Option<B3Digest>,
}

impl Drop for GrpcBlobWriter {
    /// An unclosed writer cancels its upload (the call is reset, not
    /// completed), so the server never stores a truncated blob.
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl GrpcBlobWriter {
    fn start(&mut self) -> Result<(), Error> {
        if self.failed {
            return Err(Error::Storage("blob upload failed earlier; start a new one".into()));
        }
        if self.task.is_some() {
            return Ok(());
        }
        let (tx, rx) = mpsc::channel(4);
        let mut client = self.client.clone();
        self.task = Some(tokio::spawn(async move {
            let resp = client.put(tokio_stream::wrappers::ReceiverStream::new(rx)).await?;
            Ok(resp.into_inner().digest)
        }));
        self.tx = Some(tx);
        Ok(())
    }

    async fn finish(&mut self) -> Result<Bytes, Error> {
        self.tx = None;
        let r = match self.task.take() {
            Some(t) => t.await.map_err(Error::storage).and_then(|r| r.map_err(Error::from)),
            None => Err(Error::Storage("blob upload failed earlier; start a new one".into())),
        };
        self.failed |= r.is_err();
        r
    }
}

#[async_trait]
impl BlobWriter for GrpcBlobWriter {
    async fn write(&mut self, mut data: Bytes) -> Result<(), Error> {
        if self.done.is_some() {
            return Err(Error::InvalidRequest("write after close".into()));
        }
        self.start()?;
        if self.expected.is_none() {
            self.hasher.update(&data);
        }
        while !data.is_empty() {
            let piece = data.split_to(data.len().min(BLOB_MESSAGE_CHUNK));
            let sent = match &self.tx {
                Some(tx) => tx.send(proto::BlobChunk { data: piece }).await.is_ok(),
                None => false,
            };
            if !sent {
                // The upload ended early; report why.
                self.failed = true;
                self.finish().await?;
                return Err(Error::Storage("upload stream ended early".into()));
            }
        }
        Ok(())
    }

    async fn close(&mut self) -> Result<B3Digest, Error> {
        if let Some(d) = self.done {
            return Ok(d);
        }
        self.start()?;
        let returned = self.finish().await?;
        let returned = B3Digest::try_from(&returned)
            .map_err(|e| Error::Storage(format!("server returned an invalid digest: {e}")))?;
        let local = match self.expected {
            Some(d) => d,
            None => B3Digest::from(self.hasher.finalize()),
        };
        if returned != local {
            self.failed = true;
            return Err(Error::Storage(format!("server returned digest {returned} for data with digest {local}")));
        }
        self.done = Some(local);
        Ok(local)
    }

    fn expect_digest(&mut self, digest: B3Digest) {
        self.expected = Some(digest);
    }
}
