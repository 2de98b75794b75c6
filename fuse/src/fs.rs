//! The FUSE filesystem: `fuser` callbacks over the castore and path-info
//! services.
//!
//! fuser calls these synchronously on its session threads. Whatever is
//! answered from memory (cached attributes, directories, symlink targets,
//! xattrs) is answered at once; everything that needs I/O is spawned as a
//! task on the tokio runtime, which replies when done (fuser replies may be
//! sent from any thread), so many lookups and reads run in parallel.
//!
//! Files are never opened as far as the filesystem is concerned: `open`
//! answers ENOSYS, which tells the kernel (once) to stop sending opens and
//! releases of files and to keep their page cache across opens
//! (`FOPEN_KEEP_CACHE`, the kernel's default without opens). Reading a file
//! that is already cached then costs no request at all. Read state belongs
//! to the file: small files are whole blobs in [BlobCache], large ones have
//! readers in a [ReaderPool] (dropped when the kernel forgets the inode).
use crate::cache::{ArrivalHook, BlobCache, DirCache, Listing};
use crate::inodes::{ino_of, InodeTable, Parent, ROOT_INO};
use crate::read::ReaderPool;
use arca_castore::{B3Digest, BlobService, DirectoryService, Node};
use arca_store::{PathInfoService, StorePath};
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use futures::StreamExt;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::runtime::Handle;

/// How long the kernel may cache attributes and entries: the content is immutable.
const TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Files up to this size are fetched whole (and cached); larger ones stream.
pub const SMALL_FILE: u64 = 1024 * 1024;
/// Bytes of small blobs kept in memory: those read through the filesystem
/// (a read-ahead window's marker, files read before they arrived). Files
/// pushed into the kernel's page cache are read from there and not kept
/// ([BlobCache] remembers their digests): every megabyte kept is a megabyte
/// of fresh pages a new mount faults in (keeping them cost a walk of
/// /usr/include a tenth of the mount's CPU, and 20 MiB of RSS).
const BLOB_CACHE_BYTES: u64 = 24 * 1024 * 1024;
/// Directories kept in memory.
const DIR_CACHE_ENTRIES: usize = 50_000;
/// Read-ahead of small files in walk order (the rest of the directory,
/// descending into subdirectories already fetched) once a file is read from
/// its start: a window of at most this many files, this many bytes, looking
/// at this many entries.
const SIBLING_FILES: usize = 256;
const SIBLING_BYTES: u64 = 16 * 1024 * 1024;
const SIBLING_SCAN: usize = 1024;
/// The window's missing files are fetched (in one batch call) once at least
/// this many are missing, or at once when the file being read is one of
/// them: a walk costs about one call per this many small files.
const BATCH_MIN: usize = SIBLING_FILES / 4;
/// Large files a window starts reading ahead (each reader holds at most
/// a few pieces until the file is read).
const LARGE_AHEAD_FILES: usize = 2;

/// The bytes a read of `size` at `offset` gets from a file of `file_size`.
fn read_range(offset: u64, size: u32, file_size: u64) -> std::ops::Range<usize> {
    let start = offset.min(file_size) as usize;
    let end = offset.saturating_add(size as u64).min(file_size) as usize;
    start..end
}

/// What a read of `size` at `offset` gets from a whole small file `data`
/// that the node says has `file_size` bytes. Blobs are cached by digest,
/// so a directory claiming another size for the same digest than the one
/// it was fetched for gets EIO: never a slice past the end (a panic on a
/// session thread) or a silently shortened file.
fn file_bytes(
    data: &bytes::Bytes,
    offset: u64,
    size: u32,
    file_size: u64,
) -> Result<bytes::Bytes, Errno> {
    if data.len() as u64 != file_size {
        tracing::warn!(
            file_size,
            blob_size = data.len(),
            "a file's size does not match its blob's"
        );
        return Err(Errno::EIO);
    }
    Ok(data.slice(read_range(offset, size, file_size)))
}

/// One read-ahead window being collected: what is left of its budget, the
/// small files in it that are neither cached nor in flight (digest, size,
/// inode), and which of them is the window's marker.
struct Window {
    files: usize,
    bytes: u64,
    scan: usize,
    missing: Vec<(B3Digest, u64, u64)>,
    /// The digests in `missing` (a content appears once: files with the
    /// same content and exec bit share an inode and its page cache).
    seen: std::collections::HashSet<B3Digest>,
    /// Index in `missing` of the first file past the window's middle (in
    /// files or bytes). It is not pushed into the page cache, so reading it
    /// reaches the filesystem, which then reads ahead from there: the next
    /// window is fetched while half of this one is still to be read (the
    /// kernel's own read-ahead marker, for a walk over many files). Without
    /// it, files served from the page cache would send no request at all,
    /// and the walk would stall at the end of every window.
    marker: Option<usize>,
    /// Large files (read by a reader of their own, not fetched whole) in
    /// the window whose first pieces to fetch ahead: (digest, size, inode).
    large: Vec<(B3Digest, u64, u64)>,
}

