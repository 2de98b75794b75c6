//! A streaming NAR pull parser.
//!
//! [NarReader::next] yields one [Event] per node, depth first, in NAR order.
//! After [Event::File] the file's contents can be read with
//! [NarReader::contents], a reader bounded to exactly the file's length; the
//! parser never holds a file in memory. Contents not read are skipped by the
//! next call to [NarReader::next].
//!
//! Everything `nix-formats.md` calls malformed is rejected, each with its own
//! [NarError] variant: a bad magic, unknown or misplaced tokens, non-zero
//! padding, names out of order or duplicated, invalid names or symlink
//! targets, strings longer than their cap, input ending early, and bytes after
//! the root node. [NarReader::next] returns `Ok(None)` only once the whole
//! NAR was read and the input proved to end right there.
use super::{padding_len, CHUNK_SIZE, MAX_NAME_LEN, MAX_TARGET_LEN, MAX_TOKEN_LEN, NAR_MAGIC};
use arca_castore::{NameError, PathComponent, SymlinkTarget};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, BufReader, ReadBuf};

/// Why a NAR was refused.
#[derive(Debug, thiserror::Error)]
pub enum NarError {
    /// Reading the input failed.
    #[error("reading the NAR failed: {0}")]
    Io(#[source] std::io::Error),
    /// The input ended inside the NAR (a length beyond the input).
    #[error("the NAR is truncated")]
    Truncated,
    /// The first token is not `nix-archive-1`.
    #[error("not a NAR: bad magic")]
    BadMagic,
    /// A token other than the grammar allows at this point.
    #[error("unexpected token {found:?} in the NAR, expected {expected}")]
    UnexpectedToken {
        /// What the grammar allows here.
        expected: &'static str,
        /// What was found (lossy UTF-8).
        found: String,
    },
    /// A keyword token with an absurd length.
    #[error("a token in the NAR is {0} bytes long, at most {MAX_TOKEN_LEN} allowed")]
    TokenTooLong(u64),
    /// An entry name longer than [MAX_NAME_LEN].
    #[error("an entry name in the NAR is {0} bytes long, at most {MAX_NAME_LEN} allowed")]
    NameTooLong(u64),
    /// A symlink target longer than [MAX_TARGET_LEN].
    #[error("a symlink target in the NAR is {0} bytes long, at most {MAX_TARGET_LEN} allowed")]
    TargetTooLong(u64),
    /// Padding after a string is not all zero.
    #[error("non-zero padding in the NAR")]
    NonZeroPadding,
    /// An entry name that is empty, `.`, `..`, or contains `/` or NUL.
    #[error("invalid entry name in the NAR: {0}")]
    InvalidName(#[source] NameError),
    /// A symlink target that is empty or contains NUL.
    #[error("invalid symlink target in the NAR: {0}")]
    InvalidTarget(#[source] NameError),
    /// An entry name not greater than the previous one in its directory.
    #[error("NAR entries out of order: {name} after {previous}")]
    NamesOutOfOrder {
        /// The previous entry's name.
        previous: PathComponent,
        /// The offending name.
        name: PathComponent,
    },
    /// The same entry name twice in one directory.
    #[error("duplicate NAR entry {0}")]
    DuplicateName(PathComponent),
    /// Bytes after the root node.
    #[error("trailing bytes after the end of the NAR")]
    TrailingData,
    /// The reader failed before; it cannot continue.
    #[error("the NAR reader failed earlier")]
    Failed,
}

impl NarError {
    fn from_io(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            NarError::Truncated
        } else {
            NarError::Io(e)
        }
    }
}

/// One step of the NAR, depth first. `name` is `None` for the root node only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A regular file; its `size` bytes of contents follow
    /// ([NarReader::contents]).
    File {
        /// The entry name.
        name: Option<PathComponent>,
        /// Whether the executable bit is set.
        executable: bool,
        /// Length of the contents.
        size: u64,
    },
    /// A symbolic link.
    Symlink {
        /// The entry name.
        name: Option<PathComponent>,
        /// Where it points.
        target: SymlinkTarget,
    },
    /// A directory starts; its entries follow, then [Event::DirectoryEnd].
    DirectoryStart {
        /// The entry name.
        name: Option<PathComponent>,
    },
    /// The innermost open directory ends.
    DirectoryEnd,
}

#[derive(Debug)]
enum State {
    /// Before the root node (magic already read).
    Start,
    /// Inside a file's contents: bytes left, then padding.
    Contents { remaining: u64, padding: usize },
    /// A file or symlink body is complete; its `)` comes next.
    NodeBody,
    /// Inside a directory: `entry` or `)` comes next.
    InDirectory,
    /// The root node is complete; the input must end here.
    Done,
    /// End of input verified.
    Finished,
    /// An error was returned; nothing more is read.
    Failed,
}

/// A streaming NAR parser over any [AsyncRead].
pub struct NarReader<R> {
    inner: BufReader<R>,
    state: State,
    /// Per open directory: the last entry name seen in it.
    dirs: Vec<Option<PathComponent>>,
}

const BUFFER_SIZE: usize = 64 * 1024;

impl<R: AsyncRead + Unpin> NarReader<R> {
    /// Starts parsing: reads and checks the magic.
    pub async fn new(reader: R) -> Result<Self, NarError> {
        let mut r = Self {
            inner: BufReader::with_capacity(BUFFER_SIZE, reader),
            state: State::Start,
            dirs: Vec::new(),
        };
        let magic = r.read_string(MAX_TOKEN_LEN).await.map_err(|e| match e {
            NarError::Truncated | NarError::TokenTooLong(_) | NarError::NonZeroPadding => {
                NarError::BadMagic
            }
            e => e,
        })?;
        if magic != NAR_MAGIC {
            return Err(NarError::BadMagic);
        }
        Ok(r)
    }

