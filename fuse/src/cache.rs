//! Bounded caches of immutable content, each fetch running once however
//! many requests wait for it: directories (by digest) and small blobs (whole,
//! by digest).
use arca_castore::{B3Digest, BlobService, Directory, DirectoryService, Node, PathComponent};
use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::StreamExt;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::io::AsyncReadExt;

/// Why a fetch failed, as the errno the kernel gets (details are logged).
pub type Errno = fuser::Errno;

type Flight<V> = Shared<BoxFuture<'static, Result<V, Errno>>>;

/// Called with each blob a batch read delivers (on a runtime thread: it
/// must not block); true if it handed the blob to the kernel's page cache
/// (then the cache keeps only its digest).
pub type ArrivalHook = Arc<dyn Fn(B3Digest, &Bytes) -> bool + Send + Sync>;

/// Digests of blobs handed to the kernel's page cache that are remembered
/// (so that read-ahead does not fetch them again).
const PUSHED_ENTRIES: usize = 64 * 1024;

/// A directory's entries in name order, searchable by name.
pub struct Listing {
    /// Digest of the directory.
    pub digest: B3Digest,
    /// (name, node), sorted by name bytes.
    pub entries: Vec<(PathComponent, Node)>,
}

impl Listing {
    fn new(d: &Directory) -> Self {
        Self {
            digest: d.digest(),
            entries: d
                .entries()
                .map(|(n, node)| (n.clone(), node.clone()))
                .collect(),
        }
    }

    /// Index of the entry called `name`.
    pub fn find(&self, name: &[u8]) -> Option<usize> {
        self.entries
            .binary_search_by(|(n, _)| n.as_bytes().cmp(name))
            .ok()
    }
}

/// Directories by digest: an LRU of at most `capacity` directories, plus the
/// fetches in flight.
pub struct DirCache {
    service: Arc<dyn DirectoryService>,
    lru: Mutex<lru::LruCache<B3Digest, Arc<Listing>>>,
    flights: Mutex<HashMap<B3Digest, Flight<Arc<Listing>>>>,
    /// Roots whose closure was fetched ahead recently (not again).
    prefetched: Mutex<lru::LruCache<B3Digest, ()>>,
}

impl DirCache {
    /// A cache of up to `capacity` directories over `service`.
    pub fn new(service: Arc<dyn DirectoryService>, capacity: usize) -> Arc<Self> {
        let cap = std::num::NonZeroUsize::new(capacity.max(1)).expect("at least 1");
        Arc::new(Self {
            service,
            lru: Mutex::new(lru::LruCache::new(cap)),
            flights: Mutex::new(HashMap::new()),
            prefetched: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(1024).expect("1024"),
            )),
        })
    }

    /// The directory if it is cached (no I/O).
    pub fn cached(&self, digest: &B3Digest) -> Option<Arc<Listing>> {
        self.lru.lock().get(digest).cloned()
    }

    /// The directory, fetched if needed (one fetch per digest at a time).
    pub async fn get(self: &Arc<Self>, digest: B3Digest) -> Result<Arc<Listing>, Errno> {
        if let Some(d) = self.cached(&digest) {
            return Ok(d);
        }
        let flight = {
            let mut flights = self.flights.lock();
            if let Some(d) = self.cached(&digest) {
                return Ok(d);
            }
            flights
                .entry(digest)
                .or_insert_with(|| {
                    let task = tokio::spawn(self.clone().fetch(digest));
                    async move { task.await.unwrap_or(Err(Errno::EIO)) }
                        .boxed()
                        .shared()
                })
                .clone()
        };
        flight.await
    }

    /// Fetches one directory into the cache, ending its flight.
    async fn fetch(self: Arc<Self>, digest: B3Digest) -> Result<Arc<Listing>, Errno> {
        let r = match self.service.get(&digest).await {
            Ok(Some(d)) => Ok(Arc::new(Listing::new(&d))),
            Ok(None) => {
                tracing::warn!(%digest, "directory not in the store");
                Err(Errno::EIO)
            }
            Err(e) => {
                tracing::warn!(%digest, "fetching directory: {e}");
                Err(Errno::EIO)
            }
        };
        if let Ok(d) = &r {
            self.lru.lock().put(digest, d.clone());
        }
        self.flights.lock().remove(&digest);
        r
    }

    /// Fetches the closure of `root` in the background (one streamed call
    /// for gRPC services) into the cache, unless done recently.
    pub fn prefetch_closure(self: &Arc<Self>, root: B3Digest) {
        if self.cached(&root).is_some() || self.prefetched.lock().put(root, ()).is_some() {
            return;
        }
        // The root comes first in the closure: a listing of it waits for
        // that (one call fewer, and the call's answer would queue behind
        // the closure's on the same connection anyway).
        let (root_tx, root_rx) = tokio::sync::oneshot::channel::<Arc<Listing>>();
        {
            let mut flights = self.flights.lock();
            if !flights.contains_key(&root) {
                let this = self.clone();
                let flight = async move {
                    match root_rx.await {
                        Ok(listing) => Ok(listing),
                        // The closure ended before its root: fetch it alone.
                        Err(_) => this.fetch(root).await,
                    }
                }
                .boxed()
                .shared();
                flights.insert(root, flight);
            }
        }
        let this = self.clone();
        tokio::spawn(async move {
            let mut root_tx = Some(root_tx);
            let mut stream = this.service.get_recursive(&root);
            let mut n = 0usize;
            while let Some(r) = stream.next().await {
                match r {
                    Ok(d) => {
                        let listing = Arc::new(Listing::new(&d));
                        this.lru.lock().put(listing.digest, listing.clone());
                        if listing.digest == root {
                            if let Some(tx) = root_tx.take() {
                                this.flights.lock().remove(&root);
                                let _ = tx.send(listing);
                            }
                        }
                        n += 1;
                        // Never push out more than half the cache for one closure.
                        if n >= this.lru.lock().cap().get() / 2 {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(%root, "prefetching directory closure: {e}");
                        break;
                    }
                }
            }
            if root_tx.is_some() {
                // No root came: whoever waits for it fetches it alone.
                this.flights.lock().remove(&root);
            }
        });
    }
}

