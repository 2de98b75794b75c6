//! End-to-end tests of `arca daemon` and `arca castore` with the real binary.
mod common;

use common::*;
use std::process::Command;

#[test]
fn import_prints_the_protocol_test_vector() {
    let d = Daemon::start();
    let t = tempfile::tempdir().unwrap();
    protocol_tree(&t.path().join("tree"));
    let out = d.arca(&["castore", "import", t.path().join("tree").to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let node: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(node["type"], "directory");
    assert_eq!(
        node["digest"],
        "424a7f6ce08d805d15b428062faae96299a1675d708c3a39261afe38cdd04feb"
    );
    // and it is listable, with the keep entry's size 2
    let ls = d.arca(&[
        "castore",
        "ls",
        "--json",
        "424a7f6ce08d805d15b428062faae96299a1675d708c3a39261afe38cdd04feb",
    ]);
    assert!(ls.status.success(), "{}", stderr(&ls));
    let entries: serde_json::Value = serde_json::from_str(&stdout(&ls)).unwrap();
    let keep = entries
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "keep")
        .unwrap();
    assert_eq!(keep["size"], 2);
    let aa = entries
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "aa")
        .unwrap();
    assert_eq!(aa["target"], "/nix/store/somewhereelse");
}

#[test]
fn second_import_adds_no_stored_bytes() {
    let d = Daemon::start();
    let t = tempfile::tempdir().unwrap();
    varied_tree(&t.path().join("tree"), 7);
    let tree = t.path().join("tree");
    let first = d.arca(&["castore", "import", tree.to_str().unwrap()]);
    assert!(first.status.success(), "{}", stderr(&first));
    let after_first = d.blob_bytes();
    let dirs_first = dir_bytes(&d.data.path().join("directories.sled"));
    assert!(after_first > 0);
    let second = d.arca(&["castore", "import", tree.to_str().unwrap()]);
    assert!(second.status.success(), "{}", stderr(&second));
    assert_eq!(stdout(&first), stdout(&second));
    assert_eq!(
        d.blob_bytes(),
        after_first,
        "second import stored blob bytes"
    );
    eprintln!(
        "blob bytes after first import: {after_first}, after second: {}; sled bytes {dirs_first} -> {}",
        d.blob_bytes(),
        dir_bytes(&d.data.path().join("directories.sled"))
    );
}

#[test]
fn sixteen_concurrent_clients_get_correct_digests() {
    let d = Daemon::start();
    let t = tempfile::tempdir().unwrap();
    // Eight distinct trees, each imported by two clients at once; trees share some files.
    let trees: Vec<_> = (0..8u64)
        .map(|i| {
            let p = t.path().join(format!("tree{i}"));
            varied_tree(&p, i % 3 + 1);
            std::fs::write(p.join(format!("unique-{i}")), format!("tree {i}")).unwrap();
            p
        })
        .collect();
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let tree = trees[i % 8].clone();
            let url = d.url.clone();
            std::thread::spawn(move || {
                let out = Command::new(arca_bin())
                    .args(["castore", "import", tree.to_str().unwrap()])
                    .env("BLOB_SERVICE_ADDR", &url)
                    .env("DIRECTORY_SERVICE_ADDR", &url)
                    .output()
                    .unwrap();
                (tree, out)
            })
        })
        .collect();
    for h in handles {
        let (tree, out) = h.join().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let got: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        assert_eq!(got, expected_node(&tree), "{}", tree.display());
    }
}