    /// The underlying reader. It is read ahead in blocks of up to 64 KiB.
    pub fn get_ref(&self) -> &R {
        self.inner.get_ref()
    }

    /// The underlying reader; meant for after [NarReader::next] returned
    /// `Ok(None)`, when all input was consumed.
    pub fn into_inner(self) -> R {
        self.inner.into_inner()
    }

    /// Number of open directories (the depth of the next entry).
    pub fn depth(&self) -> usize {
        self.dirs.len()
    }

    /// The next event; `Ok(None)` once the NAR ended and the input with it.
    /// After an error every further call fails with [NarError::Failed].
    pub async fn next(&mut self) -> Result<Option<Event>, NarError> {
        if matches!(self.state, State::Failed) {
            return Err(NarError::Failed);
        }
        match self.step().await {
            Ok(ev) => Ok(ev),
            Err(e) => {
                self.state = State::Failed;
                Err(e)
            }
        }
    }

    /// The contents of the file just returned by [NarReader::next]: exactly
    /// its length, then end of file. Empty when not positioned on a file.
    /// A NAR ending inside the contents gives an `UnexpectedEof` error.
    pub fn contents(&mut self) -> ContentsReader<'_, R> {
        ContentsReader { reader: self }
    }

    async fn step(&mut self) -> Result<Option<Event>, NarError> {
        loop {
            match self.state {
                State::Start => return self.node(None).await.map(Some),
                State::Contents { remaining, padding } => {
                    self.skip(remaining).await?;
                    self.read_padding(padding).await?;
                    self.state = State::NodeBody;
                }
                State::NodeBody => {
                    self.expect(b")", "\")\"").await?;
                    self.close_entry().await?;
                }
                State::InDirectory => {
                    let tok = self.read_token().await?;
                    match tok.as_slice() {
                        b"entry" => {
                            self.expect(b"(", "\"(\"").await?;
                            self.expect(b"name", "\"name\"").await?;
                            let name = self.read_name().await?;
                            self.expect(b"node", "\"node\"").await?;
                            return self.node(Some(name)).await.map(Some);
                        }
                        b")" => {
                            self.dirs.pop();
                            self.close_entry().await?;
                            return Ok(Some(Event::DirectoryEnd));
                        }
                        _ => return Err(unexpected("\"entry\" or \")\"", &tok)),
                    }
                }
                State::Done => {
                    let mut byte = [0u8; 1];
                    let n = self
                        .inner
                        .read(&mut byte)
                        .await
                        .map_err(NarError::from_io)?;
                    if n != 0 {
                        return Err(NarError::TrailingData);
                    }
                    self.state = State::Finished;
                    return Ok(None);
                }
                State::Finished => return Ok(None),
                State::Failed => return Err(NarError::Failed),
            }
        }
    }

