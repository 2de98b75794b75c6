//! Importing a filesystem tree into castore: files hashed and uploaded in
//! parallel, symlinks stored (never followed), the exec bit kept, and the
//! directory closure put leaves first.
use crate::directoryservice::ClosureValidator;
use crate::{
    B3Digest, BlobService, Directory, DirectoryService, Error, Node, PathComponent, SymlinkTarget,
};
use futures::future::BoxFuture;
use futures::stream::{StreamExt, TryStreamExt};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why an import failed. Nothing refers to partially uploaded data: the
/// directory closure is only written once every file is stored.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// Reading the tree failed.
    #[error("{path}: {source}")]
    Io {
        /// The path being read.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A socket, FIFO or device.
    #[error("{path}: cannot import a {kind}")]
    UnsupportedType {
        /// The offending path.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// A name or symlink target castore cannot represent.
    #[error("{path}: {reason}")]
    Invalid {
        /// The offending path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A file changed size while it was imported.
    #[error("{path}: changed while importing (expected {expected} bytes, read {actual})")]
    Changed {
        /// The file.
        path: PathBuf,
        /// Size when walked.
        expected: u64,
        /// Bytes read.
        actual: u64,
    },
    /// A file's bytes no longer match the digest taken when it was first
    /// read (same size, other content).
    #[error("{path}: changed while importing (the bytes uploaded do not have the digest taken when it was first read)")]
    ContentChanged {
        /// The file.
        path: PathBuf,
    },
    /// The store refused or failed.
    #[error("{path}: {source}")]
    Store {
        /// What was being stored.
        path: PathBuf,
        /// The cause.
        source: Error,
    },
}

/// Receives progress while importing.
pub trait ImportProgress: Send + Sync {
    /// The walk is done: this many files and bytes will be uploaded.
    fn walked(&self, _files: u64, _bytes: u64) {}
    /// A file was stored.
    fn file_done(&self, _bytes: u64) {}
}

/// Progress that goes nowhere.
pub struct NoProgress;
impl ImportProgress for NoProgress {}

/// Where an import gets each regular file's BLAKE3 digest, before it
/// decides whether the store needs the file at all. The upload that may
/// follow reads the file again and is checked against this digest, so a file
/// that changed in between fails the import ([ImportError::Changed]).
pub trait FileDigests: Send + Sync {
    /// The digest and size of the regular file at `path` (as the walk found it).
    fn digest<'a>(&'a self, path: &'a Path) -> BoxFuture<'a, std::io::Result<(B3Digest, u64)>>;

    /// Whether [Self::digest] reads the file (rather than looking up a
    /// digest computed anyway): where the store takes files directly
    /// ([BlobService::direct_file_puts]) that read is skipped.
    fn reads_files(&self) -> bool {
        true
    }
}

/// Hashes each file itself, read by [read_file_pieces] (opened as
/// [open_regular_file] does: a path swapped for a symlink or a FIFO after
/// the walk is refused, never followed or waited on). Read, not mapped: a
/// file truncated while being hashed is an error, not a SIGBUS.
pub struct HashLocally;

impl FileDigests for HashLocally {
    fn digest<'a>(&'a self, path: &'a Path) -> BoxFuture<'a, std::io::Result<(B3Digest, u64)>> {
        Box::pin(async move {
            let mut hasher = blake3::Hasher::new();
            let mut pieces = read_file_pieces(path.to_path_buf());
            while let Some(piece) = pieces.recv().await {
                hasher.update(&piece?);
            }
            Ok((B3Digest::from(hasher.finalize()), hasher.count()))
        })
    }
}

/// Opens a file the walk found to be regular, for reading: `O_NOFOLLOW`
/// (a path swapped for a symlink since is refused, not followed) and
/// `O_NONBLOCK` (a path swapped for a FIFO does not block the open), then
/// checks on the open file itself that it is still a regular file, so no
/// swap can slip in between the check and the reads.
pub fn open_regular_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.file_type().is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is no longer a regular file", path.display()),
        ));
    }
    Ok(file)
}

/// Digests published by another pass over the same files (for example the
/// one computing a NAR hash, so that every file is read once for both, and
/// the NAR hash describes exactly the bytes that get stored). An import
/// asking for a path waits until it is published, or fails once the board
/// is closed without it.
#[derive(Default)]
pub struct DigestBoard {
    state: parking_lot::Mutex<BoardState>,
    changed: tokio::sync::Notify,
}