/// Whole small blobs by digest: an LRU bounded in bytes, plus the fetches in
/// flight (so a read and a read-ahead of the same blob share one fetch).
pub struct BlobCache {
    service: Arc<dyn BlobService>,
    lru: Mutex<(lru::LruCache<B3Digest, Bytes>, u64)>,
    capacity_bytes: u64,
    flights: Mutex<HashMap<B3Digest, Flight<Bytes>>>,
    /// Blobs in flight a reader joined (the kernel has a read of them in
    /// flight: no page-cache store for those); cleared when the flight lands.
    awaited: Mutex<std::collections::HashSet<B3Digest>>,
    /// Blobs handed to the kernel's page cache, which serves their reads:
    /// not kept here (a fresh mount would fault in every page it keeps),
    /// only remembered. A read the kernel sends anyway (it dropped the
    /// pages) fetches the blob again.
    pushed: Mutex<lru::LruCache<B3Digest, ()>>,
}

impl BlobCache {
    /// A cache of up to `capacity_bytes` of blob data over `service`.
    pub fn new(service: Arc<dyn BlobService>, capacity_bytes: u64) -> Arc<Self> {
        Arc::new(Self {
            service,
            lru: Mutex::new((lru::LruCache::unbounded(), 0)),
            capacity_bytes,
            flights: Mutex::new(HashMap::new()),
            awaited: Mutex::new(std::collections::HashSet::new()),
            pushed: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(PUSHED_ENTRIES).expect("non-zero"),
            )),
        })
    }

    /// Whether the blob is cached, being fetched, or in the kernel's page
    /// cache (as far as this cache knows).
    pub fn has(&self, digest: &B3Digest) -> bool {
        self.lru.lock().0.contains(digest)
            || self.flights.lock().contains_key(digest)
            || self.pushed.lock().contains(digest)
    }

    /// The blob if it is cached (no I/O).
    pub fn cached(&self, digest: &B3Digest) -> Option<Bytes> {
        self.lru.lock().0.get(digest).cloned()
    }

    fn insert(&self, digest: B3Digest, data: Bytes) {
        let mut guard = self.lru.lock();
        let (lru, total) = &mut *guard;
        if let Some(old) = lru.put(digest, data.clone()) {
            *total -= old.len() as u64;
        }
        *total += data.len() as u64;
        while *total > self.capacity_bytes {
            match lru.pop_lru() {
                Some((_, b)) => *total -= b.len() as u64,
                None => break,
            }
        }
    }

    /// Ends the flight of `digest` (later requests find the cache, or start
    /// anew) and forgets whether a reader had joined it.
    fn land(&self, digest: &B3Digest) {
        self.flights.lock().remove(digest);
        self.awaited.lock().remove(digest);
    }

    /// Fetches the blob on its own and caches it.
    async fn fetch_into_cache(&self, digest: B3Digest, size: u64) -> Result<Bytes, Errno> {
        let r = fetch_whole(&*self.service, digest, size).await;
        if let Ok(b) = &r {
            self.insert(digest, b.clone());
        }
        r
    }

    /// The blob's bytes (exactly `size` of them, verified by the blob
    /// service's reader), fetched if needed.
    pub async fn get(self: &Arc<Self>, digest: B3Digest, size: u64) -> Result<Bytes, Errno> {
        if let Some(b) = self.cached(&digest) {
            return Ok(b);
        }
        self.start(digest, size).await
    }

    /// Starts fetching the blobs among `items` (digest, size) that are
    /// neither cached nor in flight, all in one [BlobService::read_many]
    /// call (one gRPC call per 1024 blobs). Each blob becomes available as
    /// soon as it arrives; if the batch fails, readers waiting for one of
    /// its blobs fetch that blob on its own.
    /// `on_arrival(digest, bytes)` runs for every blob the batch delivers
    /// (the filesystem pushes small files into the kernel's page cache).
    pub fn prefetch_batch(
        self: &Arc<Self>,
        items: &[(B3Digest, u64)],
        on_arrival: Option<ArrivalHook>,
    ) {
        let mut senders = Vec::new();
        {
            let mut flights = self.flights.lock();
            for &(digest, size) in items {
                if flights.contains_key(&digest) || self.lru.lock().0.contains(&digest) {
                    continue;
                }
                let (tx, rx) = tokio::sync::oneshot::channel::<Bytes>();
                let this = self.clone();
                let flight = async move {
                    match rx.await {
                        Ok(b) => Ok(b),
                        // The batch failed or never got to this blob: alone, then.
                        Err(_) => this.fetch_into_cache(digest, size).await,
                    }
                }
                .boxed()
                .shared();
                flights.insert(digest, flight);
                senders.push((digest, size, tx));
            }
        }
        if senders.is_empty() {
            return;
        }
        tracing::debug!(blobs = senders.len(), "fetching small blobs in one batch");
        let this = self.clone();
        tokio::spawn(async move {
            let digests: Vec<B3Digest> = senders.iter().map(|(d, _, _)| *d).collect();
            let mut answers = this.service.read_many(digests);
            let mut pending = senders.into_iter();
            while let Some(answer) = answers.next().await {
                let Some((digest, size, tx)) = pending.next() else {
                    break;
                };
                match answer {
                    Ok((got, Some(data))) if got == digest && data.len() as u64 == size => {
                        // Not for blobs a reader waits for: the kernel has
                        // that read in flight (its pages locked) and fills
                        // its page cache from the answer anyway.
                        let awaited = this.awaited.lock().contains(&digest);
                        let pushed =
                            !awaited && on_arrival.as_ref().is_some_and(|hook| hook(digest, &data));
                        if pushed {
                            this.pushed.lock().put(digest, ());
                        } else {
                            this.insert(digest, data.clone());
                        }
                        this.land(&digest);
                        let _ = tx.send(data);
                    }
                    Ok((got, data)) => {
                        tracing::warn!(
                            %digest,
                            "batch read answered {got} with {:?} bytes, the node says {size}",
                            data.map(|d| d.len())
                        );
                        this.land(&digest);
                    }
                    Err(e) => {
                        tracing::warn!(%digest, "batch read of small blobs failed: {e}");
                        this.land(&digest);
                        break;
                    }
                }
            }
            // Whatever the batch did not deliver: readers waiting fetch alone
            // (their flights end here, so they drop their senders' halves).
            for (digest, _, _) in pending {
                this.land(&digest);
            }
        });
    }

    fn start(self: &Arc<Self>, digest: B3Digest, size: u64) -> Flight<Bytes> {
        let mut flights = self.flights.lock();
        if let Some(b) = self.cached(&digest) {
            return futures::future::ready(Ok(b)).boxed().shared();
        }
        if flights.contains_key(&digest) {
            self.awaited.lock().insert(digest);
        }
        flights
            .entry(digest)
            .or_insert_with(|| {
                let this = self.clone();
                let task = tokio::spawn(async move {
                    let r = this.fetch_into_cache(digest, size).await;
                    this.land(&digest);
                    r
                });
                async move { task.await.unwrap_or(Err(Errno::EIO)) }
                    .boxed()
                    .shared()
            })
            .clone()
    }
}

/// Reads a whole blob, checking its length against the node's size (the
/// reader checks its digest).
async fn fetch_whole(
    service: &dyn BlobService,
    digest: B3Digest,
    size: u64,
) -> Result<Bytes, Errno> {
    let mut reader = match service.open_read(&digest).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            tracing::warn!(%digest, "blob not in the store");
            return Err(Errno::EIO);
        }
        Err(e) => {
            tracing::warn!(%digest, "opening blob: {e}");
            return Err(Errno::EIO);
        }
    };
    let mut buf = Vec::with_capacity(size as usize);
    if let Err(e) = (&mut reader).take(size + 1).read_to_end(&mut buf).await {
        tracing::warn!(%digest, "reading blob: {e}");
        return Err(Errno::EIO);
    }
    if buf.len() as u64 != size {
        tracing::warn!(%digest, "blob has {} bytes, its node says {size}", buf.len());
        return Err(Errno::EIO);
    }
    Ok(Bytes::from(buf))
}
