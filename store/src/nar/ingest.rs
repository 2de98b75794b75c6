//! Ingesting a NAR into castore.
//!
//! The NAR is parsed as it streams in, its SHA-256 and size computed on the
//! way. File contents go straight to blob uploads (in pieces of at most
//! 1 MiB, several uploads in flight, never a whole file in memory). The
//! directories are built bottom-up and stored as one closure (leaves first,
//! through [ClosureValidator]) only after the whole NAR proved valid and
//! matched the expected NarHash/NarSize: a malformed or mismatching NAR
//! stores no directory. (Blobs already uploaded may remain; they are content
//! addressed and harmless.)
use super::hashing::HashingReader;
use super::reader::{Event, NarError, NarReader};
use super::CHUNK_SIZE;
use crate::NixHash;
use arca_castore::directoryservice::ClosureValidator;
use arca_castore::{
    B3Digest, BlobService, Directory, DirectoryService, Node, PathComponent, SymlinkTarget,
};
use bytes::{Bytes, BytesMut};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

/// Uploads in flight at once.
const UPLOAD_CONCURRENCY: usize = 8;
/// Pieces queued per upload (each at most 1 MiB).
const UPLOAD_QUEUE: usize = 2;

/// Why an ingest failed. No directory was stored.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The NAR is malformed or could not be read.
    #[error(transparent)]
    Nar(#[from] NarError),
    /// The NAR is not the announced size.
    #[error("NAR size mismatch: expected {expected} bytes, got {actual}{}", if *.at_least { " or more" } else { "" })]
    NarSizeMismatch {
        /// The announced NarSize.
        expected: u64,
        /// The size seen.
        actual: u64,
        /// Whether reading stopped early, so the NAR is at least `actual` bytes.
        at_least: bool,
    },
    /// The NAR does not have the announced SHA-256.
    #[error("NAR hash mismatch: expected sha256:{}, got sha256:{}", NixHash::sha256(*.expected).to_nixbase32(), NixHash::sha256(*.actual).to_nixbase32())]
    NarHashMismatch {
        /// The announced NarHash.
        expected: [u8; 32],
        /// The hash of the NAR received.
        actual: [u8; 32],
    },
    /// Uploading a file's contents failed.
    #[error("uploading a blob failed: {0}")]
    Blob(#[source] arca_castore::Error),
    /// An upload stored a different number of bytes than the NAR holds
    /// (a misbehaving blob service).
    #[error("blob upload stored {actual} bytes, the file has {expected}")]
    BlobSize {
        /// The file's size in the NAR.
        expected: u64,
        /// Bytes written to the blob.
        actual: u64,
    },
    /// An upload task ended abnormally.
    #[error("an upload task failed: {0}")]
    Task(String),
    /// Building or storing the directories failed.
    #[error("storing the directories failed: {0}")]
    Directory(#[source] arca_castore::Error),
}

/// What the NAR is announced to be (from a narinfo); `None` checks nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExpectedNar {
    /// NarSize.
    pub nar_size: Option<u64>,
    /// NarHash (SHA-256 digest).
    pub nar_sha256: Option<[u8; 32]>,
}

/// Ingests a NAR: see the [module docs](self). Returns the root node, the
/// NAR's size and its SHA-256.
pub async fn ingest_nar<R: AsyncRead + Unpin + Send>(
    reader: R,
    blobs: Arc<dyn BlobService>,
    directories: &dyn DirectoryService,
) -> Result<(Node, u64, [u8; 32]), IngestError> {
    ingest_nar_expecting(reader, blobs, directories, ExpectedNar::default()).await
}

enum Kind {
    File {
        index: usize,
        size: u64,
        executable: bool,
    },
    Symlink(SymlinkTarget),
    Directory,
}

/// A node, listed in post-order (a directory after its contents).
struct Entry {
    depth: usize,
    name: Option<PathComponent>,
    kind: Kind,
}

enum Piece {
    Data(Bytes),
    /// All contents were sent: the upload may close the blob.
    End,
}

type UploadResult = Result<(usize, B3Digest), IngestError>;

/// Uploads one file's contents as they arrive; stores nothing unless the
/// whole file arrived.
async fn upload(
    blobs: Arc<dyn BlobService>,
    mut rx: mpsc::Receiver<Piece>,
    index: usize,
    size: u64,
    _permit: tokio::sync::OwnedSemaphorePermit,
) -> UploadResult {
    let mut w = blobs.open_write().await;
    let mut written = 0u64;
    while let Some(piece) = rx.recv().await {
        match piece {
            Piece::Data(b) => {
                written += b.len() as u64;
                w.write(b).await.map_err(IngestError::Blob)?;
            }
            Piece::End => {
                if written != size {
                    return Err(IngestError::BlobSize {
                        expected: size,
                        actual: written,
                    });
                }
                let digest = w.close().await.map_err(IngestError::Blob)?;
                return Ok((index, digest));
            }
        }
    }
    // The ingest was abandoned: drop the writer unclosed (no blob).
    Err(IngestError::Task("upload abandoned".into()))
}

fn joined(r: Result<UploadResult, tokio::task::JoinError>) -> UploadResult {
    r.map_err(|e| IngestError::Task(e.to_string()))?
}

/// Like [ingest_nar], and also checks the NAR against `expected`: a NAR
/// longer than NarSize is refused as soon as that shows, a wrong hash at the
/// end; either way before any directory is stored.
pub async fn ingest_nar_expecting<R: AsyncRead + Unpin + Send>(
    reader: R,
    blobs: Arc<dyn BlobService>,
    directories: &dyn DirectoryService,
    expected: ExpectedNar,
) -> Result<(Node, u64, [u8; 32]), IngestError> {
    let mut nar = NarReader::new(HashingReader::new(reader)).await?;
    let check_size = |nar: &NarReader<HashingReader<R>>| -> Result<(), IngestError> {
        match expected.nar_size {
            Some(expected) if nar.get_ref().count() > expected => {
                Err(IngestError::NarSizeMismatch {
                    expected,
                    actual: nar.get_ref().count(),
                    at_least: true,
                })
            }
            _ => Ok(()),
        }
    };
    let mut uploads: JoinSet<UploadResult> = JoinSet::new();
    let slots = Arc::new(Semaphore::new(UPLOAD_CONCURRENCY));
    let mut entries: Vec<Entry> = Vec::new();
    let mut open_dirs: Vec<Option<PathComponent>> = Vec::new();
    let mut file_count = 0usize;
    let mut digests: Vec<Option<B3Digest>> = Vec::new();
    let record = |digests: &mut Vec<Option<B3Digest>>, r| -> Result<(), IngestError> {
        let (index, digest) = joined(r)?;
        if digests.len() <= index {
            digests.resize(index + 1, None);
        }
        if let Some(slot) = digests.get_mut(index) {
            *slot = Some(digest);
        }
        Ok(())
    };

    while let Some(event) = nar.next().await? {
        check_size(&nar)?;
        match event {
            Event::File {
                name,
                executable,
                size,
            } => {
                // A file larger than the whole announced NAR is refused
                // before its contents are streamed.
                if let Some(limit) = expected.nar_size {
                    if size > limit {
                        return Err(IngestError::NarSizeMismatch {
                            expected: limit,
                            actual: size,
                            at_least: true,
                        });
                    }
                }
                let index = file_count;
                file_count += 1;
                // Fail early if an upload already failed.
                while let Some(r) = uploads.try_join_next() {
                    record(&mut digests, r)?;
                }
                let permit = slots
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|e| IngestError::Task(e.to_string()))?;
                let (tx, rx) = mpsc::channel(UPLOAD_QUEUE);
                uploads.spawn(upload(blobs.clone(), rx, index, size, permit));
                let mut contents = nar.contents();
                let mut upload_gone = false;
                loop {
                    let want = usize::try_from(contents.remaining())
                        .unwrap_or(CHUNK_SIZE)
                        .min(CHUNK_SIZE);
                    if want == 0 {
                        break;
                    }
                    let mut buf = BytesMut::with_capacity(want);
                    while buf.len() < want {
                        let n = contents
                            .read_buf(&mut buf)
                            .await
                            .map_err(|e| IngestError::Nar(nar_io(e)))?;
                        if n == 0 {
                            break;
                        }
                    }
                    if tx.send(Piece::Data(buf.freeze())).await.is_err() {
                        upload_gone = true;
                        break;
                    }
                }
                if upload_gone || tx.send(Piece::End).await.is_err() {
                    // The upload ended early: report why.
                    while let Some(r) = uploads.join_next().await {
                        joined(r)?;
                    }
                    return Err(IngestError::Task("an upload ended early".into()));
                }
                check_size(&nar)?;
                entries.push(Entry {
                    depth: open_dirs.len(),
                    name,
                    kind: Kind::File {
                        index,
                        size,
                        executable,
                    },
                });
            }
            Event::Symlink { name, target } => {
                entries.push(Entry {
                    depth: open_dirs.len(),
                    name,
                    kind: Kind::Symlink(target),
                });
            }
            Event::DirectoryStart { name } => open_dirs.push(name),
            Event::DirectoryEnd => {
                let name = open_dirs
                    .pop()
                    .ok_or(IngestError::Task("directory end without start".into()))?;
                entries.push(Entry {
                    depth: open_dirs.len(),
                    name,
                    kind: Kind::Directory,
                });
            }
        }
    }

    while let Some(r) = uploads.join_next().await {
        record(&mut digests, r)?;
    }

    let (nar_size, nar_sha256) = nar.into_inner().finalize();
    if let Some(expected) = expected.nar_size {
        if expected != nar_size {
            return Err(IngestError::NarSizeMismatch {
                expected,
                actual: nar_size,
                at_least: false,
            });
        }
    }
    if let Some(expected) = expected.nar_sha256 {
        if expected != nar_sha256 {
            return Err(IngestError::NarHashMismatch {
                expected,
                actual: nar_sha256,
            });
        }
    }

    let root = build_directories(entries, &digests, directories).await?;
    Ok((root, nar_size, nar_sha256))
}