#[test]
fn import_keeps_exec_bit_and_never_follows_symlinks() {
    let d = Daemon::start();
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("tree");
    varied_tree(&tree, 3);
    let out = d.arca(&["castore", "import", tree.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let root: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let ls = |digest: &str| -> serde_json::Value {
        let o = d.arca(&["castore", "ls", "--json", digest]);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_str(&stdout(&o)).unwrap()
    };
    let entry = |list: &serde_json::Value, name: &str| -> serde_json::Value {
        list.as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("{name}"))
            .clone()
    };
    let top = ls(root["digest"].as_str().unwrap());
    assert_eq!(entry(&top, "etc-link")["type"], "symlink");
    assert_eq!(entry(&top, "etc-link")["target"], "/etc");
    assert_eq!(entry(&top, "empty")["type"], "directory");
    let bin = ls(entry(&top, "bin")["digest"].as_str().unwrap());
    assert_eq!(entry(&bin, "tool")["executable"], true);
    assert_eq!(entry(&bin, "docs")["type"], "symlink");
    let share = ls(entry(&top, "share")["digest"].as_str().unwrap());
    assert_eq!(entry(&share, "tool-copy")["executable"], false);
    assert_eq!(
        entry(&share, "tool-copy")["digest"],
        entry(&bin, "tool")["digest"],
        "same content, one blob"
    );
    // cat gives the bytes back
    let cat = d.arca(&[
        "castore",
        "cat",
        entry(&bin, "tool")["digest"].as_str().unwrap(),
    ]);
    assert_eq!(cat.stdout, std::fs::read(tree.join("bin/tool")).unwrap());
}

#[test]
fn special_files_are_refused_with_their_path_and_nothing_is_stored() {
    let d = Daemon::start();
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("tree");
    varied_tree(&tree, 4);
    let fifo = tree.join("share/a-fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let out = d.arca(&["castore", "import", tree.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("a-fifo") && stderr(&out).contains("FIFO"),
        "{}",
        stderr(&out)
    );
    assert_eq!(d.blob_bytes(), 0, "nothing uploaded");
    std::fs::remove_file(&fifo).unwrap();

    let sock = tree.join("bin/a-socket");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let out = d.arca(&["castore", "import", tree.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("a-socket") && stderr(&out).contains("socket"),
        "{}",
        stderr(&out)
    );
    assert_eq!(d.blob_bytes(), 0, "nothing uploaded");
}

#[test]
fn missing_objects_and_bad_input_exit_nonzero_with_one_line() {
    let d = Daemon::start();
    let unknown = "00".repeat(32);
    for args in [
        vec!["castore", "cat", unknown.as_str()],
        vec!["castore", "ls", unknown.as_str()],
    ] {
        let out = d.arca(&args);
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr(&out).contains("not found"), "{}", stderr(&out));
        assert_eq!(stderr(&out).trim().lines().count(), 1, "{}", stderr(&out));
    }
    let out = d.arca(&["castore", "cat", "xyz"]);
    assert_eq!(out.status.code(), Some(2), "usage error");
    let out = Command::new(arca_bin())
        .args(["castore", "ls", unknown.as_str()])
        .env("BLOB_SERVICE_ADDR", "sled:///tmp/x")
        .env("DIRECTORY_SERVICE_ADDR", &d.url)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not available for blob"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn composition_file_cycles_and_unknown_names_are_refused_at_start() {
    let t = tempfile::tempdir().unwrap();
    let f = t.path().join("store.toml");
    std::fs::write(
        &f,
        "[blobservices.default]\ntype=\"cache\"\nnear=\"a\"\nfar=\"b\"\n[blobservices.a]\ntype=\"memory\"\n[blobservices.b]\ntype=\"cache\"\nnear=\"a\"\nfar=\"default\"\n[directoryservices.default]\ntype=\"memory\"\n",
    )
    .unwrap();
    let out = Command::new(arca_bin())
        .args(["daemon", "--store-composition", f.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let msg = stderr(&out);
    assert!(
        msg.contains("reference cycle")
            && (msg.contains("default -> b -> default") || msg.contains("b -> default -> b")),
        "{msg}"
    );
    std::fs::write(&f, "[blobservices.default]\ntype=\"cache\"\nnear=\"a\"\nfar=\"ghost\"\n[blobservices.a]\ntype=\"memory\"\n").unwrap();
    let out = Command::new(arca_bin())
        .args(["daemon", "--store-composition", f.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("\"ghost\""), "{}", stderr(&out));
}

#[test]
fn daemon_serves_a_composition_file() {
    let t = tempfile::tempdir().unwrap();
    let f = t.path().join("store.toml");
    std::fs::write(
        &f,
        format!(
            "[blobservices.default]\ntype=\"cache\"\nnear=\"mem\"\nfar=\"disk\"\n[blobservices.mem]\ntype=\"memory\"\n[blobservices.disk]\ntype=\"objectstore\"\nurl=\"file://{}/b\"\n[directoryservices.default]\ntype=\"lru\"\ncapacity=1000\ninner=\"sled:///{}/d\"\n[pathinfoservices.default]\ntype=\"lru\"\ncapacity=1000\ninner=\"disk\"\n[pathinfoservices.disk]\ntype=\"sled\"\npath=\"{}/p\"\n",
            t.path().display(),
            t.path().display(),
            t.path().display()
        ),
    )
    .unwrap();
    let d = Daemon::start_with(&[
        "--listen",
        "127.0.0.1:0",
        "--store-composition",
        f.to_str().unwrap(),
    ]);
    let tree = t.path().join("tree");
    protocol_tree(&tree);
    let out = d.arca(&["castore", "import", tree.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("424a7f6ce08d805d15b428062faae96299a1675d708c3a39261afe38cdd04feb")
    );
    assert!(
        dir_bytes(&t.path().join("b")) > 0,
        "blobs reached the far store"
    );
    // the Nix layer goes through [pathinfoservices]
    let out = Command::new(arca_bin())
        .args(["import", tree.to_str().unwrap()])
        .env("BLOB_SERVICE_ADDR", &d.url)
        .env("DIRECTORY_SERVICE_ADDR", &d.url)
        .env("PATH_INFO_SERVICE_ADDR", &d.url)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("/nix/store/"), "{}", stdout(&out));
    assert!(
        t.path().join("p").exists(),
        "path infos reached the sled entry of the file"
    );
}

#[test]
fn sigterm_drains_and_exits_zero_and_unix_socket_works() {
    let t = tempfile::tempdir().unwrap();
    let sock = t.path().join("arca.sock");
    let listen = format!("unix://{}", sock.display());
    let mut d = Daemon::start_with(&["--listen", &listen]);
    assert!(d.url.starts_with("grpc+unix://"), "{}", d.url);
    let tree = t.path().join("tree");
    protocol_tree(&tree);
    let out = d.arca(&["castore", "import", tree.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("424a7f6ce08d805d15b428062faae96299a1675d708c3a39261afe38cdd04feb")
    );
    let status = d.stop();
    assert_eq!(status.code(), Some(0));
    assert!(!sock.exists(), "socket removed on exit");
}

#[test]
fn health_and_reflection_are_served() {
    let d = Daemon::start();
    let addr = d.url.trim_start_matches("grpc+").to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(addr)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        for service in [
            "",
            "tvix.castore.v1.BlobService",
            "tvix.castore.v1.DirectoryService",
        ] {
            let resp = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(
                resp.status(),
                tonic_health::pb::health_check_response::ServingStatus::Serving,
                "{service:?}"
            );
        }
        use tonic_reflection::pb::v1::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
            ServerReflectionRequest,
        };
        let mut refl = ServerReflectionClient::new(channel);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut resp = refl
            .server_reflection_info(futures::stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        let msg = resp.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
            panic!("unexpected")
        };
        let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
        for want in [
            "tvix.castore.v1.BlobService",
            "tvix.castore.v1.DirectoryService",
            "grpc.health.v1.Health",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from {names:?}"
            );
        }
    });
}

#[test]
fn daemon_refuses_to_forward_to_itself() {
    let out = Command::new(arca_bin())
        .args(["daemon", "--listen", "127.0.0.1:18555"])
        .env("BLOB_SERVICE_ADDR", "grpc+http://127.0.0.1:18555")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("own address"), "{}", stderr(&out));
}

