//! One conformance suite, run against every backend and against every
//! backend behind the gRPC client/server pair.
mod common;

use arca_castore::blobservice::{put_bytes, read_all, BlobService, MAX_BATCH_BLOB_SIZE};
use arca_castore::directoryservice::{get_closure, put_all, DirectoryService};
use arca_castore::{B3Digest, Directory, Error, Node};
use common::*;
use futures::{StreamExt, TryStreamExt};
use std::io::SeekFrom;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

type Services = (Arc<dyn BlobService>, Arc<dyn DirectoryService>, Guard);

pub mod cases {
    use super::*;

    const HELLO: &str = "5ca7815adcb484e9a136c11efe69c1d530176d549b5d18d038eb5280b4b3470c";
    const EMPTY: &str = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";

    async fn put_in_pieces(b: &dyn BlobService, data: &[u8], piece: usize) -> B3Digest {
        let mut w = b.open_write().await;
        for p in data.chunks(piece) {
            w.write(bytes::Bytes::copy_from_slice(p)).await.unwrap();
        }
        w.close().await.unwrap()
    }

    pub async fn blob_put_has_read(b: Arc<dyn BlobService>, _d: Arc<dyn DirectoryService>) {
        let d = put_bytes(&*b, "Hello World!".into()).await.unwrap();
        assert_eq!(d.to_hex(), HELLO);
        assert!(b.has(&d).await.unwrap());
        assert_eq!(read_all(&*b, &d).await.unwrap().unwrap(), b"Hello World!");
    }

    pub async fn blob_missing(b: Arc<dyn BlobService>, _d: Arc<dyn DirectoryService>) {
        let d = B3Digest::of(b"never stored");
        assert!(!b.has(&d).await.unwrap());
        assert!(b.open_read(&d).await.unwrap().is_none());
        assert!(b.chunks(&d).await.unwrap().is_none());
    }

    pub async fn blob_empty(b: Arc<dyn BlobService>, _d: Arc<dyn DirectoryService>) {
        let w = b.open_write().await;
        let mut w = w;
        let d = w.close().await.unwrap();
        assert_eq!(d.to_hex(), EMPTY);
        assert!(b.has(&d).await.unwrap());
        assert_eq!(read_all(&*b, &d).await.unwrap().unwrap(), b"");
    }