impl Window {
    fn new() -> Self {
        Self {
            files: SIBLING_FILES,
            bytes: SIBLING_BYTES,
            scan: SIBLING_SCAN,
            missing: Vec::new(),
            seen: std::collections::HashSet::new(),
            marker: None,
            large: Vec::new(),
        }
    }

    /// Records a small file that is missing (`missing_ino`: its inode)
    /// against the budget (false: it does not fit). Files present already
    /// (cached, in flight, in the page cache) or met earlier in the window
    /// cost only the scan: where most files repeat content met before
    /// (/usr/include holds dozens of copies of OpenSSL's headers), a window
    /// still reaches as many files to fetch, and stays ahead of its reader.
    fn take(&mut self, digest: B3Digest, size: u64, missing_ino: Option<u64>) -> bool {
        let Some(ino) = missing_ino else {
            return true;
        };
        if self.seen.contains(&digest) {
            return true;
        }
        if self.files == 0 || self.bytes < size {
            return false;
        }
        let past_middle = self.files <= SIBLING_FILES / 2 || self.bytes <= SIBLING_BYTES / 2;
        self.files -= 1;
        self.bytes -= size;
        self.seen.insert(digest);
        if past_middle && self.marker.is_none() {
            self.marker = Some(self.missing.len());
        }
        self.missing.push((digest, size, ino));
        true
    }

    /// The missing files to push into the page cache when they arrive:
    /// all but the marker's content (under any inode), whose read must
    /// reach the filesystem.
    fn to_page_cache(&self) -> Vec<(B3Digest, u64, u64)> {
        let marker = self.marker.map(|i| self.missing[i].0);
        self.missing
            .iter()
            .filter(|(d, _, _)| Some(*d) != marker)
            .copied()
            .collect()
    }
}
/// The extended attribute holding a file's or directory's BLAKE3 digest (hex).
pub const XATTR_BLAKE3: &str = "user.arca.blake3";
/// Largest read the kernel is asked to send (and readahead it may use).
const MAX_IO: u32 = 1024 * 1024;

/// Settings of the filesystem.
#[derive(Clone, Debug, Default)]
pub struct FsOptions {
    /// List the store paths when the root is read (else the root reads as empty).
    pub list_root: bool,
}

/// The root's listing, taken when it is opened (with `list_root`).
type RootListing = tokio::sync::OnceCell<Result<Arc<Vec<(String, Node)>>, Errno>>;

struct Inner {
    path_info: Arc<dyn PathInfoService>,
    options: FsOptions,
    inodes: InodeTable,
    dirs: Arc<DirCache>,
    blobs: Arc<BlobCache>,
    readers: ReaderPool,
    /// The session's notifier, once mounted: small files fetched ahead are
    /// stored straight into the kernel's page cache (`FUSE_NOTIFY_STORE`),
    /// so reading them costs no request at all.
    notifier: Arc<std::sync::OnceLock<PageCacheFiller>>,
    root_listings: Mutex<HashMap<u64, Arc<RootListing>>>,
    next_fh: AtomicU64,
    uid: u32,
    gid: u32,
}

/// Stores small files fetched ahead into the kernel's page cache
/// (`FUSE_NOTIFY_STORE`) from a thread of its own: a store waits for the
/// page locks of the file, which a read of the same file in flight holds
/// until it is answered, so it must never run where answers are made.
#[derive(Clone)]
pub(crate) struct PageCacheFiller {
    tx: std::sync::mpsc::SyncSender<(u64, bytes::Bytes)>,
}

/// Files queued for the page-cache filler; more are dropped (read on demand).
const PAGE_CACHE_QUEUE: usize = 1024;

