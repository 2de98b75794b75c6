//! Blobs on any `object_store` backend (local files, memory, S3).
//!
//! Layout under the base path:
//! - `chunks/<2 hex>/<digest hex>`: one content-defined chunk, a one-byte tag
//!   (`0` raw, `1` zstd, `2` LZ4) followed by the (compressed) bytes; new
//!   chunks get the store's [Codec] (LZ4 unless `?codec=zstd`), and a store
//!   reads every tag whatever its codec;
//! - `blobs/<2 hex>/<digest hex>`: for blobs of more than one chunk, the chunk
//!   list encoded as a `StatBlobResponse`.
//!
//! A blob of a single chunk is stored as that chunk only (its digest is the
//! blob's digest). Every chunk is verified against its digest when read.
//!
//! On local files, new chunks are by default written raw and compressed later
//! by a background thread once writes pause (see `compaction.rs`); the tag byte
//! says which form a chunk file holds, so readers never care.
//!
//! On local files in background mode, a blob larger than the largest chunk is
//! by default not even chunked while it is written ("whole first"): it goes,
//! hashed on the way, to one file `whole/<2 hex>/<digest hex>`, and the
//! compactor later cuts it into chunks (compressed, deduplicated), writes its
//! chunk list and only then removes the whole file. Writing a large blob then
//! costs what copying and hashing it costs, as in `cp` plus `b3sum`; chunking,
//! deduplication and compression happen once writes pause. A whole file is
//! read only after it was hashed whole and matched its digest; a whole file
//! and a chunk list may both exist for a moment (the list is written first),
//! so readers look for the whole file first and then for the list.
use super::chunked_reader::{check_chunk_size, verify_chunk, ChunkFetcher, ChunkedReader};
use super::{
    BatchItem, BlobReader, BlobService, BlobWriter, ChunkMeta, StoredBatchItem, StoredBlob,
    MAX_BATCH_BLOB_SIZE,
};
use crate::{B3Digest, Error};
use arca_proto::castore as proto;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::stream::{BoxStream, FuturesOrdered, StreamExt, TryStreamExt};
use object_store::{path::Path, ObjectStore, ObjectStoreExt, PutPayload};
use prost::Message;
use std::sync::Arc;
use tokio::task::JoinHandle;
use tracing::instrument;

mod compaction;
use compaction::Compactor;
pub use compaction::{LocalChunking, LocalCompression, LocalFilesOptions};

const TAG_RAW: u8 = 0;
const TAG_ZSTD: u8 = 1;
const TAG_LZ4: u8 = 2;

/// How a store compresses new chunks (where that saves at least 1/16).
/// The tag byte of every chunk file says how it was stored, so a store
/// reads chunks of either codec whatever it writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Codec {
    /// LZ4, the default: decodes about three times as fast as zstd and
    /// compresses twice as fast, storing about 1.33 times the bytes (shared
    /// libraries: 0.32 of their size against 0.24). Reading is what a lazy
    /// `/nix/store`, NAR dumps and binary-cache serving wait for.
    #[default]
    Lz4,
    /// zstd at this level (`?codec=zstd`: level 1): the smallest store.
    Zstd(i32),
}

impl std::str::FromStr for Codec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lz4" => Ok(Codec::Lz4),
            "zstd" => Ok(Codec::Zstd(1)),
            other => Err(format!("codec={other:?}: expected lz4 or zstd")),
        }
    }
}
/// Chunks uploaded concurrently by one writer.
const UPLOADS_IN_FLIGHT: usize = 8;
/// Chunks being hashed, compressed or uploaded at once by all writers of a
/// service together: bounds memory (at most this many chunks of ≤ 1 MiB).
const SERVICE_UPLOADS_IN_FLIGHT: usize = 32;

/// Content-defined chunking parameters (FastCDC 2020), in bytes.
#[derive(Clone, Copy, Debug)]
pub struct ChunkingParams {
    /// Smallest chunk (except a blob's last).
    pub min: usize,
    /// Target average.
    pub avg: usize,
    /// Largest chunk.
    pub max: usize,
}

impl Default for ChunkingParams {
    fn default() -> Self {
        Self {
            min: 64 * 1024,
            avg: 256 * 1024,
            max: 1024 * 1024,
        }
    }
}

struct Inner {
    store: Arc<dyn ObjectStore>,
    base: Path,
    params: ChunkingParams,
    codec: Codec,
    upload_permits: Arc<tokio::sync::Semaphore>,
    /// For a local-files store: the directory `base` maps to. Chunks are
    /// then read and written with plain file calls, each chunk in one trip
    /// to the blocking pool (hash, compress, existence check, write), in the
    /// same layout `object_store` uses.
    local_dir: Option<std::path::PathBuf>,
    /// For a local-files store in background mode: new chunks are written
    /// raw and handed to this compactor. `None`: compress inline.
    compaction: Option<Compactor>,
    /// Blobs larger than `params.max` are written whole and chunked by the
    /// compactor (local files, background mode, [LocalChunking::Background]).
    whole_first: bool,
}

/// Files written by this process (staging names must not collide).
static STAGING_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The file of chunk `hex` under a local store directory.
fn local_chunk_file(dir: &std::path::Path, hex: &str) -> std::path::PathBuf {
    dir.join("chunks").join(&hex[..2]).join(hex)
}

/// The chunk list file of blob `hex` under a local store directory.
fn local_list_file(dir: &std::path::Path, hex: &str) -> std::path::PathBuf {
    dir.join("blobs").join(&hex[..2]).join(hex)
}

/// A chunk list as stored (a `StatBlobResponse`, as the gRPC `Stat` answers).
fn encode_chunk_list(chunks: &[ChunkMeta]) -> Vec<u8> {
    proto::StatBlobResponse {
        chunks: chunks
            .iter()
            .map(|c| proto::stat_blob_response::ChunkMeta {
                digest: c.digest.to_bytes(),
                size: c.size,
            })
            .collect(),
        bao: Bytes::new(),
    }
    .encode_to_vec()
}

/// The whole-blob file of blob `hex` under a local store directory (see
/// the module docs: blobs written whole, not chunked yet).
fn local_whole_file(dir: &std::path::Path, hex: &str) -> std::path::PathBuf {
    dir.join("whole").join(&hex[..2]).join(hex)
}

