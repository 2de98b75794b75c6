//! A seekable NAR of a castore node, for HTTP Range requests.
//!
//! [SeekableNar::new] fetches the directory closure and lays the NAR out as a
//! sorted list of segments without reading any blob: literal framing bytes
//! (tokens, names, targets, padding — exactly as [super::NarWriter] writes
//! them) and file contents (a blob and its size) followed by their zero
//! padding. So [SeekableNar::len] is known up front, and a seek is just a new
//! position (the segment is found by binary search on the next read).
//!
//! File contents are read through [BlobService::open_read] and a seek inside
//! the blob, straight into the caller's buffer: no blob is ever held in
//! memory. The reader of the current blob is kept, so sequential reads (and
//! forward seeks within a file) do not reopen it.
//!
//! A blob is checked against the size its node claims as far as a read
//! touches it: reaching its end before that size is an error, and once its
//! contents are read to their end, one more byte is asked for, which must not
//! exist. A range covering only part of a blob cannot tell that the blob is
//! longer; it is never given bytes that are not the blob's.
//!
//! Errors are [std::io::Error]s carrying a [RenderError] (get it with
//! [std::io::Error::into_inner] and `downcast`). After an error, the blob
//! reader is dropped; a later seek and read may try again.
use super::render::{fetch_directories, walk, RenderError, Step};
use super::{padding_len, NAR_MAGIC};
use arca_castore::blobservice::BlobReader;
use arca_castore::{B3Digest, BlobService, DirectoryService, Node};
use futures::future::BoxFuture;
use std::io::{self, SeekFrom};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncSeek, ReadBuf};

/// What a segment holds.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// Framing bytes: `framing[at..at + len]`.
    Framing { at: usize },
    /// A file's contents (`size` bytes of the blob) and then its zero padding.
    File { digest: B3Digest, size: u64 },
}

/// A non-empty, contiguous piece of the NAR.
#[derive(Clone, Copy, Debug)]
struct Segment {
    /// Offset of the first byte in the NAR.
    start: u64,
    /// Length in bytes (never 0).
    len: u64,
    kind: Kind,
}

/// The blob reader in use, if any, with the segment it belongs to.
enum BlobState {
    None,
    /// `open_read` under way.
    Opening {
        segment: usize,
        fut: BoxFuture<'static, Result<Option<Box<dyn BlobReader>>, arca_castore::Error>>,
    },
    /// A seek inside the blob under way, to `target`.
    Seeking {
        segment: usize,
        reader: Box<dyn BlobReader>,
        target: u64,
    },
    /// The reader stands at `pos` inside the blob.
    Ready {
        segment: usize,
        reader: Box<dyn BlobReader>,
        pos: u64,
    },
}

/// A NAR of a castore node that can be read from any offset; see the module
/// documentation.
pub struct SeekableNar {
    blobs: Arc<dyn BlobService>,
    /// All framing bytes, concatenated.
    framing: Vec<u8>,
    /// Sorted by `start`, contiguous, covering `0..len`.
    segments: Vec<Segment>,
    len: u64,
    /// The position of the next read.
    pos: u64,
    blob: BlobState,
}

/// Builds the segment list, mirroring [super::NarWriter] token for token.
struct Layout {
    framing: Vec<u8>,
    segments: Vec<Segment>,
    /// Framing bytes not yet closed into a segment start here.
    pending_at: usize,
    /// NAR offset of the end of the last closed segment.
    offset: u64,
}

impl Layout {
    fn push_str(&mut self, s: &[u8]) {
        self.framing
            .extend_from_slice(&(s.len() as u64).to_le_bytes());
        self.framing.extend_from_slice(s);
        self.framing
            .extend_from_slice(&[0u8; 8][..padding_len(s.len() as u64)]);
    }

