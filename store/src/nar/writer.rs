//! A streaming NAR writer, byte-identical to `nix-store --dump`.
//!
//! [NarWriter] takes nodes depth first, in NAR order (entries of a directory
//! by increasing raw name bytes, which it checks), and streams file contents
//! through without holding them. [dump_path] serialises a file system tree
//! with it, as `nix-store --dump` does.
use super::{padding_len, CHUNK_SIZE, NAR_MAGIC};
use arca_castore::import::read_file_pieces;
use arca_castore::{B3Digest, NameError, PathComponent, SymlinkTarget};
use bytes::Bytes;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};

/// Why writing a NAR failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The output failed.
    #[error("writing the NAR failed: {0}")]
    Io(#[from] std::io::Error),
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
    /// A file's contents are shorter or longer than announced.
    #[error("file contents are {actual} bytes, {expected} announced")]
    ContentsLength {
        /// The announced length.
        expected: u64,
        /// What was given (at least).
        actual: u64,
    },
    /// A call out of sequence (a name for the root, no name for an entry,
    /// two roots, an unfinished file or directory, ...).
    #[error("NAR writer misused: {0}")]
    Misuse(&'static str),
}

/// Writes one NAR to an [AsyncWrite] (buffered internally).
pub struct NarWriter<W: AsyncWrite + Unpin> {
    out: BufWriter<W>,
    /// Per open directory: the last entry name written in it.
    dirs: Vec<Option<PathComponent>>,
    /// The file being written: bytes still expected.
    file: Option<(u64, u64)>,
    root_started: bool,
    /// Scratch space for tokens.
    scratch: Vec<u8>,
}

fn push_str(buf: &mut Vec<u8>, s: &[u8]) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s);
    buf.extend_from_slice(&[0u8; 8][..padding_len(s.len() as u64)]);
}

/// Where a rendered NAR goes: any [AsyncWrite], written through copies of
/// what it is given. A writer that can keep file contents as they are (the
/// reference-counted [Bytes] they were fetched in) overrides
/// [NarOutput::poll_take], and the NAR's contents reach it without a copy.
pub trait NarOutput: AsyncWrite + Unpin {
    /// Whether [NarOutput::poll_take] takes pieces (else the writer never
    /// offers them: offering means flushing what is gathered first, which
    /// would cut a compressor's blocks short for nothing).
    const TAKES: bool = false;

    /// Offered `data` (file contents, in order after everything written
    /// before): a writer that keeps it takes it out of the option (waiting
    /// for room as a write would). The default takes nothing: the bytes are
    /// then written as usual.
    fn poll_take(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        _data: &mut Option<Bytes>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

impl NarOutput for Vec<u8> {}
impl<W: NarOutput + ?Sized> NarOutput for &mut W {
    const TAKES: bool = W::TAKES;

    fn poll_take(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &mut Option<Bytes>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut **self).poll_take(cx, data)
    }
}

/// Contents pieces at least this long are offered whole
/// ([NarOutput::poll_take]); shorter ones are gathered with the framing.
const TAKE_WHOLE: usize = 64 * 1024;

impl<W: NarOutput> NarWriter<W> {
    /// Appends file contents as [NarWriter::write_contents] does, handing
    /// `data` itself to a writer that keeps such pieces (no copy).
    pub async fn write_contents_owned(&mut self, data: Bytes) -> Result<(), WriteError> {
        if !W::TAKES || data.len() < TAKE_WHOLE {
            return self.write_contents(&data).await;
        }
        let (size, remaining) = self.contents_room(data.len())?;
        let len = data.len() as u64;
        // What is buffered goes first.
        self.out.flush().await?;
        let mut offered = Some(data);
        let out = self.out.get_mut();
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut *out).poll_take(cx, &mut offered))
            .await?;
        if let Some(data) = offered {
            self.out.write_all(&data).await?;
        }
        self.file = Some((size, remaining - len));
        Ok(())
    }
}

impl<W: AsyncWrite + Unpin> NarWriter<W> {
    /// Starts a NAR: writes the magic.
    pub async fn new(writer: W) -> Result<Self, WriteError> {
        let mut w = Self {
            out: BufWriter::with_capacity(64 * 1024, writer),
            dirs: Vec::new(),
            file: None,
            root_started: false,
            scratch: Vec::with_capacity(512),
        };
        push_str(&mut w.scratch, NAR_MAGIC);
        w.flush_scratch().await?;
        Ok(w)
    }