/// Builds the directories bottom-up from the post-order list and stores the
/// closure; returns the root node.
async fn build_directories(
    entries: Vec<Entry>,
    digests: &[Option<B3Digest>],
    directories: &dyn DirectoryService,
) -> Result<Node, IngestError> {
    let missing = || IngestError::Task("an upload did not report its digest".into());
    let mut pending: Vec<Vec<(PathComponent, Node)>> = Vec::new();
    let mut validator = ClosureValidator::new();
    let mut root = None;
    for e in entries {
        let node = match e.kind {
            Kind::File {
                index,
                size,
                executable,
            } => {
                let digest = digests.get(index).copied().flatten().ok_or_else(missing)?;
                Node::File {
                    digest,
                    size,
                    executable,
                }
            }
            Kind::Symlink(target) => Node::Symlink { target },
            Kind::Directory => {
                let children = pending
                    .get_mut(e.depth + 1)
                    .map(std::mem::take)
                    .unwrap_or_default();
                let mut dir = Directory::new();
                for (name, node) in children {
                    dir.add(name, node)
                        .map_err(|err| IngestError::Directory(err.into()))?;
                }
                let node = Node::Directory {
                    digest: dir.digest(),
                    size: dir.size(),
                };
                validator.add(dir).map_err(IngestError::Directory)?;
                node
            }
        };
        match e.name {
            None => root = Some(node),
            Some(name) => {
                if pending.len() <= e.depth {
                    pending.resize_with(e.depth + 1, Vec::new);
                }
                if let Some(level) = pending.get_mut(e.depth) {
                    level.push((name, node));
                }
            }
        }
    }
    let root = root.ok_or(IngestError::Task("the NAR has no root node".into()))?;
    if let Node::Directory { .. } = root {
        let closure = validator.finalize().map_err(IngestError::Directory)?;
        directories
            .put_closure(closure)
            .await
            .map_err(IngestError::Directory)?;
    }
    Ok(root)
}

/// Maps an error of [super::reader::ContentsReader] back to a [NarError].
fn nar_io(e: std::io::Error) -> NarError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        NarError::Truncated
    } else {
        NarError::Io(e)
    }
}