/// The whole-blob file of `d` under `dir`, opened after it was read
/// through and matched `d`; `None` if there is none (an empty file, what an
/// OS crash can leave of an unsynced write, counts as none). Blocking.
fn open_verified_whole(
    dir: &std::path::Path,
    d: &B3Digest,
    max_len: Option<u64>,
) -> Result<Option<std::fs::File>, Error> {
    use std::io::{Read, Seek};
    let path = local_whole_file(dir, &d.to_hex());
    let err = |e: std::io::Error| Error::Storage(format!("reading {}: {e}", path.display()));
    let mut file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e)),
    };
    let len = file.metadata().map_err(err)?.len();
    if len == 0 {
        return Ok(None);
    }
    if max_len.is_some_and(|max| len > max) {
        // Refused before hashing it: a batch read takes small blobs only.
        return Err(super::too_large_for_batch(d));
    }
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let actual = B3Digest::from(hasher.finalize());
    if actual != *d {
        return Err(Error::Storage(format!(
            "blob {d}: whole file {} failed verification (got {actual})",
            path.display()
        )));
    }
    file.rewind().map_err(err)?;
    Ok(Some(file))
}

/// Bytes of a file mapped at once by [hash_own_file].
const HASH_WINDOW: u64 = 64 * 1024 * 1024;

/// BLAKE3 of the first `len` bytes of a file this process wrote and nobody
/// else changes (a staging file): mapped [HASH_WINDOW] bytes at a time and
/// hashed on all cores, so it is neither copied nor resident whole.
/// Never for files others can truncate: that would be a SIGBUS. Blocking.
fn hash_own_file(path: &std::path::Path, len: u64) -> std::io::Result<B3Digest> {
    let file = std::fs::File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut offset = 0u64;
    while offset < len {
        let n = HASH_WINDOW.min(len - offset);
        // SAFETY: the file is this process's own staging file, written
        // completely before and never truncated or written again.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(offset)
                .len(n as usize)
                .map(&file)?
        };
        hasher.update_rayon(&map);
        offset += n;
    }
    Ok(B3Digest::from(hasher.finalize()))
}

/// Whether `path` exists and is not empty (see `exists_nonempty`). Blocking.
fn file_nonempty(path: &std::path::Path) -> Result<bool, Error> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(m.len() > 0),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::Storage(format!("checking {}: {e}", path.display()))),
    }
}

/// Pieces a whole-blob file is streamed in.
const WHOLE_READ_PIECE: usize = 1024 * 1024;

/// Chunk files read per trip to the blocking pool by a batch read.
const LOCAL_BATCH: usize = 16;

/// Reads, decodes and verifies the chunk `d` of a local store (blocking);
/// `None` if there is no such chunk file.
fn read_local_chunk(dir: &std::path::Path, d: &B3Digest) -> Result<Option<Bytes>, Error> {
    let Some(stored) = read_chunk_file(dir, d)? else {
        return Ok(None);
    };
    decode_stored_file(d, stored).map(Some)
}

/// Largest stored chunk file: a chunk of [super::MAX_CHUNK_SIZE] bytes
/// that did not compress, with its tag byte and the codecs' worst-case
/// growth. A reader of a file passed to it refuses anything larger
/// before reading it.
pub const MAX_STORED_FILE_SIZE: u64 = super::MAX_CHUNK_SIZE + super::MAX_CHUNK_SIZE / 128 + 1024;

/// The blob `d` from the bytes of the file a local store keeps it in as one
/// chunk ([super::StoredFiles]): its tag byte read, decoded, and verified
/// against `d` (an error for anything else).
pub fn decode_stored_file(d: &B3Digest, stored: Bytes) -> Result<Bytes, Error> {
    let data = decode_chunk(d, stored)?;
    verify_chunk(
        &ChunkMeta {
            digest: *d,
            size: data.len() as u64,
        },
        &data,
    )?;
    Ok(data)
}

/// The chunk files of a store on local disk ([super::StoredFiles]).
struct LocalStoredFiles {
    dir: std::path::PathBuf,
}

impl super::StoredFiles for LocalStoredFiles {
    fn open(&self, digest: &B3Digest) -> std::io::Result<Option<std::fs::File>> {
        match std::fs::File::open(local_chunk_file(&self.dir, &digest.to_hex())) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// The bytes of a chunk's file as stored (tag byte and payload); `None` if
/// there is no such file.
fn read_chunk_file(dir: &std::path::Path, d: &B3Digest) -> Result<Option<Bytes>, Error> {
    let file = local_chunk_file(dir, &d.to_hex());
    match std::fs::read(&file) {
        Ok(b) => Ok(Some(Bytes::from(b))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Storage(format!("reading {}: {e}", file.display()))),
    }
}

/// A chunk file as stored, for a reader that decodes and verifies it
/// ([BlobService::read_many_as_stored]): raw bytes, or the compressed form.
/// Its declared size must fit a batch; `None` if there is no such file.
fn read_local_chunk_as_stored(
    dir: &std::path::Path,
    d: &B3Digest,
) -> Result<Option<StoredBlob>, Error> {
    let Some(stored) = read_chunk_file(dir, d)? else {
        return Ok(None);
    };
    let blob = stored_chunk(d, stored)?;
    // A compressed form without a readable size is passed on: the reader refuses it.
    if blob
        .declared_size()
        .is_some_and(|n| n > MAX_BATCH_BLOB_SIZE)
    {
        return Err(super::too_large_for_batch(d));
    }
    Ok(Some(blob))
}

/// Starts writing `file`'s dirty pages to disk without anyone waiting for
/// it: `sync_file_range(SYNC_FILE_RANGE_WRITE)`, as RocksDB's
/// `bytes_per_sync` does, so that by the time anyone syncs (the compactor,
/// or `sync` after an import) much of the file is on disk already instead
/// of all of it being written then. The call itself can wait while the
/// disk's queue is full (about as long as writing the file), so it runs on
/// one thread of its own, one file after the other (many at once on the
/// blocking pool contended: twice the CPU for an import), and a writer
/// only queues the file. Only a hint: a full queue drops it, errors are
/// ignored (durability comes from the compactor's own syncs).
fn start_writeback(file: std::fs::File) {
    static QUEUE: std::sync::OnceLock<Option<std::sync::mpsc::SyncSender<std::fs::File>>> =
        std::sync::OnceLock::new();
    let queue = QUEUE.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<std::fs::File>(1024);
        std::thread::Builder::new()
            .name("arca-writeback".into())
            .spawn(move || {
                use std::os::fd::AsRawFd;
                for file in rx {
                    // SAFETY: a plain syscall on a descriptor `file` keeps
                    // open; it reads and writes no memory of this process.
                    let _ = unsafe {
                        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE)
                    };
                }
            })
            .ok()
            .map(|_| tx)
    });
    if let Some(tx) = queue {
        let _ = tx.try_send(file);
    }
}

/// `#arca-b<boot>-<pid>-<n>`: what staging files of this process end in
/// (unique per call). The boot (see [boot_tag]) and pid tell a later
/// process whether the writer is gone: a file of an earlier boot always is,
/// even if its pid was given to a live process since. Without a boot tag
/// (no `/proc`), `#arca-<pid>-<n>`.
fn staging_suffix() -> String {
    let n = STAGING_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    match boot_tag() {
        Some(boot) => format!("{STAGING_MARK}b{boot}-{}-{n}", std::process::id()),
        None => format!("{STAGING_MARK}{}-{n}", std::process::id()),
    }
}