    pub async fn blob_large_50mib(b: Arc<dyn BlobService>, _d: Arc<dyn DirectoryService>) {
        let data = test_data(50 * 1024 * 1024, 1);
        let d = put_in_pieces(&*b, &data, 1024 * 1024 + 17).await;
        assert_eq!(d, B3Digest::of(&data));
        let mut r = b.open_read(&d).await.unwrap().unwrap();
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0;
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            total += n;
            hasher.update(&buf[..n]);
        }
        assert_eq!(total, data.len());
        assert_eq!(B3Digest::from(hasher.finalize()), d);
    }

    pub async fn blob_read_many(b: Arc<dyn BlobService>, _d: Arc<dyn DirectoryService>) {
        let small = put_bytes(&*b, "Hello World!".into()).await.unwrap();
        let empty = b.open_write().await.close().await.unwrap();
        // several chunks on chunking backends, still small enough for a batch
        let multi_data = test_data(3 * 1024 * 1024 + 5, 7);
        let multi = put_in_pieces(&*b, &multi_data, 1024 * 1024).await;
        let missing = B3Digest::of(b"never stored");
        let asked = vec![small, missing, empty, multi, small];
        let got: Vec<_> = b.read_many(asked.clone()).try_collect().await.unwrap();
        let digests: Vec<B3Digest> = got.iter().map(|(d, _)| *d).collect();
        assert_eq!(digests, asked, "one answer per digest, in order");
        assert_eq!(got[0].1.as_deref(), Some(&b"Hello World!"[..]));
        assert_eq!(got[1].1, None);
        assert_eq!(got[2].1.as_deref(), Some(&b""[..]));
        assert!(
            got[3].1.as_deref() == Some(&multi_data[..]),
            "multi-chunk blob read whole"
        );
        assert_eq!(got[4].1.as_deref(), Some(&b"Hello World!"[..]));
        // many blobs: more than any backend's group size
        let mut many = Vec::new();
        for i in 0..300 {
            many.push(
                put_bytes(&*b, format!("small blob {i}").into_bytes().into())
                    .await
                    .unwrap(),
            );
        }
        let got: Vec<_> = b.read_many(many.clone()).try_collect().await.unwrap();
        assert_eq!(got.len(), 300);
        for (i, (d, data)) in got.into_iter().enumerate() {
            assert_eq!(d, many[i]);
            assert_eq!(data.unwrap(), format!("small blob {i}").as_bytes());
        }
        assert!(b.read_many(Vec::new()).next().await.is_none());
        // a blob too large for a batch is an error, not a silent truncation
        let big_data = test_data(MAX_BATCH_BLOB_SIZE as usize + 1, 9);
        let big = put_in_pieces(&*b, &big_data, 1024 * 1024).await;
        let r: Result<Vec<_>, Error> = b.read_many(vec![small, big]).try_collect().await;
        assert!(
            matches!(r, Err(Error::InvalidRequest(ref m)) if m.contains("larger than")),
            "{r:?}"
        );
    }

    pub async fn blob_read_stream(b: Arc<dyn BlobService>, _d: Arc<dyn DirectoryService>) {
        async fn streamed(b: &dyn BlobService, d: &B3Digest) -> Option<Vec<u8>> {
            let pieces: Vec<bytes::Bytes> = b
                .read_stream(d)
                .await
                .unwrap()?
                .try_collect()
                .await
                .unwrap();
            Some(pieces.concat())
        }
        assert!(b
            .read_stream(&B3Digest::of(b"never stored"))
            .await
            .unwrap()
            .is_none());
        let empty = b.open_write().await.close().await.unwrap();
        assert_eq!(streamed(&*b, &empty).await.unwrap(), b"");
        let small = put_bytes(&*b, "Hello World!".into()).await.unwrap();
        assert_eq!(streamed(&*b, &small).await.unwrap(), b"Hello World!");
        // several chunks on chunking backends, several messages over gRPC
        let data = test_data(5 * 1024 * 1024 + 3, 11);
        let d = put_in_pieces(&*b, &data, 700_000).await;
        assert!(
            streamed(&*b, &d).await.unwrap() == data,
            "multi-chunk blob streamed whole"
        );
    }

    pub async fn blob_seek(b: Arc<dyn BlobService>, _d: Arc<dyn DirectoryService>) {
        let data = test_data(5 * 1024 * 1024 + 3, 2);
        let d = put_in_pieces(&*b, &data, 300_000).await;
        let mut r = b.open_read(&d).await.unwrap().unwrap();
        let mut buf = vec![0u8; 1000];
        // forward, backward, forward again, relative, and across chunk boundaries
        for pos in [
            0u64,
            4_000_000,
            100,
            2_500_000,
            1_048_570,
            5 * 1024 * 1024 - 997,
            10,
        ] {
            assert_eq!(r.seek(SeekFrom::Start(pos)).await.unwrap(), pos);
            r.read_exact(&mut buf).await.unwrap();
            assert_eq!(
                &buf[..],
                &data[pos as usize..pos as usize + 1000],
                "at {pos}"
            );
        }
        let here = r.seek(SeekFrom::Current(-500)).await.unwrap();
        assert_eq!(here, 510);
        r.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf[..], &data[510..1510]);
        // At and past the end: reads return nothing.
        r.seek(SeekFrom::Start(data.len() as u64)).await.unwrap();
        assert_eq!(r.read(&mut buf).await.unwrap(), 0);
        // Before the start: an error.
        assert!(r
            .seek(SeekFrom::Current(-(data.len() as i64) - 10))
            .await
            .is_err());
    }

    pub async fn blob_chunks(b: Arc<dyn BlobService>, _d: Arc<dyn DirectoryService>) {
        let data = test_data(3 * 1024 * 1024, 3);
        let d = put_in_pieces(&*b, &data, 1 << 20).await;
        let chunks = b.chunks(&d).await.unwrap().expect("blob exists");
        if chunks.is_empty() {
            return; // kept in one piece: nothing finer to read
        }
        assert!(chunks.len() > 1);
        assert_eq!(
            chunks.iter().map(|c| c.size).sum::<u64>(),
            data.len() as u64
        );
        let mut offset = 0usize;
        for c in chunks {
            let got = read_all(&*b, &c.digest)
                .await
                .unwrap()
                .expect("chunk readable by digest");
            assert_eq!(got.len() as u64, c.size);
            assert_eq!(&got[..], &data[offset..offset + got.len()]);
            offset += got.len();
        }
    }

    pub async fn blob_duplicate(b: Arc<dyn BlobService>, _d: Arc<dyn DirectoryService>) {
        let data = test_data(2 * 1024 * 1024, 4);
        let d1 = put_in_pieces(&*b, &data, 65536).await;
        let d2 = put_in_pieces(&*b, &data, 1 << 20).await;
        assert_eq!(d1, d2);
        assert_eq!(read_all(&*b, &d1).await.unwrap().unwrap(), data);
    }

    pub async fn blob_concurrent_writes(b: Arc<dyn BlobService>, _d: Arc<dyn DirectoryService>) {
        let tasks: Vec<_> = (0..8u64)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move {
                    let data = test_data(1_500_000 + i as usize, 10 + i);
                    let d = put_in_pieces(&*b, &data, 100_000).await;
                    assert_eq!(d, B3Digest::of(&data));
                    assert_eq!(read_all(&*b, &d).await.unwrap().unwrap(), data);
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    }

    pub async fn blob_unclosed_writer_leaves_nothing(
        b: Arc<dyn BlobService>,
        _d: Arc<dyn DirectoryService>,
    ) {
        let data = test_data(3 * 1024 * 1024, 5);
        {
            let mut w = b.open_write().await;
            w.write(data.clone().into()).await.unwrap();
            // dropped without close
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!b.has(&B3Digest::of(&data)).await.unwrap());
    }

    fn file(data: &[u8]) -> Node {
        Node::File {
            digest: B3Digest::of(data),
            size: data.len() as u64,
            executable: false,
        }
    }

    fn leaf(tag: &str) -> Directory {
        let mut d = Directory::new();
        d.add(tag.try_into().unwrap(), file(tag.as_bytes()))
            .unwrap();
        d.add(
            "link".try_into().unwrap(),
            Node::Symlink {
                target: "/nix/store/x".try_into().unwrap(),
            },
        )
        .unwrap();
        d
    }

    fn with_children(children: &[(&str, &Directory)]) -> Directory {
        let mut d = Directory::new();
        for (name, c) in children {
            d.add(
                (*name).try_into().unwrap(),
                Node::Directory {
                    digest: c.digest(),
                    size: c.size(),
                },
            )
            .unwrap();
        }
        d
    }

    /// root -> {a -> {shared}, b -> {shared, c}}, shared referenced twice.
    fn diamond() -> Vec<Directory> {
        diamond_tagged("")
    }

    /// A diamond whose digests differ per tag (cases may share a store).
    fn diamond_tagged(tag: &str) -> Vec<Directory> {
        let shared = leaf(&format!("shared{tag}"));
        let c = leaf(&format!("c{tag}"));
        let a = with_children(&[("s", &shared)]);
        let b = with_children(&[("s", &shared), ("c", &c)]);
        let root = with_children(&[("a", &a), ("b", &b)]);
        vec![shared, c, a, b, root]
    }

    pub async fn dir_put_get(_b: Arc<dyn BlobService>, d: Arc<dyn DirectoryService>) {
        let l = leaf("x");
        let digest = d.put(l.clone()).await.unwrap();
        assert_eq!(digest, l.digest());
        assert_eq!(d.get(&digest).await.unwrap(), Some(l));
        let empty = d.put(Directory::new()).await.unwrap();
        assert_eq!(empty.to_hex(), EMPTY);
        assert_eq!(d.get(&empty).await.unwrap(), Some(Directory::new()));
    }

    pub async fn dir_missing(_b: Arc<dyn BlobService>, d: Arc<dyn DirectoryService>) {
        assert_eq!(d.get(&B3Digest::of(b"nope")).await.unwrap(), None);
    }

    pub async fn dir_recursive_unknown_root(
        _b: Arc<dyn BlobService>,
        d: Arc<dyn DirectoryService>,
    ) {
        let r = get_closure(&*d, &B3Digest::of(b"nope")).await;
        assert!(matches!(r, Err(Error::NotFound(_))), "{r:?}");
    }

    pub async fn dir_closure_right_order(_b: Arc<dyn BlobService>, d: Arc<dyn DirectoryService>) {
        let dirs = diamond();
        let root = dirs.last().unwrap().digest();
        assert_eq!(put_all(&*d, dirs.clone()).await.unwrap(), root);
        let got = get_closure(&*d, &root).await.unwrap();
        assert_eq!(got.len(), 5, "each directory once");
        assert_eq!(got[0].digest(), root, "root first");
        // Each directory after one that refers to it.
        let mut seen = std::collections::HashSet::new();
        for (i, dir) in got.iter().enumerate() {
            if i > 0 {
                assert!(got[..i]
                    .iter()
                    .any(|p| p.child_directories().any(|(_, c, _)| c == dir.digest())));
            }
            assert!(seen.insert(dir.digest()));
        }
        // Breadth-first: a, b before shared, c.
        let pos = |x: &Directory| got.iter().position(|g| g == x).unwrap();
        assert!(pos(&dirs[2]) < pos(&dirs[0]) && pos(&dirs[3]) < pos(&dirs[1]));
    }

    pub async fn dir_closure_wrong_order(_b: Arc<dyn BlobService>, d: Arc<dyn DirectoryService>) {
        let mut dirs = diamond_tagged("-wrong-order");
        dirs.reverse();
        let root = dirs[0].digest();
        assert!(matches!(
            put_all(&*d, dirs).await,
            Err(Error::InvalidRequest(_))
        ));
        assert_eq!(d.get(&root).await.unwrap(), None, "nothing stored");
        // Disconnected: an extra directory nobody refers to.
        let mut dirs = diamond_tagged("-disconnected");
        dirs.insert(0, leaf("stray"));
        assert!(matches!(
            put_all(&*d, dirs).await,
            Err(Error::InvalidRequest(_))
        ));
        assert_eq!(
            d.get(&leaf("stray").digest()).await.unwrap(),
            None,
            "nothing stored"
        );
    }

    pub async fn dir_dangling_reference(_b: Arc<dyn BlobService>, d: Arc<dyn DirectoryService>) {
        let missing = leaf("missing");
        let parent = with_children(&[("m", &missing)]);
        assert!(matches!(
            d.put(parent.clone()).await,
            Err(Error::InvalidRequest(_))
        ));
        assert_eq!(d.get(&parent.digest()).await.unwrap(), None);
    }

    pub async fn dir_wrong_size(_b: Arc<dyn BlobService>, d: Arc<dyn DirectoryService>) {
        let child = leaf("child");
        d.put(child.clone()).await.unwrap();
        let mut parent = Directory::new();
        parent
            .add(
                "c".try_into().unwrap(),
                Node::Directory {
                    digest: child.digest(),
                    size: child.size() + 1,
                },
            )
            .unwrap();
        assert!(matches!(
            d.put(parent.clone()).await,
            Err(Error::InvalidRequest(_))
        ));
        assert_eq!(d.get(&parent.digest()).await.unwrap(), None);
        assert!(matches!(
            put_all(&*d, vec![child, parent]).await,
            Err(Error::InvalidRequest(_))
        ));
    }

    pub async fn dir_duplicate(_b: Arc<dyn BlobService>, d: Arc<dyn DirectoryService>) {
        let dirs = diamond();
        let r1 = put_all(&*d, dirs.clone()).await.unwrap();
        let r2 = put_all(&*d, dirs).await.unwrap();
        assert_eq!(r1, r2);
        assert_eq!(get_closure(&*d, &r1).await.unwrap().len(), 5);
    }

    pub async fn dir_any_directory_fetchable(
        _b: Arc<dyn BlobService>,
        d: Arc<dyn DirectoryService>,
    ) {
        let dirs = diamond();
        put_all(&*d, dirs.clone()).await.unwrap();
        assert_eq!(
            d.get(&dirs[3].digest()).await.unwrap(),
            Some(dirs[3].clone())
        );
        let sub = get_closure(&*d, &dirs[3].digest()).await.unwrap();
        assert_eq!(sub.len(), 3);
        // a child put on its own after its closure exists
        let parent = with_children(&[("x", &dirs[2])]);
        assert_eq!(d.put(parent.clone()).await.unwrap(), parent.digest());
        assert_eq!(get_closure(&*d, &parent.digest()).await.unwrap().len(), 3);
    }

    pub async fn dir_larger_than_grpc_default_limit(
        _b: Arc<dyn BlobService>,
        d: Arc<dyn DirectoryService>,
    ) {
        let mut big = Directory::new();
        for i in 0..70_000u32 {
            big.add(
                format!("entry-with-a-longish-name-{i:08}")
                    .as_str()
                    .try_into()
                    .unwrap(),
                file(&i.to_le_bytes()),
            )
            .unwrap();
        }
        assert!(big.encode().len() > 4 * 1024 * 1024);
        let digest = d.put(big.clone()).await.unwrap();
        assert_eq!(d.get(&digest).await.unwrap(), Some(big));
    }
}