/// A client on the daemon's machine hands it open files (local ingest) and
/// gets the digests an in-process import computes; with the socket off it
/// uploads over gRPC, with the same result.
#[test]
fn local_clients_hand_open_files_to_the_daemon() {
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("tree");
    varied_tree(&tree, 11);
    let expected = expected_node(&tree);
    let big = bytes_for(11, 3 * 1024 * 1024 + 11);

    for (args, local) in [
        (&["--listen", "127.0.0.1:0"][..], true),
        (
            &["--listen", "127.0.0.1:0", "--ingest-socket", "off"][..],
            false,
        ),
    ] {
        let mut d = Daemon::start_with(args);
        let socket = d.data.path().join("ingest.sock");
        assert_eq!(socket.exists(), local, "{args:?}");
        let out = Command::new(arca_bin())
            .args(["castore", "import", tree.to_str().unwrap()])
            .env("BLOB_SERVICE_ADDR", &d.url)
            .env("DIRECTORY_SERVICE_ADDR", &d.url)
            .env("ARCA_LOG", "arca_castore=debug")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let got: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        assert_eq!(got, expected, "{args:?}");
        assert_eq!(
            stderr(&out).contains("handing files to the daemon"),
            local,
            "{args:?}: {}",
            stderr(&out)
        );
        // The large file reads back (stored whole until the compactor chunks it).
        let digest = arca_castore::B3Digest::of(&big).to_hex();
        let cat = d.arca(&["castore", "cat", &digest]);
        assert!(cat.status.success(), "{}", stderr(&cat));
        assert!(cat.stdout == big, "{args:?}: content differs");
        assert!(d.stop().success());
        assert!(!socket.exists(), "socket removed at exit");
    }
}
