//! The compressions of Nix binary caches, on streams: decoding NAR files as
//! they are downloaded or uploaded, encoding NARs as they are served.
//!
//! Shared by the binary-cache client
//! ([NixHttpPathInfoService](crate::pathinfoservice::NixHttpPathInfoService))
//! and the HTTP front ([http_cache](crate::http_cache)).
use crate::narinfo::Compression;
use async_compression::tokio::bufread::{
    BrotliDecoder, BzDecoder, GzipDecoder, XzDecoder, ZstdDecoder,
};
use async_compression::tokio::write::{
    BrotliEncoder, BzEncoder, GzipEncoder, XzEncoder, ZstdEncoder,
};
use async_compression::Level;
use sha2::{Digest, Sha256};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf};

/// The file-name extension Arca gives a NAR file with this compression
/// (after `.nar`): `""`, `.xz`, `.zst`, `.bz2`, `.gz`, `.br`. (Nix itself
/// names gzip NAR files `.nar`, like uncompressed ones.)
pub fn nar_extension(compression: Compression) -> &'static str {
    match compression {
        Compression::None => "",
        Compression::Xz => ".xz",
        Compression::Zstd => ".zst",
        Compression::Bzip2 => ".bz2",
        Compression::Gzip => ".gz",
        Compression::Brotli => ".br",
    }
}

/// The compression a NAR file extension (after `.nar`, with its dot) names;
/// `None` for an extension of no supported compression (`.lz4`, `.lzip`, …).
/// An empty extension means uncompressed, except that Nix names gzip files
/// `.nar` too: see [sniff_gzip].
pub fn from_nar_extension(ext: &str) -> Option<Compression> {
    Some(match ext {
        "" => Compression::None,
        ".xz" => Compression::Xz,
        ".zst" => Compression::Zstd,
        ".bz2" => Compression::Bzip2,
        ".gz" => Compression::Gzip,
        ".br" => Compression::Brotli,
        _ => return None,
    })
}

/// Whether a file starting with `head` is gzip (`1f 8b`); a NAR starts with
/// the length of `nix-archive-1`, `0d 00 …`.
pub fn sniff_gzip(head: &[u8]) -> bool {
    head.first() == Some(&0x1f)
}

/// What went wrong below a decompressor.
#[derive(Debug, Clone)]
pub(crate) enum RawFailure {
    /// More bytes than the limit (FileSize, or trailing bytes).
    TooLong,
    /// Reading failed (network, file system, request body).
    Read(String),
}

/// Hashes (SHA-256) and counts the compressed bytes, failing past `limit`.
pub(crate) struct RawTap<R> {
    pub(crate) inner: R,
    pub(crate) hasher: Sha256,
    pub(crate) count: u64,
    pub(crate) limit: Option<u64>,
    pub(crate) failure: Option<RawFailure>,
}

impl<R> RawTap<R> {
    /// A tap over `inner`, failing once more than `limit` bytes were read.
    pub(crate) fn new(inner: R, limit: Option<u64>) -> Self {
        RawTap {
            inner,
            hasher: Sha256::new(),
            count: 0,
            limit,
            failure: None,
        }
    }

    /// Bytes read and their SHA-256.
    pub(crate) fn finalize(self) -> (u64, [u8; 32]) {
        (self.count, self.hasher.finalize().into())
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for RawTap<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                this.hasher.update(new);
                this.count += new.len() as u64;
                if this.limit.is_some_and(|l| this.count > l) {
                    this.failure = Some(RawFailure::TooLong);
                    return Poll::Ready(Err(std::io::Error::other(
                        "the NAR file is longer than expected",
                    )));
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                this.failure = Some(RawFailure::Read(e.to_string()));
                Poll::Ready(Err(e))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The decompressor a `Compression` names, over a buffered reader.
pub(crate) enum Decoder<R> {
    None(R),
    Xz(XzDecoder<R>),
    Zstd(ZstdDecoder<R>),
    Bzip2(BzDecoder<R>),
    Gzip(GzipDecoder<R>),
    Brotli(BrotliDecoder<R>),
}

impl<R: AsyncBufRead + Unpin> Decoder<R> {
    pub(crate) fn new(compression: Compression, r: R) -> Self {
        // Concatenated streams (pigz, pbzip2, …) decode as their concatenation.
        match compression {
            Compression::None => Decoder::None(r),
            Compression::Xz => {
                let mut d = XzDecoder::new(r);
                d.multiple_members(true);
                Decoder::Xz(d)
            }
            Compression::Zstd => {
                let mut d = ZstdDecoder::new(r);
                d.multiple_members(true);
                Decoder::Zstd(d)
            }
            Compression::Bzip2 => {
                let mut d = BzDecoder::new(r);
                d.multiple_members(true);
                Decoder::Bzip2(d)
            }
            Compression::Gzip => {
                let mut d = GzipDecoder::new(r);
                d.multiple_members(true);
                Decoder::Gzip(d)
            }
            Compression::Brotli => Decoder::Brotli(BrotliDecoder::new(r)),
        }
    }

    pub(crate) fn get_ref(&self) -> &R {
        match self {
            Decoder::None(r) => r,
            Decoder::Xz(d) => d.get_ref(),
            Decoder::Zstd(d) => d.get_ref(),
            Decoder::Bzip2(d) => d.get_ref(),
            Decoder::Gzip(d) => d.get_ref(),
            Decoder::Brotli(d) => d.get_ref(),
        }
    }

    pub(crate) fn into_inner(self) -> R {
        match self {
            Decoder::None(r) => r,
            Decoder::Xz(d) => d.into_inner(),
            Decoder::Zstd(d) => d.into_inner(),
            Decoder::Bzip2(d) => d.into_inner(),
            Decoder::Gzip(d) => d.into_inner(),
            Decoder::Brotli(d) => d.into_inner(),
        }
    }
}

impl<R: AsyncBufRead + Unpin> AsyncRead for Decoder<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Decoder::None(r) => Pin::new(r).poll_read(cx, buf),
            Decoder::Xz(d) => Pin::new(d).poll_read(cx, buf),
            Decoder::Zstd(d) => Pin::new(d).poll_read(cx, buf),
            Decoder::Bzip2(d) => Pin::new(d).poll_read(cx, buf),
            Decoder::Gzip(d) => Pin::new(d).poll_read(cx, buf),
            Decoder::Brotli(d) => Pin::new(d).poll_read(cx, buf),
        }
    }
}

