//! gRPC client for a remote blob service (an Arca or Tvix daemon).
//!
//! Every byte received is verified: chunks before they are returned, whole
//! streams before their last bytes are handed out. Uploads are hashed
//! locally and the server's digest must match.
use super::chunked_reader::{verify_chunk, ChunkFetcher, ChunkedReader};
use super::{
    BatchItem, BlobReader, BlobService, BlobWriter, ChunkMeta, MAX_BATCH_BLOB_SIZE,
    MAX_BATCH_DIGESTS,
};
use crate::local_ingest::LocalIngestClient;
use crate::{B3Digest, Error, BLOB_MESSAGE_CHUNK};
use arca_proto::castore as proto;
use arca_proto::castore::blob_service_client::BlobServiceClient;
use arca_proto::castore_batch::blob_batch_service_client::BlobBatchServiceClient;
use arca_proto::castore_batch::ReadBlobsRequest;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use std::io::SeekFrom;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
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
///
/// Calls are spread round-robin over one or more channels (HTTP/2
/// connections): one connection serialises all framing of concurrent
/// uploads in one task on each side.
///
/// Many small blobs are read with Arca's `arca.castore.v1.BlobBatchService`
/// (one call for up to [MAX_BATCH_DIGESTS] blobs); against a server without
/// it (a Tvix daemon: `UNIMPLEMENTED`) the client falls back to one `Read`
/// per blob, and remembers.
#[derive(Clone)]
pub struct GrpcBlobService {
    clients: Arc<[(BlobServiceClient<Channel>, BlobBatchServiceClient<Channel>)]>,
    next: Arc<std::sync::atomic::AtomicUsize>,
    /// The client of the call being made (picked by [Self::pick]).
    client: BlobServiceClient<Channel>,
    /// Its batch client (same channel).
    batch_client: BlobBatchServiceClient<Channel>,
    /// Set once the server answered `UNIMPLEMENTED` to a batch read.
    no_batch: Arc<AtomicBool>,
    /// Whether the server is on this machine (loopback or a Unix socket),
    /// so that it may take open files ([crate::local_ingest]).
    local_ingest_allowed: bool,
    /// The server's local ingest socket, looked up on first use; `None` if
    /// it has none (or is not on this machine).
    local_ingest: Arc<tokio::sync::OnceCell<Option<Arc<LocalIngestClient>>>>,
    /// The first connection, for the local ingest lookup.
    first_channel: Channel,
    /// Set once the local ingest socket failed: uploads go over gRPC.
    local_ingest_broken: Arc<AtomicBool>,
    /// Set once a local read request failed: batch reads go over gRPC.
    local_reads_broken: Arc<AtomicBool>,
}

/// Blobs asked for in one local read request ([GrpcBlobService::read_many]
/// through the daemon's socket); each group is read, decoded and verified
/// in one trip to the blocking pool, two groups at a time.
const LOCAL_READ_GROUP: usize = 32;
/// The first group of a [GrpcBlobService::read_many] through the daemon's
/// socket: smaller, so that the first blob (often one a reader waits for)
/// comes sooner.
const LOCAL_READ_FIRST_GROUP: usize = 8;

impl GrpcBlobService {
    /// Starts a `Read` call for the blob on the next connection: the
    /// connection and the response stream, `None` if the server answered
    /// NOT_FOUND.
    async fn start_read(
        &self,
        digest: &B3Digest,
    ) -> Result<Option<(GrpcBlobService, tonic::Streaming<proto::BlobChunk>)>, Error> {
        let this = self.pick();
        let req = proto::ReadBlobRequest {
            digest: digest.to_bytes(),
        };
        match this.client.clone().read(req).await {
            Ok(resp) => Ok(Some((this, resp.into_inner()))),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(s.into()),
        }
    }

    /// A client over an established (or lazy) channel.
    pub fn from_channel(channel: Channel) -> Self {
        Self::from_channels(vec![channel]).expect("one channel given")
    }