    /// A node's `)` was read: close the entry around it, if any.
    async fn close_entry(&mut self) -> Result<(), NarError> {
        if self.dirs.is_empty() {
            self.state = State::Done;
        } else {
            self.expect(b")", "\")\"").await?;
            self.state = State::InDirectory;
        }
        Ok(())
    }

    /// Parses a node up to its body.
    async fn node(&mut self, name: Option<PathComponent>) -> Result<Event, NarError> {
        self.expect(b"(", "\"(\"").await?;
        self.expect(b"type", "\"type\"").await?;
        let tok = self.read_token().await?;
        match tok.as_slice() {
            b"regular" => {
                let mut tok = self.read_token().await?;
                let mut executable = false;
                if tok == b"executable" {
                    let empty = self.read_token().await?;
                    if !empty.is_empty() {
                        return Err(unexpected("\"\"", &empty));
                    }
                    executable = true;
                    tok = self.read_token().await?;
                }
                if tok != b"contents" {
                    return Err(unexpected(
                        if executable {
                            "\"contents\""
                        } else {
                            "\"executable\" or \"contents\""
                        },
                        &tok,
                    ));
                }
                let size = self.read_u64().await?;
                self.state = State::Contents {
                    remaining: size,
                    padding: padding_len(size),
                };
                Ok(Event::File {
                    name,
                    executable,
                    size,
                })
            }
            b"symlink" => {
                self.expect(b"target", "\"target\"").await?;
                let len = self.read_u64().await?;
                if len > MAX_TARGET_LEN {
                    return Err(NarError::TargetTooLong(len));
                }
                let target = self.read_body(len).await?;
                let target =
                    SymlinkTarget::try_from(target.as_slice()).map_err(NarError::InvalidTarget)?;
                self.state = State::NodeBody;
                Ok(Event::Symlink { name, target })
            }
            b"directory" => {
                self.dirs.push(None);
                self.state = State::InDirectory;
                Ok(Event::DirectoryStart { name })
            }
            _ => Err(unexpected(
                "\"regular\", \"symlink\" or \"directory\"",
                &tok,
            )),
        }
    }

    /// Reads an entry name and checks it against the previous one.
    async fn read_name(&mut self) -> Result<PathComponent, NarError> {
        let len = self.read_u64().await?;
        if len > MAX_NAME_LEN {
            return Err(NarError::NameTooLong(len));
        }
        let raw = self.read_body(len).await?;
        let name = PathComponent::try_from(raw.as_slice()).map_err(NarError::InvalidName)?;
        let Some(prev) = self.dirs.last_mut() else {
            // Only reachable in a directory; keep it an error rather than a panic.
            return Err(unexpected("a node", b"entry"));
        };
        if let Some(previous) = prev {
            match name.as_bytes().cmp(previous.as_bytes()) {
                std::cmp::Ordering::Greater => {}
                std::cmp::Ordering::Equal => return Err(NarError::DuplicateName(name)),
                std::cmp::Ordering::Less => {
                    return Err(NarError::NamesOutOfOrder {
                        previous: previous.clone(),
                        name,
                    });
                }
            }
        }
        *prev = Some(name.clone());
        Ok(name)
    }

    async fn expect(&mut self, want: &[u8], expected: &'static str) -> Result<(), NarError> {
        let tok = self.read_token().await?;
        if tok != want {
            return Err(unexpected(expected, &tok));
        }
        Ok(())
    }

