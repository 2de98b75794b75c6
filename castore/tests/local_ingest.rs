//! Local ingest: a daemon takes open files over a Unix socket. What a
//! client passes is checked; a bad request gets an error answer and stores
//! nothing, and the connection stays usable.
use arca_castore::blobservice::{read_all, BlobService, MemoryBlobService};
use arca_castore::local_ingest::{self, LocalIngestClient, HELLO, TOKEN_LEN};
use arca_castore::B3Digest;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use std::io::{IoSlice, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;

struct Server {
    path: PathBuf,
    token: [u8; TOKEN_LEN],
    blobs: Arc<MemoryBlobService>,
    task: tokio::task::JoinHandle<()>,
    _tmp: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn start() -> Server {
    start_exporting(None)
}

/// A server whose socket takes exports with `export`.
fn start_exporting(export: Option<Arc<dyn local_ingest::LocalExport>>) -> Server {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("ingest.sock");
    let token = local_ingest::new_token().unwrap();
    let blobs = Arc::new(MemoryBlobService::default());
    let listener = local_ingest::bind(&path).unwrap();
    let task = tokio::spawn(local_ingest::serve(listener, token, blobs.clone(), export));
    Server {
        path,
        token,
        blobs,
        task,
        _tmp: tmp,
    }
}

/// A file with `data` in a temporary directory (kept by the caller).
fn file_with(dir: &tempfile::TempDir, name: &str, data: &[u8]) -> std::fs::File {
    let p = dir.path().join(name);
    std::fs::write(&p, data).unwrap();
    std::fs::File::open(p).unwrap()
}

/// A raw connection to the socket at `path`, its greeting checked.
fn raw_connection(path: &std::path::Path, token: [u8; TOKEN_LEN]) -> UnixStream {
    let mut c = UnixStream::connect(path).unwrap();
    let mut hello = [0u8; 8 + TOKEN_LEN];
    c.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..8], HELLO);
    assert_eq!(hello[8..], token);
    c
}