    /// A client spreading calls over several channels; `None` if `channels` is empty.
    pub fn from_channels(channels: Vec<Channel>) -> Option<Self> {
        let first_channel = channels.first()?.clone();
        let clients: Arc<[_]> = channels
            .into_iter()
            .map(|c| {
                let blob = BlobServiceClient::new(c.clone())
                    .max_decoding_message_size(crate::MAX_BLOB_MESSAGE_SIZE)
                    .max_encoding_message_size(crate::MAX_BLOB_MESSAGE_SIZE);
                let batch = BlobBatchServiceClient::new(c)
                    .max_decoding_message_size(crate::MAX_BLOB_MESSAGE_SIZE)
                    .max_encoding_message_size(crate::MAX_BLOB_MESSAGE_SIZE);
                (blob, batch)
            })
            .collect();
        let (client, batch_client) = clients.first()?.clone();
        Some(Self {
            clients,
            next: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            client,
            batch_client,
            no_batch: Arc::new(AtomicBool::new(false)),
            local_ingest_allowed: false,
            local_ingest: Arc::new(tokio::sync::OnceCell::new()),
            first_channel,
            local_ingest_broken: Arc::new(AtomicBool::new(false)),
            local_reads_broken: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Lets this client hand open files to the server's local ingest socket
    /// when the server has one: only for a server on this machine (the
    /// socket path it names is a path here).
    pub fn with_local_ingest(mut self, allowed: bool) -> Self {
        self.local_ingest_allowed = allowed;
        self
    }

    /// The server's local ingest socket, connected and its token checked;
    /// `None` if not allowed, not offered or not reachable.
    async fn local_ingest(&self) -> Option<Arc<LocalIngestClient>> {
        if !self.local_ingest_allowed || self.local_ingest_broken.load(Ordering::Relaxed) {
            return None;
        }
        let channel = self.first_channel.clone();
        self.local_ingest
            .get_or_init(|| async move {
                let client = LocalIngestClient::discover(channel).await?;
                tracing::debug!("handing files to the daemon");
                Some(Arc::new(client))
            })
            .await
            .clone()
    }

    /// This service with the next channel's client for its calls.
    fn pick(&self) -> Self {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        let (client, batch_client) = self.clients[i].clone();
        Self {
            clients: self.clients.clone(),
            next: self.next.clone(),
            client,
            batch_client,
            no_batch: self.no_batch.clone(),
            local_ingest_allowed: self.local_ingest_allowed,
            local_ingest: self.local_ingest.clone(),
            first_channel: self.first_channel.clone(),
            local_ingest_broken: self.local_ingest_broken.clone(),
            local_reads_broken: self.local_reads_broken.clone(),
        }
    }

    /// The daemon's socket, if it takes read requests (and none failed).
    async fn local_reads(&self) -> Option<Arc<LocalIngestClient>> {
        if self.local_reads_broken.load(Ordering::Relaxed) {
            return None;
        }
        self.local_ingest().await.filter(|l| l.takes_reads())
    }

    /// [BlobService::read_many] over gRPC: one `ReadBlobs` call per
    /// [MAX_BATCH_DIGESTS] digests (two calls in flight), answers handed
    /// out as they arrive; one `Read` per blob against servers without
    /// batch reads.
    fn read_many_grpc<'a>(
        &'a self,
        digests: Vec<B3Digest>,
    ) -> BoxStream<'a, Result<BatchItem, Error>> {
        if self.no_batch.load(Ordering::Relaxed) {
            return super::read_each(self, digests);
        }
        let groups = super::in_groups(&digests, MAX_BATCH_DIGESTS);
        futures::stream::iter(groups)
            .map(move |group| async move {
                let this = self.pick();
                match this.start_batch(&group).await {
                    Ok(Some(answers)) => checked_batch(answers, group, Check::EachAnswer),
                    Ok(None) => {
                        tracing::debug!("server has no batch reads: one Read per blob");
                        self.no_batch.store(true, Ordering::Relaxed);
                        super::read_each(self, group)
                    }
                    Err(e) => futures::stream::iter([Err(e)]).boxed(),
                }
            })
            .buffered(2)
            .flatten()
            .boxed()
    }

    /// [BlobService::read_many] through the daemon's socket: the files it
    /// keeps the blobs in, [LOCAL_READ_GROUP] per request, read, decoded
    /// and verified here; blobs it passes no file for over gRPC.
    fn read_many_local<'a>(
        &'a self,
        local: Arc<LocalIngestClient>,
        digests: Vec<B3Digest>,
    ) -> BoxStream<'a, Result<BatchItem, Error>> {
        // A small first group: the first blob is ready sooner.
        let first = digests.len().min(LOCAL_READ_FIRST_GROUP);
        let mut groups = vec![digests[..first].to_vec()];
        groups.extend(super::in_groups(&digests[first..], LOCAL_READ_GROUP));
        groups.retain(|g| !g.is_empty());
        futures::stream::iter(groups)
            .map(move |group| {
                let local = local.clone();
                async move { self.read_group_locally(&local, group).await }
            })
            .buffered(2)
            .map_ok(|items| futures::stream::iter(items.into_iter().map(Ok)))
            .try_flatten()
            .boxed()
    }

    /// One group of [Self::read_many_local], in order.
    async fn read_group_locally(
        &self,
        local: &LocalIngestClient,
        group: Vec<B3Digest>,
    ) -> Result<Vec<BatchItem>, Error> {
        let files = match local.read_files(&group).await {
            Ok(files) => {
                tracing::debug!(blobs = group.len(), "reading blobs from the daemon's files");
                files
            }
            Err(e) => {
                // A restarted daemon (another token), or one that stopped
                // taking reads: gRPC from here on.
                tracing::warn!(error = %e, "local reads failed; reading over gRPC");
                self.local_reads_broken.store(true, Ordering::Relaxed);
                return self.read_many_grpc(group).try_collect().await;
            }
        };
        let asked = group.clone();
        // A file that does not hold its blob (corrupt, or in a form this
        // client cannot decode: a newer daemon's codec) is asked for over
        // gRPC too, where the daemon decodes what it can; every answer is
        // verified all the same.
        let read: Vec<Option<Bytes>> = tokio::task::spawn_blocking(move || {
            asked
                .iter()
                .zip(files)
                .map(|(d, file)| {
                    file.and_then(|fd| match crate::local_ingest::read_stored_file(d, fd) {
                        Ok(data) => Some(data),
                        Err(e) => {
                            tracing::warn!(digest = %d, error = %e, "a file the daemon passed; reading it over gRPC");
                            None
                        }
                    })
                })
                .collect()
        })
        .await
        .map_err(Error::storage)?;
        let elsewhere: Vec<B3Digest> = group
            .iter()
            .zip(&read)
            .filter(|(_, r)| r.is_none())
            .map(|(d, _)| *d)
            .collect();
        let mut from_grpc = if elsewhere.is_empty() {
            Vec::new()
        } else {
            self.read_many_grpc(elsewhere).try_collect().await?
        }
        .into_iter();
        group
            .into_iter()
            .zip(read)
            .map(|(d, r)| match r {
                Some(data) => Ok((d, Some(data))),
                None => from_grpc
                    .next()
                    .ok_or_else(|| Error::Storage(format!("no answer for blob {d}"))),
            })
            .collect()
    }

    /// Starts one `ReadBlobs` call for `digests` (at most
    /// [MAX_BATCH_DIGESTS]); `Ok(None)`: the server does not serve batch reads.
    async fn start_batch(
        &self,
        digests: &[B3Digest],
    ) -> Result<Option<tonic::Streaming<arca_proto::castore_batch::ReadBlobsResponse>>, Error> {
        let req = ReadBlobsRequest {
            digests: digests.iter().map(B3Digest::to_bytes).collect(),
            // Compressed chunks as the server stores them: decompressed and
            // verified here (checked_batch), which saves the server both.
            accept_zstd: true,
            accept_lz4: true,
        };
        match self.batch_client.clone().read_blobs(req).await {
            Ok(r) => Ok(Some(r.into_inner())),
            Err(s) if s.code() == Code::Unimplemented => Ok(None),
            Err(s) => Err(s.into()),
        }
    }
}