    async fn read_token(&mut self) -> Result<Vec<u8>, NarError> {
        self.read_string(MAX_TOKEN_LEN).await
    }

    async fn read_string(&mut self, cap: u64) -> Result<Vec<u8>, NarError> {
        let len = self.read_u64().await?;
        if len > cap {
            return Err(NarError::TokenTooLong(len));
        }
        self.read_body(len).await
    }

    /// Reads `len` (already capped) bytes and their padding.
    async fn read_body(&mut self, len: u64) -> Result<Vec<u8>, NarError> {
        let len_usize = usize::try_from(len).map_err(|_| NarError::TokenTooLong(len))?;
        let mut buf = vec![0u8; len_usize];
        self.inner
            .read_exact(&mut buf)
            .await
            .map_err(NarError::from_io)?;
        self.read_padding(padding_len(len)).await?;
        Ok(buf)
    }

    async fn read_padding(&mut self, n: usize) -> Result<(), NarError> {
        let mut pad = [0u8; 8];
        let pad = pad.get_mut(..n).ok_or(NarError::NonZeroPadding)?;
        self.inner
            .read_exact(pad)
            .await
            .map_err(NarError::from_io)?;
        if pad.iter().any(|b| *b != 0) {
            return Err(NarError::NonZeroPadding);
        }
        Ok(())
    }

    async fn read_u64(&mut self) -> Result<u64, NarError> {
        let mut b = [0u8; 8];
        self.inner
            .read_exact(&mut b)
            .await
            .map_err(NarError::from_io)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Discards `n` bytes of file contents.
    async fn skip(&mut self, mut n: u64) -> Result<(), NarError> {
        let mut buf = vec![0u8; CHUNK_SIZE.min(usize::try_from(n).unwrap_or(CHUNK_SIZE))];
        while n > 0 {
            let want = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            let got = self
                .inner
                .read(&mut buf[..want])
                .await
                .map_err(NarError::from_io)?;
            if got == 0 {
                return Err(NarError::Truncated);
            }
            n -= got as u64;
            if let State::Contents { remaining, .. } = &mut self.state {
                *remaining = n;
            }
        }
        Ok(())
    }
}

fn unexpected(expected: &'static str, found: &[u8]) -> NarError {
    NarError::UnexpectedToken {
        expected,
        found: String::from_utf8_lossy(found).into_owned(),
    }
}

/// The contents of one file in a NAR: exactly the file's bytes, then EOF.
pub struct ContentsReader<'a, R> {
    reader: &'a mut NarReader<R>,
}

impl<R> ContentsReader<'_, R> {
    /// Bytes of contents not read yet.
    pub fn remaining(&self) -> u64 {
        match self.reader.state {
            State::Contents { remaining, .. } => remaining,
            _ => 0,
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for ContentsReader<'_, R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let reader = &mut *self.reader;
        let remaining = match reader.state {
            State::Contents { remaining, .. } => remaining,
            _ => return Poll::Ready(Ok(())),
        };
        if remaining == 0 || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let result = if (buf.remaining() as u64) <= remaining {
            Pin::new(&mut reader.inner)
                .poll_read(cx, buf)
                .map_ok(|()| buf.filled().len() - before)
        } else {
            // Read into a slice no longer than what is left of the file.
            let max = usize::try_from(remaining).unwrap_or(usize::MAX);
            let mut limited = ReadBuf::new(buf.initialize_unfilled_to(max));
            match Pin::new(&mut reader.inner).poll_read(cx, &mut limited) {
                Poll::Ready(Ok(())) => {
                    let n = limited.filled().len();
                    buf.advance(n);
                    Poll::Ready(Ok(n))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        };
        match result {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => {
                reader.state = State::Failed;
                Poll::Ready(Err(e))
            }
            Poll::Ready(Ok(n)) => {
                if n == 0 {
                    reader.state = State::Failed;
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the NAR ends inside a file's contents",
                    )));
                }
                if let State::Contents { remaining, .. } = &mut reader.state {
                    *remaining -= n as u64;
                }
                Poll::Ready(Ok(()))
            }
        }
    }
}
