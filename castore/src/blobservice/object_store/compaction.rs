//! Background compression of chunks written raw to a local-files store.
//!
//! Compressing inline costs the writer the codec's time on every chunk
//! (with zstd, about a third of the daemon's CPU during an import). In
//! background mode a writer stores the chunk raw (`TAG_RAW`), appends its
//! digest to the `pending-compression` journal and goes on; one OS thread
//! per service, at the lowest CPU priority (`SCHED_IDLE`, else nice 19),
//! compresses pending chunks once the store has had no chunk writes for
//! `idle_delay`. As in
//! RocksDB's levels, fresh data is stored fast and compacted later.
//!
//! For each pending chunk the compactor reads the file, and only if it is
//! still raw, matches its digest, and the store's codec saves at least 1/16
//! (the rule of inline compression), writes the compressed form to a staging file, syncs
//! it, and renames it over the chunk. Readers see either the raw or the
//! compressed file, both complete, and the tag byte says how to decode it.
//! A corrupt raw chunk is logged and left alone, so reads keep reporting it.
//!
//! Blobs written whole (see the parent module) are journaled the same way,
//! by the blob's digest: for such a record the compactor finds the file
//! `whole/<2 hex>/<hex>`, cuts it into chunks with FastCDC (each stored
//! unless present, compressed when that pays, synced; a present chunk
//! counts only once it read back right and was synced, since the whole file
//! is about to go), checks the whole
//! blob's digest, writes the chunk list (synced), and only then removes the
//! whole file. A whole file that does not match its digest is logged and
//! left alone (reads report it). At start-up, whole files are queued again
//! (whatever the journal says), and staging files of writers that are gone
//! are removed.
//!
//! The journal is a file of 32-byte digests, appended by writers (whoever
//! takes the journal lock writes every record queued so far: group commit),
//! read at start-up (a torn last record is dropped) and emptied once the
//! compactor has dealt with everything queued. It is not fsynced: losing
//! records (a crash) only leaves chunks raw, which is still correct. Stale
//! records (chunks compressed already) are harmless: they are skipped.
use super::{
    compress_chunk, encode_chunk_list, local_chunk_file, local_list_file, local_whole_file,
    raw_payload, read_local_chunk, write_file_atomically, ChunkMeta, ChunkingParams, Codec,
    STAGING_MARK, TAG_RAW,
};
use crate::{B3Digest, Error, B3_LEN};
use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use std::collections::{HashSet, VecDeque};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// The journal's file name, in the store's directory.
const JOURNAL_NAME: &str = "pending-compression";

/// How a local-files store compresses new chunks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LocalCompression {
    /// Compressed while the chunk is written, as every other backend does.
    Inline,
    /// Written raw; a background thread compresses them once writes pause.
    #[default]
    Background,
}

impl std::str::FromStr for LocalCompression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match inline_or_background("compression", s)? {
            true => Self::Inline,
            false => Self::Background,
        })
    }
}

/// Parses the value of a `what=inline|background` option: true for inline.
fn inline_or_background(what: &str, s: &str) -> Result<bool, String> {
    match s {
        "inline" => Ok(true),
        "background" => Ok(false),
        other => Err(format!(
            "unknown {what} {other:?} (expected inline or background)"
        )),
    }
}

/// When a local-files store in background mode cuts large blobs into chunks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LocalChunking {
    /// While the blob is written (deduplicated at once).
    Inline,
    /// A blob larger than one chunk is written whole and chunked by the
    /// compactor once writes pause (needs [LocalCompression::Background]).
    #[default]
    Background,
}

impl std::str::FromStr for LocalChunking {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match inline_or_background("chunking", s)? {
            true => Self::Inline,
            false => Self::Background,
        })
    }
}