/// Chunks per `ReadBlobs` call when a blob is read chunk by chunk
/// ([GrpcBlobService::chunkwise_stream]); two calls are in flight.
const CHUNKS_PER_CALL: usize = 64;

impl GrpcBlobService {
    /// The whole blob from its start (see [BlobService::read_stream] and
    /// [BlobService::open_read]): chunk by chunk through batch reads when
    /// it is chunked and the server has them, the chunks checked as
    /// `check` says; else the server's one `Read` stream.
    async fn sequential_stream(
        &self,
        digest: &B3Digest,
        check: Check,
    ) -> Result<Option<super::BlobStream>, Error> {
        if !self.no_batch.load(Ordering::Relaxed) {
            match self.chunks(digest).await? {
                None => return Ok(None),
                Some(list)
                    if list.len() > 1 && list.iter().all(|c| c.size <= MAX_BATCH_BLOB_SIZE) =>
                {
                    if let Some(stream) = self.chunkwise_stream(*digest, list, check).await? {
                        return Ok(Some(stream));
                    }
                }
                Some(_) => {}
            }
        }
        Ok(self
            .start_read(digest)
            .await?
            .map(|(this, resp)| verified_stream(this.client, *digest, Some(resp))))
    }

    /// The blob `digest` made of `chunks`, read in `ReadBlobs` calls of
    /// [CHUNKS_PER_CALL] chunks (see [BlobService::read_stream]); `None` if
    /// the server has no batch reads (remembered).
    async fn chunkwise_stream(
        &self,
        digest: B3Digest,
        chunks: Vec<ChunkMeta>,
        check: Check,
    ) -> Result<Option<super::BlobStream>, Error> {
        let mut groups: std::collections::VecDeque<Vec<B3Digest>> = chunks
            .chunks(CHUNKS_PER_CALL)
            .map(|g| g.iter().map(|c| c.digest).collect())
            .collect();
        let Some(first_group) = groups.pop_front() else {
            return Ok(None);
        };
        // The first call is made here, so a server without batch reads is
        // found out before any stream is handed out.
        let Some(first) = self.start_batch(&first_group).await? else {
            tracing::debug!("server has no batch reads: one Read per blob");
            self.no_batch.store(true, Ordering::Relaxed);
            return Ok(None);
        };
        let this = self.clone();
        let rest = futures::stream::iter(groups)
            .map(move |group| {
                let this = this.pick();
                async move {
                    match this.start_batch(&group).await {
                        Ok(Some(answers)) => checked_batch(answers, group, check),
                        Ok(None) => futures::stream::iter([Err(Error::Storage(
                            "server stopped serving batch reads".into(),
                        ))])
                        .boxed(),
                        Err(e) => futures::stream::iter([Err(e)]).boxed(),
                    }
                }
            })
            .buffered(2)
            .flatten();
        let mut pieces = checked_batch(first, first_group, check).chain(rest);
        Ok(Some(
            async_stream::try_stream! {
                // The whole-blob hash runs on a thread of its own, beside
                // the chunks' checks and the caller's work; the last piece
                // waits for its result.
                let (to_hasher, from_stream) = std::sync::mpsc::sync_channel::<Bytes>(16);
                let hashed = tokio::task::spawn_blocking(move || {
                    let mut hasher = blake3::Hasher::new();
                    for piece in from_stream {
                        hasher.update(&piece);
                    }
                    B3Digest::from(hasher.finalize())
                });
                let mut held: Option<Bytes> = None;
                while let Some(item) = pieces.next().await {
                    let (chunk, data) = item?;
                    let Some(data) = data else {
                        Err(Error::Storage(format!("chunk {chunk} of blob {digest} is missing")))?;
                        return;
                    };
                    // A full queue means the hasher is behind: wait off the runtime.
                    if let Err(std::sync::mpsc::TrySendError::Full(piece)) = to_hasher.try_send(data.clone()) {
                        let tx = to_hasher.clone();
                        tokio::task::spawn_blocking(move || tx.send(piece))
                            .await
                            .map_err(Error::storage)?
                            .map_err(|_| Error::Storage("blob hasher stopped".into()))?;
                    }
                    if let Some(prev) = held.replace(data) {
                        yield prev;
                    }
                }
                drop(to_hasher);
                let actual = hashed.await.map_err(Error::storage)?;
                if actual != digest {
                    Err(Error::Storage(format!("blob {digest} failed verification (got {actual})")))?;
                }
                if let Some(last) = held {
                    yield last;
                }
            }
            .map(|r: Result<Bytes, Error>| r.map_err(std::io::Error::from))
            .boxed(),
        ))
    }
}

