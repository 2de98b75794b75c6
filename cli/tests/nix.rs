//! The Nix layer end to end against the real Nix (Debian's nix-bin 2.8), the
//! oracle: `arca import` vs `nix-store --add`, `arca nar dump` vs
//! `nix-store --dump`, `arca path-info --json` vs `nix path-info --json`.
mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Output, Stdio};

const NIX_CONFIG: &str =
    "build-users-group =\nexperimental-features = nix-command\nsubstituters =\n";

/// Whether the real Nix is here. Under CI=true its absence fails the test.
fn have_nix() -> bool {
    let ok = Command::new("nix-store")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "nix-store not found (scripts/test.sh installs nix-bin)"
        );
        eprintln!("SKIPPED: nix-store not found (run scripts/test.sh to install nix-bin)");
    }
    ok
}

fn nix(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .env("NIX_CONFIG", NIX_CONFIG)
        .output()
        .expect("run nix");
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    out
}

/// `arca ARGS` with all three services on the daemon `d`.
fn store_command(d: &Daemon, args: &[&str]) -> Command {
    let mut command = Command::new(arca_bin());
    command
        .args(args)
        .env("BLOB_SERVICE_ADDR", &d.url)
        .env("DIRECTORY_SERVICE_ADDR", &d.url)
        .env("PATH_INFO_SERVICE_ADDR", &d.url);
    command
}

fn with_store(d: &Daemon, args: &[&str]) -> Output {
    store_command(d, args).output().expect("run arca")
}

/// Checks import, dump and path-info of `tree` against Nix.
fn check_against_nix(d: &Daemon, tree: &Path, nix_root: &Path) {
    let store = format!("local?root={}", nix_root.display());
    let ours = with_store(d, &["import", tree.to_str().unwrap()]);
    assert!(ours.status.success(), "{}", stderr(&ours));
    let theirs = nix(&[
        "nix-store",
        "--store",
        &store,
        "--add",
        tree.to_str().unwrap(),
    ]);
    let path = stdout(&ours).trim().to_string();
    assert_eq!(
        path,
        stdout(&theirs).trim(),
        "store path of {}",
        tree.display()
    );

    let dump = with_store(d, &["nar", "dump", &path]);
    assert!(dump.status.success(), "{}", stderr(&dump));
    let nix_dump = nix(&["nix-store", "--dump", tree.to_str().unwrap()]);
    assert!(
        dump.stdout == nix_dump.stdout,
        "NAR of {} differs from nix-store --dump",
        tree.display()
    );

    let ours: serde_json::Value =
        serde_json::from_slice(&with_store(d, &["path-info", "--json", &path]).stdout).unwrap();
    let theirs: serde_json::Value = serde_json::from_slice(
        &nix(&["nix", "path-info", "--store", &store, "--json", &path]).stdout,
    )
    .unwrap();
    for field in ["path", "narHash", "narSize", "references", "ca"] {
        assert_eq!(
            ours[0][field],
            theirs[0][field],
            "{field} of {}",
            tree.display()
        );
    }
}

#[test]
fn import_dump_and_path_info_agree_with_nix() {
    if !have_nix() {
        return;
    }
    let d = Daemon::start();
    let t = tempfile::tempdir().unwrap();
    let nix_root = t.path().join("nix-root");
    // executables, symlinks (absolute, relative, to a dir), empty files and dirs, a multi-chunk file
    let tree = t.path().join("varied");
    varied_tree(&tree, 5);
    check_against_nix(&d, &tree, &nix_root);
    // a single file and a single executable
    let file = t.path().join("single.txt");
    std::fs::write(&file, b"hello nix\n").unwrap();
    check_against_nix(&d, &file, &nix_root);
    // a real tree of the system: part of its documentation (symlinks, gzip files, deep dirs)
    let docs = t.path().join("doc");
    std::fs::create_dir_all(&docs).unwrap();
    let mut entries: Vec<_> = std::fs::read_dir("/usr/share/doc")
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for e in entries.iter().take(120) {
        let cp = Command::new("cp")
            .arg("-a")
            .arg(e)
            .arg(&docs)
            .status()
            .unwrap();
        assert!(cp.success());
    }
    check_against_nix(&d, &docs, &nix_root);
}