/// Options of a local-files blob store
/// ([ObjectStoreBlobService::with_local_files](super::ObjectStoreBlobService::with_local_files)).
#[derive(Clone, Debug)]
pub struct LocalFilesOptions {
    /// When chunks get compressed.
    pub compression: LocalCompression,
    /// When large blobs get chunked (background only with background
    /// compression; inline compression chunks inline).
    pub chunking: LocalChunking,
    /// How long the store must have had no chunk writes before the compactor
    /// works (default 1 s). Tests set it long to keep chunks raw, or short.
    pub idle_delay: Duration,
    /// Run the compactor at the lowest CPU priority (default). Off only in
    /// tests, where a machine busy with other tests would starve it.
    pub low_priority: bool,
}

impl Default for LocalFilesOptions {
    fn default() -> Self {
        Self {
            compression: LocalCompression::default(),
            chunking: LocalChunking::default(),
            idle_delay: Duration::from_secs(1),
            low_priority: true,
        }
    }
}

/// The compactor of one service: dropping it stops the thread (between two
/// chunks; it is not joined).
pub(super) struct Compactor {
    shared: Arc<Shared>,
}

struct Shared {
    dir: PathBuf,
    codec: Codec,
    params: ChunkingParams,
    idle_delay: Duration,
    low_priority: bool,
    epoch: Instant,
    /// Milliseconds since `epoch` of the last chunk write.
    last_write_ms: AtomicU64,
    stop: AtomicBool,
    state: Mutex<State>,
    /// Signalled when work arrives on an empty queue, and on stop.
    wake: Condvar,
    /// The journal, opened for appending. Lock order: `journal`, then `state`.
    journal: Mutex<std::fs::File>,
}

#[derive(Default)]
struct State {
    /// Chunks to look at, oldest first.
    queue: VecDeque<B3Digest>,
    /// Journal records not appended yet.
    unjournaled: Vec<u8>,
    /// The compactor is working on a chunk taken from the queue.
    working: bool,
    /// What the compactor did since the queue was last empty.
    round: Round,
}

#[derive(Default)]
struct Round {
    started: Option<Instant>,
    compressed: u64,
    bytes_before: u64,
    bytes_after: u64,
    kept_raw: u64,
    skipped: u64,
    whole_blobs: u64,
    whole_chunks: u64,
    whole_before: u64,
    whole_after: u64,
}

/// What became of one pending chunk.
enum Outcome {
    Compressed {
        before: u64,
        after: u64,
    },
    /// A blob written whole was cut into `chunks` chunks; `before` bytes,
    /// `after` bytes in new chunk files (chunks present already cost none).
    Chunked {
        chunks: u64,
        before: u64,
        after: u64,
    },
    /// Raw, and compressing would not save 1/16.
    KeptRaw,
    /// Already compressed, gone, corrupt or unreadable: nothing written.
    Skipped,
}