/// Answers of one batch read decoded and verified at once.
const DECODES_IN_FLIGHT: usize = 4;

/// One answer of a batch read as sent: the blob, or a compressed form of it.
struct SentBlob(super::StoredBlob);

impl SentBlob {
    /// An answer's data as its flags say it is (both set: refused).
    fn from_answer(asked: B3Digest, data: Bytes, zstd: bool, lz4: bool) -> Result<Self, Error> {
        use super::StoredBlob::*;
        Ok(SentBlob(match (zstd, lz4) {
            (false, false) => Plain(data),
            (true, false) => Zstd(data),
            (false, true) => Lz4(data),
            (true, true) => {
                return Err(Error::Storage(format!(
                    "server sent blob {asked} as both zstd and LZ4"
                )))
            }
        }))
    }

    /// The blob, decompressed (at most [MAX_BATCH_BLOB_SIZE]) and, with
    /// [Check::EachAnswer], verified.
    fn decode(self, asked: B3Digest, check: Check) -> Result<Bytes, Error> {
        let data = self.0.decode(MAX_BATCH_BLOB_SIZE).map_err(|e| {
            Error::Storage(format!(
                "server sent bad compressed data for blob {asked}: {e}"
            ))
        })?;
        if check == Check::ByCaller {
            return Ok(data);
        }
        let actual = B3Digest::of(&data);
        if actual != asked {
            return Err(Error::Storage(format!(
                "blob {asked} failed verification (got {actual})"
            )));
        }
        Ok(data)
    }
}

