//! Serving NARs: found by the NarHash in their name, rendered from castore as
//! they stream (compressed on the fly for `.nar.zst` and the other
//! extensions), with `Range` support for uncompressed `.nar` through
//! [SeekableNar].
use super::{parse_nar_file, Answer, HttpError, Inner, NarFile, NAR_CACHE_CONTROL, NAR_TYPE};
use crate::compression::Encoder;
use crate::nar::{render_nar, RenderError, SeekableNar};
use crate::narinfo::Compression;
use arca_castore::{Error, Node};
use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use std::io::SeekFrom;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::PollSender;

/// Bytes gathered before a piece of the body is handed to the connection.
const PIECE: usize = 256 * 1024;
/// Pieces queued between the renderer and the connection.
const PIECES_QUEUED: usize = 8;

/// What a `Range` header asks of a body of known length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ranged {
    /// No (usable) range: the whole body.
    Full,
    /// Bytes `start..=end`.
    Part { start: u64, end: u64 },
    /// The range starts beyond the end: 416.
    Unsatisfiable,
}

fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Interprets a `Range` header value for a body of `len` bytes. Only single
/// byte ranges are honoured; anything else (other units, several ranges,
/// invalid syntax) is ignored and the whole body is served, as RFC 9110
/// allows.
pub(crate) fn parse_range(value: &str, len: u64) -> Ranged {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Ranged::Full;
    };
    if spec.contains(',') {
        return Ranged::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Ranged::Full;
    };
    match (a.trim(), b.trim()) {
        ("", "") => Ranged::Full,
        ("", n) => match digits(n) {
            None => Ranged::Full,
            Some(0) => Ranged::Unsatisfiable,
            Some(_) if len == 0 => Ranged::Unsatisfiable,
            Some(n) => Ranged::Part {
                start: len.saturating_sub(n),
                end: len - 1,
            },
        },
        (a, "") => match digits(a) {
            None => Ranged::Full,
            Some(a) if a >= len => Ranged::Unsatisfiable,
            Some(a) => Ranged::Part {
                start: a,
                end: len - 1,
            },
        },
        (a, b) => match (digits(a), digits(b)) {
            (Some(a), Some(b)) if b >= a => {
                if a >= len {
                    Ranged::Unsatisfiable
                } else {
                    Ranged::Part {
                        start: a,
                        end: b.min(len - 1),
                    }
                }
            }
            _ => Ranged::Full,
        },
    }
}

fn etag(nar_sha256: &[u8; 32]) -> String {
    format!("\"{}\"", crate::nixbase32::encode(nar_sha256))
}

fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

impl Inner {
    /// The root node and NarSize of the NAR a file name asks for.
    async fn resolve_nar(&self, file: &NarFile) -> Result<Option<(Node, u64)>, Error> {
        if let Some(found) = self.nars.lock().get(&file.hash).cloned() {
            return Ok(Some(found));
        }
        if let Some(found) = self.index.get_nar_to_serve(&file.hash).await? {
            self.nars.lock().put(file.hash, found.clone());
            return Ok(Some(found));
        }
        if let Some(up) = self.index.get_upload(&file.url_path).await? {
            return Ok(Some((up.node, up.nar_size)));
        }
        Ok(None)
    }

    /// The NAR of `node` as a streaming body, `compression` applied. Waits
    /// for the first piece, so a NAR that cannot be rendered at all (content
    /// gone, backend down) is an error answer rather than a cut connection.
    ///
    /// Rendering runs as a task; zstd compression runs on a blocking thread
    /// of its own, fed piece by piece, with zstd's worker threads (one per
    /// core), so rendering and compression overlap (on-the-fly compression
    /// costs about a core per 250 MB/s at level 1). The rarer compressions
    /// are applied inline.
    async fn stream_nar(&self, node: Node, compression: Compression) -> Result<Body, HttpError> {
        let (tx, mut rx) = mpsc::channel::<std::io::Result<Bytes>>(PIECES_QUEUED);
        let blobs = self.blobs.clone();
        let directories = self.directories.clone();
        let level = self.options.zstd_level;
        let (render_into, inline) = match compression {
            Compression::Zstd => {
                let (plain_tx, plain_rx) = mpsc::channel::<std::io::Result<Bytes>>(PIECES_QUEUED);
                let out = tx;
                tokio::task::spawn_blocking(move || compress_zstd(plain_rx, out, level));
                (plain_tx, Compression::None)
            }
            other => (tx, other),
        };
        let errors = render_into.clone();
        tokio::spawn(async move {
            let writer = Encoder::new(inline, level, ChannelWriter::new(render_into));
            let result = async {
                let mut w = render_nar(&node, blobs, directories.as_ref(), writer)
                    .await
                    .map_err(std::io::Error::other)?;
                w.shutdown().await
            }
            .await;
            if let Err(e) = result {
                // The client may be gone already: nothing more to do then.
                let _ = errors.send(Err(e)).await;
            }
        });
        match rx.recv().await {
            None => Ok(Body::empty()),
            Some(Err(e)) => Err(render_failed(e)),
            Some(Ok(first)) => {
                let rest = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
                Ok(Body::from_stream(
                    futures::stream::once(async move { Ok(first) }).chain(rest),
                ))
            }
        }
    }
}