/// This boot of the machine: the first 16 hex digits of the kernel's
/// random boot id, `None` where there is none.
fn boot_tag() -> Option<&'static str> {
    static TAG: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    TAG.get_or_init(|| {
        let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        let hex: String = id
            .chars()
            .filter(char::is_ascii_hexdigit)
            .take(16)
            .collect();
        (hex.len() == 16).then_some(hex)
    })
    .as_deref()
}

/// What every staging file's name contains.
const STAGING_MARK: &str = "#arca-";

/// Writes `parts` to `target` atomically: a staging file in the same
/// directory (created on demand), renamed over the target. With `sync`, the
/// staging file's data reaches the disk before the rename, so a crash never
/// leaves `target` replaced by an incomplete file.
fn write_file_atomically(
    target: &std::path::Path,
    parts: &[Bytes],
    sync: bool,
) -> std::io::Result<()> {
    use std::io::Write;
    let parent = target
        .parent()
        .ok_or_else(|| std::io::Error::other("chunk file without a directory"))?;
    let mut staging = target.as_os_str().to_owned();
    staging.push(staging_suffix());
    let staging = std::path::PathBuf::from(staging);
    let open = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&staging)
    };
    let mut file = match open() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(parent)?;
            open()?
        }
        other => other?,
    };
    let written = parts
        .iter()
        .try_for_each(|p| file.write_all(p))
        .and_then(|()| if sync { file.sync_data() } else { Ok(()) })
        .and_then(|()| std::fs::rename(&staging, target));
    if written.is_err() {
        let _ = std::fs::remove_file(&staging);
    }
    written
}

impl Inner {
    /// Makes the staging file of a blob written whole the blob's whole file
    /// and queues it for the compactor; or, if the blob is chunked already,
    /// leaves the staging file to its owner to remove. Returns whether the
    /// staging file was taken. Blocking.
    fn commit_whole(&self, staging: &std::path::Path, digest: &B3Digest) -> Result<bool, Error> {
        let dir = self
            .local_dir
            .as_ref()
            .ok_or_else(|| Error::Storage("whole blobs need a local directory".into()))?;
        let hex = digest.to_hex();
        let target = local_whole_file(dir, &hex);
        let list = local_list_file(dir, &hex);
        if file_nonempty(&list)? {
            return Ok(false);
        }
        // A whole file there already is kept if it reads back right, else
        // replaced (atomically): one that an OS crash left short, empty or
        // zeroed is repaired by storing the blob again.
        if matches!(open_verified_whole(dir, digest, None), Ok(Some(_))) {
            return Ok(false);
        }
        let parent = target
            .parent()
            .ok_or_else(|| Error::Storage("whole file without a directory".into()))?;
        std::fs::create_dir_all(parent)
            .and_then(|()| std::fs::rename(staging, &target))
            .map_err(|e| Error::Storage(format!("storing {}: {e}", target.display())))?;
        if let Some(c) = &self.compaction {
            c.record(*digest);
        }
        Ok(true)
    }

    /// [BlobService::put_file] into a whole-first store. A file larger than
    /// one chunk is copied in the kernel (`copy_file_range`) into a staging
    /// file, the copy hashed (mapped: only this process writes it), then
    /// committed; a smaller one is stored as chunks in the same trip
    /// ([Self::put_small_file]). A file whose size changed on the way is
    /// handed back for the writer or the chunk path. Blocking.
    fn put_whole_file(
        &self,
        mut file: std::fs::File,
        expected: Option<B3Digest>,
    ) -> Result<WholePut, Error> {
        let meta = file.metadata().map_err(Error::from)?;
        if !meta.is_file() {
            return Err(Error::InvalidRequest("not a regular file".into()));
        }
        if meta.len() <= self.params.max as u64 {
            return Ok(match self.put_small_file(file, meta.len(), expected)? {
                Ok((digest, size)) => WholePut::Stored(digest, size),
                Err(grown) => WholePut::Grown(grown),
            });
        }
        let dir = self
            .local_dir
            .as_ref()
            .ok_or_else(|| Error::Storage("whole blobs need a local directory".into()))?;
        if let Some(c) = &self.compaction {
            c.note_write();
        }
        let mut whole = WholeWrite::create(dir)
            .map_err(|e| Error::Storage(format!("creating a whole-blob file: {e}")))?;
        let (mut staging_file, _, _) = whole
            .state
            .take()
            .ok_or_else(|| Error::Storage("whole-blob file not open".into()))?;
        let size = std::io::copy(&mut file, &mut staging_file).map_err(|e| {
            Error::Storage(format!("copying into {}: {e}", whole.staging.display()))
        })?;
        if size <= self.params.max as u64 {
            // It shrank (or was read from a later position): one chunk at
            // most, stored as chunks are. The staging file goes.
            let data = std::fs::read(&whole.staging)
                .map_err(|e| Error::Storage(format!("reading {}: {e}", whole.staging.display())))?;
            return Ok(WholePut::Small(Bytes::from(data)));
        }
        start_writeback(staging_file);
        let digest = hash_own_file(&whole.staging, size)
            .map_err(|e| Error::Storage(format!("hashing {}: {e}", whole.staging.display())))?;
        super::check_expected(expected, digest)?;
        whole.committed = self.commit_whole(&whole.staging, &digest)?;
        Ok(WholePut::Stored(digest, size))
    }

