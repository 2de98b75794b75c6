//! Rendering a castore node as a NAR.
//!
//! The directory closure is fetched up front with
//! [DirectoryService::get_recursive]; then the tree is written depth first in
//! NAR order while the next few blobs are already being fetched (each into a
//! small bounded queue, so memory stays bounded whatever the file sizes).
//! Every blob is checked to have the size its node claims. Content that
//! shows up more than once in the tree (hard links; a NAR of
//! `/usr/lib/x86_64-linux-gnu` holds one 25 MB library 13 times) is fetched
//! once and written again from memory, within a budget of bytes kept at once
//! ([render_nar_keeping_repeats]; [REPEAT_BUDGET] for `arca nar dump`).
use super::hashing::HashingWriter;
use super::writer::{NarOutput, NarWriter, WriteError};
use super::CHUNK_SIZE;
use arca_castore::{B3Digest, BlobService, Directory, DirectoryService, Node, PathComponent};
use futures::stream::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Fetches (a large blob, or a batch of small ones) running ahead of the file being written.
const PREFETCH: usize = 8;
/// Files up to this size are fetched in batches ([BlobService::read_many]:
/// one call for many over gRPC).
const BATCH_FILE: u64 = 256 * 1024;
/// Most files and bytes in one batch.
const BATCH_FILES: usize = 256;
const BATCH_BYTES: u64 = 4 * 1024 * 1024;
/// Pieces (at most 1 MiB each) queued per blob being fetched.
const PIECES_AHEAD: usize = 2;
/// Bytes of content that [render_nar_keeping_repeats] callers keep for files
/// whose content shows up again later in the same NAR (hard links,
/// duplicated files): written again from memory instead of being fetched,
/// decoded and verified once more. For renders whose number is bounded
/// (`arca nar dump`, the daemon's local export); [render_nar] keeps none.
pub const REPEAT_BUDGET: u64 = 64 * 1024 * 1024;

/// Why rendering a NAR failed.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// Fetching directories failed (one missing, corrupt, ...).
    #[error("fetching directories failed: {0}")]
    Directory(#[source] arca_castore::Error),
    /// A directory referred to is not in the closure returned.
    #[error("directory {0} is missing")]
    MissingDirectory(B3Digest),
    /// A blob referred to is not stored.
    #[error("blob {0} is missing")]
    MissingBlob(B3Digest),
    /// Reading a blob failed.
    #[error("reading blob {digest} failed: {source}")]
    Blob {
        /// The blob.
        digest: B3Digest,
        /// The cause.
        #[source]
        source: arca_castore::Error,
    },
    /// A blob is not the size its node claims.
    #[error("blob {digest} has {actual} bytes, its node claims {expected}")]
    BlobSize {
        /// The blob.
        digest: B3Digest,
        /// The size in the node.
        expected: u64,
        /// Bytes the blob had (at least).
        actual: u64,
    },
    /// Writing the NAR failed.
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// One step of the walk in NAR order.
pub(crate) enum Step<'a> {
    Node(Option<&'a PathComponent>, &'a Node),
    EndDirectory,
}

/// Walks the tree in NAR order, calling `f` for every step.
pub(crate) fn walk<'a>(
    root: &'a Node,
    dirs: &'a HashMap<B3Digest, Directory>,
    mut f: impl FnMut(Step<'a>) -> Result<(), RenderError>,
) -> Result<(), RenderError> {
    let mut stack: Vec<Box<dyn Iterator<Item = (&'a PathComponent, &'a Node)> + 'a>> = Vec::new();
    let mut next = Some((None, root));
    loop {
        let (name, node) = match next.take() {
            Some(n) => n,
            None => match stack.last_mut().map(|it| it.next()) {
                None => return Ok(()),
                Some(Some((name, node))) => (Some(name), node),
                Some(None) => {
                    stack.pop();
                    f(Step::EndDirectory)?;
                    continue;
                }
            },
        };
        f(Step::Node(name, node))?;
        if let Node::Directory { digest, .. } = node {
            let dir = dirs
                .get(digest)
                .ok_or(RenderError::MissingDirectory(*digest))?;
            stack.push(Box::new(dir.entries()));
        }
    }
}

