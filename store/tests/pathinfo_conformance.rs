//! One conformance suite for path-info services, run against every backend
//! (behind the referential-integrity layer the daemon uses, and behind the
//! signing layer) and against every backend behind the gRPC client/server
//! pair; plus wire-level checks with a raw gRPC client.
use arca_castore::blobservice::{put_bytes, MemoryBlobService};
use arca_castore::directoryservice::{put_all, MemoryDirectoryService};
use arca_castore::{
    B3Digest, BlobService, Directory, DirectoryService, Error, Node, PathComponent, SymlinkTarget,
};
use arca_proto::store as proto;
use arca_proto::store::path_info_service_client::PathInfoServiceClient;
use arca_store::grpc::GrpcPathInfoServiceWrapper;
use arca_store::pathinfoservice::{
    pathinfo_service_from_url, CheckedPathInfoService, GrpcPathInfoService, PathInfoService,
    SigningPathInfoService, StoreServices,
};
use arca_store::LazyNarIndex;
use arca_store::{compress_hash, NixHash, PathInfo, PublicKey, SecretKey, Signature, StorePath};
use bytes::Bytes;
use futures::TryStreamExt;
use std::collections::BTreeSet;
use std::sync::Arc;
use tokio::sync::oneshot;
use tonic::Code;

// ---------------------------------------------------------------- harness

/// Stops the in-process gRPC server when dropped.
struct ServerGuard {
    stop: Option<oneshot::Sender<()>>,
    addr: std::net::SocketAddr,
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn serve(
    pis: Arc<dyn PathInfoService>,
    blob: Arc<dyn BlobService>,
    dir: Arc<dyn DirectoryService>,
) -> ServerGuard {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(GrpcPathInfoServiceWrapper::new(pis, blob, dir).into_server())
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = rx.await;
                },
            )
            .await
            .expect("server runs");
    });
    ServerGuard {
        stop: Some(tx),
        addr,
    }
}

fn channel(addr: std::net::SocketAddr) -> tonic::transport::Channel {
    arca_castore::grpc::channel_from_url(&url::Url::parse(&format!("grpc+http://{addr}")).unwrap())
        .unwrap()
}

fn secret_key() -> SecretKey {
    include_str!("data/keys/secret.key").parse().unwrap()
}

fn public_key() -> PublicKey {
    include_str!("data/keys/public.key").parse().unwrap()
}

/// What a case gets: castore services (local, so cases can fill them), the
/// path-info service under test, and whatever must stay alive.
pub struct Env {
    blob: Arc<dyn BlobService>,
    dir: Arc<dyn DirectoryService>,
    pis: Arc<dyn PathInfoService>,
    _tmp: tempfile::TempDir,
    _server: Option<ServerGuard>,
}

#[derive(Clone, Copy)]
enum Layer {
    /// Checked layer over the backend.
    Checked,
    /// Signing over checked over the backend.
    Signed,
}

async fn make(url: &str, layer: Layer, grpc: bool) -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let url = url.replace("{tmp}", &tmp.path().display().to_string());
    let blob: Arc<dyn BlobService> = Arc::new(MemoryBlobService::default());
    let dir: Arc<dyn DirectoryService> = Arc::new(MemoryDirectoryService::default());
    let raw = pathinfo_service_from_url(
        &url,
        &StoreServices::new(blob.clone(), dir.clone(), LazyNarIndex::temporary()),
    )
    .unwrap();
    let mut pis: Arc<dyn PathInfoService> =
        Arc::new(CheckedPathInfoService::new(raw, blob.clone(), dir.clone()));
    if let Layer::Signed = layer {
        pis = Arc::new(SigningPathInfoService::new(pis, secret_key()));
    }
    let mut server = None;
    if grpc {
        let s = serve(pis, blob.clone(), dir.clone()).await;
        pis = Arc::new(GrpcPathInfoService::from_channel(channel(s.addr)));
        server = Some(s);
    }
    Env {
        blob,
        dir,
        pis,
        _tmp: tmp,
        _server: server,
    }
}

fn store_path(name: &str) -> StorePath {
    StorePath::new(
        compress_hash::<20>(NixHash::sha256_of(name.as_bytes()).digest()),
        name,
    )
    .unwrap()
}