impl PageCacheFiller {
    /// Starts the filler thread (it ends when every sender is gone).
    pub(crate) fn start(notifier: fuser::Notifier) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, bytes::Bytes)>(PAGE_CACHE_QUEUE);
        std::thread::Builder::new()
            .name("arca-pagecache".into())
            .spawn(move || {
                for (ino, data) in rx {
                    // ENOENT (the kernel holds no such inode now) is ignored by fuser.
                    if let Err(e) = notifier.store(INodeNo(ino), 0, &data) {
                        tracing::debug!(ino, "storing into the page cache: {e}");
                    }
                }
            })?;
        Ok(Self { tx })
    }

    /// Queues a file's whole contents for the page cache, unless the queue
    /// is full (false).
    fn offer(&self, ino: u64, data: bytes::Bytes) -> bool {
        self.tx.try_send((ino, data)).is_ok()
    }
}

/// A read-only view of a store: `/<hash>-<name>/…` for every store path
/// the path-info service knows.
pub struct ArcaFs {
    inner: Arc<Inner>,
    rt: Handle,
}

impl ArcaFs {
    /// A filesystem over these services; I/O runs on `rt`.
    pub fn new(
        blob: Arc<dyn BlobService>,
        directory: Arc<dyn DirectoryService>,
        path_info: Arc<dyn PathInfoService>,
        options: FsOptions,
        rt: Handle,
    ) -> Self {
        // SAFETY: getuid/getgid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        // A batch read of nothing: a gRPC client looks up (and connects to)
        // its daemon's local socket now, not when the first read waits.
        let warm = blob.clone();
        rt.spawn(async move { warm.read_many(Vec::new()).for_each(|_| async {}).await });
        let inner = Arc::new(Inner {
            dirs: DirCache::new(directory, DIR_CACHE_ENTRIES),
            blobs: BlobCache::new(blob.clone(), BLOB_CACHE_BYTES),
            readers: ReaderPool::new(blob),
            notifier: Arc::new(std::sync::OnceLock::new()),
            path_info,
            options,
            inodes: InodeTable::new(),
            root_listings: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            uid,
            gid,
        });
        Self { inner, rt }
    }

    /// Where the mount puts the session's notifier (set once mounted).
    pub(crate) fn notifier_slot(&self) -> Arc<std::sync::OnceLock<PageCacheFiller>> {
        self.inner.notifier.clone()
    }

    /// Inodes the kernel currently holds (besides the root).
    pub fn live_inodes(&self) -> usize {
        self.inner.inodes.len()
    }

    fn spawn<F: std::future::Future<Output = ()> + Send + 'static>(&self, f: F) {
        self.rt.spawn(f);
    }
}

fn kind_of(node: &Node) -> FileType {
    match node {
        Node::Directory { .. } => FileType::Directory,
        Node::File { .. } => FileType::RegularFile,
        Node::Symlink { .. } => FileType::Symlink,
    }
}