/// Every entry of the castore tree `root`, in NAR order, with its path
/// relative to the root (`""` for the root, names joined by `/`): what
/// [super::dump_path_observed] reports for the same tree on disk.
pub async fn tree_entries(
    root: &Node,
    directories: &dyn DirectoryService,
) -> Result<Vec<(Vec<u8>, super::DumpedEntry)>, RenderError> {
    let dirs = fetch_directories(root, directories).await?;
    let mut out = Vec::new();
    // The path of each open directory.
    let mut open: Vec<Vec<u8>> = Vec::new();
    walk(root, &dirs, |step| {
        match step {
            Step::Node(name, node) => {
                let mut path = open.last().cloned().unwrap_or_default();
                if let Some(name) = name {
                    if !path.is_empty() {
                        path.push(b'/');
                    }
                    path.extend_from_slice(name.as_bytes());
                }
                if matches!(node, Node::Directory { .. }) {
                    open.push(path.clone());
                }
                out.push((path, super::DumpedEntry::from(node)));
            }
            Step::EndDirectory => {
                open.pop();
            }
        }
        Ok(())
    })?;
    Ok(out)
}

/// Fetches the directory closure of `root` (nothing for a file or symlink).
pub(crate) async fn fetch_directories(
    root: &Node,
    directories: &dyn DirectoryService,
) -> Result<HashMap<B3Digest, Directory>, RenderError> {
    let mut dirs = HashMap::new();
    if let Node::Directory { digest, size } = root {
        let mut stream = directories.get_recursive(digest);
        while let Some(dir) = stream.next().await {
            let dir = dir.map_err(RenderError::Directory)?;
            dirs.insert(dir.digest(), dir);
        }
        match dirs.get(digest) {
            None => return Err(RenderError::MissingDirectory(*digest)),
            Some(d) if d.size() != *size => {
                return Err(RenderError::Directory(arca_castore::Error::Storage(
                    format!(
                        "directory {digest} has size {}, the node claims {size}",
                        d.size()
                    ),
                )))
            }
            Some(_) => {}
        }
    }
    Ok(dirs)
}