impl Compactor {
    /// Reads the journal under `dir` (creating it) and starts the thread.
    pub(super) fn start(
        dir: PathBuf,
        codec: Codec,
        params: ChunkingParams,
        options: &LocalFilesOptions,
    ) -> Result<Self, Error> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::Storage(format!("creating {}: {e}", dir.display())))?;
        let path = dir.join(JOURNAL_NAME);
        let io_err = |what: &str, e: std::io::Error| {
            Error::Storage(format!("{what} {}: {e}", path.display()))
        };
        let mut journal = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| io_err("opening", e))?;
        let mut records = Vec::new();
        journal
            .read_to_end(&mut records)
            .map_err(|e| io_err("reading", e))?;
        let whole = records.len() - records.len() % B3_LEN;
        if whole != records.len() {
            // A torn last record (crash during an append): drop it, so that
            // new records start on a record boundary.
            warn!(journal = %path.display(), "dropping a torn last record");
            journal
                .set_len(whole as u64)
                .map_err(|e| io_err("truncating", e))?;
        }
        let mut seen = HashSet::new();
        let queue: VecDeque<B3Digest> = records[..whole]
            .chunks_exact(B3_LEN)
            .filter_map(|r| B3Digest::try_from(r).ok())
            .chain(whole_files_left(&dir))
            .filter(|d| seen.insert(*d))
            .collect();
        if !queue.is_empty() {
            info!(chunks = queue.len(), dir = %dir.display(), "resuming background compression");
        }
        let shared = Arc::new(Shared {
            dir,
            codec,
            params,
            idle_delay: options.idle_delay,
            low_priority: options.low_priority,
            epoch: Instant::now(),
            last_write_ms: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            state: Mutex::new(State {
                queue,
                ..Default::default()
            }),
            wake: Condvar::new(),
            journal: Mutex::new(journal),
        });
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("arca-compactor".into())
            .spawn(move || thread_shared.run())
            .map_err(|e| Error::Storage(format!("starting the compactor thread: {e}")))?;
        Ok(Self { shared })
    }

    /// A writer is about to store a chunk: the compactor waits for quiet.
    pub(super) fn note_write(&self) {
        self.shared
            .last_write_ms
            .store(self.shared.now_ms(), Ordering::Relaxed);
    }

    /// Records a chunk just written raw: queued, and appended to the journal
    /// (with whatever other writers queued meanwhile). Blocking I/O.
    pub(super) fn record(&self, digest: B3Digest) {
        let shared = &self.shared;
        shared
            .last_write_ms
            .store(shared.now_ms(), Ordering::Relaxed);
        {
            let mut st = shared.state.lock();
            let was_idle = st.queue.is_empty() && !st.working;
            st.queue.push_back(digest);
            st.unjournaled.extend_from_slice(digest.as_bytes());
            if was_idle {
                shared.wake.notify_all();
            }
        }
        let mut journal = shared.journal.lock();
        let batch = std::mem::take(&mut shared.state.lock().unjournaled);
        if !batch.is_empty() {
            if let Err(e) = journal.write_all(&batch) {
                // The chunks are stored; they may only stay raw after a restart.
                warn!(dir = %shared.dir.display(), error = %e, "appending to the compression journal");
            }
        }
    }

    /// Chunks queued or being compressed.
    pub(super) fn pending(&self) -> usize {
        let st = self.shared.state.lock();
        st.queue.len() + usize::from(st.working)
    }
}

impl Drop for Compactor {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Take the lock so a thread between its check and its wait sees the flag.
        let _st = self.shared.state.lock();
        self.shared.wake.notify_all();
    }
}

impl Shared {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// The compactor thread's loop.
    fn run(self: Arc<Self>) {
        let priority = if self.low_priority {
            lower_own_priority()
        } else {
            "normal (as asked)"
        };
        debug!(dir = %self.dir.display(), priority, "compactor started");
        loop {
            let mut st = self.state.lock();
            while st.queue.is_empty() && !self.stopped() {
                self.wake.wait(&mut st);
            }
            if self.stopped() {
                break;
            }
            // Only once writes have paused.
            let quiet_ms = self
                .now_ms()
                .saturating_sub(self.last_write_ms.load(Ordering::Relaxed));
            let quiet = Duration::from_millis(quiet_ms);
            if quiet < self.idle_delay {
                self.wake.wait_for(&mut st, self.idle_delay - quiet);
                continue;
            }
            let Some(digest) = st.queue.pop_front() else {
                continue;
            };
            st.working = true;
            st.round.started.get_or_insert_with(Instant::now);
            drop(st);

            let outcome = compact_whole(&self.dir, self.codec, self.params, &digest)
                .unwrap_or_else(|| compact_one(&self.dir, self.codec, &digest));

            let mut st = self.state.lock();
            st.working = false;
            match outcome {
                Outcome::Compressed { before, after } => {
                    st.round.compressed += 1;
                    st.round.bytes_before += before;
                    st.round.bytes_after += after;
                }
                Outcome::Chunked {
                    chunks,
                    before,
                    after,
                } => {
                    st.round.whole_blobs += 1;
                    st.round.whole_chunks += chunks;
                    st.round.whole_before += before;
                    st.round.whole_after += after;
                }
                Outcome::KeptRaw => st.round.kept_raw += 1,
                Outcome::Skipped => st.round.skipped += 1,
            }
            let drained = st.queue.is_empty();
            drop(st);
            if drained {
                self.finish_round();
            }
        }
        debug!(dir = %self.dir.display(), "compactor stopped");
    }