/// Who verifies the blobs of a batch read.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Check {
    /// Each answer is hashed and must match the digest asked for.
    EachAnswer,
    /// The answers are the chunks of one blob that the caller hashes whole
    /// and refuses before handing out its last piece
    /// ([GrpcBlobService::chunkwise_stream]): hashing each chunk as well
    /// would hash every byte twice and protect nothing more, since the
    /// chunk list is only the server's word anyway.
    ByCaller,
}

/// The answers of one `ReadBlobs` call, each checked as it arrives: in
/// order, the digest asked for, no more than [MAX_BATCH_BLOB_SIZE] (sent,
/// and decompressed where the server sent a compressed form), the bytes
/// hashing to it (unless [Check::ByCaller]); then that every digest was
/// answered. Large answers are decoded (and verified) on the blocking pool,
/// [DECODES_IN_FLIGHT] at once, and handed out in order.
fn checked_batch(
    mut stream: tonic::Streaming<arca_proto::castore_batch::ReadBlobsResponse>,
    digests: Vec<B3Digest>,
    check: Check,
) -> BoxStream<'static, Result<BatchItem, Error>> {
    let answers = async_stream::try_stream! {
        let mut answered = 0usize;
        while let Some(msg) = stream.message().await? {
            let Some(asked) = digests.get(answered).copied() else {
                Err(Error::Storage(format!("server sent more than the {} blobs asked for", digests.len())))?;
                return;
            };
            answered += 1;
            if msg.digest.as_ref() != &asked.as_bytes()[..] {
                Err(Error::Storage(format!("server answered another blob where {asked} was expected")))?;
            }
            if !msg.found {
                yield (asked, None);
                continue;
            }
            if msg.data.len() as u64 > MAX_BATCH_BLOB_SIZE {
                Err(Error::Storage(format!("server sent {} bytes for blob {asked}", msg.data.len())))?;
            }
            yield (asked, Some(SentBlob::from_answer(asked, msg.data, msg.zstd, msg.lz4)?));
        }
        if answered != digests.len() {
            Err(Error::Storage(format!("server sent {answered} of the {} blobs asked for", digests.len())))?;
        }
    };
    answers
        .map(
            move |answer: Result<(B3Digest, Option<SentBlob>), Error>| async move {
                let (asked, sent) = answer?;
                let Some(sent) = sent else {
                    return Ok((asked, None));
                };
                let data = if sent.0.stored_len() >= super::DECODE_ELSEWHERE {
                    tokio::task::spawn_blocking(move || sent.decode(asked, check))
                        .await
                        .map_err(Error::storage)??
                } else {
                    sent.decode(asked, check)?
                };
                Ok((asked, Some(data)))
            },
        )
        .buffered(DECODES_IN_FLIGHT)
        .boxed()
}

#[async_trait]
impl BlobService for GrpcBlobService {
    /// Through the daemon's local ingest socket when it has one on this
    /// machine (it takes the open file), else uploaded as usual.
    async fn put_file(
        &self,
        file: std::fs::File,
        expected: Option<B3Digest>,
    ) -> Result<(B3Digest, u64), Error> {
        let Some(local) = self.local_ingest().await else {
            return super::put_file_by_writes(self, file, expected).await;
        };
        use std::io::Seek;
        let mut file = file;
        let start = file.stream_position().map_err(Error::from)?;
        let (digest, size) = match local.put_file(&file).await {
            Err(Error::Unavailable(why)) => {
                // The socket broke (a restarted daemon has another token):
                // upload over gRPC from here on, this file from where it
                // started (the daemon's copy moved the shared offset).
                tracing::warn!(%why, "local ingest failed; uploading over gRPC");
                self.local_ingest_broken.store(true, Ordering::Relaxed);
                file.seek(SeekFrom::Start(start)).map_err(Error::from)?;
                return super::put_file_by_writes(self, file, expected).await;
            }
            other => other?,
        };
        super::check_expected(expected, digest)?;
        Ok((digest, size))
    }

    /// When the daemon takes open files.
    async fn direct_file_puts(&self) -> bool {
        self.local_ingest().await.is_some()
    }