/// Reads one blob into a bounded queue of pieces: the backend's own pieces
/// ([BlobService::read_stream]: chunks, messages), cut to at most
/// [CHUNK_SIZE] each, never copied.
fn fetch_blob(
    blobs: Arc<dyn BlobService>,
    digest: B3Digest,
    size: u64,
) -> mpsc::Receiver<Result<bytes::Bytes, RenderError>> {
    let (tx, rx) = mpsc::channel(PIECES_AHEAD);
    tokio::spawn(async move {
        let mut pieces = match blobs.read_stream(&digest).await {
            Ok(Some(s)) => s,
            Ok(None) => {
                let _ = tx.send(Err(RenderError::MissingBlob(digest))).await;
                return;
            }
            Err(source) => {
                let _ = tx.send(Err(RenderError::Blob { digest, source })).await;
                return;
            }
        };
        let mut total = 0u64;
        while let Some(piece) = pieces.next().await {
            let piece = match piece {
                Ok(p) => p,
                Err(e) => {
                    let _ = tx
                        .send(Err(RenderError::Blob {
                            digest,
                            source: e.into(),
                        }))
                        .await;
                    return;
                }
            };
            total += piece.len() as u64;
            if total > size {
                let _ = tx
                    .send(Err(RenderError::BlobSize {
                        digest,
                        expected: size,
                        actual: total,
                    }))
                    .await;
                return;
            }
            for slice in arca_castore::blobservice::pieces_of(piece, CHUNK_SIZE) {
                if tx.send(Ok(slice)).await.is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// What is fetched ahead, in NAR order.
enum Unit {
    /// The empty file (nothing to fetch).
    Empty(B3Digest),
    /// A blob read on its own, in pieces.
    Large(B3Digest, u64),
    /// Consecutive small files read in one batch.
    Batch(Vec<(B3Digest, u64)>),
    /// Content written before and kept: nothing to fetch.
    Repeat(B3Digest),
}

/// One file's contents, as the writer receives them.
enum Fetched {
    Pieces(B3Digest, mpsc::Receiver<Result<bytes::Bytes, RenderError>>),
    Whole(B3Digest, Result<bytes::Bytes, RenderError>),
    Repeat(B3Digest),
}

/// Which contents to keep for a later repeat, decided before anything is
/// fetched: per digest, how many more times it is written from memory.
/// Contents are admitted in file order while the bytes kept at once stay
/// within `budget` (a content is dropped after its last repeat).
fn plan_repeats(files: &[(B3Digest, u64)], budget: u64) -> HashMap<B3Digest, usize> {
    use std::cmp::Reverse;
    let mut kept = HashMap::new();
    if budget == 0 {
        return kept;
    }
    let mut last = HashMap::new();
    let mut count: HashMap<B3Digest, usize> = HashMap::new();
    for (i, (d, _)) in files.iter().enumerate() {
        last.insert(*d, i);
        *count.entry(*d).or_default() += 1;
    }
    let mut seen = std::collections::HashSet::new();
    let mut held = 0u64;
    // What is held, by the index of its last occurrence: released past it.
    let mut release = std::collections::BinaryHeap::new();
    for (i, (d, size)) in files.iter().enumerate() {
        while let Some(&Reverse((at, s))) = release.peek() {
            if at >= i {
                break;
            }
            release.pop();
            held -= s;
        }
        let n = count[d];
        // Only at its first time: a content written once already is not
        // kept from a later time on (its remaining count would be wrong).
        let first = seen.insert(*d);
        let fits = held.checked_add(*size).is_some_and(|h| h <= budget);
        if first && n > 1 && *size > 0 && fits {
            kept.insert(*d, n - 1);
            held += size;
            release.push(Reverse((last[d], *size)));
        }
    }
    kept
}

/// Groups the files (digest, size), in order, into fetch units (in the
/// same order: one file per unit, or a run of small files per batch).
fn plan(files: Vec<(B3Digest, u64)>, repeats: &HashMap<B3Digest, usize>) -> Vec<Unit> {
    let empty = B3Digest::of(b"");
    let mut units = Vec::new();
    let mut batch: Vec<(B3Digest, u64)> = Vec::new();
    let mut batch_bytes = 0u64;
    let mut seen = std::collections::HashSet::new();
    for (digest, size) in files {
        let repeat = repeats.contains_key(&digest) && !seen.insert(digest);
        let alone = if size == 0 && digest == empty {
            Some(Unit::Empty(digest))
        } else if repeat {
            Some(Unit::Repeat(digest))
        } else if size > BATCH_FILE {
            Some(Unit::Large(digest, size))
        } else {
            None
        };
        if let Some(unit) = alone {
            // Units stay in file order: the batch so far goes first.
            if !batch.is_empty() {
                units.push(Unit::Batch(std::mem::take(&mut batch)));
                batch_bytes = 0;
            }
            units.push(unit);
            continue;
        }
        if batch.len() == BATCH_FILES || batch_bytes + size > BATCH_BYTES {
            units.push(Unit::Batch(std::mem::take(&mut batch)));
            batch_bytes = 0;
        }
        batch_bytes += size;
        batch.push((digest, size));
    }
    if !batch.is_empty() {
        units.push(Unit::Batch(batch));
    }
    units
}

/// Reads a batch of small blobs into a queue, one whole blob per file, each
/// checked against its node's size.
fn fetch_batch(
    blobs: Arc<dyn BlobService>,
    files: Vec<(B3Digest, u64)>,
) -> mpsc::Receiver<(B3Digest, Result<bytes::Bytes, RenderError>)> {
    let (tx, rx) = mpsc::channel(files.len().max(1));
    tokio::spawn(async move {
        let digests = files.iter().map(|(d, _)| *d).collect();
        let mut answers = blobs.read_many(digests);
        for (digest, size) in files {
            let r = match answers.next().await {
                Some(Ok((got, Some(data)))) if got == digest => {
                    if data.len() as u64 == size {
                        Ok(data)
                    } else {
                        Err(RenderError::BlobSize {
                            digest,
                            expected: size,
                            actual: data.len() as u64,
                        })
                    }
                }
                Some(Ok((got, None))) if got == digest => Err(RenderError::MissingBlob(digest)),
                Some(Ok((got, _))) => Err(RenderError::Blob {
                    digest,
                    source: arca_castore::Error::Storage(format!(
                        "a batch read answered blob {got}"
                    )),
                }),
                Some(Err(source)) => Err(RenderError::Blob { digest, source }),
                None => Err(RenderError::Blob {
                    digest,
                    source: arca_castore::Error::Storage("a batch read ended early".into()),
                }),
            };
            let failed = r.is_err();
            if tx.send((digest, r)).await.is_err() || failed {
                return;
            }
        }
    });
    rx
}

/// Writes the NAR of `node` to `writer` and returns the writer (flushed).
/// Keeps no content for repeats: for renders whose number nothing bounds
/// (the HTTP cache's NARs, `CalculateNAR`).
pub async fn render_nar<W: NarOutput>(
    node: &Node,
    blobs: Arc<dyn BlobService>,
    directories: &dyn DirectoryService,
    writer: W,
) -> Result<W, RenderError> {
    render_nar_keeping_repeats(node, blobs, directories, writer, 0).await
}

/// [render_nar], keeping up to `repeat_budget` bytes of content at once for
/// files whose content shows up again later in the NAR.
pub async fn render_nar_keeping_repeats<W: NarOutput>(
    node: &Node,
    blobs: Arc<dyn BlobService>,
    directories: &dyn DirectoryService,
    writer: W,
    repeat_budget: u64,
) -> Result<W, RenderError> {
    let dirs = fetch_directories(node, directories).await?;

    let mut steps = Vec::new();
    walk(node, &dirs, |step| {
        steps.push(step);
        Ok(())
    })?;
    // The files in NAR order, fetched a few ahead.
    let files: Vec<(B3Digest, u64)> = steps
        .iter()
        .filter_map(|step| match step {
            Step::Node(_, Node::File { digest, size, .. }) => Some((*digest, *size)),
            _ => None,
        })
        .collect();
    let mut repeats = plan_repeats(&files, repeat_budget);
    let mut kept: HashMap<B3Digest, Vec<bytes::Bytes>> = HashMap::new();
    let mut fetched = futures::stream::iter(plan(files, &repeats))
        .map(|unit| {
            let blobs = blobs.clone();
            async move {
                match unit {
                    Unit::Empty(digest) => futures::stream::once(async move {
                        Fetched::Whole(digest, Ok(bytes::Bytes::new()))
                    })
                    .boxed(),
                    Unit::Repeat(digest) => {
                        futures::stream::once(async move { Fetched::Repeat(digest) }).boxed()
                    }
                    Unit::Large(digest, size) => {
                        let rx = fetch_blob(blobs, digest, size);
                        futures::stream::once(async move { Fetched::Pieces(digest, rx) }).boxed()
                    }
                    Unit::Batch(files) => {
                        let rx = fetch_batch(blobs, files);
                        futures::stream::unfold(rx, |mut rx| async move {
                            let (digest, data) = rx.recv().await?;
                            Some((Fetched::Whole(digest, data), rx))
                        })
                        .boxed()
                    }
                }
            }
        })
        .buffered(PREFETCH)
        .flatten();

    let mut nar = NarWriter::new(writer).await?;
    for step in steps {
        match step {
            Step::EndDirectory => nar.end_directory().await?,
            Step::Node(name, Node::Directory { .. }) => nar.start_directory(name).await?,
            Step::Node(name, Node::Symlink { target }) => nar.symlink(name, target).await?,
            Step::Node(
                name,
                Node::File {
                    digest,
                    size,
                    executable,
                },
            ) => {
                nar.start_file(name, *executable, *size).await?;
                let mut written = 0u64;
                let next = fetched.next().await;
                // Fetches come in file order; anything else is a bug here, never a wrong NAR.
                if let Some(Fetched::Pieces(d, _) | Fetched::Whole(d, _) | Fetched::Repeat(d)) =
                    &next
                {
                    if d != digest {
                        return Err(RenderError::Blob {
                            digest: *digest,
                            source: arca_castore::Error::Storage(format!(
                                "internal: fetched blob {d} in its place"
                            )),
                        });
                    }
                }
                // The first time of a content written again later: keep it.
                let keep = repeats.contains_key(digest) && !kept.contains_key(digest);
                let mut keeping = Vec::new();
                match next {
                    Some(Fetched::Pieces(_, mut rx)) => {
                        while let Some(piece) = rx.recv().await {
                            let piece = piece?;
                            written += piece.len() as u64;
                            if keep {
                                keeping.push(piece.clone());
                            }
                            nar.write_contents_owned(piece).await?;
                        }
                    }
                    Some(Fetched::Whole(_, data)) => {
                        let data = data?;
                        written = data.len() as u64;
                        if keep {
                            keeping.push(data.clone());
                        }
                        nar.write_contents_owned(data).await?;
                    }
                    Some(Fetched::Repeat(_)) => {
                        let pieces = kept.get(digest).cloned().unwrap_or_default();
                        for piece in pieces {
                            written += piece.len() as u64;
                            nar.write_contents_owned(piece).await?;
                        }
                        if let Some(left) = repeats.get_mut(digest) {
                            *left -= 1;
                            if *left == 0 {
                                repeats.remove(digest);
                                kept.remove(digest);
                            }
                        }
                    }
                    None => {}
                }
                if keep {
                    kept.insert(*digest, keeping);
                }
                if written != *size {
                    return Err(RenderError::BlobSize {
                        digest: *digest,
                        expected: *size,
                        actual: written,
                    });
                }
                nar.end_file().await?;
            }
        }
    }
    Ok(nar.finish().await?)
}

/// The size and SHA-256 of the NAR of `node`, rendered into a hashing sink.
pub async fn calculate_nar(
    node: &Node,
    blobs: Arc<dyn BlobService>,
    directories: &dyn DirectoryService,
) -> Result<(u64, [u8; 32]), RenderError> {
    let sink = render_nar(node, blobs, directories, HashingWriter::new()).await?;
    Ok(sink.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(units: &[Unit]) -> Vec<String> {
        units
            .iter()
            .map(|u| match u {
                Unit::Empty(_) => "E".to_string(),
                Unit::Large(_, s) => format!("L{s}"),
                Unit::Batch(f) => format!("B{:?}", f.iter().map(|(_, s)| *s).collect::<Vec<_>>()),
                Unit::Repeat(_) => "R".to_string(),
            })
            .collect()
    }

    #[test]
    fn plan_keeps_file_order() {
        let empty = B3Digest::of(b"");
        let d = |n: u8| B3Digest::of(&[n]);
        let files = vec![
            (d(1), 10),
            (empty, 0),
            (d(2), 20),
            (d(3), BATCH_FILE + 1),
            (d(4), 30),
            (d(5), 40),
            (empty, 0),
        ];
        let units = plan(files, &HashMap::new());
        assert_eq!(
            kinds(&units),
            [
                "B[10]",
                "E",
                "B[20]",
                &format!("L{}", BATCH_FILE + 1),
                "B[30, 40]",
                "E"
            ]
        );
    }

    #[test]
    fn repeated_contents_are_kept_within_the_budget_and_fetched_once() {
        let d = |n: u8| B3Digest::of(&[n]);
        // 1 (60) twice, 2 (50) three times around 3 (50) twice: with 100
        // bytes to keep, 2 does not fit while 1 is held; 3 does once 1 is
        // released after its last time.
        let files = vec![
            (d(1), 60),
            (d(2), 50),
            (d(1), 60),
            (d(3), 50),
            (d(2), 50),
            (d(3), 50),
            (d(2), 50),
            (d(4), 10),
        ];
        let repeats = plan_repeats(&files, 100);
        assert_eq!(repeats.get(&d(1)), Some(&1));
        assert_eq!(repeats.get(&d(2)), None, "did not fit");
        assert_eq!(repeats.get(&d(3)), Some(&1));
        assert_eq!(repeats.get(&d(4)), None, "once only");
        let units = plan(files, &repeats);
        assert_eq!(
            kinds(&units),
            ["B[60, 50]", "R", "B[50, 50]", "R", "B[50, 10]"]
        );
    }

    #[test]
    fn plan_splits_batches_by_count_and_bytes() {
        let files: Vec<_> = (0..BATCH_FILES as u32 + 1)
            .map(|i| (B3Digest::of(&i.to_le_bytes()), 1))
            .collect();
        let units = plan(files, &HashMap::new());
        assert_eq!(units.len(), 2);
        assert!(matches!(&units[0], Unit::Batch(f) if f.len() == BATCH_FILES));
        let big = BATCH_FILE;
        let n = (BATCH_BYTES / big) as u32 + 1;
        let files: Vec<_> = (0..n)
            .map(|i| (B3Digest::of(&i.to_le_bytes()), big))
            .collect();
        let units = plan(files, &HashMap::new());
        assert_eq!(
            units.len(),
            2,
            "{} files of {big} bytes exceed {BATCH_BYTES}",
            n
        );
    }
}