#[derive(Default)]
struct BoardState {
    /// Published and not yet asked for (each path is asked for once).
    digests: std::collections::HashMap<PathBuf, (B3Digest, u64)>,
    /// Set when nothing more will be published: `Err` says why.
    closed: Option<Result<(), String>>,
}

impl DigestBoard {
    /// An empty board.
    pub fn new() -> Self {
        Self::default()
    }

    /// Publishes the digest and size of the file at `path`.
    pub fn publish(&self, path: &Path, digest: B3Digest, size: u64) {
        self.state
            .lock()
            .digests
            .insert(path.to_path_buf(), (digest, size));
        self.changed.notify_waiters();
    }

    /// Nothing more will be published; `result` is how the publishing pass
    /// ended (its error is what waiting imports fail with).
    pub fn close(&self, result: Result<(), String>) {
        self.state.lock().closed.get_or_insert(result);
        self.changed.notify_waiters();
    }
}

/// Closes its board when dropped, with an error unless it was closed
/// already: hold one in the publishing pass, so that a pass that panics or
/// is cancelled never leaves an import waiting.
pub struct CloseOnDrop(pub Arc<DigestBoard>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0
            .close(Err("the pass computing the digests stopped".into()));
    }
}

impl FileDigests for DigestBoard {
    fn reads_files(&self) -> bool {
        false
    }

    fn digest<'a>(&'a self, path: &'a Path) -> BoxFuture<'a, std::io::Result<(B3Digest, u64)>> {
        Box::pin(async move {
            loop {
                // Registered before looking, so a publish in between is not missed.
                let changed = self.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                {
                    let mut state = self.state.lock();
                    if let Some(d) = state.digests.remove(path) {
                        return Ok(d);
                    }
                    match &state.closed {
                        Some(Ok(())) => {
                            return Err(std::io::Error::other(
                                "no digest was published for this file",
                            ))
                        }
                        Some(Err(e)) => return Err(std::io::Error::other(e.clone())),
                        None => {}
                    }
                }
                changed.await;
            }
        })
    }
}

/// Counts of what an import saw.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ImportStats {
    /// Regular files.
    pub files: u64,
    /// Bytes in regular files.
    pub bytes: u64,
    /// Directories.
    pub directories: u64,
    /// Symlinks.
    pub symlinks: u64,
}

enum Kind {
    File {
        size: u64,
        executable: bool,
        index: usize,
    },
    Symlink(SymlinkTarget),
    Directory,
}

struct Entry {
    path: PathBuf,
    depth: usize,
    name: Option<PathComponent>,
    kind: Kind,
}

/// The walk: every entry (contents first), the files to upload (one per
/// inode: hard links share one upload), and the count and bytes of all files.
struct Walk {
    entries: Vec<Entry>,
    uploads: Vec<(PathBuf, u64)>,
    file_count: u64,
    file_bytes: u64,
}

fn walk(root: &Path) -> Result<Walk, ImportError> {
    use std::os::unix::fs::MetadataExt;
    let mut entries = Vec::new();
    let mut files = Vec::new();
    let mut by_inode: std::collections::HashMap<(u64, u64), usize> =
        std::collections::HashMap::new();
    let (mut file_count, mut file_bytes) = (0u64, 0u64);
    for e in walkdir::WalkDir::new(root)
        .follow_links(false)
        .follow_root_links(false)
        .contents_first(true)
        // By raw name bytes: files come in NAR order (see [DigestBoard]).
        .sort_by(|a, b| a.file_name().as_bytes().cmp(b.file_name().as_bytes()))
    {
        let e = e.map_err(|err| {
            let path = err.path().unwrap_or(root).to_path_buf();
            ImportError::Io {
                path,
                source: err
                    .into_io_error()
                    .unwrap_or_else(|| std::io::Error::other("walk failed")),
            }
        })?;
        let path = e.path().to_path_buf();
        let ft = e.file_type();
        let name = if e.depth() == 0 {
            None
        } else {
            Some(
                PathComponent::try_from(e.file_name().as_bytes()).map_err(|err| {
                    ImportError::Invalid {
                        path: path.clone(),
                        reason: format!("invalid name: {err}"),
                    }
                })?,
            )
        };
        let kind = if ft.is_dir() {
            Kind::Directory
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&path).map_err(|source| ImportError::Io {
                path: path.clone(),
                source,
            })?;
            Kind::Symlink(
                SymlinkTarget::try_from(target.as_os_str().as_bytes()).map_err(|err| {
                    ImportError::Invalid {
                        path: path.clone(),
                        reason: format!("invalid symlink target: {err}"),
                    }
                })?,
            )
        } else if ft.is_file() {
            let meta = e.metadata().map_err(|err| ImportError::Io {
                path: path.clone(),
                source: err
                    .into_io_error()
                    .unwrap_or_else(|| std::io::Error::other("metadata failed")),
            })?;
            file_count += 1;
            file_bytes += meta.len();
            let index = if meta.nlink() > 1 {
                *by_inode.entry((meta.dev(), meta.ino())).or_insert_with(|| {
                    files.push((path.clone(), meta.len()));
                    files.len() - 1
                })
            } else {
                files.push((path.clone(), meta.len()));
                files.len() - 1
            };
            Kind::File {
                size: meta.len(),
                executable: meta.permissions().mode() & 0o100 != 0,
                index,
            }
        } else {
            let kind = if ft.is_socket() {
                "socket"
            } else if ft.is_fifo() {
                "FIFO"
            } else if ft.is_block_device() {
                "block device"
            } else if ft.is_char_device() {
                "character device"
            } else {
                "file of unknown type"
            };
            return Err(ImportError::UnsupportedType { path, kind });
        };
        entries.push(Entry {
            path,
            depth: e.depth(),
            name,
            kind,
        });
    }
    Ok(Walk {
        entries,
        uploads: files,
        file_count,
        file_bytes,
    })
}

