//! Filesystem import into castore (in process, memory services).
mod common;

use arca_castore::blobservice::{read_all, MemoryBlobService};
use arca_castore::directoryservice::{get_closure, MemoryDirectoryService};
use arca_castore::import::{import_path, ImportError, NoProgress};
use arca_castore::{BlobService, DirectoryService, Node};
use std::path::Path;
use std::sync::Arc;

async fn import(
    p: &Path,
) -> Result<(Node, Arc<dyn BlobService>, Arc<dyn DirectoryService>), ImportError> {
    let b: Arc<dyn BlobService> = Arc::new(MemoryBlobService::default());
    let d: Arc<dyn DirectoryService> = Arc::new(MemoryDirectoryService::default());
    let (node, _) = import_path(p, b.clone(), d.clone(), 8, Arc::new(NoProgress)).await?;
    Ok((node, b, d))
}

#[tokio::test]
async fn protocol_test_vector_tree() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("tree");
    std::fs::create_dir_all(root.join("keep")).unwrap();
    std::fs::write(root.join("keep/.keep"), b"").unwrap();
    std::fs::write(root.join(".keep"), b"").unwrap();
    std::os::unix::fs::symlink("/nix/store/somewhereelse", root.join("aa")).unwrap();
    let (node, _, d) = import(&root).await.unwrap();
    let Node::Directory { digest, .. } = node else {
        panic!("{node:?}")
    };
    assert_eq!(
        digest.to_hex(),
        "424a7f6ce08d805d15b428062faae96299a1675d708c3a39261afe38cdd04feb"
    );
    let closure = get_closure(&*d, &digest).await.unwrap();
    assert_eq!(closure.len(), 2);
    let keep = closure[0].get(&"keep".try_into().unwrap()).unwrap();
    assert!(matches!(keep, Node::Directory { size: 2, .. }));
}

#[tokio::test]
async fn hard_links_are_uploaded_once_and_imported_like_copies() {
    let t = tempfile::tempdir().unwrap();
    let linked = t.path().join("linked");
    let copied = t.path().join("copied");
    for root in [&linked, &copied] {
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("a"), b"shared content").unwrap();
    }
    std::fs::hard_link(linked.join("a"), linked.join("sub/b")).unwrap();
    std::fs::write(copied.join("sub/b"), b"shared content").unwrap();
    let (n1, b, _) = import(&linked).await.unwrap();
    let (n2, _, _) = import(&copied).await.unwrap();
    assert_eq!(n1, n2);
    let digest = arca_castore::B3Digest::of(b"shared content");
    assert_eq!(
        read_all(&*b, &digest).await.unwrap().unwrap(),
        b"shared content"
    );
}

#[tokio::test]
async fn single_file_and_symlink_roots() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    let f = t.path().join("tool");
    std::fs::write(&f, b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (node, _, _) = import(&f).await.unwrap();
    assert!(
        matches!(
            node,
            Node::File {
                size: 10,
                executable: true,
                ..
            }
        ),
        "{node:?}"
    );
    let l = t.path().join("link");
    std::os::unix::fs::symlink("tool", &l).unwrap();
    let (node, _, _) = import(&l).await.unwrap();
    assert!(
        matches!(node, Node::Symlink { ref target } if target.as_bytes() == b"tool"),
        "{node:?}"
    );
}

#[tokio::test]
async fn special_files_and_missing_paths_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("tree");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("ok"), b"fine").unwrap();
    let fifo = std::ffi::CString::new(root.join("pipe").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    match import(&root).await {
        Err(ImportError::UnsupportedType { path, kind }) => {
            assert!(path.ends_with("pipe"));
            assert_eq!(kind, "FIFO");
        }
        other => panic!("{:?}", other.map(|r| r.0)),
    }
    assert!(matches!(
        import(&t.path().join("missing")).await,
        Err(ImportError::Io { .. })
    ));
}