    /// The queue ran empty: everything journaled is done, so the journal is
    /// emptied (unless new work arrived meanwhile) and the round reported.
    fn finish_round(&self) {
        let journal = self.journal.lock();
        let mut st = self.state.lock();
        if !st.queue.is_empty() || st.working || self.stopped() {
            return;
        }
        // Records not appended yet belong to chunks already dealt with.
        st.unjournaled.clear();
        let round = std::mem::take(&mut st.round);
        drop(st);
        if let Err(e) = journal.set_len(0) {
            warn!(dir = %self.dir.display(), error = %e, "emptying the compression journal");
        }
        drop(journal);
        let seconds = round.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        info!(
            dir = %self.dir.display(),
            kept_raw = round.kept_raw,
            skipped = round.skipped,
            seconds,
            "compressed {} chunks, {} -> {} bytes; chunked {} whole blobs into {} chunks, {} -> {} new bytes",
            round.compressed,
            round.bytes_before,
            round.bytes_after,
            round.whole_blobs,
            round.whole_chunks,
            round.whole_before,
            round.whole_after,
        );
    }
}

/// The blobs with a whole file under `dir` (to queue at start-up), after
/// removing the staging files of writers that are gone.
fn whole_files_left(dir: &Path) -> Vec<B3Digest> {
    let root = dir.join("whole");
    let Ok(entries) = std::fs::read_dir(&root) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if let Some(rest) = name.strip_prefix(STAGING_MARK) {
            if writer_gone(rest) {
                debug!(file = %e.path().display(), "removing a dead writer's staging file");
                let _ = std::fs::remove_file(e.path());
            }
            continue;
        }
        let Ok(sub) = std::fs::read_dir(e.path()) else {
            continue;
        };
        for f in sub.flatten() {
            let name = f.file_name();
            let parsed = name
                .to_str()
                .and_then(|n| hex::decode(n).ok())
                .and_then(|b| B3Digest::try_from(b.as_slice()).ok());
            if let Some(d) = parsed {
                found.push(d);
            }
        }
    }
    if !found.is_empty() {
        info!(blobs = found.len(), dir = %dir.display(), "whole blobs left to chunk");
    }
    found
}

/// Whether the process that made the staging file `b<boot>-<pid>-<n>` (or,
/// from older builds, `<pid>-<n>`) is gone: it ran in an earlier boot, or
/// no process has its pid.
fn writer_gone(name: &str) -> bool {
    let pid_and_n = match name.strip_prefix('b') {
        Some(rest) => {
            let Some((boot, pid_and_n)) = rest.split_once('-') else {
                return false;
            };
            if super::boot_tag().is_some_and(|now| now != boot) {
                return true;
            }
            pid_and_n
        }
        None => name,
    };
    let Some(pid) = pid_and_n
        .split('-')
        .next()
        .and_then(|p| p.parse::<i32>().ok())
    else {
        return false;
    };
    if pid == std::process::id() as i32 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks whether the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// Chunks the whole file of blob `digest` under `dir` (module docs);
/// `None` if it has none.
fn compact_whole(
    dir: &Path,
    codec: Codec,
    params: ChunkingParams,
    digest: &B3Digest,
) -> Option<Outcome> {
    let path = local_whole_file(dir, &digest.to_hex());
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            warn!(blob = %digest, file = %path.display(), error = %e, "opening a whole blob to chunk");
            return Some(Outcome::Skipped);
        }
    };
    match chunk_whole(dir, codec, params, digest, file) {
        Ok(Some(outcome)) => {
            if let Err(e) = std::fs::remove_file(&path) {
                warn!(blob = %digest, file = %path.display(), error = %e, "removing a chunked whole blob");
            }
            Some(outcome)
        }
        Ok(None) => Some(Outcome::Skipped),
        Err(e) => {
            warn!(blob = %digest, file = %path.display(), error = %e, "chunking a whole blob");
            Some(Outcome::Skipped)
        }
    }
}