    async fn flush_scratch(&mut self) -> Result<(), WriteError> {
        self.out.write_all(&self.scratch).await?;
        self.scratch.clear();
        Ok(())
    }

    /// Writes what precedes a node's type: the entry header inside a directory.
    fn begin_node(&mut self, name: Option<&PathComponent>) -> Result<(), WriteError> {
        if self.file.is_some() {
            return Err(WriteError::Misuse("a file is still being written"));
        }
        match self.dirs.last_mut() {
            None => {
                if self.root_started {
                    return Err(WriteError::Misuse("the root node was already written"));
                }
                if name.is_some() {
                    return Err(WriteError::Misuse("the root node has no name"));
                }
                self.root_started = true;
            }
            Some(last) => {
                let name = name.ok_or(WriteError::Misuse("a directory entry needs a name"))?;
                if let Some(previous) = last {
                    match name.as_bytes().cmp(previous.as_bytes()) {
                        std::cmp::Ordering::Greater => {}
                        std::cmp::Ordering::Equal => {
                            return Err(WriteError::DuplicateName(name.clone()))
                        }
                        std::cmp::Ordering::Less => {
                            return Err(WriteError::NamesOutOfOrder {
                                previous: previous.clone(),
                                name: name.clone(),
                            })
                        }
                    }
                }
                *last = Some(name.clone());
                push_str(&mut self.scratch, b"entry");
                push_str(&mut self.scratch, b"(");
                push_str(&mut self.scratch, b"name");
                push_str(&mut self.scratch, name.as_bytes());
                push_str(&mut self.scratch, b"node");
            }
        }
        push_str(&mut self.scratch, b"(");
        push_str(&mut self.scratch, b"type");
        Ok(())
    }

    /// Closes a node, and the entry around it if any.
    fn end_node(&mut self) {
        push_str(&mut self.scratch, b")");
        if !self.dirs.is_empty() {
            push_str(&mut self.scratch, b")");
        }
    }

    /// Starts a regular file of `size` bytes; give the contents with
    /// [NarWriter::write_contents], then call [NarWriter::end_file].
    pub async fn start_file(
        &mut self,
        name: Option<&PathComponent>,
        executable: bool,
        size: u64,
    ) -> Result<(), WriteError> {
        self.begin_node(name)?;
        push_str(&mut self.scratch, b"regular");
        if executable {
            push_str(&mut self.scratch, b"executable");
            push_str(&mut self.scratch, b"");
        }
        push_str(&mut self.scratch, b"contents");
        self.scratch.extend_from_slice(&size.to_le_bytes());
        self.flush_scratch().await?;
        self.file = Some((size, size));
        Ok(())
    }

    /// The file being written (its size, bytes still expected), if `len`
    /// more bytes fit in it.
    fn contents_room(&self, len: usize) -> Result<(u64, u64), WriteError> {
        let (size, remaining) = self
            .file
            .ok_or(WriteError::Misuse("no file is being written"))?;
        if len as u64 > remaining {
            return Err(WriteError::ContentsLength {
                expected: size,
                actual: size - remaining + len as u64,
            });
        }
        Ok((size, remaining))
    }

    /// Appends file contents; refuses more than announced.
    pub async fn write_contents(&mut self, data: &[u8]) -> Result<(), WriteError> {
        let (size, remaining) = self.contents_room(data.len())?;
        self.out.write_all(data).await?;
        self.file = Some((size, remaining - data.len() as u64));
        Ok(())
    }

    /// Ends the current file; refuses fewer bytes than announced.
    pub async fn end_file(&mut self) -> Result<(), WriteError> {
        let (size, remaining) = self
            .file
            .ok_or(WriteError::Misuse("no file is being written"))?;
        if remaining != 0 {
            return Err(WriteError::ContentsLength {
                expected: size,
                actual: size - remaining,
            });
        }
        self.file = None;
        self.scratch
            .extend_from_slice(&[0u8; 8][..padding_len(size)]);
        self.end_node();
        self.flush_scratch().await
    }

