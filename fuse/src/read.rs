//! Reading large files: blob readers per file ([ReaderPool]), each driven by
//! a task that reads ahead of the kernel's requests into a bounded queue.
//!
//! The kernel sends reads of one open file concurrently and not always in
//! order (several read-ahead requests in flight). The reader keeps a window
//! of recently received bytes, so a request slightly behind is served from
//! memory and one slightly ahead reads forward; only a real jump seeks
//! (restarting the read-ahead at the new offset; the blob readers switch to
//! chunk-wise reads then).
use arca_castore::{B3Digest, BlobService};
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::io::SeekFrom;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;

/// Bytes per piece the read-ahead task hands over.
const PIECE: usize = 1024 * 1024;
/// Pieces queued ahead of the reads (so up to this many MiB read ahead).
const AHEAD_PIECES: usize = 8;
/// A request this far past what was received is served by reading forward.
const MAX_FORWARD: u64 = 32 * 1024 * 1024;
/// Received bytes kept behind the latest request, for requests arriving out of order.
const KEEP_BEHIND: u64 = 8 * 1024 * 1024;

type Errno = fuser::Errno;

/// A read-ahead task at some offset of the blob.
struct Ahead {
    /// Offset of the next byte `rx` delivers.
    next: u64,
    rx: mpsc::Receiver<Result<Bytes, Errno>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Ahead {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sequential-friendly reads of one blob.
pub struct BlobFileReader {
    service: Arc<dyn BlobService>,
    digest: B3Digest,
    size: u64,
    ahead: Option<Ahead>,
    /// Received pieces, contiguous, ending at `ahead.next`.
    window: VecDeque<Bytes>,
    /// Offset of the window's first byte.
    window_start: u64,
}

impl BlobFileReader {
    /// A reader of the blob `digest` of `size` bytes; nothing is fetched until the first read.
    pub fn new(service: Arc<dyn BlobService>, digest: B3Digest, size: u64) -> Self {
        Self {
            service,
            digest,
            size,
            ahead: None,
            window: VecDeque::new(),
            window_start: 0,
        }
    }

    fn window_end(&self) -> u64 {
        self.window_start + self.window.iter().map(|b| b.len() as u64).sum::<u64>()
    }

    fn restart(&mut self, offset: u64) {
        if self.ahead.is_some() {
            tracing::debug!(digest = %self.digest, offset, "reader restarts (a jump outside its window)");
        }
        self.window.clear();
        self.window_start = offset;
        let (tx, rx) = mpsc::channel(AHEAD_PIECES);
        let service = self.service.clone();
        let digest = self.digest;
        let task = tokio::spawn(read_ahead(service, digest, offset, self.size, tx));
        self.ahead = Some(Ahead {
            next: offset,
            rx,
            task,
        });
    }

    /// Starts fetching from the start, if nothing was fetched yet (a
    /// read-ahead of a file about to be read).
    pub fn start(&mut self) {
        if self.ahead.is_none() {
            self.restart(0);
        }
    }

    /// Up to `len` bytes at `offset` (fewer only at the end of the blob).
    pub async fn read(&mut self, offset: u64, len: u32) -> Result<Bytes, Errno> {
        let end = offset.saturating_add(len as u64).min(self.size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        let received = self.window_end();
        let usable =
            self.ahead.is_some() && offset >= self.window_start && offset <= received + MAX_FORWARD;
        if !usable {
            self.restart(offset);
        }
        // Receive until the window covers [offset, end).
        loop {
            let ahead = self.ahead.as_mut().expect("started above");
            if ahead.next >= end {
                break;
            }
            match ahead.rx.recv().await {
                Some(Ok(piece)) => {
                    ahead.next += piece.len() as u64;
                    self.window.push_back(piece);
                }
                Some(Err(e)) => {
                    self.ahead = None;
                    self.window.clear();
                    return Err(e);
                }
                None => {
                    tracing::warn!(digest = %self.digest, "blob ended early");
                    self.ahead = None;
                    self.window.clear();
                    return Err(Errno::EIO);
                }
            }
        }
        let out = self.slice(offset, end);
        // Forget what lies well behind this request.
        let keep_from = offset.saturating_sub(KEEP_BEHIND);
        while let Some(front) = self.window.front() {
            let front_end = self.window_start + front.len() as u64;
            if front_end > keep_from {
                break;
            }
            self.window_start = front_end;
            self.window.pop_front();
        }
        Ok(out)
    }

    /// The bytes [start, end) out of the window (no copy within one piece).
    fn slice(&self, start: u64, end: u64) -> Bytes {
        let mut pos = self.window_start;
        let mut parts: Vec<Bytes> = Vec::new();
        for piece in &self.window {
            let piece_end = pos + piece.len() as u64;
            if piece_end > start && pos < end {
                let a = start.max(pos) - pos;
                let b = end.min(piece_end) - pos;
                parts.push(piece.slice(a as usize..b as usize));
            }
            if piece_end >= end {
                break;
            }
            pos = piece_end;
        }
        if parts.len() == 1 {
            return parts.pop().expect("one part");
        }
        let mut out = BytesMut::with_capacity((end - start) as usize);
        for p in parts {
            out.extend_from_slice(&p);
        }
        out.freeze()
    }
}

/// Reads the blob from `offset` to its end in pieces into `tx`, as fast as
/// the queue drains.
async fn read_ahead(
    service: Arc<dyn BlobService>,
    digest: B3Digest,
    offset: u64,
    size: u64,
    tx: mpsc::Sender<Result<Bytes, Errno>>,
) {
    let mut reader = match service.open_read(&digest).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            tracing::warn!(%digest, "blob not in the store");
            let _ = tx.send(Err(Errno::EIO)).await;
            return;
        }
        Err(e) => {
            tracing::warn!(%digest, "opening blob: {e}");
            let _ = tx.send(Err(Errno::EIO)).await;
            return;
        }
    };
    if offset > 0 {
        if let Err(e) = reader.seek(SeekFrom::Start(offset)).await {
            tracing::warn!(%digest, offset, "seeking in blob: {e}");
            let _ = tx.send(Err(Errno::EIO)).await;
            return;
        }
    }
    let mut pos = offset;
    while pos < size {
        let want = PIECE.min((size - pos) as usize);
        let mut buf = BytesMut::with_capacity(want);
        while buf.len() < want {
            match (&mut reader)
                .take((want - buf.len()) as u64)
                .read_buf(&mut buf)
                .await
            {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(%digest, "reading blob: {e}");
                    let _ = tx.send(Err(Errno::EIO)).await;
                    return;
                }
            }
        }
        if buf.is_empty() {
            break; // shorter than its node says: the receiver reports it
        }
        pos += buf.len() as u64;
        if tx.send(Ok(buf.freeze())).await.is_err() {
            return;
        }
    }
}