fn info(name: &str, node: Node, refs: &[&StorePath]) -> PathInfo {
    PathInfo {
        store_path: store_path(name),
        node,
        references: refs.iter().map(|r| (*r).clone()).collect(),
        nar_size: 120,
        nar_sha256: NixHash::sha256_of(name.as_bytes()).as_sha256().unwrap(),
        signatures: vec![],
        deriver: None,
        ca: None,
    }
}

fn symlink() -> Node {
    Node::Symlink {
        target: SymlinkTarget::try_from("/nix/store/somewhere").unwrap(),
    }
}

fn pc(s: &str) -> PathComponent {
    PathComponent::try_from(s).unwrap()
}

/// A small tree in castore: `{ hello (file), exe (executable), link -> …, sub/{ .keep (empty) } }`.
async fn tree(env: &Env) -> Node {
    let hello = put_bytes(&*env.blob, Bytes::from_static(b"Hello World!"))
        .await
        .unwrap();
    let empty = put_bytes(&*env.blob, Bytes::new()).await.unwrap();
    let mut sub = Directory::new();
    sub.add(
        pc(".keep"),
        Node::File {
            digest: empty,
            size: 0,
            executable: false,
        },
    )
    .unwrap();
    let mut root = Directory::new();
    root.add(
        pc("hello"),
        Node::File {
            digest: hello,
            size: 12,
            executable: false,
        },
    )
    .unwrap();
    root.add(
        pc("exe"),
        Node::File {
            digest: hello,
            size: 12,
            executable: true,
        },
    )
    .unwrap();
    root.add(pc("link"), symlink()).unwrap();
    root.add(
        pc("sub"),
        Node::Directory {
            digest: sub.digest(),
            size: sub.size(),
        },
    )
    .unwrap();
    let size = root.size();
    let digest = put_all(&*env.dir, [sub, root]).await.unwrap();
    Node::Directory { digest, size }
}

fn invalid(r: Result<PathInfo, Error>, needle: &str) {
    match r {
        Err(Error::InvalidRequest(m)) => {
            assert!(m.contains(needle), "{m:?} does not mention {needle}")
        }
        other => panic!("expected InvalidRequest mentioning {needle}, got {other:?}"),
    }
}

async fn list_all(pis: &dyn PathInfoService) -> Vec<PathInfo> {
    pis.list().try_collect().await.unwrap()
}

// ---------------------------------------------------------------- cases

pub mod cases {
    use super::*;

    pub async fn put_get_list(env: Env) {
        let node = tree(&env).await;
        let i = info("hello-1.0", node, &[]);
        let stored = env.pis.put(i.clone()).await.unwrap();
        // Only signatures may have been added.
        let mut unsigned = stored.clone();
        unsigned.signatures.clear();
        assert_eq!(unsigned, i);
        assert_eq!(
            env.pis.get(*i.digest()).await.unwrap(),
            Some(stored.clone())
        );
        let missing = *store_path("never-stored").digest();
        assert_eq!(
            env.pis
                .get_many(&[missing, *i.digest(), missing])
                .await
                .unwrap(),
            vec![None, Some(stored.clone()), None]
        );
        assert_eq!(list_all(&*env.pis).await, vec![stored]);
    }

    pub async fn missing(env: Env) {
        assert_eq!(
            env.pis.get(*store_path("nope").digest()).await.unwrap(),
            None
        );
        assert_eq!(
            env.pis.get(*store_path("never").digest()).await.unwrap(),
            None
        );
        assert_eq!(env.pis.get_many(&[]).await.unwrap(), vec![]);
        assert!(list_all(&*env.pis).await.is_empty());
    }

    pub async fn every_node_kind_and_field(env: Env) {
        let hello = put_bytes(&*env.blob, Bytes::from_static(b"Hello World!"))
            .await
            .unwrap();
        let dep = env.pis.put(info("dep", symlink(), &[])).await.unwrap();
        let mut i = info(
            "file-node",
            Node::File {
                digest: hello,
                size: 12,
                executable: true,
            },
            &[&dep.store_path],
        );
        i.deriver = Some(store_path("file-node.drv"));
        i.ca = Some(
            "fixed:r:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"
                .parse()
                .unwrap(),
        );
        i.signatures.push(Signature::new("someone-1", [5; 64]));
        i.references.push(i.store_path.clone());
        let stored = env.pis.put(i.clone()).await.unwrap();
        assert!(
            stored.signatures.contains(&i.signatures[0]),
            "existing signatures are kept"
        );
        assert_eq!(env.pis.get(*i.digest()).await.unwrap(), Some(stored));
    }