    /// Writes a whole regular file, streaming exactly `size` bytes from
    /// `contents` (which must then be at its end).
    pub async fn file<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        name: Option<&PathComponent>,
        executable: bool,
        size: u64,
        contents: &mut R,
    ) -> Result<(), WriteError> {
        self.start_file(name, executable, size).await?;
        let mut buf = vec![
            0u8;
            CHUNK_SIZE
                .min(usize::try_from(size).unwrap_or(CHUNK_SIZE))
                .max(1)
        ];
        let mut written = 0u64;
        loop {
            let n = contents.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            written += n as u64;
            if written > size {
                return Err(WriteError::ContentsLength {
                    expected: size,
                    actual: written,
                });
            }
            self.write_contents(&buf[..n]).await?;
        }
        self.end_file().await
    }

    /// Writes a symlink.
    pub async fn symlink(
        &mut self,
        name: Option<&PathComponent>,
        target: &SymlinkTarget,
    ) -> Result<(), WriteError> {
        self.begin_node(name)?;
        push_str(&mut self.scratch, b"symlink");
        push_str(&mut self.scratch, b"target");
        push_str(&mut self.scratch, target.as_bytes());
        self.end_node();
        self.flush_scratch().await
    }

    /// Starts a directory; its entries follow, then [NarWriter::end_directory].
    pub async fn start_directory(
        &mut self,
        name: Option<&PathComponent>,
    ) -> Result<(), WriteError> {
        self.begin_node(name)?;
        push_str(&mut self.scratch, b"directory");
        self.dirs.push(None);
        self.flush_scratch().await
    }

    /// Ends the innermost open directory.
    pub async fn end_directory(&mut self) -> Result<(), WriteError> {
        if self.file.is_some() {
            return Err(WriteError::Misuse("a file is still being written"));
        }
        if self.dirs.pop().is_none() {
            return Err(WriteError::Misuse("no directory is open"));
        }
        self.end_node();
        self.flush_scratch().await
    }

    /// Checks the NAR is complete, flushes, and returns the output.
    pub async fn finish(mut self) -> Result<W, WriteError> {
        if !self.root_started || self.file.is_some() || !self.dirs.is_empty() {
            return Err(WriteError::Misuse("the NAR is incomplete"));
        }
        self.out.flush().await?;
        Ok(self.out.into_inner())
    }
}

/// Why [dump_path] failed.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// Reading the tree failed.
    #[error("{path}: {source}")]
    Io {
        /// The path being read.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A name or symlink target a NAR (as Arca accepts it) cannot hold.
    #[error("{path}: {source}")]
    Invalid {
        /// The offending path.
        path: PathBuf,
        /// Why.
        source: NameError,
    },
    /// A socket, FIFO or device.
    #[error("{path}: a NAR cannot hold this file type")]
    UnsupportedType {
        /// The offending path.
        path: PathBuf,
    },
    /// Writing failed (or a file changed size while it was read).
    #[error("{path}: {source}")]
    Write {
        /// The path being written.
        path: PathBuf,
        /// The cause.
        source: WriteError,
    },
}

/// Serialises the tree at `path` (not following symlinks) as a NAR into
/// `writer`, exactly as `nix-store --dump` does; returns the writer.
pub async fn dump_path<W: AsyncWrite + Unpin>(path: &Path, writer: W) -> Result<W, DumpError> {
    dump_path_observed(path, writer, None).await
}

/// An entry [dump_path_observed] wrote, as castore describes it (a
/// directory by its kind only; a file by the BLAKE3 digest of the very
/// bytes that went into the NAR).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DumpedEntry {
    /// A directory (its entries follow).
    Directory,
    /// A regular file.
    File {
        /// BLAKE3 digest of its contents.
        digest: B3Digest,
        /// Length of its contents.
        size: u64,
        /// Whether it is executable.
        executable: bool,
    },
    /// A symlink.
    Symlink(SymlinkTarget),
}

