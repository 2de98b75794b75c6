//! Filesystem import into castore (in process, memory services).
mod common;

use arca_castore::blobservice::{read_all, MemoryBlobService};
use arca_castore::directoryservice::{get_closure, MemoryDirectoryService};
use arca_castore::import::{import_path, import_path_with, DigestBoard, ImportError, NoProgress};
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

/// A tree of a few files in two directories; returns its root.
fn small_tree(t: &Path) -> std::path::PathBuf {
    let root = t.join("tree");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("a"), b"first file").unwrap();
    std::fs::write(root.join("sub/b"), b"second file").unwrap();
    std::fs::write(root.join("sub/c"), b"").unwrap();
    root
}

/// A closed board claiming `contents` (digest and size) for files under `root`.
fn claimed(root: &Path, contents: &[(&str, &[u8])]) -> Arc<DigestBoard> {
    let board = Arc::new(DigestBoard::new());
    for (rel, data) in contents {
        board.publish(
            &root.join(rel),
            arca_castore::B3Digest::of(data),
            data.len() as u64,
        );
    }
    board.close(Ok(()));
    board
}

async fn import_with_board(
    root: &Path,
    board: Arc<DigestBoard>,
) -> Result<(Node, Arc<dyn BlobService>, Arc<dyn DirectoryService>), ImportError> {
    let b: Arc<dyn BlobService> = Arc::new(MemoryBlobService::default());
    let d: Arc<dyn DirectoryService> = Arc::new(MemoryDirectoryService::default());
    let (node, _) =
        import_path_with(root, b.clone(), d.clone(), 8, Arc::new(NoProgress), board).await?;
    Ok((node, b, d))
}

#[tokio::test]
async fn digests_published_by_another_pass_are_used_as_they_arrive() {
    let t = tempfile::tempdir().unwrap();
    let root = small_tree(t.path());
    let (expected, _, _) = import(&root).await.unwrap();
    let board = Arc::new(DigestBoard::new());
    // Published after the import started waiting, one at a time.
    let publisher = {
        let (board, root) = (board.clone(), root.clone());
        tokio::spawn(async move {
            for rel in ["a", "sub/b", "sub/c"] {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                let p = root.join(rel);
                let data = std::fs::read(&p).unwrap();
                board.publish(&p, arca_castore::B3Digest::of(&data), data.len() as u64);
            }
            board.close(Ok(()));
        })
    };
    let (node, b, _) = import_with_board(&root, board).await.unwrap();
    publisher.await.unwrap();
    assert_eq!(node, expected);
    let digest = arca_castore::B3Digest::of(b"second file");
    assert_eq!(
        read_all(&*b, &digest).await.unwrap().unwrap(),
        b"second file"
    );
}

#[tokio::test]
async fn a_published_digest_the_file_does_not_match_fails_the_import_and_stores_no_tree() {
    let t = tempfile::tempdir().unwrap();
    let root = small_tree(t.path());
    // As if sub/b changed between the pass that hashed it and the upload (same size).
    let board = claimed(
        &root,
        &[
            ("a", b"first file"),
            ("sub/b", b"second filE"),
            ("sub/c", b""),
        ],
    );
    let b: Arc<dyn BlobService> = Arc::new(MemoryBlobService::default());
    let d: Arc<dyn DirectoryService> = Arc::new(MemoryDirectoryService::default());
    let Err(err) =
        import_path_with(&root, b.clone(), d.clone(), 8, Arc::new(NoProgress), board).await
    else {
        panic!("imported")
    };
    assert!(
        matches!(&err, ImportError::ContentChanged { path } if path.ends_with("sub/b")),
        "{err}"
    );
    // Neither the wrong blob nor any directory is there.
    assert!(!b
        .has(&arca_castore::B3Digest::of(b"second filE"))
        .await
        .unwrap());
    let (good, _, _) = import(&root).await.unwrap();
    let Node::Directory { digest, .. } = good else {
        panic!("{good:?}")
    };
    assert!(d.get(&digest).await.unwrap().is_none());
}

/// Through a daemon (the gRPC writer checks the server's digest against the
/// one announced), a file changed after it was hashed is reported as such.
#[tokio::test]
async fn a_file_changed_after_hashing_is_reported_through_grpc_too() {
    let t = tempfile::tempdir().unwrap();
    let root = small_tree(t.path());
    // As if sub/b changed between the pass that hashed it and the upload (same size).
    let board = claimed(
        &root,
        &[
            ("a", b"first file"),
            ("sub/b", b"second filE"),
            ("sub/c", b""),
        ],
    );
    let (b, d, _g) = common::behind_grpc(common::from_urls("memory://", "memory://")).await;
    let Err(err) = import_path_with(&root, b, d, 8, Arc::new(NoProgress), board).await else {
        panic!("imported")
    };
    assert!(
        matches!(&err, ImportError::ContentChanged { path } if path.ends_with("sub/b")),
        "{err}"
    );
}

#[tokio::test]
async fn a_published_size_other_than_the_walks_fails_the_import() {
    let t = tempfile::tempdir().unwrap();
    let root = small_tree(t.path());
    let board = claimed(&root, &[("a", b"first file, longer")]);
    let Err(err) = import_with_board(&root, board).await else {
        panic!("imported")
    };
    assert!(
        matches!(&err, ImportError::Changed { path, expected: 10, actual: 18 } if path.ends_with("a")),
        "{err}"
    );
}

#[tokio::test]
async fn a_board_closed_without_a_file_fails_the_import_with_the_passes_error() {
    let t = tempfile::tempdir().unwrap();
    let root = small_tree(t.path());
    let board = Arc::new(DigestBoard::new());
    board.publish(
        &root.join("a"),
        arca_castore::B3Digest::of(b"first file"),
        b"first file".len() as u64,
    );
    board.close(Err("the NAR pass failed: disk on fire".into()));
    let Err(err) = import_with_board(&root, board).await else {
        panic!("imported")
    };
    assert!(err.to_string().contains("disk on fire"), "{err}");

    let board = Arc::new(DigestBoard::new());
    board.close(Ok(()));
    let Err(err) = import_with_board(&root, board).await else {
        panic!("imported")
    };
    assert!(err.to_string().contains("no digest was published"), "{err}");
}

/// A path the walk saw as a regular file but that is a symlink or a FIFO
/// when it is opened (swapped in between) is refused: never followed, and
/// never waited on (a FIFO's open would block until a writer appears).
#[tokio::test]
async fn files_swapped_for_symlinks_or_fifos_are_refused() {
    use arca_castore::import::{open_regular_file, read_file_pieces, FileDigests, HashLocally};
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("target");
    std::fs::write(&target, b"content the link points to").unwrap();
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let fifo = tmp.path().join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let limit = std::time::Duration::from_secs(10);
    for path in [&link, &fifo] {
        assert!(open_regular_file(path).is_err(), "{}", path.display());
        let hashed = tokio::time::timeout(limit, HashLocally.digest(path))
            .await
            .expect("hashing must not block");
        assert!(hashed.is_err(), "{}: {hashed:?}", path.display());
        let mut pieces = read_file_pieces(path.clone());
        let first = tokio::time::timeout(limit, pieces.recv())
            .await
            .expect("reading must not block");
        assert!(
            matches!(first, Some(Err(_))),
            "{}: {first:?}",
            path.display()
        );
    }
    // The regular file itself is read and hashed.
    let (digest, size) = HashLocally.digest(&target).await.unwrap();
    assert_eq!(
        digest,
        arca_castore::B3Digest::of(b"content the link points to")
    );
    assert_eq!(size, 26);
}