/// Cuts `file` into chunks stored under `dir` and writes the chunk list of
/// `digest`; `None` (nothing listed) if the file does not match `digest`.
fn chunk_whole(
    dir: &Path,
    codec: Codec,
    params: ChunkingParams,
    digest: &B3Digest,
    file: std::fs::File,
) -> Result<Option<Outcome>, Error> {
    let io = |what: &str, e: std::io::Error| Error::Storage(format!("{what}: {e}"));
    let mut blob = blake3::Hasher::new();
    let mut list = Vec::new();
    let (mut before, mut after) = (0u64, 0u64);
    let cdc = fastcdc::v2020::StreamCDC::new(file, params.min, params.avg, params.max);
    for chunk in cdc {
        let chunk = chunk.map_err(|e| Error::Storage(format!("reading: {e}")))?;
        blob.update(&chunk.data);
        before += chunk.data.len() as u64;
        let d = B3Digest::of(&chunk.data);
        let target = local_chunk_file(dir, &d.to_hex());
        // A chunk counts as stored only if it reads back right and is on
        // disk: the whole file, the only other copy, goes once listed.
        let present = matches!(read_local_chunk(dir, &d), Ok(Some(_)))
            && std::fs::File::open(&target)
                .and_then(|f| f.sync_data())
                .is_ok();
        let size = chunk.data.len() as u64;
        if !present {
            let parts: Vec<Bytes> = match compress_chunk(&chunk.data, codec)? {
                Some(compressed) => vec![Bytes::from(compressed)],
                None => raw_payload(Bytes::from(chunk.data))
                    .iter()
                    .cloned()
                    .collect(),
            };
            after += parts.iter().map(|p| p.len() as u64).sum::<u64>();
            write_file_atomically(&target, &parts, true)
                .map_err(|e| io(&format!("writing {}", target.display()), e))?;
        }
        list.push(ChunkMeta { digest: d, size });
    }
    let actual = B3Digest::from(blob.finalize());
    if actual != *digest {
        warn!(blob = %digest, got = %actual, "whole blob does not match its digest: left as is");
        return Ok(None);
    }
    if list.len() > 1 {
        let hex = digest.to_hex();
        let target = local_list_file(dir, &hex);
        if !std::fs::metadata(&target).is_ok_and(|m| m.len() > 0) {
            write_file_atomically(&target, &[Bytes::from(encode_chunk_list(&list))], true)
                .map_err(|e| io(&format!("writing {}", target.display()), e))?;
        }
    }
    // (A blob of one chunk is that chunk, stored above under its digest.)
    Ok(Some(Outcome::Chunked {
        chunks: list.len() as u64,
        before,
        after,
    }))
}

/// Compresses the raw chunk `digest` under `dir` in place, if worth it.
fn compact_one(dir: &Path, codec: Codec, digest: &B3Digest) -> Outcome {
    let file = local_chunk_file(dir, &digest.to_hex());
    let stored = match std::fs::read(&file) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            debug!(chunk = %digest, "pending chunk is gone");
            return Outcome::Skipped;
        }
        Err(e) => {
            warn!(chunk = %digest, file = %file.display(), error = %e, "reading a chunk to compress");
            return Outcome::Skipped;
        }
    };
    match stored.first() {
        Some(&TAG_RAW) => {}
        Some(&(super::TAG_ZSTD | super::TAG_LZ4)) => return Outcome::Skipped,
        _ => {
            warn!(chunk = %digest, file = %file.display(), "chunk of unknown encoding: not compressed");
            return Outcome::Skipped;
        }
    }
    let raw = &stored[1..];
    if B3Digest::of(raw) != *digest {
        // Never turn a corrupt chunk into a valid-looking compressed one.
        warn!(chunk = %digest, file = %file.display(), "raw chunk does not match its digest: left as is");
        return Outcome::Skipped;
    }
    match compress_chunk(raw, codec) {
        Ok(Some(compressed)) => {
            let after = compressed.len() as u64;
            match write_file_atomically(&file, &[Bytes::from(compressed)], true) {
                Ok(()) => Outcome::Compressed {
                    before: stored.len() as u64,
                    after,
                },
                Err(e) => {
                    warn!(chunk = %digest, file = %file.display(), error = %e, "writing a compressed chunk");
                    Outcome::Skipped
                }
            }
        }
        Ok(None) => Outcome::KeptRaw,
        Err(e) => {
            warn!(chunk = %digest, error = %e, "compressing a chunk");
            Outcome::Skipped
        }
    }
}