    pub async fn duplicate_put(env: Env) {
        let i = info("dup", symlink(), &[]);
        let a = env.pis.put(i.clone()).await.unwrap();
        let b = env.pis.put(a.clone()).await.unwrap();
        assert_eq!(a, b);
        assert_eq!(list_all(&*env.pis).await, vec![a]);
    }

    pub async fn list_many(env: Env) {
        let mut want = BTreeSet::new();
        for n in 0..40 {
            let stored = env
                .pis
                .put(info(&format!("p{n}"), symlink(), &[]))
                .await
                .unwrap();
            want.insert(stored.store_path.clone());
        }
        let got: BTreeSet<StorePath> = list_all(&*env.pis)
            .await
            .into_iter()
            .map(|i| i.store_path)
            .collect();
        assert_eq!(got, want);
        let digests: Vec<[u8; 20]> = want.iter().map(|p| *p.digest()).collect();
        let many = env.pis.get_many(&digests).await.unwrap();
        assert_eq!(
            many.into_iter()
                .map(|i| i.unwrap().store_path)
                .collect::<BTreeSet<_>>(),
            want
        );
    }

    pub async fn refuses_missing_blob(env: Env) {
        let absent = B3Digest::of(b"not stored");
        let i = info(
            "nofile",
            Node::File {
                digest: absent,
                size: 10,
                executable: false,
            },
            &[],
        );
        invalid(env.pis.put(i.clone()).await, &absent.to_hex());
        assert_eq!(env.pis.get(*i.digest()).await.unwrap(), None);
    }

    pub async fn refuses_missing_directory(env: Env) {
        let absent = B3Digest::of(b"no such directory");
        let i = info(
            "nodir",
            Node::Directory {
                digest: absent,
                size: 1,
            },
            &[],
        );
        invalid(env.pis.put(i.clone()).await, &absent.to_hex());
        assert_eq!(env.pis.get(*i.digest()).await.unwrap(), None);
    }

    pub async fn refuses_missing_blob_deep_in_closure(env: Env) {
        let absent = B3Digest::of(b"deep blob");
        let mut sub = Directory::new();
        sub.add(
            pc("f"),
            Node::File {
                digest: absent,
                size: 9,
                executable: false,
            },
        )
        .unwrap();
        let mut root = Directory::new();
        root.add(
            pc("sub"),
            Node::Directory {
                digest: sub.digest(),
                size: sub.size(),
            },
        )
        .unwrap();
        let size = root.size();
        let digest = put_all(&*env.dir, [sub, root]).await.unwrap();
        invalid(
            env.pis
                .put(info("deep", Node::Directory { digest, size }, &[]))
                .await,
            &absent.to_hex(),
        );
    }

    pub async fn refuses_wrong_root_size(env: Env) {
        let Node::Directory { digest, size } = tree(&env).await else {
            unreachable!()
        };
        invalid(
            env.pis
                .put(info(
                    "wrong-size",
                    Node::Directory {
                        digest,
                        size: size + 1,
                    },
                    &[],
                ))
                .await,
            "size",
        );
    }

    pub async fn references(env: Env) {
        let dep = store_path("dependency");
        let i = info("needs-dep", symlink(), &[&dep]);
        invalid(env.pis.put(i.clone()).await, &dep.hash_part());
        assert_eq!(env.pis.get(*i.digest()).await.unwrap(), None);
        // A self-reference needs nothing.
        let me = store_path("self-ref");
        env.pis
            .put(info("self-ref", symlink(), &[&me]))
            .await
            .unwrap();
        // Once the dependency is stored, the put succeeds.
        env.pis
            .put(info("dependency", symlink(), &[]))
            .await
            .unwrap();
        let stored = env.pis.put(i).await.unwrap();
        assert_eq!(stored.references, vec![dep]);
    }

    pub async fn replace_keeps_one(env: Env) {
        let mut i = info("replaced", symlink(), &[]);
        env.pis.put(i.clone()).await.unwrap();
        i.nar_size = 999;
        let b = env.pis.put(i.clone()).await.unwrap();
        assert_eq!(
            env.pis.get(*i.digest()).await.unwrap().unwrap().nar_size,
            999
        );
        assert_eq!(list_all(&*env.pis).await, vec![b]);
    }
}

