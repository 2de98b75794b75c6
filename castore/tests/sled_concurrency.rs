//! Many concurrent writers on a sled-backed directory service must all
//! finish: sled's own `flush_async` deadlocked here under a few hundred
//! concurrent closures (a 1000-path `arca copy` hung its daemon).
use arca_castore::directoryservice::{put_all, DirectoryService, SledDirectoryService};
use arca_castore::{B3Digest, Directory, Node, PathComponent};
use std::sync::Arc;

/// Runs on its own runtime in another thread: a deadlock blocks the
/// runtime's workers (and its timers), so the wait happens outside it.
#[test]
fn hundreds_of_concurrent_closures_all_finish() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let _ = tx.send(rt.block_on(puts()));
    });
    let stored = rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("600 concurrent closure puts on sled did not finish within 120 s (deadlock)");
    assert_eq!(stored, 600);
}

async fn puts() -> usize {
    let tmp = tempfile::tempdir().unwrap();
    let svc: Arc<dyn DirectoryService> =
        Arc::new(SledDirectoryService::open(&tmp.path().join("d.sled")).unwrap());
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..600u32 {
        let svc = svc.clone();
        tasks.spawn(async move {
            let mut leaf = Directory::new();
            let name = PathComponent::try_from(format!("f{i}").as_str()).unwrap();
            leaf.add(
                name,
                Node::File {
                    digest: B3Digest::of(&i.to_le_bytes()),
                    size: 4,
                    executable: false,
                },
            )
            .unwrap();
            let mut root = Directory::new();
            root.add(
                PathComponent::try_from("sub").unwrap(),
                Node::Directory {
                    digest: leaf.digest(),
                    size: leaf.size(),
                },
            )
            .unwrap();
            let want = root.digest();
            let got = put_all(&*svc, [leaf, root]).await.unwrap();
            assert_eq!(got, want);
            got
        });
    }
    let mut roots = Vec::new();
    while let Some(r) = tasks.join_next().await {
        roots.push(r.unwrap());
    }
    for root in roots.iter().take(20) {
        assert!(svc.get(root).await.unwrap().is_some());
    }
    roots.len()
}