/// Puts the calling thread at the lowest CPU priority: `SCHED_IDLE` on Linux
/// (it runs only when a core would otherwise idle), else nice 19. Returns
/// what it got, for the log.
fn lower_own_priority() -> &'static str {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: a plain syscall; pid 0 is the calling thread, `param` is valid.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } == 0 {
            return "SCHED_IDLE";
        }
        // SAFETY: a plain syscall; on Linux, who 0 is the calling thread only.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) } == 0 {
            return "nice 19";
        }
    }
    "normal"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_modes_parse() {
        assert_eq!(
            "inline".parse::<LocalCompression>(),
            Ok(LocalCompression::Inline)
        );
        assert_eq!(
            "background".parse::<LocalCompression>(),
            Ok(LocalCompression::Background)
        );
        let err = "lazy".parse::<LocalCompression>().unwrap_err();
        assert!(
            err.contains("\"lazy\"") && err.contains("inline or background"),
            "{err}"
        );
    }

    #[test]
    fn the_compactor_thread_runs_at_idle_priority() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let got = lower_own_priority();
            // SAFETY: plain syscall on the calling thread.
            let policy = unsafe { libc::sched_getscheduler(0) };
            let _ = tx.send((got, policy));
        });
        let (got, policy) = rx.recv().expect("thread reports");
        match got {
            "SCHED_IDLE" => assert_eq!(policy, libc::SCHED_IDLE),
            "nice 19" => {
                // SAFETY: plain syscall.
                assert_eq!(
                    unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) },
                    0,
                    "only that thread was reniced"
                );
            }
            other => panic!("could not lower the priority: {other}"),
        }
        // The calling thread itself is untouched.
        // SAFETY: plain syscall on the calling thread.
        assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_OTHER);
    }

    #[test]
    fn a_torn_journal_record_is_dropped_and_duplicates_merged() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let a = B3Digest::of(b"a");
        let b = B3Digest::of(b"b");
        let mut bytes = Vec::new();
        for d in [a, b, a] {
            bytes.extend_from_slice(d.as_bytes());
        }
        bytes.extend_from_slice(&[7; 10]); // torn
        std::fs::write(tmp.path().join(JOURNAL_NAME), &bytes).expect("write journal");
        // A long delay: nothing is compacted while we look.
        let options = LocalFilesOptions {
            idle_delay: Duration::from_secs(3600),
            ..Default::default()
        };
        let c = Compactor::start(
            tmp.path().to_path_buf(),
            Codec::default(),
            ChunkingParams::default(),
            &options,
        )
        .expect("start");
        assert_eq!(c.pending(), 2);
        assert_eq!(
            std::fs::metadata(tmp.path().join(JOURNAL_NAME))
                .expect("journal")
                .len(),
            3 * 32
        );
        // New records land on a record boundary.
        let d = B3Digest::of(b"d");
        c.record(d);
        let after = std::fs::read(tmp.path().join(JOURNAL_NAME)).expect("journal");
        assert_eq!(after.len(), 4 * 32);
        assert_eq!(&after[96..], d.as_bytes());
        assert_eq!(c.pending(), 3);
    }
}