/// Readers kept per file (for several processes reading one file at
/// different places) and in all.
const READERS_PER_FILE: usize = 4;
const READERS_TOTAL: usize = 16;

/// One reader and where its last read ended.
struct Slot {
    /// End offset of the last read served (where the next sequential read starts).
    next: AtomicU64,
    last_used: AtomicU64,
    reader: tokio::sync::Mutex<BlobFileReader>,
}

/// The large-file readers, by inode. Opens are not sent to the filesystem
/// (see `fs`), so readers belong to files, not to open file descriptions: a
/// read goes to the file's reader whose position is nearest (requests of one
/// sequential reader keep going to the same one); a read far from all of them
/// gets a new reader. Bounded per file and in all (least recently used go
/// first); dropped when the kernel forgets the inode.
pub struct ReaderPool {
    service: Arc<dyn BlobService>,
    slots: Mutex<HashMap<u64, Vec<Arc<Slot>>>>,
    clock: AtomicU64,
}

impl ReaderPool {
    /// An empty pool over `service`.
    pub fn new(service: Arc<dyn BlobService>) -> Self {
        Self {
            service,
            slots: Mutex::new(HashMap::new()),
            clock: AtomicU64::new(0),
        }
    }

    fn pick(&self, ino: u64, digest: B3Digest, size: u64, offset: u64) -> Arc<Slot> {
        let now = self.clock.fetch_add(1, Ordering::Relaxed);
        let mut map = self.slots.lock();
        let slots = map.entry(ino).or_default();
        let near = slots
            .iter()
            .filter(|s| {
                let next = s.next.load(Ordering::Relaxed);
                offset + KEEP_BEHIND >= next && offset <= next + MAX_FORWARD
            })
            .min_by_key(|s| s.next.load(Ordering::Relaxed).abs_diff(offset));
        if let Some(s) = near {
            s.last_used.store(now, Ordering::Relaxed);
            return s.clone();
        }
        let slot = Arc::new(Slot {
            next: AtomicU64::new(offset),
            last_used: AtomicU64::new(now),
            reader: tokio::sync::Mutex::new(BlobFileReader::new(
                self.service.clone(),
                digest,
                size,
            )),
        });
        if slots.len() >= READERS_PER_FILE {
            if let Some(i) =
                (0..slots.len()).min_by_key(|&i| slots[i].last_used.load(Ordering::Relaxed))
            {
                slots.swap_remove(i);
            }
        }
        slots.push(slot.clone());
        // Bound the total: drop the least recently used readers of any file.
        let mut total: usize = map.values().map(Vec::len).sum();
        while total > READERS_TOTAL {
            let oldest = map
                .iter()
                .flat_map(|(ino, v)| {
                    v.iter()
                        .enumerate()
                        .map(move |(i, s)| (*ino, i, s.last_used.load(Ordering::Relaxed)))
                })
                .filter(|(_, _, used)| *used != now)
                .min_by_key(|(_, _, used)| *used);
            let Some((victim, i, _)) = oldest else { break };
            let v = map.get_mut(&victim).expect("just seen");
            v.swap_remove(i);
            if v.is_empty() {
                map.remove(&victim);
            }
            total -= 1;
        }
        slot
    }

    /// Reads `len` bytes at `offset` of the file `ino` (the blob `digest` of `size` bytes).
    pub async fn read(
        &self,
        ino: u64,
        digest: B3Digest,
        size: u64,
        offset: u64,
        len: u32,
    ) -> Result<Bytes, Errno> {
        let slot = self.pick(ino, digest, size, offset);
        let mut reader = slot.reader.lock().await;
        let data = reader.read(offset, len).await?;
        slot.next
            .fetch_max(offset + data.len() as u64, Ordering::Relaxed);
        Ok(data)
    }

    /// Whether the file `ino` has a reader.
    pub fn has(&self, ino: u64) -> bool {
        self.slots.lock().contains_key(&ino)
    }

    /// Starts reading the file `ino` (the blob `digest` of `size` bytes)
    /// from its start, ahead of its first read, unless it has a reader
    /// already. Needs the runtime (a task fetches).
    pub fn prefetch(&self, ino: u64, digest: B3Digest, size: u64) {
        if self.has(ino) {
            return;
        }
        let slot = self.pick(ino, digest, size, 0);
        let locked = slot.reader.try_lock();
        if let Ok(mut reader) = locked {
            reader.start();
        }
    }

    /// Drops the readers of a file the kernel forgot.
    pub fn forget(&self, ino: u64) {
        self.slots.lock().remove(&ino);
    }
}