macro_rules! suite {
    ($backend:ident, $make:expr) => {
        mod $backend {
            use super::*;
            async fn make() -> Services {
                $make
            }
            suite!(@cases
                blob_put_has_read, blob_missing, blob_empty, blob_large_50mib, blob_read_many, blob_read_stream, blob_seek,
                blob_chunks, blob_duplicate, blob_concurrent_writes, blob_unclosed_writer_leaves_nothing,
                dir_put_get, dir_missing, dir_recursive_unknown_root, dir_closure_right_order,
                dir_closure_wrong_order, dir_dangling_reference, dir_wrong_size, dir_duplicate,
                dir_any_directory_fetchable, dir_larger_than_grpc_default_limit);
        }
    };
    (@cases $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let (b, d, _guard) = make().await;
                cases::$case(b, d).await;
            }
        )*
    };
}

/// Every case against every backend, in one process (for S3, which is slow to start).
pub async fn run_all(b: Arc<dyn BlobService>, d: Arc<dyn DirectoryService>) {
    macro_rules! all { ($($case:ident),*) => { $( eprintln!("case {}", stringify!($case)); cases::$case(b.clone(), d.clone()).await; )* } }
    all!(
        blob_put_has_read,
        blob_missing,
        blob_empty,
        blob_large_50mib,
        blob_read_many,
        blob_read_stream,
        blob_seek,
        blob_chunks,
        blob_duplicate,
        blob_concurrent_writes,
        blob_unclosed_writer_leaves_nothing,
        dir_put_get,
        dir_missing,
        dir_recursive_unknown_root,
        dir_closure_right_order,
        dir_closure_wrong_order,
        dir_dangling_reference,
        dir_wrong_size,
        dir_duplicate,
        dir_any_directory_fetchable,
        dir_larger_than_grpc_default_limit
    );
}