    /// [BlobService::put_file] of a file not larger than one chunk into a
    /// whole-first store, in one trip: read whole, cut (FastCDC, as a writer
    /// cuts it), each new chunk written raw and journaled for the compactor,
    /// the chunk list if there are several. Stores what a writer
    /// would. A file that turns out larger is handed back, at its start
    /// position again. Blocking.
    fn put_small_file(
        &self,
        file: std::fs::File,
        len: u64,
        expected: Option<B3Digest>,
    ) -> Result<Result<(B3Digest, u64), std::fs::File>, Error> {
        use std::io::{Read, Seek};
        let dir = self
            .local_dir
            .as_ref()
            .ok_or_else(|| Error::Storage("small-file puts need a local directory".into()))?;
        let mut file = file;
        let start = file.stream_position().map_err(Error::from)?;
        // Sized by the file's length (it may still grow: read_to_end grows).
        let cap = usize::try_from(len)
            .unwrap_or(usize::MAX)
            .min(self.params.max)
            + 1;
        let mut data = Vec::with_capacity(cap);
        (&mut file)
            .take(self.params.max as u64 + 1)
            .read_to_end(&mut data)
            .map_err(Error::from)?;
        if data.len() > self.params.max {
            file.seek(std::io::SeekFrom::Start(start))
                .map_err(Error::from)?;
            return Ok(Err(file));
        }
        let data = Bytes::from(data);
        if let Some(c) = &self.compaction {
            c.note_write();
        }
        let mut cuts: Vec<Bytes> =
            fastcdc::v2020::FastCDC::new(&data, self.params.min, self.params.avg, self.params.max)
                .map(|c| data.slice(c.offset..c.offset + c.length))
                .collect();
        if cuts.is_empty() {
            cuts.push(Bytes::new()); // the empty blob: one empty chunk
        }
        let mut list = Vec::with_capacity(cuts.len());
        for chunk in cuts {
            let digest = B3Digest::of(&chunk);
            let target = local_chunk_file(dir, &digest.to_hex());
            let size = chunk.len() as u64;
            if !file_nonempty(&target)? {
                write_file_atomically(&target, raw_payload(chunk).as_ref(), false)
                    .map_err(|e| Error::Storage(format!("writing {}: {e}", target.display())))?;
                if let Some(c) = &self.compaction {
                    c.record(digest);
                }
            }
            list.push(ChunkMeta { digest, size });
        }
        let digest = if list.len() == 1 {
            list[0].digest
        } else {
            B3Digest::of(&data)
        };
        super::check_expected(expected, digest)?;
        if list.len() > 1 {
            let hex = digest.to_hex();
            let target = local_list_file(dir, &hex);
            if !file_nonempty(&target)? {
                write_file_atomically(&target, &[Bytes::from(encode_chunk_list(&list))], false)
                    .map_err(|e| Error::Storage(format!("writing {}: {e}", target.display())))?;
            }
        }
        Ok(Ok((digest, data.len() as u64)))
    }

    fn chunk_path(&self, d: &B3Digest) -> Path {
        let h = d.to_hex();
        self.base.clone().join("chunks").join(&h[..2]).join(h)
    }
    fn blob_path(&self, d: &B3Digest) -> Path {
        let h = d.to_hex();
        self.base.clone().join("blobs").join(&h[..2]).join(h)
    }