/// `arca nar dump` out of a daemon on this machine: the daemon renders the
/// NAR straight into the command's standard output (a pipe, or a file); a
/// daemon without its local socket is read over gRPC. Both are Nix's bytes.
#[test]
fn nar_dump_rendered_by_the_daemon_or_over_grpc_is_nix_s_nar() {
    if !have_nix() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("varied");
    varied_tree(&tree, 7);
    let nix_dump = nix(&["nix-store", "--dump", tree.to_str().unwrap()]).stdout;
    for (extra, by_daemon) in [(None, true), (Some("off"), false)] {
        let mut args = vec!["--listen", "127.0.0.1:0"];
        if let Some(socket) = extra {
            args.extend(["--ingest-socket", socket]);
        }
        let d = Daemon::start_with(&args);
        let imported = with_store(&d, &["import", tree.to_str().unwrap()]);
        assert!(imported.status.success(), "{}", stderr(&imported));
        let path = stdout(&imported).trim().to_string();
        let dump = |out: Stdio| {
            store_command(&d, &["nar", "dump", &path])
                .env("ARCA_LOG", "arca=debug")
                .stdout(out)
                .stderr(Stdio::piped())
                .output()
                .expect("run arca")
        };
        let piped = dump(Stdio::piped());
        assert!(piped.status.success(), "{}", stderr(&piped));
        assert!(piped.stdout == nix_dump, "NAR through a pipe differs");
        assert_eq!(
            stderr(&piped).contains("the daemon writes the NAR"),
            by_daemon,
            "{}",
            stderr(&piped)
        );
        let file = t.path().join("out.nar");
        let into_file = dump(Stdio::from(std::fs::File::create(&file).unwrap()));
        assert!(into_file.status.success(), "{}", stderr(&into_file));
        assert!(
            std::fs::read(&file).unwrap() == nix_dump,
            "NAR written into a file differs"
        );
    }
}