macro_rules! suite {
    ($backend:ident, $url:expr, $layer:expr, $grpc:expr) => {
        mod $backend {
            use super::*;
            suite!(@cases $url, $layer, $grpc;
                put_get_list, missing, every_node_kind_and_field, duplicate_put, list_many,
                refuses_missing_blob, refuses_missing_directory, refuses_missing_blob_deep_in_closure,
                refuses_wrong_root_size, references, replace_keeps_one);
        }
    };
    (@cases $url:expr, $layer:expr, $grpc:expr; $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                cases::$case(make($url, $layer, $grpc).await).await;
            }
        )*
    };
}

const MEMORY: &str = "memory://";
const SLED: &str = "sled://{tmp}/pathinfo.sled";
const SLED_TMP: &str = "sled://";
const OS_MEMORY: &str = "objectstore+memory:///";
const OS_FILE: &str = "objectstore+file://{tmp}/pathinfos";
const CACHE: &str = "cache://?near=memory://&far=sled://{tmp}/far.sled";
const LRU: &str = "lru://?capacity=1000&inner=objectstore+file://{tmp}/inner";
const LRU_ALONE: &str = "lru://?capacity=1000";

suite!(memory, MEMORY, Layer::Checked, false);
suite!(sled, SLED, Layer::Checked, false);
suite!(sled_temporary, SLED_TMP, Layer::Checked, false);
suite!(objectstore_memory, OS_MEMORY, Layer::Checked, false);
suite!(objectstore_file, OS_FILE, Layer::Checked, false);
suite!(cache, CACHE, Layer::Checked, false);
suite!(lru, LRU, Layer::Checked, false);
suite!(lru_alone, LRU_ALONE, Layer::Checked, false);
suite!(signed_memory, MEMORY, Layer::Signed, false);
suite!(signed_sled, SLED, Layer::Signed, false);
suite!(grpc_memory, MEMORY, Layer::Checked, true);
suite!(grpc_sled, SLED, Layer::Checked, true);
suite!(grpc_objectstore_file, OS_FILE, Layer::Checked, true);
suite!(grpc_cache, CACHE, Layer::Checked, true);
suite!(grpc_lru, LRU, Layer::Checked, true);
suite!(
    grpc_signed_objectstore_memory,
    OS_MEMORY,
    Layer::Signed,
    true
);

// ---------------------------------------------------------------- layers

#[tokio::test]
async fn signing_layer_signature_verifies() {
    for grpc in [false, true] {
        let env = make(MEMORY, Layer::Signed, grpc).await;
        let dep = env.pis.put(info("sig-dep", symlink(), &[])).await.unwrap();
        let mut i = info("signed", tree(&env).await, &[&dep.store_path]);
        let foreign = Signature::new("other-1", [1; 64]);
        i.signatures.push(foreign.clone());
        let stored = env.pis.put(i.clone()).await.unwrap();
        assert_eq!(stored.signatures.len(), 2, "grpc={grpc}");
        assert_eq!(
            stored.signatures[0], foreign,
            "existing signature kept first"
        );
        assert!(stored.verify(&[public_key()]));
        let ours = &stored.signatures[1];
        assert_eq!(ours.name(), "arca-fixture-1");
        assert!(public_key().verify(stored.fingerprint().as_bytes(), ours));
        // It is what the narinfo would carry, and Nix's narinfo check agrees.
        let n = stored
            .to_narinfo("nar/x.nar", arca_store::Compression::None)
            .unwrap();
        assert!(n.verify(&[public_key()]));
        let fetched = env.pis.get(*i.digest()).await.unwrap().unwrap();
        assert_eq!(fetched, stored);
        // Putting it again adds nothing.
        assert_eq!(env.pis.put(fetched).await.unwrap().signatures.len(), 2);
    }
}