/// Compresses the pieces of `plain` with zstd into `out`, on the calling
/// (blocking) thread; an error from upstream is passed on and ends the stream.
fn compress_zstd(
    mut plain: mpsc::Receiver<std::io::Result<Bytes>>,
    out: mpsc::Sender<std::io::Result<Bytes>>,
    level: i32,
) {
    let result = (|| -> std::io::Result<()> {
        let mut enc = zstd::stream::write::Encoder::new(
            BlockingChannelWriter {
                tx: &out,
                buf: BytesMut::new(),
            },
            level,
        )?;
        // zstd's own worker threads: compression (~200-270 MB/s per core at
        // level 1) is otherwise the bottleneck of a single stream.
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        if workers > 1 {
            enc.multithread(u32::try_from(workers).unwrap_or(2))?;
        }
        while let Some(piece) = plain.blocking_recv() {
            std::io::Write::write_all(&mut enc, &piece?)?;
        }
        let mut w = enc.finish()?;
        std::io::Write::flush(&mut w)
    })();
    if let Err(e) = result {
        let _ = out.blocking_send(Err(e));
    }
}

/// A blocking [std::io::Write] into a body channel, in pieces of about [PIECE] bytes.
struct BlockingChannelWriter<'a> {
    tx: &'a mpsc::Sender<std::io::Result<Bytes>>,
    buf: BytesMut,
}

impl BlockingChannelWriter<'_> {
    fn send(&mut self) -> std::io::Result<()> {
        let piece = self.buf.split().freeze();
        self.tx.blocking_send(Ok(piece)).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away")
        })
    }
}

impl std::io::Write for BlockingChannelWriter<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.capacity() == 0 {
            self.buf.reserve(PIECE);
        }
        self.buf.extend_from_slice(data);
        if self.buf.len() >= PIECE {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.send()?;
        }
        Ok(())
    }
}

/// The error answer for a NAR that could not be rendered.
fn render_failed(e: std::io::Error) -> HttpError {
    let missing = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<RenderError>())
        .is_some_and(|r| {
            matches!(
                r,
                RenderError::MissingBlob(_) | RenderError::MissingDirectory(_)
            )
        });
    if missing {
        HttpError::not_found(format!("the NAR's content is no longer in the store: {e}"))
    } else {
        HttpError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("rendering the NAR failed: {e}"),
        )
    }
}

/// `GET`/`HEAD /nar/<file>`.
pub(crate) async fn get(
    inner: &Arc<Inner>,
    method: &Method,
    file: &str,
    headers: &HeaderMap,
) -> Answer {
    let file = parse_nar_file(file)?;
    let Some((node, nar_size)) = inner.resolve_nar(&file).await? else {
        return Err(HttpError::not_found(format!(
            "no NAR {} in this binary cache",
            file.url_path
        )));
    };
    let head = *method == Method::HEAD;
    let tag = etag(&file.hash);
    let mut r = Response::new(Body::empty());
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(NAR_TYPE));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(NAR_CACHE_CONTROL),
    );
    h.insert(header::ETAG, hv(&tag));

    if file.compression != Compression::None {
        // Compressed on the fly: length unknown, no ranges.
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("none"));
        if !head {
            *r.body_mut() = inner.stream_nar(node, file.compression).await?;
        }
        return Ok(r);
    }

    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let ranged = range_of(headers, &tag, nar_size);
    match ranged {
        Ranged::Full => {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(nar_size));
            if !head {
                *r.body_mut() = inner.stream_nar(node, Compression::None).await?;
            }
        }
        Ranged::Unsatisfiable => {
            h.insert(header::CONTENT_RANGE, hv(&format!("bytes */{nar_size}")));
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            h.insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static(super::NO_CACHE),
            );
            *r.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
            *r.body_mut() = Body::from(format!(
                "the range is beyond the end of the NAR ({nar_size} bytes)\n"
            ));
        }
        Ranged::Part { start, end } => {
            let len = end - start + 1;
            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_RANGE,
                hv(&format!("bytes {start}-{end}/{nar_size}")),
            );
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            if !head {
                let mut nar =
                    SeekableNar::new(node, inner.blobs.clone(), inner.directories.as_ref())
                        .await
                        .map_err(|e| render_failed(std::io::Error::other(e)))?;
                if nar.len() != nar_size {
                    return Err(HttpError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("the NAR laid out from the store has {} bytes, its NarSize is {nar_size}", nar.len()),
                    ));
                }
                nar.seek(SeekFrom::Start(start)).await.map_err(|e| {
                    HttpError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("seeking in the NAR: {e}"),
                    )
                })?;
                let reader = nar.take(len);
                *r.body_mut() =
                    Body::from_stream(tokio_util::io::ReaderStream::with_capacity(reader, PIECE));
            }
        }
    }
    Ok(r)
}