fn send(c: &UnixStream, byte: u8, fds: &[i32]) {
    let cmsgs: Vec<ControlMessage> = if fds.is_empty() {
        vec![]
    } else {
        vec![ControlMessage::ScmRights(fds)]
    };
    let n = sendmsg::<()>(
        c.as_raw_fd(),
        &[IoSlice::new(&[byte])],
        &cmsgs,
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    assert_eq!(n, 1);
}

/// Reads one answer: `Ok((digest, size))` or `Err((kind, message))`.
fn answer(c: &mut UnixStream) -> Result<(B3Digest, u64), (u8, String)> {
    let mut status = [0u8; 1];
    c.read_exact(&mut status).unwrap();
    if status[0] == 0 {
        let mut d = [0u8; 32];
        c.read_exact(&mut d).unwrap();
        let mut n = [0u8; 8];
        c.read_exact(&mut n).unwrap();
        return Ok((B3Digest::from(d), u64::from_le_bytes(n)));
    }
    Err(error_answer(c, status[0]))
}

/// The rest of an error answer after its status byte: (kind, message).
fn error_answer(c: &mut UnixStream, status: u8) -> (u8, String) {
    assert_eq!(status, 1, "status byte");
    let mut head = [0u8; 5];
    c.read_exact(&mut head).unwrap();
    let len = u32::from_le_bytes(head[1..].try_into().unwrap()) as usize;
    let mut text = vec![0u8; len];
    c.read_exact(&mut text).unwrap();
    (head[0], String::from_utf8(text).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hands_over_open_files() {
    let s = start();
    let client = LocalIngestClient::connect(s.path.clone(), s.token)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let file = file_with(&dir, "big", &data);
    let (digest, size) = client.put_file(&file).await.unwrap();
    assert_eq!((digest, size), (B3Digest::of(&data), data.len() as u64));
    assert_eq!(read_all(&*s.blobs, &digest).await.unwrap().unwrap(), data);

    // Many at once (one connection each), and the empty file.
    let files: Vec<(Vec<u8>, std::fs::File)> = (0..20u8)
        .map(|i| {
            let d = vec![i; usize::from(i) * 1000];
            let f = file_with(&dir, &format!("f{i}"), &d);
            (d, f)
        })
        .collect();
    let results = futures::future::join_all(files.iter().map(|(_, f)| client.put_file(f))).await;
    for ((d, _), r) in files.iter().zip(results) {
        assert_eq!(r.unwrap(), (B3Digest::of(d), d.len() as u64));
        assert!(s.blobs.has(&B3Digest::of(d)).await.unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_errors_store_nothing_and_keep_the_connection() {
    let s = start();
    let dir = tempfile::tempdir().unwrap();
    let good = b"stored at last".to_vec();
    let good_file = file_with(&dir, "good", &good);
    let other = file_with(&dir, "other", b"never stored");
    let (path, token) = (s.path.clone(), s.token);
    let answers = tokio::task::spawn_blocking(move || {
        let mut c = raw_connection(&path, token);
        let mut out = Vec::new();
        // No descriptor.
        send(&c, b'P', &[]);
        out.push(answer(&mut c));
        // Two descriptors.
        send(&c, b'P', &[other.as_raw_fd(), other.as_raw_fd()]);
        out.push(answer(&mut c));
        // Not a regular file: a pipe (the daemon must not wait on it).
        let (r, _w) = std::io::pipe().unwrap();
        send(&c, b'P', &[r.as_raw_fd()]);
        out.push(answer(&mut c));
        // Not open for reading.
        let wo = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("other"))
            .unwrap();
        send(&c, b'P', &[wo.as_raw_fd()]);
        out.push(answer(&mut c));
        // An unknown request byte.
        send(&c, b'X', &[other.as_raw_fd()]);
        out.push(answer(&mut c));
        // And then a good request on the same connection.
        send(&c, b'P', &[good_file.as_raw_fd()]);
        out.push(answer(&mut c));
        out
    })
    .await
    .unwrap();
    let expect = [
        "exactly one file descriptor, not 0",
        "exactly one file descriptor, not 2",
        "not a regular file",
        "not open for reading",
        "unknown request byte 0x58",
    ];
    for (a, text) in answers.iter().zip(expect) {
        let (_, message) = a.as_ref().expect_err("refused");
        assert!(message.contains(text), "{message:?} lacks {text:?}");
    }
    assert_eq!(
        answers[5].as_ref().unwrap(),
        &(B3Digest::of(&good), good.len() as u64)
    );
    assert!(!s.blobs.has(&B3Digest::of(b"never stored")).await.unwrap());
    assert!(!s.blobs.has(&B3Digest::of(b"")).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_of_another_daemon_is_not_used() {
    let s = start();
    let mut wrong = s.token;
    wrong[0] ^= 1;
    let err = LocalIngestClient::connect(s.path.clone(), wrong)
        .await
        .err()
        .expect("other token");
    assert!(err.to_string().contains("is not the socket"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_mid_request_harms_nothing() {
    let s = start();
    let (path, token) = (s.path.clone(), s.token);
    let dir = tempfile::tempdir().unwrap();
    let data = vec![9u8; 100_000];
    let f = file_with(&dir, "f", &data);
    tokio::task::spawn_blocking(move || {
        let mut c = raw_connection(&path, token);
        send(&c, b'P', &[f.as_raw_fd()]);
        // Half a request byte stream and gone.
        c.write_all(b"P").unwrap();
    })
    .await
    .unwrap();
    // The server is still serving.
    let client = LocalIngestClient::connect(s.path.clone(), s.token)
        .await
        .unwrap();
    let g = file_with(&dir, "g", b"after");
    assert_eq!(
        client.put_file(&g).await.unwrap(),
        (B3Digest::of(b"after"), 5)
    );
}

/// A gRPC client whose daemon's socket goes away (a restarted daemon) falls
/// back to uploading over gRPC, the file from where it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_socket_falls_back_to_grpc_uploads() {
    use arca_castore::blobservice::GrpcBlobService;
    use arca_castore::grpc::{GrpcBlobServiceWrapper, GrpcLocalIngestWrapper};
    let s = start();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(GrpcBlobServiceWrapper::new(s.blobs.clone()).into_server())
            .add_service(
                GrpcLocalIngestWrapper::new(s.path.display().to_string(), s.token).into_server(),
            )
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let url = url::Url::parse(&format!("grpc+http://{addr}")).unwrap();
    let channel = arca_castore::grpc::channel_from_url(&url).unwrap();
    let client = GrpcBlobService::from_channels(vec![channel])
        .unwrap()
        .with_local_ingest(true);
    assert!(client.direct_file_puts().await, "the socket is offered");

    let dir = tempfile::tempdir().unwrap();
    let first = file_with(&dir, "first", b"through the socket");
    let (d1, _) = client.put_file(first, None).await.unwrap();
    assert!(s.blobs.has(&d1).await.unwrap());

    // The socket goes; a file read partly already is uploaded from there.
    s.task.abort();
    let _ = std::fs::remove_file(&s.path);
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    let mut second = file_with(&dir, "second", &data);
    std::io::Read::read_exact(&mut second, &mut [0u8; 1000]).unwrap();
    let (d2, n) = client.put_file(second, None).await.unwrap();
    assert_eq!(
        (d2, n),
        (B3Digest::of(&data[1000..]), data.len() as u64 - 1000)
    );
    assert_eq!(
        read_all(&*s.blobs, &d2).await.unwrap().unwrap(),
        &data[1000..]
    );
    assert!(!client.direct_file_puts().await, "no longer offered");
    server.abort();
}

/// Exports the request's bytes `repeat` times; a request "wait" waits until
/// cancelled, and says so in `cancelled`.
struct Echo {
    repeat: usize,
    cancelled: Arc<tokio::sync::Notify>,
}

#[async_trait::async_trait]
impl local_ingest::LocalExport for Echo {
    async fn export(
        &self,
        request: bytes::Bytes,
        out: std::os::fd::OwnedFd,
    ) -> Result<u64, arca_castore::Error> {
        if &request[..] == b"wait" {
            struct Tell(Arc<tokio::sync::Notify>);
            impl Drop for Tell {
                fn drop(&mut self) {
                    self.0.notify_one();
                }
            }
            let _tell = Tell(self.cancelled.clone());
            std::future::pending::<()>().await;
        }
        if &request[..] == b"fail" {
            return Err(arca_castore::Error::NotFound("no such thing".into()));
        }
        let mut out = std::fs::File::from(out);
        for _ in 0..self.repeat {
            out.write_all(&request).unwrap();
        }
        Ok((request.len() * self.repeat) as u64)
    }
}

fn echo_server(repeat: usize) -> (Server, Arc<tokio::sync::Notify>) {
    let cancelled = Arc::new(tokio::sync::Notify::new());
    let echo = Echo {
        repeat,
        cancelled: cancelled.clone(),
    };
    (start_exporting(Some(Arc::new(echo))), cancelled)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_exports_into_the_descriptor_passed() {
    let (s, _) = echo_server(3);
    let client = LocalIngestClient::connect(s.path.clone(), s.token)
        .await
        .unwrap();
    // Into a regular file, at its current position.
    let dir = tempfile::tempdir().unwrap();
    let mut file = std::fs::File::create(dir.path().join("out")).unwrap();
    file.write_all(b"head:").unwrap();
    let request: Vec<u8> = (0..60_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(client.export(&request, &file).await.unwrap(), 180_000);
    let written = std::fs::read(dir.path().join("out")).unwrap();
    assert_eq!(&written[..5], b"head:");
    assert_eq!(written[5..], request.repeat(3)[..]);
    // Into a pipe, read as it is written.
    let (mut r, w) = std::io::pipe().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        out
    });
    assert_eq!(client.export(b"abc", &w).await.unwrap(), 9);
    drop(w);
    assert_eq!(reader.join().unwrap(), b"abcabcabc");
    // The exporter's error reaches the client with its kind.
    let err = client.export(b"fail", &file).await.unwrap_err();
    assert!(
        matches!(&err, arca_castore::Error::NotFound(m) if m.contains("no such thing")),
        "{err:?}"
    );
}

/// Reads an export's answer: `Ok(bytes written)` or `Err((kind, message))`.
fn export_answer(c: &mut UnixStream) -> Result<u64, (u8, String)> {
    let mut status = [0u8; 1];
    c.read_exact(&mut status).unwrap();
    if status[0] == 0 {
        let mut n = [0u8; 8];
        c.read_exact(&mut n).unwrap();
        return Ok(u64::from_le_bytes(n));
    }
    Err(error_answer(c, status[0]))
}

fn send_export(c: &mut UnixStream, fds: &[i32], request: &[u8]) {
    send(c, b'E', fds);
    c.write_all(&(request.len() as u32).to_le_bytes()).unwrap();
    c.write_all(request).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_export_requests_get_errors_and_write_nothing() {
    let (s, _) = echo_server(1);
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target");
    std::fs::write(&target, b"").unwrap();
    let (path, token) = (s.path.clone(), s.token);
    let t = target.clone();
    let answers = tokio::task::spawn_blocking(move || {
        let mut c = raw_connection(&path, token);
        let read_only = std::fs::File::open(&t).unwrap();
        let writable = std::fs::OpenOptions::new().append(true).open(&t).unwrap();
        let mut out = Vec::new();
        // No descriptor, two descriptors, one not open for writing.
        send_export(&mut c, &[], b"x");
        out.push(export_answer(&mut c));
        send_export(&mut c, &[writable.as_raw_fd(), writable.as_raw_fd()], b"x");
        out.push(export_answer(&mut c));
        send_export(&mut c, &[read_only.as_raw_fd()], b"x");
        out.push(export_answer(&mut c));
        // A device other than a terminal.
        let null = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .unwrap();
        send_export(&mut c, &[null.as_raw_fd()], b"x");
        out.push(export_answer(&mut c));
        // Then a good one on the same connection.
        send_export(&mut c, &[writable.as_raw_fd()], b"good");
        out.push(export_answer(&mut c));
        // A request longer than allowed: an answer, then the connection closes.
        send(&c, b'E', &[writable.as_raw_fd()]);
        let len = (local_ingest::MAX_EXPORT_REQUEST as u32) + 1;
        c.write_all(&len.to_le_bytes()).unwrap();
        out.push(export_answer(&mut c));
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "the connection closed");
        out
    })
    .await
    .unwrap();
    let expect = [
        "exactly one file descriptor, not 0",
        "exactly one file descriptor, not 2",
        "not open for writing",
        "not a file, pipe, socket or terminal",
    ];
    for (a, text) in answers.iter().zip(expect) {
        let (kind, message) = a.as_ref().expect_err("refused");
        assert_eq!(*kind, 0, "invalid request");
        assert!(message.contains(text), "{message:?} lacks {text:?}");
    }
    assert_eq!(answers[4], Ok(4));
    let (_, message) = answers[5].as_ref().expect_err("too long");
    assert!(message.contains("at most"), "{message}");
    assert_eq!(std::fs::read(&target).unwrap(), b"good");

    // A daemon without an exporter refuses exports (and says so in Describe).
    let plain = start();
    let client = LocalIngestClient::connect(plain.path.clone(), plain.token)
        .await
        .unwrap();
    let err = client
        .export(b"x", &std::fs::File::create(dir.path().join("o")).unwrap())
        .await;
    assert!(
        matches!(&err, Err(arca_castore::Error::InvalidRequest(m)) if m.contains("no export")),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_cancels_its_export() {
    let (s, cancelled) = echo_server(1);
    let client = LocalIngestClient::connect(s.path.clone(), s.token)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = std::fs::File::create(dir.path().join("out")).unwrap();
    let export = client.export(b"wait", &file);
    // The export runs until the client gives up on it.
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(300), export)
            .await
            .is_err(),
        "a waiting export answered"
    );
    // Dropping the future closed the connection: the daemon drops the export.
    tokio::time::timeout(std::time::Duration::from_secs(10), cancelled.notified())
        .await
        .expect("the export was cancelled");
}

/// A local-files blob store in `dir` (chunks compressed as they are
/// written, so its files hold LZ4, not raw bytes) and a socket serving it.
fn start_reading(
    dir: &std::path::Path,
) -> (
    Arc<dyn BlobService>,
    PathBuf,
    [u8; TOKEN_LEN],
    tokio::task::JoinHandle<()>,
) {
    use arca_castore::composition::{Builder, Composition};
    let url = format!(
        "objectstore+file://{}/blobs?compression=inline",
        dir.display()
    );
    let blobs = Builder::new(Composition::from_urls(&url, "memory://").unwrap())
        .blob_service("default")
        .unwrap();
    assert!(blobs.stored_files().is_some(), "a local store has files");
    let path = dir.join("ingest.sock");
    let token = local_ingest::new_token().unwrap();
    let listener = local_ingest::bind(&path).unwrap();
    let task = tokio::spawn(local_ingest::serve(listener, token, blobs.clone(), None));
    (blobs, path, token, task)
}

/// Stores `data` in `blobs`: its digest.
async fn put(blobs: &dyn BlobService, data: &[u8]) -> B3Digest {
    arca_castore::blobservice::put_bytes(blobs, bytes::Bytes::copy_from_slice(data))
        .await
        .unwrap()
}

/// Text that compresses (the stored file differs from the blob).
fn text(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| b"abcdefgh"[(i / 7 + seed as usize) % 8])
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_passes_the_files_its_blobs_are_stored_in() {
    let tmp = tempfile::tempdir().unwrap();
    let (blobs, path, token, task) = start_reading(tmp.path());
    let a = text(50_000, 1);
    let b = text(3, 2);
    let da = put(&*blobs, &a).await;
    let db = put(&*blobs, &b).await;
    let absent = B3Digest::of(b"not stored");
    let client = LocalIngestClient::connect(path.clone(), token)
        .await
        .unwrap();

    let files = client.read_files(&[da, absent, db, da]).await.unwrap();
    assert_eq!(
        files.iter().map(Option::is_some).collect::<Vec<_>>(),
        [true, false, true, true]
    );
    let mut files = files.into_iter();
    let fa = files.next().unwrap().unwrap();
    // As stored: LZ4 (tag 2) and smaller than the blob, not its bytes.
    let stored = std::fs::read(format!("/proc/self/fd/{}", fa.as_raw_fd())).unwrap();
    assert_eq!(stored[0], 2, "the LZ4 tag");
    assert!(stored.len() < a.len());
    assert_eq!(local_ingest::read_stored_file(&da, fa).unwrap(), a);
    assert!(files.next().unwrap().is_none());
    assert_eq!(
        local_ingest::read_stored_file(&db, files.next().unwrap().unwrap()).unwrap(),
        b
    );
    // A file read as another blob fails its verification.
    let e = local_ingest::read_stored_file(&db, files.next().unwrap().unwrap()).unwrap_err();
    assert!(e.to_string().contains("verification"), "{e}");

    // The connection stays usable; a request of the most digests is answered.
    let many = vec![da; local_ingest::MAX_READ_DIGESTS];
    let files = client.read_files(&many).await.unwrap();
    assert!(files.iter().all(Option::is_some));
    // Too many, or none, are refused before anything is sent.
    let too_many = vec![da; local_ingest::MAX_READ_DIGESTS + 1];
    assert!(matches!(
        client.read_files(&too_many).await,
        Err(arca_castore::Error::InvalidRequest(_))
    ));
    assert!(matches!(
        client.read_files(&[]).await,
        Err(arca_castore::Error::InvalidRequest(_))
    ));
    task.abort();
}

/// Sends a read request for `digests` (claiming `count`) with `fds` attached.
fn send_read(c: &mut UnixStream, fds: &[i32], count: u32, digests: &[B3Digest]) {
    send(c, b'R', fds);
    c.write_all(&count.to_le_bytes()).unwrap();
    for d in digests {
        c.write_all(d.as_bytes()).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_read_requests_get_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let (blobs, path, token, task) = start_reading(tmp.path());
    let d = put(&*blobs, &text(100, 3)).await;

    // A descriptor sent along: an error answer, and the connection goes on.
    let mut c = raw_connection(&path, token);
    let f = file_with(&tmp, "f", b"x");
    send_read(&mut c, &[f.as_raw_fd()], 1, &[d]);
    let mut status = [0u8; 1];
    c.read_exact(&mut status).unwrap();
    let (kind, msg) = error_answer(&mut c, status[0]);
    assert_eq!(kind, 0, "{msg}");
    assert!(msg.contains("no file descriptor"), "{msg}");
    send_read(&mut c, &[], 1, &[d]);
    c.read_exact(&mut status).unwrap();
    assert_eq!(
        status[0], 0,
        "a good request on the same connection is answered"
    );

    // No digests, or more than one answer can carry descriptors for: an
    // error answer, then the connection closes (it cannot be resynchronised).
    for count in [0u32, local_ingest::MAX_READ_DIGESTS as u32 + 1, u32::MAX] {
        let mut c = raw_connection(&path, token);
        send_read(&mut c, &[], count, &[]);
        c.read_exact(&mut status).unwrap();
        let (kind, msg) = error_answer(&mut c, status[0]);
        assert_eq!(kind, 0, "{msg}");
        assert!(msg.contains("read request for"), "{msg}");
        assert_eq!(c.read(&mut [0u8; 1]).unwrap(), 0, "closed");
    }

    // A daemon whose store keeps no files takes no reads.
    let s = start();
    let mut c = raw_connection(&s.path, s.token);
    send_read(&mut c, &[], 1, &[d]);
    c.read_exact(&mut status).unwrap();
    let (_, msg) = error_answer(&mut c, status[0]);
    assert!(msg.contains("takes no read requests"), "{msg}");
    task.abort();
}

#[test]
fn only_regular_files_of_a_bounded_size_are_read() {
    use arca_castore::blobservice::MAX_STORED_FILE_SIZE;
    let d = B3Digest::of(b"anything");
    // A pipe (a read could wait forever): refused before reading.
    let (r, _w) = nix::unistd::pipe().unwrap();
    let e = local_ingest::read_stored_file(&d, r).unwrap_err();
    assert!(e.to_string().contains("other than a regular file"), "{e}");
    // A huge (sparse) file: refused before reading.
    let tmp = tempfile::tempdir().unwrap();
    let huge = tmp.path().join("huge");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(MAX_STORED_FILE_SIZE + 1)
        .unwrap();
    let f = std::fs::File::open(&huge).unwrap();
    let e = local_ingest::read_stored_file(&d, f.into()).unwrap_err();
    assert!(e.to_string().contains("at most"), "{e}");
    // Garbage: no valid tag.
    let f = file_with(&tmp, "garbage", b"\xffnot a chunk");
    let e = local_ingest::read_stored_file(&d, f.into()).unwrap_err();
    assert!(e.to_string().contains("unknown encoding"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_batch_reads_go_through_the_daemons_files() {
    use arca_castore::blobservice::GrpcBlobService;
    use arca_castore::grpc::{
        GrpcBlobBatchServiceWrapper, GrpcBlobServiceWrapper, GrpcLocalIngestWrapper,
    };
    use futures::TryStreamExt;
    let tmp = tempfile::tempdir().unwrap();
    let (files_store, path, token, task) = start_reading(tmp.path());
    // gRPC serves another store: what it answers shows which way a blob came.
    let grpc_store = Arc::new(MemoryBlobService::default());
    let a = text(20_000, 4);
    let b = text(10, 5);
    let only_grpc = text(77, 6);
    let da = put(&*files_store, &a).await;
    let db = put(&*files_store, &b).await;
    let dg = put(&*grpc_store, &only_grpc).await;
    let absent = B3Digest::of(b"nowhere");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(GrpcBlobServiceWrapper::new(grpc_store.clone()).into_server())
            .add_service(GrpcBlobBatchServiceWrapper::new(grpc_store.clone()).into_server())
            .add_service(
                GrpcLocalIngestWrapper::new(path.display().to_string(), token)
                    .with_reads(true)
                    .into_server(),
            )
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let url = url::Url::parse(&format!("grpc+http://{addr}")).unwrap();
    let channel = arca_castore::grpc::channel_from_url(&url).unwrap();
    let client = GrpcBlobService::from_channels(vec![channel])
        .unwrap()
        .with_local_ingest(true);

    // In order, duplicates included; more than one group's worth.
    let mut asked = vec![da, dg, absent, db];
    asked.extend(std::iter::repeat_n(da, 70));
    asked.push(db);
    let got: Vec<_> = client.read_many(asked.clone()).try_collect().await.unwrap();
    assert_eq!(got.iter().map(|(d, _)| *d).collect::<Vec<_>>(), asked);
    let want = |d: &B3Digest| {
        if *d == da {
            Some(a.clone())
        } else if *d == db {
            Some(b.clone())
        } else if *d == dg {
            Some(only_grpc.clone())
        } else {
            None
        }
    };
    for (d, data) in &got {
        assert_eq!(data.as_ref().map(|x| x.to_vec()), want(d), "blob {d}");
    }
    // Those only the files hold came through them (gRPC has none of them).
    assert!(!grpc_store.has(&da).await.unwrap());

    // A tampered file: never handed out; that blob is asked for over gRPC
    // (which here has no such blob), the others still come from the files.
    let hex = da.to_hex();
    let chunk = tmp.path().join("blobs/chunks").join(&hex[..2]).join(&hex);
    let mut stored = std::fs::read(&chunk).unwrap();
    let last = stored.len() - 1;
    stored[last] ^= 1;
    std::fs::write(&chunk, &stored).unwrap();
    let got: Vec<_> = client.read_many(vec![db, da]).try_collect().await.unwrap();
    assert_eq!(got, vec![(db, Some(b.clone().into())), (da, None)]);
    // With gRPC holding it, the blob comes from there, verified.
    put(&*grpc_store, &a).await;
    let got: Vec<_> = client.read_many(vec![da]).try_collect().await.unwrap();
    assert_eq!(got, vec![(da, Some(a.clone().into()))]);

    // The socket goes: batch reads go over gRPC from then on.
    task.abort();
    let _ = std::fs::remove_file(&path);
    let got: Vec<_> = client.read_many(vec![dg, db]).try_collect().await.unwrap();
    assert_eq!(got, vec![(dg, Some(only_grpc.clone().into())), (db, None)]);
    server.abort();
}