    #[instrument(skip(self), level = "debug")]
    async fn has(&self, digest: &B3Digest) -> Result<bool, Error> {
        let req = proto::StatBlobRequest {
            digest: digest.to_bytes(),
            send_chunks: false,
            send_bao: false,
        };
        match self.client.clone().stat(req).await {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(s.into()),
        }
    }

    /// Sequential reads from the start: a chunked blob chunk by chunk, each
    /// chunk verified before any of its bytes are handed out (a reader may
    /// stop or seek away before the end, where the whole blob is checked);
    /// a blob in one piece from the server's `Read` stream, held back until
    /// verified. A seek that is not a short skip forward switches to
    /// chunk-wise reads (each chunk verified) when the blob is chunked.
    #[instrument(skip(self), level = "debug")]
    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>, Error> {
        Ok(self
            .sequential_stream(digest, Check::EachAnswer)
            .await?
            .map(|stream| {
                Box::new(GrpcBlobReader::new(self.pick(), *digest, stream)) as Box<dyn BlobReader>
            }))
    }

    /// A blob of several chunks, from a server with batch reads: its chunk
    /// list (one `Stat`), then its chunks in `ReadBlobs` calls as the server
    /// stores them (a compressed chunk stays compressed on the wire and
    /// costs the server no decompression and no hashing), decompressed
    /// here; the whole blob is hashed on the way and its last piece held
    /// back until it matched, so a stream never ends well with bytes that
    /// are not the blob's. The chunks are not hashed one by one as well
    /// (that would hash every byte twice and prove nothing more: the chunk
    /// list is only the server's word). Otherwise the server's one `Read`
    /// stream as it arrives, hashed on the way, its last message held back
    /// the same way.
    async fn read_stream(&self, digest: &B3Digest) -> Result<Option<super::BlobStream>, Error> {
        self.sequential_stream(digest, Check::ByCaller).await
    }

    async fn open_write(&self) -> Box<dyn BlobWriter> {
        Box::new(GrpcBlobWriter {
            client: self.pick().client,
            hasher: blake3::Hasher::new(),
            tx: None,
            task: None,
            done: None,
            failed: false,
            expected: None,
        })
    }