#[tokio::test]
async fn references_check_can_be_switched_off() {
    let tmp = tempfile::tempdir().unwrap();
    let blob: Arc<dyn BlobService> = Arc::new(MemoryBlobService::default());
    let dir: Arc<dyn DirectoryService> = Arc::new(MemoryDirectoryService::default());
    let raw = pathinfo_service_from_url(
        MEMORY,
        &StoreServices::new(blob.clone(), dir.clone(), LazyNarIndex::temporary()),
    )
    .unwrap();
    let pis = CheckedPathInfoService::new(raw, blob, dir).require_references(false);
    let dep = store_path("absent-dependency");
    pis.put(info("refers-anyway", symlink(), &[&dep]))
        .await
        .unwrap();
    // The closure check stays on.
    let absent = B3Digest::of(b"x");
    invalid(
        pis.put(info(
            "nofile",
            Node::File {
                digest: absent,
                size: 1,
                executable: false,
            },
            &[],
        ))
        .await,
        &absent.to_hex(),
    );
    drop(tmp);
}

#[tokio::test]
async fn cache_fills_near_from_far() {
    let blob: Arc<dyn BlobService> = Arc::new(MemoryBlobService::default());
    let dir: Arc<dyn DirectoryService> = Arc::new(MemoryDirectoryService::default());
    let near = pathinfo_service_from_url(
        MEMORY,
        &StoreServices::new(blob.clone(), dir.clone(), LazyNarIndex::temporary()),
    )
    .unwrap();
    let far = pathinfo_service_from_url(
        MEMORY,
        &StoreServices::new(blob.clone(), dir.clone(), LazyNarIndex::temporary()),
    )
    .unwrap();
    let cache = arca_store::pathinfoservice::CachePathInfoService::new(near.clone(), far.clone());
    let i = far.put(info("in-far", symlink(), &[])).await.unwrap();
    assert_eq!(near.get(*i.digest()).await.unwrap(), None);
    assert_eq!(cache.get(*i.digest()).await.unwrap(), Some(i.clone()));
    assert_eq!(near.get(*i.digest()).await.unwrap(), Some(i));
}

#[tokio::test]
async fn lru_alone_forgets_least_recently_used() {
    let lru = arca_store::pathinfoservice::LruPathInfoService::new(
        std::num::NonZeroUsize::new(2).unwrap(),
        None,
    );
    let a = lru.put(info("a", symlink(), &[])).await.unwrap();
    let b = lru.put(info("b", symlink(), &[])).await.unwrap();
    lru.get(*a.digest()).await.unwrap();
    lru.put(info("c", symlink(), &[])).await.unwrap();
    assert!(lru.get(*a.digest()).await.unwrap().is_some());
    assert!(lru.get(*b.digest()).await.unwrap().is_none());
}

#[tokio::test]
async fn sled_refuses_corrupt_entries() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("pi.sled");
    let i = info("corrupt-me", symlink(), &[]);
    {
        let s = arca_store::pathinfoservice::SledPathInfoService::open(&path).unwrap();
        s.put(i.clone()).await.unwrap();
        // Store another path's info under i's key.
        let other = info("another", symlink(), &[]);
        use prost::Message;
        drop(s);
        let db = ::sled::open(&path).unwrap();
        db.insert(i.digest(), other.to_proto().unwrap().encode_to_vec())
            .unwrap();
        db.insert(store_path("garbage").digest(), &b"\xff\xff garbage"[..])
            .unwrap();
        db.flush().unwrap();
    }
    let s = arca_store::pathinfoservice::SledPathInfoService::open(&path).unwrap();
    assert!(matches!(s.get(*i.digest()).await, Err(Error::Storage(_))));
    assert!(matches!(
        s.get(*store_path("garbage").digest()).await,
        Err(Error::Storage(_))
    ));
}

// ---------------------------------------------------------------- the wire

struct Wire {
    env: Env,
    client: PathInfoServiceClient<tonic::transport::Channel>,
}

async fn wire() -> Wire {
    let env = make(MEMORY, Layer::Checked, true).await;
    let addr = env._server.as_ref().unwrap().addr;
    Wire {
        client: PathInfoServiceClient::new(channel(addr)),
        env,
    }
}

fn get_req(raw: &[u8]) -> proto::GetPathInfoRequest {
    proto::GetPathInfoRequest {
        by_what: Some(proto::get_path_info_request::ByWhat::ByOutputHash(
            Bytes::copy_from_slice(raw),
        )),
    }
}