    /// Whether `p` exists and is not empty: chunk files and chunk lists
    /// are never empty, so an empty one (what an OS crash can leave of an
    /// unsynced write) is written again when its content is stored again.
    async fn exists_nonempty(&self, p: &Path) -> Result<bool, Error> {
        match self.store.head(p).await {
            Ok(meta) => Ok(meta.size > 0),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn exists(&self, p: &Path) -> Result<bool, Error> {
        match self.store.head(p).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn get_opt(&self, p: &Path) -> Result<Option<Bytes>, Error> {
        match self.store.get(p).await {
            Ok(r) => Ok(Some(r.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The chunk list of a multi-chunk blob.
    async fn chunk_list(&self, d: &B3Digest) -> Result<Option<Vec<ChunkMeta>>, Error> {
        let Some(raw) = self.get_opt(&self.blob_path(d)).await? else {
            return Ok(None);
        };
        let resp = proto::StatBlobResponse::decode(raw)
            .map_err(|e| Error::Storage(format!("blob {d}: corrupt chunk list: {e}")))?;
        resp.chunks
            .into_iter()
            .map(|c| {
                Ok(ChunkMeta {
                    digest: B3Digest::try_from(&c.digest).map_err(|e| {
                        Error::Storage(format!("blob {d}: corrupt chunk list: {e}"))
                    })?,
                    size: c.size,
                })
            })
            .collect::<Result<Vec<_>, Error>>()
            .and_then(|list| {
                super::validate_chunk_list(&list)
                    .map_err(|e| Error::Storage(format!("blob {d}: {e}")))?;
                Ok(Some(list))
            })
    }

    /// A chunk's raw bytes, decoded and verified; `None` if absent.
    async fn read_chunk(
        &self,
        d: &B3Digest,
        expected_size: Option<u64>,
    ) -> Result<Option<Bytes>, Error> {
        self.read_chunk_checked(d, expected_size, true).await
    }

    /// A chunk decoded and its length checked, not hashed (for a reader
    /// that hashes the whole blob).
    async fn read_chunk_unhashed(&self, chunk: &ChunkMeta) -> Result<Option<Bytes>, Error> {
        self.read_chunk_checked(&chunk.digest, Some(chunk.size), false)
            .await
    }

    /// A chunk's raw bytes, decoded, its length checked against
    /// `expected_size` and, with `hash`, verified against its digest (one
    /// trip to the blocking pool on local files); `None` if absent.
    async fn read_chunk_checked(
        &self,
        d: &B3Digest,
        expected_size: Option<u64>,
        hash: bool,
    ) -> Result<Option<Bytes>, Error> {
        let d = *d;
        let check = move |stored: Bytes| -> Result<Bytes, Error> {
            let data = decode_chunk(&d, stored)?;
            let meta = ChunkMeta {
                digest: d,
                size: expected_size.unwrap_or(data.len() as u64),
            };
            if hash {
                verify_chunk(&meta, &data)?;
            } else {
                check_chunk_size(&meta, &data)?;
            }
            Ok(data)
        };
        if let Some(dir) = self.local_dir.clone() {
            return tokio::task::spawn_blocking(move || {
                read_chunk_file(&dir, &d)?.map(check).transpose()
            })
            .await
            .map_err(Error::storage)?;
        }
        let Some(stored) = self.get_opt(&self.chunk_path(&d)).await? else {
            return Ok(None);
        };
        Ok(Some(crate::cpu_bound(move || check(stored)).await??))
    }

    /// Hashes and compresses a chunk (one trip to the blocking pool), and
    /// stores it unless it is already there. On local files in background
    /// mode the chunk is written raw and recorded for the compactor instead.
    async fn upload_chunk(self: Arc<Self>, data: Bytes) -> Result<ChunkMeta, Error> {
        let size = data.len() as u64;
        let codec = self.codec;
        if let Some(dir) = self.local_dir.clone() {
            let inline = match &self.compaction {
                Some(c) => {
                    c.note_write();
                    false
                }
                None => true,
            };
            // Hash, existence check and (inline) compression on a CPU slot;
            // the write (file creation and rename: journal I/O that can
            // block) outside it, so slow I/O never holds a core's slot.
            let (digest, pending) = crate::cpu_bound(
                move || -> Result<(B3Digest, Option<(std::path::PathBuf, PutPayload)>), Error> {
                    let digest = B3Digest::of(&data);
                    let file = local_chunk_file(&dir, &digest.to_hex());
                    // An empty file is no chunk (every chunk file has its
                    // tag byte): what an OS crash can leave of an unsynced
                    // write. It is written again, never taken as stored.
                    if std::fs::metadata(&file).is_ok_and(|m| m.len() > 0) {
                        return Ok((digest, None));
                    }
                    let payload = if inline {
                        encode_chunk(data, codec)?
                    } else {
                        raw_payload(data)
                    };
                    Ok((digest, Some((file, payload))))
                },
            )
            .await??;
            if let Some((file, payload)) = pending {
                let inner = self.clone();
                tokio::task::spawn_blocking(move || {
                    write_file_atomically(&file, payload.as_ref(), false)
                        .map_err(|e| Error::Storage(format!("writing {}: {e}", file.display())))?;
                    if let Some(c) = &inner.compaction {
                        c.record(digest);
                    }
                    Ok::<(), Error>(())
                })
                .await
                .map_err(Error::storage)??;
            }
            return Ok(ChunkMeta { digest, size });
        }
        let (digest, encoded) = crate::cpu_bound(move || {
            let digest = B3Digest::of(&data);
            encode_chunk(data, codec).map(|e| (digest, e))
        })
        .await??;
        let path = self.chunk_path(&digest);
        if !self.exists_nonempty(&path).await? {
            self.store.put(&path, encoded).await?;
        }
        Ok(ChunkMeta { digest, size })
    }
}

thread_local! {
    /// One zstd compression context per blocking thread, reused across chunks.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
}

/// Tag byte + `data` compressed with `codec`, if that saves at least 1/16
/// of the bytes; `None` if the chunk is better kept raw.
fn compress_chunk(data: &[u8], codec: Codec) -> Result<Option<Vec<u8>>, Error> {
    if data.len() < 512 {
        return Ok(None);
    }
    let out = match codec {
        Codec::Lz4 => {
            // compress_lz4 sizes the buffer (from LZ4's bound) itself.
            let mut out = vec![TAG_LZ4];
            super::codec::compress_lz4(data, &mut out).map_err(Error::Storage)?;
            out
        }
        Codec::Zstd(level) => {
            // Only the first byte is initialised; zstd writes into the spare capacity.
            let mut out = Vec::with_capacity(1 + zstd::zstd_safe::compress_bound(data.len()));
            out.push(TAG_ZSTD);
            COMPRESSOR.with(|cell| -> Result<Vec<u8>, Error> {
                let mut slot = cell.borrow_mut();
                if slot.as_ref().is_none_or(|(l, _)| *l != level) {
                    *slot = Some((
                        level,
                        zstd::bulk::Compressor::new(level).map_err(Error::storage)?,
                    ));
                }
                let (_, c) = slot.as_mut().expect("set above");
                let mut dst = std::io::Cursor::new(out);
                dst.set_position(1);
                c.compress_to_buffer(data, &mut dst)
                    .map_err(Error::storage)?;
                Ok(dst.into_inner())
            })?
        }
    };
    Ok((out.len() - 1 < data.len() - data.len() / 16).then_some(out))
}

/// Tag byte + raw bytes, without copying them (the payload has two parts).
fn raw_payload(data: Bytes) -> PutPayload {
    PutPayload::from_iter([Bytes::from_static(&[TAG_RAW]), data])
}

/// Tag byte + compressed bytes when that saves at least 1/16, else tag
/// byte + raw bytes (see [compress_chunk], [raw_payload]).
fn encode_chunk(data: Bytes, codec: Codec) -> Result<PutPayload, Error> {
    Ok(match compress_chunk(&data, codec)? {
        Some(out) => PutPayload::from(Bytes::from(out)),
        None => raw_payload(data),
    })
}

/// Decodes a stored chunk. The output buffer is sized from the size the
/// compressed form declares (bounded by the largest chunk), not allocated
/// at the maximum.
fn decode_chunk(d: &B3Digest, stored: Bytes) -> Result<Bytes, Error> {
    stored_chunk(d, stored)?
        .decode(super::MAX_CHUNK_SIZE)
        .map_err(|e| Error::Storage(format!("chunk {d}: corrupt compressed data: {e}")))
}

/// What a stored chunk's tag byte says its payload is.
fn stored_chunk(d: &B3Digest, stored: Bytes) -> Result<StoredBlob, Error> {
    match stored.first() {
        Some(&TAG_RAW) => Ok(StoredBlob::Plain(stored.slice(1..))),
        Some(&TAG_ZSTD) => Ok(StoredBlob::Zstd(stored.slice(1..))),
        Some(&TAG_LZ4) => Ok(StoredBlob::Lz4(stored.slice(1..))),
        _ => Err(Error::Storage(format!("chunk {d}: unknown encoding"))),
    }
}

/// Blob service on an `object_store` backend, with FastCDC chunking and
/// per-chunk compression ([Codec]).
#[derive(Clone)]
pub struct ObjectStoreBlobService {
    inner: Arc<Inner>,
}

impl ObjectStoreBlobService {
    /// Batch reads from local files: [LOCAL_BATCH] chunk files per trip to
    /// the blocking pool, read by `read_chunk`, two trips at a time. A
    /// digest without a chunk file is a blob of several chunks (read whole,
    /// verified, at most [MAX_BATCH_BLOB_SIZE], and wrapped by `plain`) or
    /// absent.
    fn read_local_batches<T: Send + 'static>(
        &self,
        dir: std::path::PathBuf,
        digests: Vec<B3Digest>,
        read_chunk: fn(&std::path::Path, &B3Digest) -> Result<Option<T>, Error>,
        plain: fn(Bytes) -> T,
    ) -> BoxStream<'_, Result<(B3Digest, Option<T>), Error>> {
        let groups = super::in_groups(&digests, LOCAL_BATCH);
        futures::stream::iter(groups)
            .map(move |group| {
                let dir = dir.clone();
                async move {
                    let read = tokio::task::spawn_blocking(move || {
                        group
                            .into_iter()
                            .map(|d| (d, read_chunk(&dir, &d)))
                            .collect::<Vec<_>>()
                    })
                    .await
                    .map_err(Error::storage)?;
                    let mut out = Vec::with_capacity(read.len());
                    for (d, r) in read {
                        match r? {
                            Some(blob) => out.push(Ok((d, Some(blob)))),
                            // Not a chunk: a blob of several chunks, or absent.
                            None => out.push(Ok((
                                d,
                                super::read_small_from(self.open_small(&d).await?, &d)
                                    .await?
                                    .map(plain),
                            ))),
                        }
                    }
                    Ok::<_, Error>(futures::stream::iter(out))
                }
            })
            .buffered(2)
            .try_flatten()
            .boxed()
    }

    /// A reader of a blob not stored as one chunk: its whole file (read
    /// through and verified first), else its chunk list; `None` if neither.
    async fn open_chunked(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>, Error> {
        if let Some(file) = self.open_whole(digest).await? {
            return Ok(Some(Box::new(tokio::fs::File::from_std(file))));
        }
        Ok(self
            .chunked(digest)
            .await?
            .map(|r| Box::new(r) as Box<dyn BlobReader>))
    }

    /// [Self::open_chunked] for a batch read: a whole file larger than a
    /// batch takes is refused before it is hashed.
    async fn open_small(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>, Error> {
        if let Some(file) = self
            .open_whole_max(digest, Some(MAX_BATCH_BLOB_SIZE))
            .await?
        {
            return Ok(Some(Box::new(tokio::fs::File::from_std(file))));
        }
        Ok(self
            .chunked(digest)
            .await?
            .map(|r| Box::new(r) as Box<dyn BlobReader>))
    }

    /// The blob's whole file (local files only), verified; `None` if there
    /// is none. Looked for before the chunk list (see the module docs).
    async fn open_whole(&self, digest: &B3Digest) -> Result<Option<std::fs::File>, Error> {
        self.open_whole_max(digest, None).await
    }

    /// [Self::open_whole], refusing a file longer than `max_len`.
    async fn open_whole_max(
        &self,
        digest: &B3Digest,
        max_len: Option<u64>,
    ) -> Result<Option<std::fs::File>, Error> {
        let Some(dir) = self.inner.local_dir.clone() else {
            return Ok(None);
        };
        let d = *digest;
        tokio::task::spawn_blocking(move || open_verified_whole(&dir, &d, max_len))
            .await
            .map_err(Error::storage)?
    }

    /// The [ChunkedReader] of a blob stored as a chunk list; `None` if there
    /// is no such list.
    async fn chunked(&self, digest: &B3Digest) -> Result<Option<ChunkedReader>, Error> {
        match self.inner.chunk_list(digest).await? {
            None => Ok(None),
            Some(chunks) => Ok(Some(ChunkedReader::new(
                chunks,
                Arc::new(Fetcher(self.inner.clone())),
                *digest,
            )?)),
        }
    }

    /// A service storing under `base` in `store`, compressing chunks with
    /// the default [Codec].
    pub fn new(store: Arc<dyn ObjectStore>, base: Path) -> Self {
        Self::with_params(store, base, ChunkingParams::default(), Codec::default())
    }

    /// Like [Self::new] with explicit chunking parameters and codec.
    pub fn with_params(
        store: Arc<dyn ObjectStore>,
        base: Path,
        params: ChunkingParams,
        codec: Codec,
    ) -> Self {
        let upload_permits = Arc::new(tokio::sync::Semaphore::new(SERVICE_UPLOADS_IN_FLIGHT));
        Self {
            inner: Arc::new(Inner {
                store,
                base,
                params,
                codec,
                upload_permits,
                local_dir: None,
                compaction: None,
                whole_first: false,
            }),
        }
    }

    /// Declares that `store` keeps its objects as files under `dir` (an
    /// `object_store` `LocalFileSystem` with that prefix and an empty base):
    /// chunks are then read and written directly, in the same layout, with
    /// one trip to the blocking pool per chunk. New chunks are compressed in
    /// the background ([LocalFilesOptions::default]).
    pub fn with_local_dir(self, dir: std::path::PathBuf) -> Result<Self, Error> {
        self.with_local_files(dir, LocalFilesOptions::default())
    }

    /// Like [Self::with_local_dir] with explicit options. In
    /// [LocalCompression::Background] mode this reads the directory's
    /// `pending-compression` journal (chunks a previous process wrote raw)
    /// and starts the compactor thread, which stops when the last clone of
    /// the service is dropped.
    pub fn with_local_files(
        self,
        dir: std::path::PathBuf,
        options: LocalFilesOptions,
    ) -> Result<Self, Error> {
        let compaction = match options.compression {
            LocalCompression::Inline => None,
            LocalCompression::Background => Some(Compactor::start(
                dir.clone(),
                self.inner.codec,
                self.inner.params,
                &options,
            )?),
        };
        let whole_first = compaction.is_some() && options.chunking == LocalChunking::Background;
        let inner = Inner {
            store: self.inner.store.clone(),
            base: self.inner.base.clone(),
            params: self.inner.params,
            codec: self.inner.codec,
            upload_permits: self.inner.upload_permits.clone(),
            local_dir: Some(dir),
            compaction,
            whole_first,
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Chunks written raw that the background compactor has not dealt with
    /// yet (0 when compressing inline). For tests and benchmarks: wait for
    /// this to reach 0 to see the store in its compacted steady state.
    pub fn pending_compression(&self) -> usize {
        self.inner.compaction.as_ref().map_or(0, Compactor::pending)
    }
}

struct Fetcher(Arc<Inner>);

#[async_trait]
impl ChunkFetcher for Fetcher {
    async fn fetch_chunk(&self, chunk: &ChunkMeta) -> Result<Bytes, Error> {
        self.0
            .read_chunk(&chunk.digest, Some(chunk.size))
            .await?
            .ok_or_else(|| Error::Storage(format!("chunk {} is missing", chunk.digest)))
    }

    /// Decoded (the codec checks its own framing and the declared size)
    /// and its length checked; the reader hashes the whole blob.
    async fn fetch_chunk_unhashed(&self, chunk: &ChunkMeta) -> Result<Bytes, Error> {
        self.0
            .read_chunk_unhashed(chunk)
            .await?
            .ok_or_else(|| Error::Storage(format!("chunk {} is missing", chunk.digest)))
    }
}

#[async_trait]
impl BlobService for ObjectStoreBlobService {
    #[instrument(skip(self), level = "debug")]
    async fn has(&self, digest: &B3Digest) -> Result<bool, Error> {
        if let Some(dir) = &self.inner.local_dir {
            // Both places in one trip, without opening anything.
            let hex = digest.to_hex();
            let chunk = local_chunk_file(dir, &hex);
            let list = local_list_file(dir, &hex);
            let whole = local_whole_file(dir, &hex);
            return tokio::task::spawn_blocking(move || -> Result<bool, Error> {
                // The whole file before the list: the compactor writes the
                // list before it removes the whole file.
                // An empty whole file (an OS crash's leftover) is no blob.
                if file_nonempty(&whole)? {
                    return Ok(true);
                }
                for p in [chunk, list] {
                    match std::fs::symlink_metadata(&p) {
                        Ok(_) => return Ok(true),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            return Err(Error::Storage(format!("checking {}: {e}", p.display())))
                        }
                    }
                }
                Ok(false)
            })
            .await
            .map_err(Error::storage)?;
        }
        Ok(self.inner.exists(&self.inner.chunk_path(digest)).await?
            || self.inner.exists(&self.inner.blob_path(digest)).await?)
    }

    #[instrument(skip(self), level = "debug")]
    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>, Error> {
        if let Some(data) = self.inner.read_chunk(digest, None).await? {
            return Ok(Some(Box::new(std::io::Cursor::new(data))));
        }
        self.open_chunked(digest).await
    }

    /// A one-chunk blob as that chunk (verified); a chunked one chunk by
    /// chunk (fetched and decoded ahead, not hashed one by one: the whole
    /// blob's digest is checked before the last chunk goes out), none of it
    /// copied.
    async fn read_stream(&self, digest: &B3Digest) -> Result<Option<super::BlobStream>, Error> {
        if let Some(data) = self.inner.read_chunk(digest, None).await? {
            return Ok(Some(
                futures::stream::iter((!data.is_empty()).then_some(Ok(data))).boxed(),
            ));
        }
        if let Some(file) = self.open_whole(digest).await? {
            let file = tokio::fs::File::from_std(file);
            return Ok(Some(
                tokio_util::io::ReaderStream::with_capacity(file, WHOLE_READ_PIECE).boxed(),
            ));
        }
        Ok(self.chunked(digest).await?.map(ChunkedReader::into_stream))
    }

    async fn open_write(&self) -> Box<dyn BlobWriter> {
        Box::new(ObjectStoreBlobWriter {
            inner: self.inner.clone(),
            buf: BytesMut::new(),
            blob_hasher: blake3::Hasher::new(),
            first_chunk: None,
            emitted: 0,
            uploads: FuturesOrdered::new(),
            chunks: Vec::new(),
            hashed: 0,
            failed: false,
            done: None,
            whole: None,
        })
    }

    /// In a whole-first store, in one trip to the blocking pool: a file
    /// larger than one chunk copied in the kernel and hashed in parallel, a
    /// smaller one cut and written as chunks (see `Inner::put_whole_file`).
    /// Other stores write files as usual.
    async fn put_file(
        &self,
        file: std::fs::File,
        expected: Option<B3Digest>,
    ) -> Result<(B3Digest, u64), Error> {
        if !self.inner.whole_first {
            return super::put_file_by_writes(self, file, expected).await;
        }
        let inner = self.inner.clone();
        match tokio::task::spawn_blocking(move || inner.put_whole_file(file, expected))
            .await
            .map_err(Error::storage)??
        {
            WholePut::Stored(digest, size) => Ok((digest, size)),
            WholePut::Grown(file) => super::put_file_by_writes(self, file, expected).await,
            WholePut::Small(data) => {
                let size = data.len() as u64;
                let digest = super::put_bytes(self, data).await?;
                super::check_expected(expected, digest)?;
                Ok((digest, size))
            }
        }
    }

    /// On local files: nothing between here and the disk.
    async fn direct_file_puts(&self) -> bool {
        self.inner.local_dir.is_some()
    }

    /// On local files: the chunk files (a single-chunk blob's digest is its
    /// chunk's).
    fn stored_files(&self) -> Option<Arc<dyn super::StoredFiles>> {
        self.inner
            .local_dir
            .clone()
            .map(|dir| Arc::new(LocalStoredFiles { dir }) as Arc<dyn super::StoredFiles>)
    }

    /// On local files: [LOCAL_BATCH] chunk files per trip to the blocking
    /// pool (read, decode, verify), two trips at a time; blobs of several
    /// chunks (not small) are read with [BlobService::open_read].
    fn read_many<'a>(&'a self, digests: Vec<B3Digest>) -> BoxStream<'a, Result<BatchItem, Error>> {
        match self.inner.local_dir.clone() {
            Some(dir) => self.read_local_batches(dir, digests, read_local_chunk, |b| b),
            None => super::read_each(self, digests),
        }
    }

    /// On local files: chunk files as stored (a compressed one as its zstd
    /// frame or LZ4 payload), neither decoded nor verified; blobs of several
    /// chunks are read and verified as by [BlobService::read_many].
    fn read_many_as_stored<'a>(
        &'a self,
        digests: Vec<B3Digest>,
    ) -> BoxStream<'a, Result<StoredBatchItem, Error>> {
        match self.inner.local_dir.clone() {
            Some(dir) => {
                self.read_local_batches(dir, digests, read_local_chunk_as_stored, StoredBlob::Plain)
            }
            None => super::as_plain(self.read_many(digests)),
        }
    }

    #[instrument(skip(self), level = "debug")]
    async fn chunks(&self, digest: &B3Digest) -> Result<Option<Vec<ChunkMeta>>, Error> {
        if let Some(dir) = &self.inner.local_dir {
            // Written whole, not chunked yet: one piece.
            let whole = local_whole_file(dir, &digest.to_hex());
            if tokio::task::spawn_blocking(move || file_nonempty(&whole))
                .await
                .map_err(Error::storage)??
            {
                return Ok(Some(Vec::new()));
            }
        }
        if let Some(list) = self.inner.chunk_list(digest).await? {
            return Ok(Some(list));
        }
        Ok(self
            .inner
            .exists(&self.inner.chunk_path(digest))
            .await?
            .then(Vec::new))
    }
}

struct ObjectStoreBlobWriter {
    inner: Arc<Inner>,
    buf: BytesMut,
    /// Hashes the whole blob; only fed once a second chunk shows up (a
    /// single-chunk blob's digest is its chunk's digest).
    blob_hasher: blake3::Hasher,
    first_chunk: Option<Bytes>,
    emitted: usize,
    uploads: FuturesOrdered<JoinHandle<Result<ChunkMeta, Error>>>,
    chunks: Vec<ChunkMeta>,
    /// Bytes cut into chunks so far.
    hashed: u64,
    /// Set by any error: a failed writer never stores a blob.
    failed: bool,
    done: Option<B3Digest>,
    /// In whole-first mode, once the blob outgrew one chunk: its staging file.
    whole: Option<WholeWrite>,
}

/// What `Inner::put_whole_file` did with a file.
enum WholePut {
    /// Stored whole (or found stored): its digest and size.
    Stored(B3Digest, u64),
    /// Not larger than one chunk by its length, larger when read: the
    /// file, at its starting position again.
    Grown(std::fs::File),
    /// Not larger than one chunk once copied: its bytes.
    Small(Bytes),
}

/// A blob being written whole (see the module docs): a staging file under
/// `whole/`, written and hashed on the blocking pool one piece at a time,
/// the next piece received while the last one is written. Dropped before it
/// is committed, it removes the staging file.
struct WholeWrite {
    staging: std::path::PathBuf,
    /// The file, the hash of what was written and the byte count, between
    /// writes; `None` while a write runs.
    state: Option<(std::fs::File, blake3::Hasher, u64)>,
    running: Option<JoinHandle<std::io::Result<(std::fs::File, blake3::Hasher, u64)>>>,
    committed: bool,
}

impl WholeWrite {
    /// Creates the staging file under `dir/whole` (blocking).
    fn create(dir: &std::path::Path) -> std::io::Result<Self> {
        let whole = dir.join("whole");
        let staging = whole.join(staging_suffix());
        let open = || {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&staging)
        };
        let file = match open() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(&whole)?;
                open()?
            }
            other => other?,
        };
        Ok(Self {
            staging,
            state: Some((file, blake3::Hasher::new(), 0)),
            running: None,
            committed: false,
        })
    }

    /// The state once the running write (if any) is done.
    async fn settle(&mut self) -> Result<(std::fs::File, blake3::Hasher, u64), Error> {
        if let Some(task) = self.running.take() {
            let state = task
                .await
                .map_err(Error::storage)?
                .map_err(|e| Error::Storage(format!("writing {}: {e}", self.staging.display())))?;
            return Ok(state);
        }
        self.state
            .take()
            .ok_or_else(|| Error::Storage("whole-blob write failed earlier".into()))
    }

    /// Hashes and appends `parts` on the blocking pool; returns once the
    /// previous write is done (so one write runs while the next piece comes).
    async fn write(&mut self, parts: Vec<Bytes>) -> Result<(), Error> {
        let (mut file, mut hasher, mut n) = self.settle().await?;
        self.running = Some(tokio::task::spawn_blocking(move || {
            use std::io::Write;
            for p in &parts {
                hasher.update(p);
                file.write_all(p)?;
                n += p.len() as u64;
            }
            Ok((file, hasher, n))
        }));
        Ok(())
    }
}

impl Drop for WholeWrite {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.staging);
        }
    }
}