impl Inner {
    fn attr(&self, ino: u64, node: Option<&Node>) -> FileAttr {
        let (kind, perm, size) = match node {
            None => (FileType::Directory, 0o555, 0),
            Some(Node::Directory { size, .. }) => (FileType::Directory, 0o555, *size),
            Some(Node::File {
                size, executable, ..
            }) => (
                FileType::RegularFile,
                if *executable { 0o555 } else { 0o444 },
                *size,
            ),
            Some(Node::Symlink { target }) => {
                (FileType::Symlink, 0o777, target.as_bytes().len() as u64)
            }
        };
        // Nix store timestamps: one second after the epoch.
        let time = SystemTime::UNIX_EPOCH + Duration::from_secs(1);
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: time,
            mtime: time,
            ctime: time,
            crtime: time,
            kind,
            perm,
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: MAX_IO,
            flags: 0,
        }
    }

    /// Records a lookup of `node` and answers it.
    fn reply_entry(
        &self,
        node: &Node,
        parent: Option<Parent>,
        parent_ino: u64,
        name: &[u8],
        reply: ReplyEntry,
    ) {
        let ino = self.inodes.lookup(node, parent, parent_ino, name);
        reply.entry(&TTL, &self.attr(ino, Some(node)), Generation(0));
    }

    /// Looks `name` up in a fetched directory.
    fn reply_child(&self, listing: &Listing, parent_ino: u64, name: &[u8], reply: ReplyEntry) {
        match listing.find(name) {
            Some(index) => {
                let node = &listing.entries[index].1;
                self.reply_entry(
                    node,
                    Some(Parent {
                        dir: listing.digest,
                        index,
                    }),
                    parent_ino,
                    name,
                    reply,
                )
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    /// `<hash>-<name>` at the root: the path info by hash; the name must match.
    async fn lookup_root(&self, name: Vec<u8>, reply: ReplyEntry) {
        let Some(path) = std::str::from_utf8(&name)
            .ok()
            .and_then(|s| StorePath::from_basename(s).ok())
        else {
            return reply.error(Errno::ENOENT);
        };
        match self.path_info.get(*path.digest()).await {
            Ok(Some(info)) if info.store_path.name() == path.name() => {
                if let Node::Directory { digest, .. } = &info.node {
                    self.dirs.prefetch_closure(*digest);
                }
                self.reply_entry(&info.node, None, ROOT_INO, &name, reply)
            }
            Ok(_) => reply.error(Errno::ENOENT),
            Err(e) => {
                tracing::warn!("looking up {path}: {e}");
                reply.error(Errno::EIO)
            }
        }
    }

    /// Starts fetching the small files from `parent.index` (or the one
    /// after, if `current_too` is false) in walk order (the order of
    /// `find`, `tar`, `nix-store --dump`: into subdirectories, and past the
    /// directory's end into what follows it), within the read-ahead window,
    /// in one batch: when at least [BATCH_MIN] of them are missing, or when
    /// the current file is (a reader waits for it).
    /// `parent` is where the file being read sits, `dir_ino` the inode of
    /// that directory: the walk goes up through directory inodes, which
    /// belong to one path each (a directory's digest may sit in many
    /// places: /usr/include holds 57 copies of one of OpenSSL's).
    fn prefetch_siblings(&self, parent: Parent, dir_ino: u64, current_too: bool) {
        let Some(listing) = self.dirs.cached(&parent.dir) else {
            return;
        };
        let mut window = Window::new();
        let current_missing = current_too
            && matches!(listing.entries.get(parent.index), Some((_, Node::File { digest, .. })) if !self.blobs.has(digest));
        let start = if current_too {
            parent.index
        } else {
            parent.index + 1
        };
        let mut room_left = self.prefetch_from(&listing, start, &mut window, 0);
        // Past the end of this directory, the walk goes on after it in its parent.
        let mut at = dir_ino;
        for _ in 0..16 {
            if !room_left {
                break;
            }
            // A store path's root has no parent (nor has an inode the kernel forgot).
            let Some(dir) = self.inodes.get(at) else {
                break;
            };
            let Some(up) = dir.parent else {
                break;
            };
            let Some(up_listing) = self.dirs.cached(&up.dir) else {
                break;
            };
            room_left = self.prefetch_from(&up_listing, up.index + 1, &mut window, 0);
            at = dir.parent_ino;
        }
        // Large files ahead start their readers (the first pieces come
        // while the files before them are read).
        for &(digest, size, ino) in &window.large {
            self.readers.prefetch(ino, digest, size);
        }
        if window.missing.len() >= BATCH_MIN || current_missing {
            let items: Vec<(B3Digest, u64)> =
                window.missing.iter().map(|(d, s, _)| (*d, *s)).collect();
            self.blobs
                .prefetch_batch(&items, self.page_cache_hook(window.to_page_cache()));
        }
    }

    /// A hook storing each arriving small file into the kernel's page cache
    /// under the inode it was asked for, if the kernel holds that inode now
    /// (a file in a directory not listed yet has none there: the store
    /// would be dropped, so such a file is kept in the [BlobCache]).
    fn page_cache_hook(&self, items: Vec<(B3Digest, u64, u64)>) -> Option<ArrivalHook> {
        let filler = self.notifier.get()?.clone();
        let inos: HashMap<B3Digest, u64> = items
            .into_iter()
            .filter(|(_, _, ino)| self.inodes.contains(*ino))
            .map(|(d, _, ino)| (d, ino))
            .collect();
        Some(Arc::new(move |digest, data: &bytes::Bytes| {
            inos.get(&digest)
                .is_some_and(|&ino| filler.offer(ino, data.clone()))
        }))
    }

    /// Collects the small files of `listing.entries[start..]` (and of the
    /// subdirectories on the way) into the window; false once its budget
    /// is spent (see [Window::take] for what counts against it).
    fn prefetch_from(
        &self,
        listing: &Listing,
        start: usize,
        window: &mut Window,
        depth: usize,
    ) -> bool {
        for (_, node) in listing.entries.iter().skip(start) {
            if window.scan == 0 {
                return false;
            }
            window.scan -= 1;
            match node {
                Node::File { digest, size, .. } if *size > 0 && *size <= SMALL_FILE => {
                    // A file's inode depends only on its content and exec
                    // bit; hashed only for files to fetch.
                    let missing_ino = (!self.blobs.has(digest)).then(|| ino_of(0, b"", node));
                    if !window.take(*digest, *size, missing_ino) {
                        return false;
                    }
                }
                Node::File { digest, size, .. }
                    if *size > SMALL_FILE && window.large.len() < LARGE_AHEAD_FILES =>
                {
                    let ino = ino_of(0, b"", node);
                    if !self.readers.has(ino) {
                        window.large.push((*digest, *size, ino));
                    }
                }
                Node::Directory { digest, .. } if depth < 16 => {
                    // Only directories already fetched (the closure prefetch fetched them).
                    if let Some(sub) = self.dirs.cached(digest) {
                        if !self.prefetch_from(&sub, 0, window, depth + 1) {
                            return false;
                        }
                    }
                }
                _ => {}
            }
        }
        true
    }

    async fn read(
        &self,
        ino: u64,
        (digest, file_size): (B3Digest, u64),
        (parent, dir_ino): (Option<Parent>, u64),
        offset: u64,
        size: u32,
    ) -> Result<bytes::Bytes, Errno> {
        if offset == 0 {
            // A read from the start: the next files of the directory are
            // likely next (and this one, if small, comes in the same batch).
            if let Some(p) = parent {
                self.prefetch_siblings(p, dir_ino, file_size <= SMALL_FILE);
            }
        }
        if file_size > SMALL_FILE {
            return self
                .readers
                .read(ino, digest, file_size, offset, size)
                .await;
        }
        let data = self.blobs.get(digest, file_size).await?;
        file_bytes(&data, offset, size, file_size)
    }

    async fn list_root(&self) -> Result<Arc<Vec<(String, Node)>>, Errno> {
        let mut out = Vec::new();
        let mut stream = self.path_info.list();
        while let Some(r) = stream.next().await {
            match r {
                Ok(info) => out.push((info.store_path.basename(), info.node)),
                Err(e) => {
                    tracing::warn!("listing store paths: {e}");
                    return Err(Errno::EIO);
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Arc::new(out))
    }

    /// The root's entries for this open root directory (`--list-root`), else none.
    /// Shared, not copied: the kernel reads a large listing in many calls.
    async fn root_entries(
        &self,
        listing: Option<Arc<RootListing>>,
    ) -> Result<Arc<Vec<(String, Node)>>, Errno> {
        match (&listing, self.options.list_root) {
            (Some(l), true) => l.get_or_init(|| self.list_root()).await.clone(),
            _ => Ok(Arc::new(Vec::new())),
        }
    }

    /// Answers a readdirplus: every entry but `.` and `..` counts as a
    /// lookup (the kernel links them like looked-up entries), so an entry
    /// that did not fit in the reply is forgotten again.
    fn fill_plus<'a>(
        &self,
        (dir_ino, parent_ino): (u64, u64),
        offset: u64,
        entries: impl Iterator<Item = (&'a [u8], &'a Node, Option<Parent>)>,
        mut reply: ReplyDirectoryPlus,
    ) {
        let dots = [(b".".as_slice(), dir_ino), (b"..".as_slice(), parent_ino)];
        for (i, (name, ino)) in dots.into_iter().enumerate().skip(offset as usize) {
            let attr = self.attr(ino, None);
            if reply.add(
                INodeNo(ino),
                i as u64 + 1,
                OsStr::from_bytes(name),
                &TTL,
                &attr,
                Generation(0),
            ) {
                return reply.ok();
            }
        }
        for (i, (name, node, parent)) in entries
            .enumerate()
            .skip((offset as usize).saturating_sub(2))
        {
            let ino = self.inodes.lookup(node, parent, dir_ino, name);
            let attr = self.attr(ino, Some(node));
            if reply.add(
                INodeNo(ino),
                i as u64 + 3,
                OsStr::from_bytes(name),
                &TTL,
                &attr,
                Generation(0),
            ) {
                if self.inodes.forget(ino, 1) {
                    self.readers.forget(ino);
                }
                break;
            }
        }
        reply.ok()
    }

    fn xattr_value(&self, ino: u64) -> Option<String> {
        match self.inodes.get(ino)?.node {
            Node::Directory { digest, .. } | Node::File { digest, .. } => Some(digest.to_hex()),
            Node::Symlink { .. } => None,
        }
    }
}

/// Answers a getxattr/listxattr request: the size, the value, or ERANGE.
fn reply_xattr(value: &[u8], size: u32, reply: ReplyXattr) {
    if size == 0 {
        reply.size(value.len() as u32)
    } else if (size as usize) < value.len() {
        reply.error(Errno::ERANGE)
    } else {
        reply.data(value)
    }
}

impl Filesystem for ArcaFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Large requests: up to 1 MiB per read, and as much readahead as
        // the kernel allows. Writes never come (the mount is read-only),
        // but the kernel sizes reads by max_write too (Linux 6.18: reads of
        // 128 KiB below 256 KiB, of max_write above; 40 % slower at
        // 128 KiB). It also caps the buffer it allocates for every
        // READDIRPLUS (since 6.16) by max_write: smaller would walk trees
        // faster (a third, for find over /usr/include at 16 KiB) but read
        // large files slower, so reads win.
        if let Err(max) = config.set_max_write(MAX_IO) {
            let _ = config.set_max_write(max);
        }
        if let Err(max) = config.set_max_readahead(MAX_IO) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        // READDIRPLUS: a listing carries the entries' attributes, so walking
        // a tree (find, then cat) needs no lookup per file.
        for cap in [
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_MAX_PAGES,
            InitFlags::FUSE_DO_READDIRPLUS,
        ] {
            let _ = config.add_capabilities(cap);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name.as_bytes().to_vec();
        if parent.0 == ROOT_INO {
            let inner = self.inner.clone();
            return self.spawn(async move { inner.lookup_root(name, reply).await });
        }
        let Some(entry) = self.inner.inodes.get(parent.0) else {
            return reply.error(Errno::ENOENT);
        };
        let Node::Directory { digest, .. } = entry.node else {
            return reply.error(Errno::ENOTDIR);
        };
        if let Some(listing) = self.inner.dirs.cached(&digest) {
            return self.inner.reply_child(&listing, parent.0, &name, reply);
        }
        let inner = self.inner.clone();
        self.spawn(async move {
            match inner.dirs.get(digest).await {
                Ok(listing) => inner.reply_child(&listing, parent.0, &name, reply),
                Err(e) => reply.error(e),
            }
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if self.inner.inodes.forget(ino.0, nlookup) {
            self.inner.readers.forget(ino.0);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino.0 == ROOT_INO {
            return reply.attr(&TTL, &self.inner.attr(ROOT_INO, None));
        }
        match self.inner.inodes.get(ino.0) {
            Some(e) => reply.attr(&TTL, &self.inner.attr(ino.0, Some(&e.node))),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.inner.inodes.get(ino.0).map(|e| e.node) {
            Some(Node::Symlink { target }) => reply.data(target.as_bytes()),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // No per-open state: ENOSYS makes the kernel skip opens and releases
        // of files from now on, keeping their page cache (module docs).
        // Opens for writing never get here: the mount is read-only.
        reply.error(Errno::ENOSYS)
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        tracing::trace!(ino = ino.0, offset, size, "read");
        let Some(entry) = self.inner.inodes.get(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let Node::File {
            digest,
            size: file_size,
            ..
        } = entry.node
        else {
            return reply.error(Errno::EISDIR);
        };
        if file_size <= SMALL_FILE {
            // Fetched ahead already (the common case in a walk): answer here,
            // without a hop through the runtime.
            if let Some(data) = self.inner.blobs.cached(&digest) {
                if offset == 0 {
                    if let Some(p) = entry.parent {
                        // Prefetches are spawned: enter the runtime on this fuser thread.
                        let _rt = self.rt.enter();
                        self.inner.prefetch_siblings(p, entry.parent_ino, false);
                    }
                }
                return match file_bytes(&data, offset, size, file_size) {
                    Ok(bytes) => reply.data(&bytes),
                    Err(e) => reply.error(e),
                };
            }
        }
        let inner = self.inner.clone();
        self.spawn(async move {
            match inner
                .read(
                    ino.0,
                    (digest, file_size),
                    (entry.parent, entry.parent_ino),
                    offset,
                    size,
                )
                .await
            {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(e),
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing to flush; ENOSYS tells the kernel to stop sending flushes.
        reply.error(Errno::ENOSYS)
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if !self.inner.options.list_root {
            // No directory needs per-open state: ENOSYS makes the kernel
            // stop sending opens and releases of directories (a walk then
            // costs half the requests) and cache every listing (its
            // default without opens: FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR).
            // The root lists nothing, so its cached listing never goes
            // stale; with list_root, opens are answered and the root's
            // listing is taken afresh at each.
            return reply.error(Errno::ENOSYS);
        }
        if ino.0 == ROOT_INO {
            let fh = self.inner.next_fh.fetch_add(1, Ordering::Relaxed);
            self.inner
                .root_listings
                .lock()
                .insert(fh, Arc::new(RootListing::new()));
            return reply.opened(FileHandle(fh), FopenFlags::empty());
        }
        match self.inner.inodes.get(ino.0).map(|e| e.node) {
            // Immutable: the kernel may cache the listing.
            Some(Node::Directory { .. }) => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
            Some(_) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        if ino.0 == ROOT_INO {
            let listing = self.inner.root_listings.lock().get(&fh.0).cloned();
            let inner = self.inner.clone();
            return self.spawn(async move {
                let entries = match inner.root_entries(listing).await {
                    Ok(v) => v,
                    Err(e) => return reply.error(e),
                };
                let mut reply = reply;
                let dots = [
                    (".".to_string(), ROOT_INO, FileType::Directory),
                    ("..".to_string(), ROOT_INO, FileType::Directory),
                ];
                let rest = entries.iter().map(|(name, node)| {
                    (
                        name.clone(),
                        ino_of(ROOT_INO, name.as_bytes(), node),
                        kind_of(node),
                    )
                });
                for (i, (name, ino, kind)) in dots
                    .into_iter()
                    .chain(rest)
                    .enumerate()
                    .skip(offset as usize)
                {
                    if reply.add(INodeNo(ino), i as u64 + 1, kind, name) {
                        break;
                    }
                }
                reply.ok()
            });
        }
        let Some(entry) = self.inner.inodes.get(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let Node::Directory { digest, .. } = entry.node else {
            return reply.error(Errno::ENOTDIR);
        };
        let fill = move |listing: &Listing, mut reply: ReplyDirectory| {
            let dots = [
                (b".".as_slice(), ino.0, FileType::Directory),
                (b"..".as_slice(), entry.parent_ino, FileType::Directory),
            ];
            let rest = listing.entries.iter().map(|(name, node)| {
                (
                    name.as_bytes(),
                    ino_of(ino.0, name.as_bytes(), node),
                    kind_of(node),
                )
            });
            for (i, (name, ino, kind)) in dots
                .into_iter()
                .chain(rest)
                .enumerate()
                .skip(offset as usize)
            {
                if reply.add(INodeNo(ino), i as u64 + 1, kind, OsStr::from_bytes(name)) {
                    break;
                }
            }
            reply.ok()
        };
        if let Some(listing) = self.inner.dirs.cached(&digest) {
            return fill(&listing, reply);
        }
        let inner = self.inner.clone();
        self.spawn(async move {
            match inner.dirs.get(digest).await {
                Ok(listing) => fill(&listing, reply),
                Err(e) => reply.error(e),
            }
        });
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        if ino.0 == ROOT_INO {
            let listing = self.inner.root_listings.lock().get(&fh.0).cloned();
            let inner = self.inner.clone();
            return self.spawn(async move {
                match inner.root_entries(listing).await {
                    Ok(entries) => {
                        let it = entries
                            .iter()
                            .map(|(name, node)| (name.as_bytes(), node, None));
                        inner.fill_plus((ROOT_INO, ROOT_INO), offset, it, reply)
                    }
                    Err(e) => reply.error(e),
                }
            });
        }
        let Some(entry) = self.inner.inodes.get(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let Node::Directory { digest, .. } = entry.node else {
            return reply.error(Errno::ENOTDIR);
        };
        let fill = move |inner: &Inner, listing: &Listing, reply: ReplyDirectoryPlus| {
            let it = listing
                .entries
                .iter()
                .enumerate()
                .map(|(index, (name, node))| {
                    (
                        name.as_bytes(),
                        node,
                        Some(Parent {
                            dir: listing.digest,
                            index,
                        }),
                    )
                });
            inner.fill_plus((ino.0, entry.parent_ino), offset, it, reply)
        };
        if let Some(listing) = self.inner.dirs.cached(&digest) {
            return fill(&self.inner, &listing, reply);
        }
        let inner = self.inner.clone();
        self.spawn(async move {
            match inner.dirs.get(digest).await {
                Ok(listing) => fill(&inner, &listing, reply),
                Err(e) => reply.error(e),
            }
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.inner.root_listings.lock().remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(
            0,
            0,
            0,
            self.inner.inodes.len() as u64,
            0,
            MAX_IO,
            255,
            MAX_IO,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if name.as_bytes() != XATTR_BLAKE3.as_bytes() {
            return reply.error(Errno::ENODATA);
        }
        match self.inner.xattr_value(ino.0) {
            Some(v) => reply_xattr(v.as_bytes(), size, reply),
            None => reply.error(Errno::ENODATA),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let names: &[u8] = match self.inner.xattr_value(ino.0) {
            Some(_) => b"user.arca.blake3\0",
            None => b"",
        };
        reply_xattr(names, size, reply)
    }

    fn access(&self, _req: &Request, _ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if mask.contains(AccessFlags::W_OK) {
            reply.error(Errno::EROFS)
        } else {
            reply.ok()
        }
    }

    // Everything that would change the store: EROFS (the mount is `ro` too,
    // so the kernel mostly answers these itself).

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS)
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS)
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS)
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS)
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS)
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS)
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS)
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS)
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS)
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EROFS)
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS)
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_of_small_files_check_the_size_the_node_claims() {
        let data = bytes::Bytes::from_static(b"0123456789");
        assert_eq!(file_bytes(&data, 2, 3, 10).unwrap(), &b"234"[..]);
        assert_eq!(file_bytes(&data, 8, 100, 10).unwrap(), &b"89"[..]);
        assert!(file_bytes(&data, 10, 4, 10).unwrap().is_empty());
        assert!(file_bytes(&data, u64::MAX, u32::MAX, 10)
            .unwrap()
            .is_empty());
        // A node claiming more (or less) than its blob has: EIO, no slice
        // past the end and no silently shortened file.
        assert_eq!(file_bytes(&data, 0, 4096, 110).unwrap_err(), Errno::EIO);
        assert_eq!(file_bytes(&data, 200, 10, 1000).unwrap_err(), Errno::EIO);
        assert_eq!(file_bytes(&data, 0, 4096, 5).unwrap_err(), Errno::EIO);
    }

    fn digest(n: usize) -> B3Digest {
        B3Digest::of(&n.to_le_bytes())
    }

    #[test]
    fn the_read_ahead_marker_is_the_first_missing_file_past_the_windows_middle() {
        // Small files: the middle in files.
        let mut w = Window::new();
        for n in 0..SIBLING_FILES {
            assert!(w.take(digest(n), 100, Some(n as u64)));
        }
        assert!(!w.take(digest(999), 100, Some(999)), "the window is full");
        assert_eq!(w.missing.len(), SIBLING_FILES);
        assert_eq!(w.marker, Some(SIBLING_FILES / 2));

        // Files present already cost nothing (but the scan) and are never
        // the marker: the window holds as many missing files after them.
        let mut w = Window::new();
        for n in 0..SIBLING_FILES * 4 {
            assert!(
                w.take(digest(n), SIBLING_BYTES, None),
                "present: always fits"
            );
        }
        for n in 0..SIBLING_FILES {
            assert!(w.take(digest(1000 + n), 100, Some(1000 + n as u64)));
        }
        assert!(!w.take(digest(5000), 100, Some(5000)), "the window is full");
        assert_eq!(w.missing.len(), SIBLING_FILES);
        assert_eq!(w.marker, Some(SIBLING_FILES / 2));
        assert_eq!(w.missing[0].0, digest(1000));

        // Large files: the middle in bytes (half of SIBLING_BYTES).
        let mut w = Window::new();
        let size = SIBLING_BYTES / 16;
        let mut taken = 0;
        while w.take(digest(taken), size, Some(taken as u64)) {
            taken += 1;
        }
        assert_eq!(taken, 16);
        assert_eq!(w.marker, Some(8));

        // The same content twice is one missing file (one inode, one page
        // cache), counted once; the marker's content is never pushed into
        // the page cache.
        let mut w = Window::new();
        for n in 0..SIBLING_FILES / 2 {
            assert!(w.take(digest(n), 100, Some(n as u64)));
        }
        assert!(w.take(digest(7), 100, Some(7)), "a repeat costs nothing");
        assert_eq!(w.files, SIBLING_FILES / 2);
        assert!(w.take(digest(500), 100, Some(500)));
        assert!(w.take(digest(500), 100, Some(500)));
        assert_eq!(w.missing.len(), SIBLING_FILES / 2 + 1);
        assert_eq!(w.marker, Some(SIBLING_FILES / 2));
        let pushed = w.to_page_cache();
        assert_eq!(pushed.len(), SIBLING_FILES / 2);
        assert!(pushed.iter().all(|(d, _, _)| *d != digest(500)));

        // A window that never gets past its middle has no marker.
        let mut w = Window::new();
        for n in 0..10 {
            assert!(w.take(digest(n), 100, Some(n as u64)));
        }
        assert_eq!(w.marker, None);
    }
}