/// Fails once more than `limit` bytes came out (bounds decompression: a
/// NAR never exceeds its NarSize, whatever the file headers inside claim).
pub(crate) struct Limited<R> {
    pub(crate) inner: R,
    pub(crate) count: u64,
    pub(crate) limit: u64,
    pub(crate) exceeded: bool,
}

impl<R> Limited<R> {
    pub(crate) fn new(inner: R, limit: u64) -> Self {
        Limited {
            inner,
            count: 0,
            limit,
            exceeded: false,
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Limited<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.count += (buf.filled().len() - before) as u64;
                if this.count > this.limit {
                    this.exceeded = true;
                    return Poll::Ready(Err(std::io::Error::other(
                        "the NAR is longer than NarSize",
                    )));
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

/// A compressor writing into `W`: bytes written are compressed with the
/// named compression (`shutdown` ends the compressed stream).
// One per stream: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Encoder<W> {
    /// Passes bytes through.
    None(W),
    /// xz.
    Xz(XzEncoder<W>),
    /// zstd.
    Zstd(ZstdEncoder<W>),
    /// bzip2.
    Bzip2(BzEncoder<W>),
    /// gzip.
    Gzip(GzipEncoder<W>),
    /// brotli.
    Brotli(BrotliEncoder<W>),
}

impl<W: AsyncWrite + Unpin> Encoder<W> {
    /// An encoder; `zstd_level` is the zstd level (the other compressions
    /// use fast settings: xz 1, bzip2 1, gzip 1, brotli 1).
    pub fn new(compression: Compression, zstd_level: i32, w: W) -> Self {
        match compression {
            Compression::None => Encoder::None(w),
            Compression::Xz => Encoder::Xz(XzEncoder::with_quality(w, Level::Precise(1))),
            Compression::Zstd => {
                Encoder::Zstd(ZstdEncoder::with_quality(w, Level::Precise(zstd_level)))
            }
            Compression::Bzip2 => Encoder::Bzip2(BzEncoder::with_quality(w, Level::Precise(1))),
            Compression::Gzip => Encoder::Gzip(GzipEncoder::with_quality(w, Level::Precise(1))),
            Compression::Brotli => {
                Encoder::Brotli(BrotliEncoder::with_quality(w, Level::Precise(1)))
            }
        }
    }

    /// The writer (after `shutdown`, it holds the whole compressed stream).
    pub fn into_inner(self) -> W {
        match self {
            Encoder::None(w) => w,
            Encoder::Xz(e) => e.into_inner(),
            Encoder::Zstd(e) => e.into_inner(),
            Encoder::Bzip2(e) => e.into_inner(),
            Encoder::Gzip(e) => e.into_inner(),
            Encoder::Brotli(e) => e.into_inner(),
        }
    }
}

macro_rules! each_encoder {
    ($self:expr, $e:ident => $body:expr) => {
        match $self.get_mut() {
            Encoder::None($e) => {
                let $e = Pin::new($e);
                $body
            }
            Encoder::Xz($e) => {
                let $e = Pin::new($e);
                $body
            }
            Encoder::Zstd($e) => {
                let $e = Pin::new($e);
                $body
            }
            Encoder::Bzip2($e) => {
                let $e = Pin::new($e);
                $body
            }
            Encoder::Gzip($e) => {
                let $e = Pin::new($e);
                $body
            }
            Encoder::Brotli($e) => {
                let $e = Pin::new($e);
                $body
            }
        }
    };
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Encoder<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        each_encoder!(self, e => e.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        each_encoder!(self, e => e.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        each_encoder!(self, e => e.poll_shutdown(cx))
    }
}

impl<W: AsyncWrite + Unpin> crate::nar::NarOutput for Encoder<W> {}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};

    #[test]
    fn extensions_round_trip() {
        for c in [
            Compression::None,
            Compression::Xz,
            Compression::Zstd,
            Compression::Bzip2,
            Compression::Gzip,
            Compression::Brotli,
        ] {
            assert_eq!(from_nar_extension(nar_extension(c)), Some(c));
        }
        for bad in [".lz4", ".lzip", "xz", ".XZ", ".zstd"] {
            assert_eq!(from_nar_extension(bad), None, "{bad}");
        }
        assert!(sniff_gzip(&[0x1f, 0x8b]));
        assert!(!sniff_gzip(&[0x0d, 0]));
        assert!(!sniff_gzip(&[]));
    }

    #[tokio::test]
    async fn every_encoder_decodes_back() {
        let data: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        for c in [
            Compression::None,
            Compression::Xz,
            Compression::Zstd,
            Compression::Bzip2,
            Compression::Gzip,
            Compression::Brotli,
        ] {
            let mut enc = Encoder::new(c, 3, Vec::new());
            enc.write_all(&data).await.unwrap();
            enc.shutdown().await.unwrap();
            let packed = enc.into_inner();
            let mut out = Vec::new();
            Decoder::new(c, BufReader::new(&packed[..]))
                .read_to_end(&mut out)
                .await
                .unwrap();
            assert!(out == data, "{c}");
        }
    }
}