impl ObjectStoreBlobWriter {
    async fn emit(&mut self, chunk: Bytes) -> Result<(), Error> {
        self.emitted += 1;
        self.hashed += chunk.len() as u64;
        match self.emitted {
            1 => self.first_chunk = Some(chunk.clone()),
            2 => {
                let first = self.first_chunk.take().expect("first chunk kept");
                self.blob_hasher.update(&first);
                self.blob_hasher.update(&chunk);
            }
            _ => {
                self.blob_hasher.update(&chunk);
            }
        }
        let permit = self
            .inner
            .upload_permits
            .clone()
            .acquire_owned()
            .await
            .map_err(Error::storage)?;
        let upload = self.inner.clone().upload_chunk(chunk);
        self.uploads.push_back(tokio::spawn(async move {
            let result = upload.await;
            drop(permit);
            result
        }));
        while self.uploads.len() >= UPLOADS_IN_FLIGHT {
            self.collect_one().await?;
        }
        Ok(())
    }

    async fn collect_one(&mut self) -> Result<(), Error> {
        if let Some(r) = self.uploads.next().await {
            self.chunks.push(r.map_err(Error::storage)??);
        }
        Ok(())
    }

    fn next_cut(&self, at_end: bool) -> Option<usize> {
        let p = self.inner.params;
        if self.buf.is_empty() || (!at_end && self.buf.len() < p.max) {
            return None;
        }
        fastcdc::v2020::FastCDC::new(&self.buf, p.min, p.avg, p.max)
            .next()
            .map(|c| c.length)
    }