#[tokio::test]
async fn wire_get_codes() {
    let mut w = wire().await;
    let e = w.client.get(get_req(&[0; 19])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = w.client.get(get_req(&[0; 32])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = w
        .client
        .get(proto::GetPathInfoRequest { by_what: None })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = w.client.get(get_req(&[0; 20])).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
}

#[tokio::test]
async fn wire_put_returns_stored_and_get_finds_it() {
    let mut w = wire().await;
    let i = info("over-the-wire", symlink(), &[]);
    let back = w
        .client
        .put(i.to_proto().unwrap())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(PathInfo::try_from(back).unwrap(), i);
    let got = w
        .client
        .get(get_req(i.digest()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(PathInfo::try_from(got).unwrap(), i);
    let listed: Vec<proto::PathInfo> = w
        .client
        .list(proto::ListPathInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
}

#[tokio::test]
async fn wire_invalid_pathinfos_are_invalid_argument() {
    let mut w = wire().await;
    let dep = w
        .env
        .pis
        .put(info("wire-dep", symlink(), &[]))
        .await
        .unwrap();
    let good = info("good", symlink(), &[&dep.store_path])
        .to_proto()
        .unwrap();
    // The unmodified one is accepted (so each refusal below is due to its one change).
    w.client.put(good.clone()).await.unwrap();
    type Edit = Box<dyn Fn(&mut proto::PathInfo)>;
    let edits: Vec<(&str, Edit)> = vec![
        ("no node", Box::new(|p| p.node = None)),
        (
            "node name not a basename",
            Box::new(|p| p.node = Some(symlink().into_proto(Bytes::from_static(b"good")))),
        ),
        (
            "node name with bad hash",
            Box::new(|p| {
                p.node = Some(
                    symlink()
                        .into_proto(Bytes::from_static(b"eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-good")),
                )
            }),
        ),
        (
            "empty node name",
            Box::new(|p| p.node = Some(symlink().into_proto(Bytes::new()))),
        ),
        ("no narinfo", Box::new(|p| p.narinfo = None)),
        (
            "reference count mismatch",
            Box::new(|p| p.narinfo.as_mut().unwrap().reference_names.clear()),
        ),
        (
            "extra reference",
            Box::new(|p| p.references.push(Bytes::from_static(&[1; 20]))),
        ),
        (
            "reference digest length",
            Box::new(|p| p.references[0] = Bytes::from_static(&[1; 32])),
        ),
        (
            "reference name mismatch",
            Box::new(|p| {
                p.narinfo.as_mut().unwrap().reference_names[0] = store_path("else").basename()
            }),
        ),
        (
            "nar_sha256 length",
            Box::new(|p| p.narinfo.as_mut().unwrap().nar_sha256 = Bytes::from_static(&[0; 31])),
        ),
        (
            "signature length",
            Box::new(|p| {
                p.narinfo
                    .as_mut()
                    .unwrap()
                    .signatures
                    .push(proto::nar_info::Signature {
                        name: "k".into(),
                        data: Bytes::from_static(&[0; 65]),
                    })
            }),
        ),
        (
            "signature name",
            Box::new(|p| {
                p.narinfo
                    .as_mut()
                    .unwrap()
                    .signatures
                    .push(proto::nar_info::Signature {
                        name: String::new(),
                        data: Bytes::from_static(&[0; 64]),
                    })
            }),
        ),
        (
            "deriver not .drv",
            Box::new(|p| {
                p.narinfo.as_mut().unwrap().deriver = Some(proto::StorePath {
                    name: "x".into(),
                    digest: Bytes::from_static(&[0; 20]),
                })
            }),
        ),
        (
            "deriver digest length",
            Box::new(|p| {
                p.narinfo.as_mut().unwrap().deriver = Some(proto::StorePath {
                    name: "x.drv".into(),
                    digest: Bytes::from_static(&[0; 21]),
                })
            }),
        ),
        (
            "ca digest length",
            Box::new(|p| {
                p.narinfo.as_mut().unwrap().ca = Some(proto::nar_info::Ca {
                    r#type: 1,
                    digest: Bytes::from_static(&[0; 32]),
                })
            }),
        ),
        (
            "ca type",
            Box::new(|p| {
                p.narinfo.as_mut().unwrap().ca = Some(proto::nar_info::Ca {
                    r#type: 99,
                    digest: Bytes::from_static(&[0; 32]),
                })
            }),
        ),
        (
            "file digest length",
            Box::new(|p| {
                p.node = Some(arca_proto::castore::Node {
                    node: Some(arca_proto::castore::node::Node::File(
                        arca_proto::castore::FileNode {
                            name: store_path("good").basename().into(),
                            digest: Bytes::from_static(&[0; 31]),
                            size: 1,
                            executable: false,
                        },
                    )),
                })
            }),
        ),
    ];
    for (what, edit) in edits {
        let mut p = good.clone();
        edit(&mut p);
        let e = w.client.put(p).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
    }
    // Referential integrity refusals are INVALID_ARGUMENT too.
    let absent = B3Digest::of(b"absent");
    let p = info(
        "no-blob",
        Node::File {
            digest: absent,
            size: 1,
            executable: false,
        },
        &[],
    )
    .to_proto()
    .unwrap();
    let e = w.client.put(p).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains(&absent.to_hex()), "{e:?}");
    let p = info("no-ref", symlink(), &[&store_path("not-there")])
        .to_proto()
        .unwrap();
    assert_eq!(
        w.client.put(p).await.unwrap_err().code(),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn calculate_nar_over_grpc_equals_local() {
    let w = wire().await;
    let root = tree(&w.env).await;
    let client = GrpcPathInfoService::from_channel(channel(w.env._server.as_ref().unwrap().addr));
    let Node::Directory { digest, .. } = root else {
        unreachable!()
    };
    let dir = w.env.dir.get(&digest).await.unwrap().unwrap();
    let mut nodes = vec![root.clone()];
    nodes.extend(dir.entries().map(|(_, n)| n.clone()));
    assert_eq!(nodes.len(), 5);
    for node in nodes {
        let local = arca_store::nar::calculate_nar(&node, w.env.blob.clone(), &*w.env.dir)
            .await
            .unwrap();
        assert_eq!(
            client.calculate_nar(&node).await.unwrap(),
            local,
            "{node:?}"
        );
    }
    // A symlink's NAR, checked against the bytes Nix would write.
    let (size, _) = client.calculate_nar(&symlink()).await.unwrap();
    // nix-archive-1 (8+16) ( (8+8) type (8+8) symlink (8+8) target (8+8) <20 bytes> (8+24) ) (8+8)
    assert_eq!(size, 24 + 16 + 16 + 16 + 16 + 32 + 16);

    let mut raw = PathInfoServiceClient::new(channel(w.env._server.as_ref().unwrap().addr));
    let e = raw
        .calculate_nar(symlink().into_proto(Bytes::from_static(b"named")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = raw
        .calculate_nar(arca_proto::castore::Node { node: None })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let absent = B3Digest::of(b"absent blob");
    let e = raw
        .calculate_nar(
            Node::File {
                digest: absent,
                size: 3,
                executable: false,
            }
            .into_proto(Bytes::new()),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = raw
        .calculate_nar(
            Node::Directory {
                digest: absent,
                size: 3,
            }
            .into_proto(Bytes::new()),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
}

/// A client must not accept a PathInfo for another digest than it asked for.
#[tokio::test]
async fn client_checks_the_digest_it_gets() {
    struct Liar(PathInfo);
    #[async_trait::async_trait]
    impl PathInfoService for Liar {
        async fn get(&self, _: [u8; 20]) -> Result<Option<PathInfo>, Error> {
            Ok(Some(self.0.clone()))
        }
        async fn put(&self, i: PathInfo) -> Result<PathInfo, Error> {
            let mut other = self.0.clone();
            other.nar_size = i.nar_size + 1;
            Ok(other)
        }
        fn list(&self) -> futures::stream::BoxStream<'_, Result<PathInfo, Error>> {
            Box::pin(futures::stream::empty())
        }
    }
    let blob: Arc<dyn BlobService> = Arc::new(MemoryBlobService::default());
    let dir: Arc<dyn DirectoryService> = Arc::new(MemoryDirectoryService::default());
    let server = serve(Arc::new(Liar(info("liar", symlink(), &[]))), blob, dir).await;
    let client = GrpcPathInfoService::from_channel(channel(server.addr));
    assert!(matches!(
        client.get(*store_path("honest").digest()).await,
        Err(Error::Storage(_))
    ));
    assert!(client
        .get(*store_path("liar").digest())
        .await
        .unwrap()
        .is_some());
    assert!(matches!(
        client.put(info("liar", symlink(), &[])).await,
        Err(Error::Storage(_))
    ));
}