    /// From a daemon on this machine that takes read requests, through
    /// its socket: it passes the files it keeps the blobs in, and they are
    /// read, decoded and verified here ([crate::local_ingest]). Otherwise
    /// one `ReadBlobs` call per [MAX_BATCH_DIGESTS] digests (two calls in
    /// flight), answers handed out as they arrive; one `Read` per blob
    /// against servers without batch reads.
    fn read_many<'a>(&'a self, digests: Vec<B3Digest>) -> BoxStream<'a, Result<BatchItem, Error>> {
        futures::stream::once(async move {
            match self.local_reads().await {
                Some(local) => self.read_many_local(local, digests),
                None => self.read_many_grpc(digests),
            }
        })
        .flatten()
        .boxed()
    }

    #[instrument(skip(self), level = "debug")]
    async fn chunks(&self, digest: &B3Digest) -> Result<Option<Vec<ChunkMeta>>, Error> {
        let req = proto::StatBlobRequest {
            digest: digest.to_bytes(),
            send_chunks: true,
            send_bao: false,
        };
        let resp = match self.client.clone().stat(req).await {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::NotFound => return Ok(None),
            Err(s) => return Err(s.into()),
        };
        resp.chunks
            .into_iter()
            .map(|c| {
                Ok(ChunkMeta {
                    digest: B3Digest::try_from(&c.digest).map_err(|e| {
                        Error::Storage(format!("server sent an invalid chunk digest: {e}"))
                    })?,
                    size: c.size,
                })
            })
            .collect::<Result<Vec<_>, Error>>()
            .and_then(|list| {
                super::validate_chunk_list(&list)
                    .map_err(|e| Error::Storage(format!("server sent a bad chunk list: {e}")))?;
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
        let req = proto::ReadBlobRequest {
            digest: chunk.digest.to_bytes(),
        };
        let mut stream = self.client.clone().read(req).await?.into_inner();
        let mut buf = BytesMut::with_capacity(chunk.size as usize);
        while let Some(msg) = stream.message().await? {
            if (buf.len() + msg.data.len()) as u64 > chunk.size {
                return Err(Error::Storage(format!(
                    "chunk {} is longer than {} bytes",
                    chunk.digest, chunk.size
                )));
            }
            buf.extend_from_slice(&msg.data);
        }
        let data = buf.freeze();
        verify_chunk(chunk, &data)?;
        Ok(data)
    }
}

/// Streams one blob's bytes from a `Read` response (or, with `None`, from
/// a new call), verifying the digest; the last message is held back until
/// the digest matched.
fn verified_stream(
    client: BlobServiceClient<Channel>,
    digest: B3Digest,
    response: Option<tonic::Streaming<proto::BlobChunk>>,
) -> BoxStream<'static, std::io::Result<Bytes>> {
    async_stream::try_stream! {
        let mut resp = match response {
            Some(r) => r,
            None => {
                let req = proto::ReadBlobRequest { digest: digest.to_bytes() };
                client.clone().read(req).await.map_err(Error::from)?.into_inner()
            }
        };
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

/// Forward seeks up to this far are served by skipping stream bytes; longer
/// ones (and backward ones) switch to chunk-wise reads.
const MAX_STREAM_SKIP: u64 = 4 * 1024 * 1024;

type ChunkListFuture =
    Pin<Box<dyn std::future::Future<Output = Result<Option<Vec<ChunkMeta>>, Error>> + Send>>;

enum ReadMode {
    /// The server's one stream of the whole blob, at `pos`.
    Stream {
        inner: StreamReader<BoxStream<'static, std::io::Result<Bytes>>, Bytes>,
        pos: u64,
    },
    /// Chunk-wise random access.
    Chunked(ChunkedReader),
}

/// A seekable reader over a remote blob.
struct GrpcBlobReader {
    service: GrpcBlobService,
    digest: B3Digest,
    mode: ReadMode,
    /// Where the caller wants to be (stream mode; reached in `poll_complete`).
    target: u64,
    /// A seek that needs the chunk list first, and its fetch.
    switch: Option<(SeekFrom, Option<ChunkListFuture>)>,
    /// Once failed, every later call fails too (never a silent EOF or a wrong position).
    failed: Option<(std::io::ErrorKind, String)>,
}

impl GrpcBlobReader {
    fn new(service: GrpcBlobService, digest: B3Digest, stream: super::BlobStream) -> Self {
        let inner = StreamReader::new(stream);
        Self {
            service,
            digest,
            mode: ReadMode::Stream { inner, pos: 0 },
            target: 0,
            switch: None,
            failed: None,
        }
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

    /// Finishes a seek that needed the chunk list.
    fn poll_switch(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let Some((position, fut)) = self.switch.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let fut = fut.get_or_insert_with(|| {
            let service = self.service.clone();
            let digest = self.digest;
            Box::pin(async move { service.chunks(&digest).await })
        });
        let chunks = ready!(fut.as_mut().poll(cx));
        let position = *position;
        self.switch = None;
        let chunks = chunks.map_err(std::io::Error::from)?;
        match chunks {
            Some(chunks) if chunks.len() > 1 => {
                let mut reader = ChunkedReader::new(
                    chunks,
                    Arc::new(GrpcChunkFetcher {
                        client: self.service.client.clone(),
                    }),
                    self.digest,
                )
                .map_err(std::io::Error::from)?;
                Pin::new(&mut reader).start_seek(position)?;
                self.mode = ReadMode::Chunked(reader);
                Ok(()).into()
            }
            Some(_) => {
                let target = match position {
                    SeekFrom::Start(p) => p,
                    _ => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::Unsupported,
                            "seeking from the end of an unchunked remote blob",
                        ))
                        .into()
                    }
                };
                // One piece: restart the stream and skip to the target.
                let inner = StreamReader::new(verified_stream(
                    self.service.client.clone(),
                    self.digest,
                    None,
                ));
                self.mode = ReadMode::Stream { inner, pos: 0 };
                self.target = target;
                Ok(()).into()
            }
            None => Err(std::io::Error::from(Error::Storage(format!(
                "blob {} disappeared",
                self.digest
            ))))
            .into(),
        }
    }
}

impl AsyncRead for GrpcBlobReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.check()?;
        let this = &mut *self;
        let result = match &mut this.mode {
            ReadMode::Chunked(r) => ready!(Pin::new(r).poll_read(cx, buf)),
            ReadMode::Stream { inner, pos } => {
                let before = buf.filled().len();
                let r = ready!(Pin::new(inner).poll_read(cx, buf));
                *pos += (buf.filled().len() - before) as u64;
                this.target = *pos;
                r
            }
        };
        Poll::Ready(result.map_err(|e| self.fail(e)))
    }
}