    /// Closes the pending framing bytes into a segment (if there are any).
    fn close_framing(&mut self) {
        let len = (self.framing.len() - self.pending_at) as u64;
        if len > 0 {
            self.segments.push(Segment {
                start: self.offset,
                len,
                kind: Kind::Framing {
                    at: self.pending_at,
                },
            });
            self.offset += len;
            self.pending_at = self.framing.len();
        }
    }

    fn file(&mut self, digest: B3Digest, size: u64) {
        self.close_framing();
        let len = size + padding_len(size) as u64;
        if len > 0 {
            self.segments.push(Segment {
                start: self.offset,
                len,
                kind: Kind::File { digest, size },
            });
            self.offset += len;
        }
    }

    /// Closes a node, and the entry around it if it is inside a directory.
    fn end_node(&mut self, depth: usize) {
        self.push_str(b")");
        if depth > 0 {
            self.push_str(b")");
        }
    }
}

impl SeekableNar {
    /// Lays out the NAR of `node`: fetches its directory closure, reads no blob.
    pub async fn new(
        node: Node,
        blobs: Arc<dyn BlobService>,
        directories: &dyn DirectoryService,
    ) -> Result<SeekableNar, RenderError> {
        let dirs = fetch_directories(&node, directories).await?;
        let empty = B3Digest::of(b"");
        let mut l = Layout {
            framing: Vec::new(),
            segments: Vec::new(),
            pending_at: 0,
            offset: 0,
        };
        l.push_str(NAR_MAGIC);
        // Open directories around the current node.
        let mut depth = 0usize;
        walk(&node, &dirs, |step| {
            match step {
                Step::EndDirectory => {
                    depth -= 1;
                    l.end_node(depth);
                    return Ok(());
                }
                Step::Node(name, _) => {
                    if let Some(name) = name {
                        l.push_str(b"entry");
                        l.push_str(b"(");
                        l.push_str(b"name");
                        l.push_str(name.as_bytes());
                        l.push_str(b"node");
                    }
                    l.push_str(b"(");
                    l.push_str(b"type");
                }
            }
            match step {
                Step::EndDirectory => unreachable!(),
                Step::Node(_, Node::Directory { .. }) => {
                    l.push_str(b"directory");
                    depth += 1;
                }
                Step::Node(_, Node::Symlink { target }) => {
                    l.push_str(b"symlink");
                    l.push_str(b"target");
                    l.push_str(target.as_bytes());
                    l.end_node(depth);
                }
                Step::Node(
                    _,
                    Node::File {
                        digest,
                        size,
                        executable,
                    },
                ) => {
                    // Known without reading: an empty file's blob is the empty
                    // blob, and any other blob has at least one byte.
                    if *size == 0 && *digest != empty {
                        return Err(RenderError::BlobSize {
                            digest: *digest,
                            expected: 0,
                            actual: 1,
                        });
                    }
                    l.push_str(b"regular");
                    if *executable {
                        l.push_str(b"executable");
                        l.push_str(b"");
                    }
                    l.push_str(b"contents");
                    l.framing.extend_from_slice(&size.to_le_bytes());
                    l.file(*digest, *size);
                    l.end_node(depth);
                }
            }
            Ok(())
        })?;
        l.close_framing();
        l.framing.shrink_to_fit();
        Ok(SeekableNar {
            blobs,
            framing: l.framing,
            segments: l.segments,
            len: l.offset,
            pos: 0,
            blob: BlobState::None,
        })
    }