/// The range asked for, honouring `If-Range` (a different ETag: the whole body).
fn range_of(headers: &HeaderMap, tag: &str, len: u64) -> Ranged {
    let Some(range) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ranged::Full;
    };
    if let Some(if_range) = headers.get(header::IF_RANGE) {
        if if_range.to_str().ok() != Some(tag) {
            return Ranged::Full;
        }
    }
    parse_range(range, len)
}

/// An [AsyncWrite] that hands what is written to a channel in pieces of
/// about [PIECE] bytes (the body of a streaming response).
struct ChannelWriter {
    tx: PollSender<std::io::Result<Bytes>>,
    buf: BytesMut,
}

impl ChannelWriter {
    fn new(tx: mpsc::Sender<std::io::Result<Bytes>>) -> Self {
        Self {
            tx: PollSender::new(tx),
            buf: BytesMut::with_capacity(PIECE),
        }
    }

    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let gone = || std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away");
        ready!(self.tx.poll_reserve(cx)).map_err(|_| gone())?;
        let piece = self.buf.split().freeze();
        self.buf.reserve(PIECE);
        self.tx.send_item(Ok(piece)).map_err(|_| gone())?;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ChannelWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.buf.len() >= PIECE {
            ready!(this.poll_send(cx))?;
        }
        let n = data.len().min(PIECE.saturating_mul(4));
        this.buf.extend_from_slice(&data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.buf.is_empty() {
            ready!(this.poll_send(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.poll_flush(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        use Ranged::*;
        let r = |s: &str| parse_range(s, 100);
        assert_eq!(r("bytes=0-9"), Part { start: 0, end: 9 });
        assert_eq!(r("bytes=10-"), Part { start: 10, end: 99 });
        assert_eq!(r("bytes=-10"), Part { start: 90, end: 99 });
        assert_eq!(r("bytes=-1000"), Part { start: 0, end: 99 });
        assert_eq!(r("bytes=50-1000"), Part { start: 50, end: 99 });
        assert_eq!(r("bytes=99-99"), Part { start: 99, end: 99 });
        assert_eq!(r(" bytes= 5 - 6 "), Part { start: 5, end: 6 });
        assert_eq!(r("bytes=100-"), Unsatisfiable);
        assert_eq!(r("bytes=100-200"), Unsatisfiable);
        assert_eq!(r("bytes=-0"), Unsatisfiable);
        for ignored in [
            "",
            "bytes=",
            "bytes=-",
            "items=0-1",
            "bytes=5-4",
            "bytes=0-1,5-6",
            "bytes=a-b",
            "bytes=+1-2",
            "bytes=1",
        ] {
            assert_eq!(r(ignored), Full, "{ignored}");
        }
        assert_eq!(parse_range("bytes=-5", 0), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-", 0), Unsatisfiable);
    }

    #[test]
    fn if_range() {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_static("bytes=0-0"));
        assert_eq!(range_of(&h, "\"x\"", 10), Ranged::Part { start: 0, end: 0 });
        h.insert(header::IF_RANGE, HeaderValue::from_static("\"x\""));
        assert_eq!(range_of(&h, "\"x\"", 10), Ranged::Part { start: 0, end: 0 });
        h.insert(header::IF_RANGE, HeaderValue::from_static("\"y\""));
        assert_eq!(range_of(&h, "\"x\"", 10), Ranged::Full);
    }

    #[tokio::test]
    async fn channel_writer_pieces() {
        let (tx, mut rx) = mpsc::channel(4);
        let task = tokio::spawn(async move {
            let mut w = ChannelWriter::new(tx);
            for i in 0..1000u32 {
                w.write_all(&vec![(i % 256) as u8; 1000]).await.unwrap();
            }
            w.shutdown().await.unwrap();
        });
        let mut all = Vec::new();
        while let Some(piece) = rx.recv().await {
            let piece = piece.unwrap();
            assert!(piece.len() <= PIECE + 1000 * 4);
            all.extend_from_slice(&piece);
        }
        task.await.unwrap();
        assert_eq!(all.len(), 1_000_000);
        assert!(all
            .chunks(1000)
            .enumerate()
            .all(|(i, c)| c.iter().all(|&b| b == (i % 256) as u8)));
    }
}