impl AsyncSeek for GrpcBlobReader {
    fn start_seek(mut self: Pin<&mut Self>, position: SeekFrom) -> std::io::Result<()> {
        self.check()?;
        self.switch = None;
        let pos = match &mut self.mode {
            ReadMode::Chunked(r) => return Pin::new(r).start_seek(position),
            ReadMode::Stream { pos, .. } => *pos,
        };
        let target = match position {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::Current(d) => pos.checked_add_signed(d),
            SeekFrom::End(_) => {
                self.switch = Some((position, None));
                return Ok(());
            }
        }
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before start")
        })?;
        if target < pos || target - pos > MAX_STREAM_SKIP {
            self.switch = Some((SeekFrom::Start(target), None));
        } else {
            self.target = target;
        }
        Ok(())
    }

    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<u64>> {
        self.check()?;
        if let Err(e) = ready!(self.poll_switch(cx)) {
            return Poll::Ready(Err(self.fail(e)));
        }
        let this = &mut *self;
        let (inner, pos) = match &mut this.mode {
            ReadMode::Chunked(r) => return Pin::new(r).poll_complete(cx),
            ReadMode::Stream { inner, pos } => (inner, pos),
        };
        while *pos < this.target {
            let available = match ready!(Pin::new(&mut *inner).poll_fill_buf(cx)) {
                Ok(b) => b.len() as u64,
                Err(e) => return Poll::Ready(Err(self.fail(e))),
            };
            if available == 0 {
                // Past the end: later reads return EOF.
                *pos = this.target;
                break;
            }
            let n = available.min(this.target - *pos);
            Pin::new(&mut *inner).consume(n as usize);
            *pos += n;
        }
        Poll::Ready(Ok(*pos))
    }
}

struct GrpcBlobWriter {
    client: BlobServiceClient<Channel>,
    hasher: blake3::Hasher,
    /// Chunks to send; `None` is the end marker `close` sends, so only a
    /// closed writer ends the request stream cleanly.
    tx: Option<mpsc::Sender<Option<proto::BlobChunk>>>,
    task: Option<JoinHandle<Result<Bytes, tonic::Status>>>,
    done: Option<B3Digest>,
    failed: bool,
    /// Set by `expect_digest`: the server's digest is compared with it and
    /// the data is not hashed again here.
    expected: Option<B3Digest>,
}

/// The request stream of a `Put` call. It ends only at the end marker:
/// when the writer is dropped without `close`, the channel closes without
/// one and the stream stays pending until the aborted call resets it. A
/// plain end of stream there would make the server store the truncated
/// data (hyper sends END_STREAM before the abort is noticed).
fn upload_stream(
    rx: mpsc::Receiver<Option<proto::BlobChunk>>,
) -> impl futures::Stream<Item = proto::BlobChunk> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move {
        match rx.recv().await {
            Some(Some(chunk)) => Some((chunk, rx)),
            Some(None) => None,
            None => std::future::pending().await,
        }
    })
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
            return Err(Error::Storage(
                "blob upload failed earlier; start a new one".into(),
            ));
        }
        if self.task.is_some() {
            return Ok(());
        }
        let (tx, rx) = mpsc::channel(4);
        let mut client = self.client.clone();
        self.task = Some(tokio::spawn(async move {
            let resp = client.put(upload_stream(rx)).await?;
            Ok(resp.into_inner().digest)
        }));
        self.tx = Some(tx);
        Ok(())
    }

    /// Ends the upload: sends the end marker (when the stream is still
    /// open) and waits for the server's answer.
    async fn finish(&mut self) -> Result<Bytes, Error> {
        if let Some(tx) = self.tx.take() {
            // A failed send means the call already ended; the task says why.
            let _ = tx.send(None).await;
        }
        let r = match self.task.take() {
            Some(t) => t
                .await
                .map_err(Error::storage)
                .and_then(|r| r.map_err(Error::from)),
            None => Err(Error::Storage(
                "blob upload failed earlier; start a new one".into(),
            )),
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
                Some(tx) => tx
                    .send(Some(proto::BlobChunk { data: piece }))
                    .await
                    .is_ok(),
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
        if let Some(expected) = self.expected {
            if returned != expected {
                self.failed = true;
                return Err(Error::DigestMismatch {
                    expected,
                    actual: returned,
                });
            }
        } else {
            let local = B3Digest::from(self.hasher.finalize());
            if returned != local {
                self.failed = true;
                return Err(Error::Storage(format!(
                    "server returned digest {returned} for data with digest {local}"
                )));
            }
        }
        self.done = Some(returned);
        Ok(returned)
    }

    fn expect_digest(&mut self, digest: B3Digest) {
        self.expected = Some(digest);
    }
}