#[test]
fn nar_add_matches_nix_and_refuses_malformed_nars() {
    if !have_nix() {
        return;
    }
    let d = Daemon::start();
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("tree");
    varied_tree(&tree, 6);
    let nar = nix(&["nix-store", "--dump", tree.to_str().unwrap()]).stdout;
    let nar_file = t.path().join("tree.nar");
    std::fs::write(&nar_file, &nar).unwrap();
    let added = with_store(
        &d,
        &["nar", "add", "--name", "tree", nar_file.to_str().unwrap()],
    );
    assert!(added.status.success(), "{}", stderr(&added));
    let nix_root = t.path().join("nix-root");
    let theirs = nix(&[
        "nix-store",
        "--store",
        &format!("local?root={}", nix_root.display()),
        "--add",
        tree.to_str().unwrap(),
    ]);
    assert_eq!(stdout(&added).trim(), stdout(&theirs).trim());
    let dump = with_store(&d, &["nar", "dump", stdout(&added).trim()]);
    assert!(dump.stdout == nar, "round trip");

    // Truncated, and with trailing garbage: refused, and no path registered.
    for (what, bad) in [
        ("truncated", nar[..nar.len() - 9].to_vec()),
        ("trailing", [nar.clone(), vec![0u8; 8]].concat()),
    ] {
        let f = t.path().join(format!("{what}.nar"));
        std::fs::write(&f, &bad).unwrap();
        let out = with_store(&d, &["nar", "add", "--name", what, f.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{what}: {}", stdout(&out));
        assert!(stdout(&out).is_empty(), "{what}");
    }
}

#[test]
fn missing_paths_exit_one() {
    let d = Daemon::start();
    let missing = "/nix/store/00000000000000000000000000000000-nothing";
    for args in [vec!["path-info", missing], vec!["nar", "dump", missing]] {
        let out = with_store(&d, &args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(stderr(&out).contains("is not valid"), "{}", stderr(&out));
    }
    let out = with_store(&d, &["path-info", "not-a-store-path"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn daemon_signatures_are_the_ones_nix_makes_and_verifies() {
    if !have_nix() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let sk = t.path().join("secret.key");
    let secret = nix(&["nix", "key", "generate-secret", "--key-name", "arca-test-1"]).stdout;
    std::fs::write(&sk, &secret).unwrap();
    let public = Command::new("nix")
        .args(["key", "convert-secret-to-public"])
        .env("NIX_CONFIG", NIX_CONFIG)
        .stdin(std::fs::File::open(&sk).unwrap())
        .output()
        .unwrap();
    assert!(public.status.success());
    let public = stdout(&public).trim().to_string();

    let d = Daemon::start_with(&[
        "--listen",
        "127.0.0.1:0",
        "--signing-key",
        sk.to_str().unwrap(),
    ]);
    let tree = t.path().join("signed-tree");
    varied_tree(&tree, 8);
    let out = with_store(&d, &["import", tree.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let path = stdout(&out).trim().to_string();
    let ours: serde_json::Value =
        serde_json::from_slice(&with_store(&d, &["path-info", "--json", &path]).stdout).unwrap();
    let our_sigs = ours[0]["signatures"].as_array().expect("signed").clone();
    assert_eq!(our_sigs.len(), 1);
    assert!(our_sigs[0].as_str().unwrap().starts_with("arca-test-1:"));

    // Nix signs the same path in its own store: ed25519 is deterministic, so
    // the signatures must be identical, and Nix verifies them.
    let store = format!("local?root={}", t.path().join("nix-root").display());
    nix(&[
        "nix-store",
        "--store",
        &store,
        "--add",
        tree.to_str().unwrap(),
    ]);
    nix(&[
        "nix",
        "store",
        "sign",
        "--store",
        &store,
        "--key-file",
        sk.to_str().unwrap(),
        &path,
    ]);
    let theirs: serde_json::Value = serde_json::from_slice(
        &nix(&[
            "nix",
            "path-info",
            "--store",
            &store,
            "--json",
            "--sigs",
            &path,
        ])
        .stdout,
    )
    .unwrap();
    assert_eq!(theirs[0]["signatures"], serde_json::Value::Array(our_sigs));
    nix(&[
        "nix",
        "store",
        "verify",
        "--store",
        &store,
        "--sigs-needed",
        "1",
        "--trusted-public-keys",
        &public,
        &path,
    ]);
}

/// Builds the shared real-Nix fixture (a 6-path closure and binary caches).
fn fixture() -> tempfile::TempDir {
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/make-nix-fixture.sh");
    assert!(script.exists(), "{} missing", script.display());
    let out = tempfile::tempdir().unwrap();
    let status = Command::new("bash")
        .arg(&script)
        .arg(out.path())
        .env("FIXTURE_HTTP_SELFTEST", "0")
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "make-nix-fixture.sh failed");
    out
}

#[test]
fn fixture_closure_trees_and_narinfos() {
    if !have_nix() {
        return;
    }
    let fx = fixture();
    let d = Daemon::start();
    let nix_root = fx.path().join("check-root");
    let closure = std::fs::read_to_string(fx.path().join("closure.txt")).unwrap();
    let paths: Vec<&str> = closure.lines().filter(|l| !l.is_empty()).collect();
    assert!(paths.len() >= 6, "{closure}");
    for p in &paths {
        let tree = fx.path().join("nix-root").join(p.trim_start_matches('/'));
        check_against_nix(&d, &tree, &nix_root);
    }
    // Every narinfo of every fixture cache parses and writes back byte for byte.
    let mut count = 0;
    for cache in ["cache-xz", "cache-none", "cache-zstd", "cache-xz-signed"] {
        for e in std::fs::read_dir(fx.path().join(cache)).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "narinfo") {
                let text = std::fs::read_to_string(e.path()).unwrap();
                let parsed: arca_store::NarInfo = text
                    .parse()
                    .unwrap_or_else(|err| panic!("{}: {err}", e.path().display()));
                assert_eq!(parsed.to_string(), text, "{}", e.path().display());
                count += 1;
            }
        }
    }
    assert_eq!(count, 4 * paths.len(), "one narinfo per path per cache");
}