suite!(memory, from_urls("memory://", "memory://"));
suite!(sled, from_urls("memory://", "sled://{tmp}/dirs.sled"));
suite!(
    objectstore_memory,
    from_urls("objectstore+memory:///", "objectstore+memory:///")
);
// Local files: large blobs written whole, chunked and compressed in the
// background (the default); chunks cut while writing and compressed in the
// background; and compressed inline.
suite!(
    objectstore_file,
    from_urls(
        "objectstore+file://{tmp}/blobs",
        "objectstore+file://{tmp}/dirs"
    )
);
suite!(
    objectstore_file_chunking_inline,
    from_urls(
        "objectstore+file://{tmp}/blobs?chunking=inline",
        "objectstore+file://{tmp}/dirs"
    )
);
suite!(
    objectstore_file_inline,
    from_urls(
        "objectstore+file://{tmp}/blobs?compression=inline",
        "objectstore+file://{tmp}/dirs"
    )
);
suite!(
    objectstore_file_zstd,
    from_urls(
        "objectstore+file://{tmp}/blobs?compression=inline&codec=zstd",
        "objectstore+file://{tmp}/dirs"
    )
);
suite!(
    cache,
    from_urls(
        "cache://?near=memory://&far=objectstore+file://{tmp}/far-blobs",
        "cache://?near=memory://&far=sled://{tmp}/far-dirs.sled"
    )
);
suite!(
    lru,
    from_urls(
        "objectstore+memory:///",
        "lru://?capacity=100000&inner=sled://{tmp}/dirs.sled"
    )
);
suite!(
    grpc_memory,
    behind_grpc(from_urls("memory://", "memory://")).await
);
suite!(
    grpc_sled,
    behind_grpc(from_urls("memory://", "sled://{tmp}/dirs.sled")).await
);
suite!(
    grpc_objectstore_file,
    behind_grpc(from_urls(
        "objectstore+file://{tmp}/b",
        "objectstore+file://{tmp}/d"
    ))
    .await
);
// A non-local object store behind gRPC (as S3 is): chunks are read one
// `open_read` each inside the server's batch streams, two calls at once.
suite!(
    grpc_objectstore_memory,
    behind_grpc(from_urls(
        "objectstore+memory:///",
        "objectstore+memory:///"
    ))
    .await
);
suite!(
    grpc_objectstore_file_inline,
    behind_grpc(from_urls(
        "objectstore+file://{tmp}/b?compression=inline",
        "objectstore+file://{tmp}/d"
    ))
    .await
);
suite!(
    grpc_objectstore_memory_zstd,
    behind_grpc(from_urls(
        "objectstore+memory:///?codec=zstd",
        "objectstore+memory:///"
    ))
    .await
);
suite!(
    grpc_cache,
    behind_grpc(from_urls(
        "cache://?near=memory://&far=objectstore+memory:///",
        "cache://?near=memory://&far=objectstore+memory:///"
    ))
    .await
);
suite!(
    grpc_tvix_like_server,
    behind_tvix_like_grpc(from_urls(
        "objectstore+file://{tmp}/b",
        "objectstore+file://{tmp}/d"
    ))
    .await
);
suite!(cache_far_grpc, behind_cache_far_grpc().await);
suite!(
    grpc_lru,
    behind_grpc(from_urls(
        "memory://",
        "lru://?capacity=100000&inner=memory://"
    ))
    .await
);

/// `cache://` with a local near store and a far gRPC daemon (what `arca
/// mount` on a laptop uses): batch reads go to the far store in batches.
async fn behind_cache_far_grpc() -> Services {
    let (far_b, far_d, mut guard) = behind_grpc(from_urls(
        "objectstore+file://{tmp}/b",
        "sled://{tmp}/d.sled",
    ))
    .await;
    let (near_b, near_d, near_guard) = from_urls("objectstore+file://{tmp}/nb", "memory://");
    guard.extra.push(Box::new(near_guard));
    (
        Arc::new(arca_castore::blobservice::CacheBlobService::new(
            near_b, far_b,
        )),
        Arc::new(arca_castore::directoryservice::CacheDirectoryService::new(
            near_d, far_d,
        )),
        guard,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_seaweedfs_all_cases() {
    let Some(sw) = seaweed::Seaweed::start() else {
        return;
    };
    let (b, d, _g) = from_urls(&sw.url("direct/blobs"), &sw.url("direct/dirs"));
    run_all(b, d).await;
    // and the same bucket behind the gRPC pair
    let (b, d, _g2) = behind_grpc(from_urls(&sw.url("grpc/blobs"), &sw.url("grpc/dirs"))).await;
    run_all(b, d).await;
}