    fn local_dir(&self) -> Result<std::path::PathBuf, Error> {
        self.inner
            .local_dir
            .clone()
            .ok_or_else(|| Error::Storage("whole-first writes need a local directory".into()))
    }

    /// Finishes a whole-blob write: the staging file becomes the blob's
    /// whole file (queued for the compactor), or goes if the blob is stored
    /// already.
    async fn commit_whole(&mut self, whole: &mut WholeWrite) -> Result<B3Digest, Error> {
        let (file, hasher, n) = whole.settle().await?;
        drop(file);
        let digest = B3Digest::from(hasher.finalize());
        self.hashed = n;
        let inner = self.inner.clone();
        let staging = whole.staging.clone();
        whole.committed =
            tokio::task::spawn_blocking(move || inner.commit_whole(&staging, &digest))
                .await
                .map_err(Error::storage)??;
        Ok(digest)
    }

    fn check_usable(&self) -> Result<(), Error> {
        if self.failed {
            return Err(Error::Storage(
                "blob writer failed earlier; start a new one".into(),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl BlobWriter for ObjectStoreBlobWriter {
    async fn write(&mut self, data: Bytes) -> Result<(), Error> {
        self.check_usable()?;
        let r = self.write_inner(data).await;
        self.failed |= r.is_err();
        r
    }

    async fn close(&mut self) -> Result<B3Digest, Error> {
        self.check_usable()?;
        let r = self.close_inner().await;
        self.failed |= r.is_err();
        r
    }
}

impl ObjectStoreBlobWriter {
    async fn write_inner(&mut self, data: Bytes) -> Result<(), Error> {
        if self.done.is_some() {
            return Err(Error::InvalidRequest("write after close".into()));
        }
        if let Some(whole) = &mut self.whole {
            if let Some(c) = &self.inner.compaction {
                c.note_write();
            }
            return whole.write(vec![data]).await;
        }
        if self.inner.whole_first && self.emitted == 0 {
            // Whole first: nothing is cut until the blob is known to be
            // larger than one chunk; then it goes to a whole file.
            if self.buf.len() + data.len() <= self.inner.params.max {
                self.buf.extend_from_slice(&data);
                return Ok(());
            }
            let dir = self.local_dir()?;
            let mut whole = tokio::task::spawn_blocking(move || WholeWrite::create(&dir))
                .await
                .map_err(Error::storage)?
                .map_err(|e| Error::Storage(format!("creating a whole-blob file: {e}")))?;
            if let Some(c) = &self.inner.compaction {
                c.note_write();
            }
            let buffered = std::mem::take(&mut self.buf).freeze();
            whole.write(vec![buffered, data]).await?;
            self.whole = Some(whole);
            return Ok(());
        }
        self.buf.extend_from_slice(&data);
        while let Some(cut) = self.next_cut(false) {
            let chunk = self.buf.split_to(cut).freeze();
            self.emit(chunk).await?;
        }
        Ok(())
    }

    async fn close_inner(&mut self) -> Result<B3Digest, Error> {
        if let Some(d) = self.done {
            return Ok(d);
        }
        if let Some(mut whole) = self.whole.take() {
            let digest = self.commit_whole(&mut whole).await?;
            self.done = Some(digest);
            return Ok(digest);
        }
        while let Some(cut) = self.next_cut(true) {
            let chunk = self.buf.split_to(cut).freeze();
            self.emit(chunk).await?;
        }
        if self.emitted == 0 {
            // The empty blob is stored as one empty chunk.
            self.emit(Bytes::new()).await?;
        }
        while !self.uploads.is_empty() {
            self.collect_one().await?;
        }
        let stored: u64 = self.chunks.iter().map(|c| c.size).sum();
        if stored != self.hashed || self.chunks.len() != self.emitted {
            return Err(Error::Storage(format!(
                "stored {stored} of {} bytes",
                self.hashed
            )));
        }
        let digest = if self.chunks.len() == 1 {
            self.chunks[0].digest
        } else {
            let digest = B3Digest::from(self.blob_hasher.finalize());
            let path = self.inner.blob_path(&digest);
            if !self.inner.exists_nonempty(&path).await? {
                self.inner
                    .store
                    .put(&path, PutPayload::from(encode_chunk_list(&self.chunks)))
                    .await?;
            }
            digest
        };
        self.done = Some(digest);
        Ok(digest)
    }
}