/// Size of the pieces a file is read in.
const READ_PIECE: usize = 1024 * 1024;

/// Reads a file on the blocking pool in pieces of up to 1 MiB (one copy
/// from the kernel, nothing zero-filled), two pieces ahead of the consumer.
/// Opened by [open_regular_file]: a file swapped for a symlink or a FIFO
/// after a walk is refused, not followed or waited on.
pub fn read_file_pieces(
    path: PathBuf,
) -> tokio::sync::mpsc::Receiver<std::io::Result<bytes::Bytes>> {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::task::spawn_blocking(move || match open_regular_file(&path) {
        Ok(f) => send_pieces(f, &tx),
        Err(e) => {
            let _ = tx.blocking_send(Err(e));
        }
    });
    rx
}

/// [read_file_pieces] of a file opened already, from its current position.
pub fn read_pieces(
    file: std::fs::File,
) -> tokio::sync::mpsc::Receiver<std::io::Result<bytes::Bytes>> {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::task::spawn_blocking(move || send_pieces(file, &tx));
    rx
}

/// Reads `f` to its end in pieces into `tx` (blocking).
fn send_pieces(
    mut f: std::fs::File,
    tx: &tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>,
) {
    use std::io::Read;
    loop {
        // Read into fresh capacity: nothing is zero-filled first.
        let mut buf = Vec::with_capacity(READ_PIECE);
        let filled = match (&mut f).take(READ_PIECE as u64).read_to_end(&mut buf) {
            Ok(n) => n,
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        };
        if filled == 0 {
            return;
        }
        if tx.blocking_send(Ok(bytes::Bytes::from(buf))).is_err() || filled < READ_PIECE {
            return;
        }
    }
}

/// Imports `root` (a directory, file or symlink) and returns its node.
pub async fn import_path(
    root: &Path,
    blobs: Arc<dyn BlobService>,
    directories: Arc<dyn DirectoryService>,
    concurrency: usize,
    progress: Arc<dyn ImportProgress>,
) -> Result<(Node, ImportStats), ImportError> {
    import_path_with(
        root,
        blobs,
        directories,
        concurrency,
        progress,
        Arc::new(HashLocally),
    )
    .await
}