    /// Total length of the NAR in bytes (what [super::render_nar] writes).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: a NAR holds at least its magic and a root node.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The NAR offsets where segments (framing runs, file contents) start, in
    /// increasing order: for diagnostics and tests.
    pub fn boundaries(&self) -> impl Iterator<Item = u64> + '_ {
        self.segments.iter().map(|s| s.start)
    }

    /// The position of the next read.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Index of the segment holding NAR offset `pos` (< `len`).
    fn segment_at(&self, pos: u64) -> usize {
        self.segments.partition_point(|s| s.start <= pos) - 1
    }

    /// Fails the read: drops any blob reader, so a later read starts afresh.
    fn fail(&mut self, e: RenderError) -> Poll<io::Result<()>> {
        self.blob = BlobState::None;
        let kind = match &e {
            RenderError::MissingBlob(_) | RenderError::MissingDirectory(_) => {
                io::ErrorKind::NotFound
            }
            RenderError::BlobSize { .. } => io::ErrorKind::InvalidData,
            _ => io::ErrorKind::Other,
        };
        Poll::Ready(Err(io::Error::new(kind, e)))
    }

    /// Serves file contents at `off` (< `size`) inside segment `idx`.
    fn poll_contents(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
        idx: usize,
        digest: B3Digest,
        size: u64,
        off: u64,
    ) -> Poll<io::Result<()>> {
        loop {
            match std::mem::replace(&mut self.blob, BlobState::None) {
                BlobState::Ready {
                    segment,
                    mut reader,
                    pos,
                } if segment == idx && pos == off => {
                    let want = usize::try_from(size - off)
                        .unwrap_or(usize::MAX)
                        .min(buf.remaining());
                    let dst = buf.initialize_unfilled_to(want);
                    let mut sub = ReadBuf::new(dst);
                    match Pin::new(&mut reader).poll_read(cx, &mut sub) {
                        Poll::Pending => {
                            self.blob = BlobState::Ready {
                                segment,
                                reader,
                                pos,
                            };
                            return Poll::Pending;
                        }
                        Poll::Ready(Err(e)) => {
                            return self.fail(RenderError::Blob {
                                digest,
                                source: e.into(),
                            })
                        }
                        Poll::Ready(Ok(())) => {}
                    }
                    let n = sub.filled().len();
                    if n == 0 {
                        return self.fail(RenderError::BlobSize {
                            digest,
                            expected: size,
                            actual: off,
                        });
                    }
                    buf.advance(n);
                    self.pos += n as u64;
                    self.blob = BlobState::Ready {
                        segment,
                        reader,
                        pos: pos + n as u64,
                    };
                    return Poll::Ready(Ok(()));
                }
                BlobState::Ready {
                    segment,
                    mut reader,
                    ..
                }
                | BlobState::Seeking {
                    segment,
                    mut reader,
                    ..
                } if segment == idx => {
                    // Same blob, elsewhere (or a seek to redo): seek inside it.
                    if let Err(e) = Pin::new(&mut reader).start_seek(SeekFrom::Start(off)) {
                        return self.fail(RenderError::Blob {
                            digest,
                            source: e.into(),
                        });
                    }
                    self.blob = BlobState::Seeking {
                        segment,
                        reader,
                        target: off,
                    };
                    return self.poll_seeking(cx, buf, idx, digest, size, off);
                }
                BlobState::Opening { segment, mut fut } if segment == idx => match fut
                    .as_mut()
                    .poll(cx)
                {
                    Poll::Pending => {
                        self.blob = BlobState::Opening { segment, fut };
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(source)) => {
                        return self.fail(RenderError::Blob { digest, source })
                    }
                    Poll::Ready(Ok(None)) => return self.fail(RenderError::MissingBlob(digest)),
                    Poll::Ready(Ok(Some(reader))) => {
                        // A fresh reader stands at 0; anything else needs a seek.
                        self.blob = BlobState::Ready {
                            segment,
                            reader,
                            pos: 0,
                        };
                    }
                },
                _ => {
                    let blobs = self.blobs.clone();
                    let fut = Box::pin(async move { blobs.open_read(&digest).await });
                    self.blob = BlobState::Opening { segment: idx, fut };
                }
            }
        }
    }

    /// Drives a seek inside the current blob, then reads.
    fn poll_seeking(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
        idx: usize,
        digest: B3Digest,
        size: u64,
        off: u64,
    ) -> Poll<io::Result<()>> {
        let BlobState::Seeking {
            segment,
            mut reader,
            target,
        } = std::mem::replace(&mut self.blob, BlobState::None)
        else {
            unreachable!("poll_seeking without a seek")
        };
        match Pin::new(&mut reader).poll_complete(cx) {
            Poll::Pending => {
                self.blob = BlobState::Seeking {
                    segment,
                    reader,
                    target,
                };
                Poll::Pending
            }
            Poll::Ready(Err(e)) => self.fail(RenderError::Blob {
                digest,
                source: e.into(),
            }),
            Poll::Ready(Ok(p)) if p != target => self.fail(RenderError::Blob {
                digest,
                source: arca_castore::Error::Storage(format!(
                    "seeking to {target} in the blob landed at {p}"
                )),
            }),
            Poll::Ready(Ok(_)) => {
                self.blob = BlobState::Ready {
                    segment,
                    reader,
                    pos: target,
                };
                self.poll_contents(cx, buf, idx, digest, size, off)
            }
        }
    }

    /// Checks, when the reader at hand just read a file's contents to their
    /// end and the read goes on right after them (in the padding or past
    /// it), that the blob ends there too.
    fn poll_check_end(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (segment, pos) = match &self.blob {
            BlobState::Ready { segment, pos, .. } => (*segment, *pos),
            _ => return Poll::Ready(Ok(())),
        };
        let seg = self.segments[segment];
        let Kind::File { digest, size } = seg.kind else {
            return Poll::Ready(Ok(()));
        };
        if pos != size || self.pos < seg.start + size || self.pos > seg.start + seg.len {
            return Poll::Ready(Ok(()));
        }
        let BlobState::Ready { reader, .. } = &mut self.blob else {
            unreachable!()
        };
        let mut one = [0u8; 1];
        let mut probe = ReadBuf::new(&mut one);
        match ready!(Pin::new(reader).poll_read(cx, &mut probe)) {
            Err(e) => self.fail(RenderError::Blob {
                digest,
                source: e.into(),
            }),
            Ok(()) if !probe.filled().is_empty() => self.fail(RenderError::BlobSize {
                digest,
                expected: size,
                actual: size + 1,
            }),
            Ok(()) => {
                // Checked; the reader is done with.
                self.blob = BlobState::None;
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl AsyncRead for SeekableNar {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos >= this.len || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_check_end(cx))?;
        let idx = this.segment_at(this.pos);
        let seg = this.segments[idx];
        let off = this.pos - seg.start;
        let (n, fill) = match seg.kind {
            Kind::Framing { at } => {
                let n = usize::try_from(seg.len - off)
                    .unwrap_or(usize::MAX)
                    .min(buf.remaining());
                let from = at + off as usize;
                (n, Some(from))
            }
            Kind::File { digest, size } if off < size => {
                return this.poll_contents(cx, buf, idx, digest, size, off)
            }
            Kind::File { .. } => (
                usize::try_from(seg.len - off)
                    .unwrap_or(usize::MAX)
                    .min(buf.remaining()),
                None,
            ),
        };
        match fill {
            Some(from) => buf.put_slice(&this.framing[from..from + n]),
            None => buf.put_slice(&[0u8; 8][..n]),
        }
        this.pos += n as u64;
        Poll::Ready(Ok(()))
    }
}

impl AsyncSeek for SeekableNar {
    /// Seeks anywhere at or after 0; past the end, reads return EOF.
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        let this = self.get_mut();
        this.pos = arca_castore::blobservice::seek_target(position, this.pos, this.len)?;
        Ok(())
    }

    fn poll_complete(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Poll::Ready(Ok(self.pos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_unpin<T: AsyncRead + AsyncSeek + Send + Unpin + 'static>() {}

    #[test]
    fn is_send_and_unpin() {
        assert_send_unpin::<SeekableNar>();
    }
}