impl From<&arca_castore::Node> for DumpedEntry {
    fn from(node: &arca_castore::Node) -> Self {
        match node {
            arca_castore::Node::Directory { .. } => Self::Directory,
            arca_castore::Node::File {
                digest,
                size,
                executable,
            } => Self::File {
                digest: *digest,
                size: *size,
                executable: *executable,
            },
            arca_castore::Node::Symlink { target } => Self::Symlink(target.clone()),
        }
    }
}

/// Sees every entry [dump_path_observed] wrote, in NAR order, with its path.
pub type EntryObserver<'a> = &'a mut (dyn FnMut(&Path, DumpedEntry) + Send);

/// [dump_path], also hashing every regular file with BLAKE3 as it streams
/// through, and handing `observer` every entry (files are read once for both).
pub async fn dump_path_observed<W: AsyncWrite + Unpin>(
    path: &Path,
    writer: W,
    mut observer: Option<EntryObserver<'_>>,
) -> Result<W, DumpError> {
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DumpError::Write { path, source }
    };
    let mut nar = NarWriter::new(writer).await.map_err(write_err(path))?;
    // Open directories: their remaining entries (sorted, reversed to pop).
    let mut stack: Vec<Vec<(PathComponent, PathBuf)>> = Vec::new();
    let mut next: Option<(Option<PathComponent>, PathBuf)> = Some((None, path.to_path_buf()));
    loop {
        let (name, p) = match next.take() {
            Some(n) => n,
            None => match stack.last_mut() {
                None => break,
                Some(entries) => match entries.pop() {
                    Some((name, p)) => (Some(name), p),
                    None => {
                        stack.pop();
                        nar.end_directory().await.map_err(write_err(path))?;
                        continue;
                    }
                },
            },
        };
        let io_err = |source| DumpError::Io {
            path: p.clone(),
            source,
        };
        let meta = tokio::fs::symlink_metadata(&p).await.map_err(io_err)?;
        let ft = meta.file_type();
        if ft.is_dir() {
            let mut rd = tokio::fs::read_dir(&p).await.map_err(io_err)?;
            let mut entries = Vec::new();
            while let Some(e) = rd.next_entry().await.map_err(io_err)? {
                let child = e.path();
                let n = PathComponent::try_from(e.file_name().as_bytes()).map_err(|source| {
                    DumpError::Invalid {
                        path: child.clone(),
                        source,
                    }
                })?;
                entries.push((n, child));
            }
            entries.sort_by(|a, b| b.0.as_bytes().cmp(a.0.as_bytes()));
            nar.start_directory(name.as_ref())
                .await
                .map_err(write_err(&p))?;
            if let Some(observe) = observer.as_mut() {
                observe(&p, DumpedEntry::Directory);
            }
            stack.push(entries);
        } else if ft.is_symlink() {
            let target = tokio::fs::read_link(&p).await.map_err(io_err)?;
            let target =
                SymlinkTarget::try_from(target.as_os_str().as_bytes()).map_err(|source| {
                    DumpError::Invalid {
                        path: p.clone(),
                        source,
                    }
                })?;
            nar.symlink(name.as_ref(), &target)
                .await
                .map_err(write_err(&p))?;
            if let Some(observe) = observer.as_mut() {
                observe(&p, DumpedEntry::Symlink(target));
            }
        } else if ft.is_file() {
            let executable = meta.permissions().mode() & 0o100 != 0;
            nar.start_file(name.as_ref(), executable, meta.len())
                .await
                .map_err(write_err(&p))?;
            let mut hasher = observer.as_ref().map(|_| blake3::Hasher::new());
            let mut pieces = read_file_pieces(p.clone());
            while let Some(piece) = pieces.recv().await {
                let piece = piece.map_err(io_err)?;
                if let Some(h) = hasher.as_mut() {
                    h.update(&piece);
                }
                nar.write_contents(&piece).await.map_err(write_err(&p))?;
            }
            nar.end_file().await.map_err(write_err(&p))?;
            if let (Some(observe), Some(h)) = (observer.as_mut(), hasher) {
                let digest = B3Digest::from(h.finalize());
                observe(
                    &p,
                    DumpedEntry::File {
                        digest,
                        size: meta.len(),
                        executable,
                    },
                );
            }
        } else {
            return Err(DumpError::UnsupportedType { path: p });
        }
    }
    nar.finish().await.map_err(write_err(path))
}