/// [import_path], taking each file's digest from `digests` instead of
/// hashing it first.
pub async fn import_path_with(
    root: &Path,
    blobs: Arc<dyn BlobService>,
    directories: Arc<dyn DirectoryService>,
    concurrency: usize,
    progress: Arc<dyn ImportProgress>,
    digests: Arc<dyn FileDigests>,
) -> Result<(Node, ImportStats), ImportError> {
    let owned = root.to_path_buf();
    let Walk {
        entries,
        uploads: files,
        file_count,
        file_bytes,
    } = tokio::task::spawn_blocking(move || walk(&owned))
        .await
        .map_err(|e| ImportError::Io {
            path: root.to_path_buf(),
            source: std::io::Error::other(e),
        })??;
    let mut stats = ImportStats {
        files: file_count,
        bytes: file_bytes,
        ..Default::default()
    };
    progress.walked(files.len() as u64, files.iter().map(|(_, s)| s).sum());

    // Upload all files, many at a time.
    // Unordered: one large file must not hold back the others' slots.
    let direct = digests.reads_files() && blobs.direct_file_puts().await;
    let file_count = files.len();
    let uploaded: Vec<(usize, B3Digest)> = futures::stream::iter(files.into_iter().enumerate())
        .map(|(index, (path, expected))| {
            let blobs = blobs.clone();
            let progress = progress.clone();
            let digests = digests.clone();
            async move {
                let open = |path: PathBuf| async move {
                    let opened = path.clone();
                    tokio::task::spawn_blocking(move || open_regular_file(&opened))
                        .await
                        .map_err(std::io::Error::other)
                        .and_then(|r| r)
                        .map_err(|source| ImportError::Io { path, source })
                };
                let changed = |actual: u64| ImportError::Changed {
                    path: path.clone(),
                    expected,
                    actual,
                };
                let store_err = |source| ImportError::Store {
                    path: path.clone(),
                    source,
                };
                // Where the store takes files directly, each is stored as
                // read once (the store hashes it and keeps one copy of what
                // it has already). Otherwise the digest first: content the
                // store already has is not sent again, and what is sent must
                // have that digest.
                let local = if direct {
                    None
                } else {
                    let (local, hashed_size) =
                        digests
                            .digest(&path)
                            .await
                            .map_err(|source| ImportError::Io {
                                path: path.clone(),
                                source,
                            })?;
                    if hashed_size != expected {
                        return Err(changed(hashed_size));
                    }
                    if blobs.has(&local).await.map_err(store_err)? {
                        progress.file_done(expected);
                        return Ok((index, local));
                    }
                    Some(local)
                };
                let file = open(path.clone()).await?;
                let (digest, actual) =
                    blobs
                        .put_file(file, local)
                        .await
                        .map_err(|source| match source {
                            // The bytes stored are not the ones first hashed.
                            Error::DigestMismatch { .. } => {
                                ImportError::ContentChanged { path: path.clone() }
                            }
                            source => store_err(source),
                        })?;
                if actual != expected {
                    return Err(changed(actual));
                }
                if local.is_some_and(|local| local != digest) {
                    return Err(ImportError::ContentChanged { path });
                }
                progress.file_done(actual);
                Ok::<_, ImportError>((index, digest))
            }
        })
        .buffer_unordered(concurrency.max(1))
        .try_collect()
        .await?;
    let mut digests = vec![B3Digest::from([0u8; 32]); file_count];
    for (index, digest) in uploaded {
        digests[index] = digest;
    }

    // Build directories bottom-up (the walk lists contents first).
    let mut pending: Vec<Vec<(PathComponent, Node)>> = Vec::new();
    let mut validator = ClosureValidator::new();
    let mut root_node = None;
    for e in entries {
        let node = match e.kind {
            Kind::File {
                size,
                executable,
                index,
            } => Node::File {
                digest: digests[index],
                size,
                executable,
            },
            Kind::Symlink(target) => {
                stats.symlinks += 1;
                Node::Symlink { target }
            }
            Kind::Directory => {
                stats.directories += 1;
                let children = if pending.len() > e.depth + 1 {
                    std::mem::take(&mut pending[e.depth + 1])
                } else {
                    Vec::new()
                };
                let mut dir = Directory::new();
                for (name, node) in children {
                    dir.add(name, node).map_err(|err| ImportError::Invalid {
                        path: e.path.clone(),
                        reason: err.to_string(),
                    })?;
                }
                let node = Node::Directory {
                    digest: dir.digest(),
                    size: dir.size(),
                };
                validator.add(dir).map_err(|source| ImportError::Store {
                    path: e.path.clone(),
                    source,
                })?;
                node
            }
        };
        match e.name {
            None => root_node = Some(node),
            Some(name) => {
                if pending.len() <= e.depth {
                    pending.resize_with(e.depth + 1, Vec::new);
                }
                pending[e.depth].push((name, node));
            }
        }
    }
    let root_node = root_node.ok_or_else(|| ImportError::Invalid {
        path: root.to_path_buf(),
        reason: "nothing to import".into(),
    })?;
    if let Node::Directory { digest, .. } = &root_node {
        let closure = validator.finalize().map_err(|source| ImportError::Store {
            path: root.to_path_buf(),
            source,
        })?;
        debug_assert_eq!(closure.root(), *digest);
        directories
            .put_closure(closure)
            .await
            .map_err(|source| ImportError::Store {
                path: root.to_path_buf(),
                source,
            })?;
    }
    Ok((root_node, stats))
}
