//! Local ingest: a client on the daemon's machine hands it open files.
//!
//! Uploading a file over gRPC copies each byte from the file into the
//! client, through a socket, into the daemon, and costs HTTP/2 framing on
//! both sides. A daemon on the same machine can take the open file instead:
//! the client passes its file descriptor over a Unix socket (`SCM_RIGHTS`),
//! and the daemon stores the content with [BlobService::put_file] (a local
//! store copies it in the kernel and hashes the copy). The client learns the
//! socket's path from `arca.castore.v1.LocalIngestService/Describe`, and only
//! asks when its gRPC address is on this machine (loopback or a Unix socket).
//!
//! The protocol on the socket:
//! - the daemon greets with [HELLO] and the 16-byte token that `Describe`
//!   returned (a client checks it: a socket at that path that belongs to
//!   another daemon is never used);
//! - a request is the byte `P` carrying exactly one file descriptor, open
//!   for reading on a regular file;
//! - the answer is `0`, the digest (32 bytes) and the size (u64 LE), or
//!   `1`, an error kind byte ([Error] variants: 0 invalid request, 1 not
//!   found, 2 unavailable, 3 storage), a length (u32 LE, at most
//!   [MAX_MESSAGE]) and a UTF-8 message.
//!
//! - an export request is the byte `E` carrying exactly one file
//!   descriptor, open for writing, followed by a length (u32 LE, at most
//!   [MAX_EXPORT_REQUEST]) and that many bytes saying what to export (for
//!   the daemon's [LocalExport], `arca-store`'s NAR export: a castore root
//!   node). The daemon writes the export into the descriptor and answers
//!   `0` and the number of bytes written (u64 LE), or an error as above. A
//!   client that closes its connection cancels its export. The answer to
//!   `Describe` says whether a daemon takes exports.
//!
//! - a read request is the byte `R` (no descriptor), a count `n` (u32 LE,
//!   1 to [MAX_READ_DIGESTS]) and `n` BLAKE3 digests (32 bytes each). The
//!   answer is `0` and `n` bytes, one per digest: `1` if a descriptor comes
//!   for it, `0` if not (the store holds it otherwise, or not at all: read
//!   it over gRPC); the descriptors come with the answer's first byte, in
//!   the order of the digests. Each is the file a local store keeps that
//!   blob in as one chunk ([crate::blobservice::StoredFiles]), open for
//!   reading, as stored (a tag byte, then raw or compressed bytes): the
//!   client checks it is a regular file of at most
//!   [crate::blobservice::MAX_STORED_FILE_SIZE] bytes, and decodes and
//!   verifies what it reads ([crate::blobservice::decode_stored_file]). A
//!   walk over a mount then costs the daemon an `open` per file, and no
//!   copy, compression or framing. The answer to `Describe` says whether a
//!   daemon takes reads.
//!
//! The daemon trusts nothing it receives: a put or export request without
//! exactly one descriptor (a read request with any), or with one of the wrong kind (a put's not a regular file
//! open for reading; an export's not a file, pipe, socket or terminal open
//! for writing), gets an error answer
//! (extra descriptors are closed); the digest it answers is the one of the
//! bytes it stored. Who may connect is decided by the socket file's
//! permissions (0660, in the daemon's data directory). At most
//! [MAX_CONNECTIONS] connections are served at once.
use crate::blobservice::{decode_stored_file, StoredFiles, MAX_STORED_FILE_SIZE};
use crate::{B3Digest, BlobService, Error, B3_LEN};
use bytes::Bytes;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

/// What the daemon greets each connection with, before its token.
pub const HELLO: &[u8; 8] = b"ARCAING1";
/// Length of the token.
pub const TOKEN_LEN: usize = 16;
/// Longest error message in an answer.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// The request byte of a put.
const PUT: u8 = b'P';
/// The request byte of an export.
const EXPORT: u8 = b'E';
/// The request byte of a read.
const READ: u8 = b'R';
/// Most digests in one read request: one answer carries at most this many
/// descriptors (Linux's `SCM_MAX_FD`).
pub const MAX_READ_DIGESTS: usize = SCM_MAX_FD;
/// Longest export request (after its length).
pub const MAX_EXPORT_REQUEST: usize = 64 * 1024;

/// Exports the daemon runs at once for all connections together.
const DAEMON_EXPORTS_IN_FLIGHT: usize = 4;

/// What a daemon exports into descriptors its local clients pass
/// (`arca-store` renders NARs): the request's bytes are for it to parse
/// (untrusted), and it returns how many bytes it wrote.
#[async_trait::async_trait]
pub trait LocalExport: Send + Sync {
    /// Writes what `request` asks for into `out`.
    async fn export(&self, request: bytes::Bytes, out: OwnedFd) -> Result<u64, Error>;
}

/// Files the daemon stores at once for all connections together.
const DAEMON_PUTS_IN_FLIGHT: usize = 64;
/// Connections served at once; more wait to be accepted. Each holds at
/// most one received descriptor at a time; with [DAEMON_READ_FDS], this
/// bounds what clients can make the daemon hold open.
const MAX_CONNECTIONS: usize = 256;
/// Descriptors of stored files the daemon holds open for read answers at
/// once, for all connections together (a request's are taken before its
/// files are opened and given back once its answer is sent, or its
/// connection is gone): clients that send requests and never read the
/// answers cannot run the daemon out of descriptors.
const DAEMON_READ_FDS: u32 = 512;
/// How long a client waits for the socket's greeting.
const GREETING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Most descriptors one message can carry on Linux (`SCM_MAX_FD`): the
/// receive buffer has room for all, so none is ever lost unclosed.
const SCM_MAX_FD: usize = 253;

/// A fresh random token.
pub fn new_token() -> std::io::Result<[u8; TOKEN_LEN]> {
    use std::io::Read;
    let mut token = [0u8; TOKEN_LEN];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut token)?;
    Ok(token)
}

/// Binds the daemon's socket at `path` (mode 0660: the daemon's user and
/// group), replacing a stale socket left there (never a live one, nor any
/// other kind of file).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running daemon", path.display()),
                ));
            }
            std::fs::remove_file(path)?
        }
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    // The daemon's user and group, whatever the umask.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

/// What a connection's requests are served with.
struct Served {
    blobs: Arc<dyn BlobService>,
    /// The store's files, for read requests.
    files: Option<Arc<dyn StoredFiles>>,
    export: Option<Arc<dyn LocalExport>>,
    puts: tokio::sync::Semaphore,
    exports: tokio::sync::Semaphore,
    read_fds: tokio::sync::Semaphore,
}

/// Serves connections on `listener` until the returned future is dropped:
/// puts into `blobs`, reads of the files `blobs` keeps blobs in (if it has
/// any: [BlobService::stored_files]), and exports with `export` if given.
pub async fn serve(
    listener: UnixListener,
    token: [u8; TOKEN_LEN],
    blobs: Arc<dyn BlobService>,
    export: Option<Arc<dyn LocalExport>>,
) {
    let served = Arc::new(Served {
        files: blobs.stored_files(),
        blobs,
        export,
        puts: tokio::sync::Semaphore::new(DAEMON_PUTS_IN_FLIGHT),
        exports: tokio::sync::Semaphore::new(DAEMON_EXPORTS_IN_FLIGHT),
        read_fds: tokio::sync::Semaphore::new(DAEMON_READ_FDS as usize),
    });
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let Ok(slot) = connections.clone().acquire_owned().await else {
            return;
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((conn, _)) => {
                    let served = served.clone();
                    tasks.spawn(async move {
                        if let Err(e) = handle(conn, token, &served).await {
                            debug!(error = %e, "local ingest connection ended");
                        }
                        drop(slot);
                    });
                }
                Err(e) => {
                    warn!(error = %e, "accepting a local ingest connection");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
}

/// One connection: the greeting, then requests answered in order.
async fn handle(
    mut conn: UnixStream,
    token: [u8; TOKEN_LEN],
    served: &Served,
) -> std::io::Result<()> {
    let mut hello = HELLO.to_vec();
    hello.extend_from_slice(&token);
    conn.write_all(&hello).await?;
    loop {
        let Some((byte, fds)) = receive(&conn).await? else {
            return Ok(()); // the client closed the connection
        };
        let answer = match (byte, <[OwnedFd; 1]>::try_from(fds)) {
            (PUT, Ok([fd])) => {
                let _permit = served.puts.acquire().await.map_err(std::io::Error::other)?;
                encode_answer(&put(&*served.blobs, fd).await)
            }
            (EXPORT, fds) => {
                // The request's bytes come first, whatever else is wrong.
                let len = conn.read_u32_le().await? as usize;
                if len > MAX_EXPORT_REQUEST {
                    // The stream cannot be resynchronised: answer and close.
                    let e = Error::InvalidRequest(format!(
                        "an export request of {len} bytes (at most {MAX_EXPORT_REQUEST})"
                    ));
                    conn.write_all(&encode_error(&e)).await?;
                    return Ok(());
                }
                let mut request = vec![0u8; len];
                conn.read_exact(&mut request).await?;
                let answer = match (fds, &served.export) {
                    (Ok([fd]), Some(export)) => match writable(&fd) {
                        Ok(()) => {
                            // Waiting for a slot, the client may leave too.
                            let _permit = tokio::select! {
                                p = served.exports.acquire() => p.map_err(std::io::Error::other)?,
                                _ = client_gone(&conn) => return Ok(()),
                            };
                            tokio::select! {
                                r = export.export(request.into(), fd) => r,
                                _ = client_gone(&conn) => {
                                    debug!("local export cancelled by its client");
                                    return Ok(());
                                }
                            }
                        }
                        Err(e) => Err(e),
                    },
                    (Ok(_), None) => Err(Error::InvalidRequest(
                        "this daemon takes no export requests".into(),
                    )),
                    (Err(fds), _) => Err(wrong_fd_count(fds.len())),
                };
                match answer {
                    Ok(written) => {
                        let mut out = vec![0u8];
                        out.extend_from_slice(&written.to_le_bytes());
                        out
                    }
                    Err(e) => encode_error(&e),
                }
            }
            (READ, fds) => {
                // The digests come first, whatever else is wrong.
                let n = conn.read_u32_le().await? as usize;
                if n == 0 || n > MAX_READ_DIGESTS {
                    // The stream cannot be resynchronised: answer and close.
                    let e = Error::InvalidRequest(format!(
                        "a read request for {n} blobs (1 to {MAX_READ_DIGESTS})"
                    ));
                    conn.write_all(&encode_error(&e)).await?;
                    return Ok(());
                }
                let mut raw = vec![0u8; n * B3_LEN];
                conn.read_exact(&mut raw).await?;
                // (Any descriptors sent along are closed here.)
                let sent_fds = match fds {
                    Ok(_) => 1,
                    Err(fds) => fds.len(),
                };
                let answer = match (sent_fds == 0, &served.files) {
                    (false, _) => Err(Error::InvalidRequest(format!(
                        "a read request carries no file descriptor, not {sent_fds}"
                    ))),
                    (true, None) => Err(Error::InvalidRequest(
                        "this daemon takes no read requests".into(),
                    )),
                    (true, Some(files)) => {
                        let digests = raw
                            .chunks_exact(B3_LEN)
                            .map(|c| B3Digest::from(<[u8; B3_LEN]>::try_from(c).expect("32 bytes")))
                            .collect();
                        // (n ≤ 253 < DAEMON_READ_FDS: a request always fits.)
                        let permits = tokio::select! {
                            p = served.read_fds.acquire_many(n as u32) => p.map_err(std::io::Error::other)?,
                            _ = client_gone(&conn) => return Ok(()),
                        };
                        let opened = open_stored(files.clone(), digests).await;
                        opened.map(|files| (files, permits))
                    }
                };
                match answer {
                    Ok((files, _permits)) => {
                        send_files(&conn, &files).await?;
                        continue;
                    }
                    Err(e) => encode_error(&e),
                }
            }
            (PUT, Err(fds)) => encode_error(&wrong_fd_count(fds.len())),
            (other, _) => encode_error(&Error::InvalidRequest(format!(
                "unknown request byte {other:#04x}"
            ))),
        };
        conn.write_all(&answer).await?;
    }
}

/// Opens the stored files of `digests` on the blocking pool: `None` for a
/// blob the store holds otherwise or not at all, and for one whose file
/// cannot be opened (logged; the client reads it over gRPC, which reports).
async fn open_stored(
    files: Arc<dyn StoredFiles>,
    digests: Vec<B3Digest>,
) -> Result<Vec<Option<std::fs::File>>, Error> {
    tokio::task::spawn_blocking(move || {
        digests
            .iter()
            .map(|d| match files.open(d) {
                Ok(f) => f,
                Err(e) => {
                    warn!(digest = %d, error = %e, "opening a stored blob for a local reader");
                    None
                }
            })
            .collect()
    })
    .await
    .map_err(Error::storage)
}

/// Sends a read's answer: `0`, a byte per file (`1`: its descriptor
/// follows), and the descriptors, all in one message (the descriptors
/// arrive with its first byte).
async fn send_files(conn: &UnixStream, files: &[Option<std::fs::File>]) -> std::io::Result<()> {
    let mut body = Vec::with_capacity(1 + files.len());
    body.push(0u8);
    body.extend(files.iter().map(|f| u8::from(f.is_some())));
    let fds: Vec<std::os::fd::RawFd> = files.iter().flatten().map(AsRawFd::as_raw_fd).collect();
    let mut sent = 0;
    while sent < body.len() {
        conn.writable().await?;
        let r = conn.try_io(Interest::WRITABLE, || {
            let rights = [ControlMessage::ScmRights(&fds)];
            // The descriptors go with the first bytes only.
            let control: &[ControlMessage] = if sent == 0 && !fds.is_empty() {
                &rights
            } else {
                &[]
            };
            sendmsg::<()>(
                conn.as_raw_fd(),
                &[IoSlice::new(&body[sent..])],
                control,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(std::io::Error::from)
        });
        match r {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Resolves when the client closes the connection (or sends anything: no
/// request may come while an export runs).
async fn client_gone(conn: &UnixStream) {
    let mut byte = [0u8; 1];
    loop {
        if conn.readable().await.is_err() {
            return;
        }
        // Readiness can be left over from the request's last read: only a
        // read that would block clears it.
        match conn.try_read(&mut byte) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            _ => return,
        }
    }
}

/// The error for a request with other than one descriptor.
fn wrong_fd_count(n: usize) -> Error {
    Error::InvalidRequest(format!(
        "a request carries exactly one file descriptor, not {n}"
    ))
}

/// Checks that `fd` is open for writing (not `O_PATH`, not read-only) on
/// what a command's output can be: a regular file, a pipe, a socket or a
/// terminal (no other device, nothing the daemon has no business writing).
fn writable(fd: &OwnedFd) -> Result<(), Error> {
    // SAFETY: F_GETFL only reads the open file's flags.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 || flags & libc::O_PATH != 0 || flags & libc::O_ACCMODE == libc::O_RDONLY {
        return Err(Error::InvalidRequest(
            "the file descriptor passed is not open for writing".into(),
        ));
    }
    // SAFETY: fstat fills the zeroed stat for a descriptor this process owns.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(Error::InvalidRequest(format!(
            "cannot stat the file descriptor passed: {}",
            std::io::Error::last_os_error()
        )));
    }
    let kind = st.st_mode & libc::S_IFMT;
    // SAFETY: isatty only asks about the descriptor.
    let terminal = kind == libc::S_IFCHR && unsafe { libc::isatty(fd.as_raw_fd()) } == 1;
    if !(kind == libc::S_IFREG || kind == libc::S_IFIFO || kind == libc::S_IFSOCK || terminal) {
        return Err(Error::InvalidRequest(
            "the file descriptor passed is not a file, pipe, socket or terminal".into(),
        ));
    }
    Ok(())
}

/// Stores the regular file `fd` refers to.
async fn put(blobs: &dyn BlobService, fd: OwnedFd) -> Result<(B3Digest, u64), Error> {
    let file = std::fs::File::from(fd);
    let meta = file
        .metadata()
        .map_err(|e| Error::InvalidRequest(format!("cannot stat the file passed: {e}")))?;
    if !meta.is_file() {
        return Err(Error::InvalidRequest(
            "the file descriptor passed is not a regular file".into(),
        ));
    }
    // SAFETY: F_GETFL only reads the open file's flags.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 || flags & libc::O_PATH != 0 || flags & libc::O_ACCMODE == libc::O_WRONLY {
        return Err(Error::InvalidRequest(
            "the file descriptor passed is not open for reading".into(),
        ));
    }
    blobs.put_file(file, None).await
}

/// Receives one request byte and the descriptors that came with it; `None`
/// at end of stream. Descriptors are owned at once, so extras get closed.
async fn receive(conn: &UnixStream) -> std::io::Result<Option<(u8, Vec<OwnedFd>)>> {
    loop {
        conn.readable().await?;
        match conn.try_io(Interest::READABLE, || recv_with_fds(conn.as_raw_fd())) {
            Ok((0, _, _)) => return Ok(None),
            Ok((_, byte, fds)) => return Ok(Some((byte, fds))),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// `recvmsg` of one byte and its `SCM_RIGHTS` descriptors. Walks the control
/// messages itself, also when the kernel truncated them (`MSG_CTRUNC`, e.g.
/// when it could install only some descriptors): every descriptor that did
/// arrive is owned, so none is leaked.
fn recv_with_fds(sock: std::os::fd::RawFd) -> std::io::Result<(usize, u8, Vec<OwnedFd>)> {
    const FD_SIZE: usize = std::mem::size_of::<std::os::fd::RawFd>();
    // u64s: aligned for cmsghdr.
    let space = unsafe { libc::CMSG_SPACE((SCM_MAX_FD * FD_SIZE) as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut byte = 0u8;
    let mut iov = libc::iovec {
        iov_base: (&mut byte as *mut u8).cast(),
        iov_len: 1,
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() * 8;
    // SAFETY: every pointer in msg points into live buffers of the stated sizes.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the CMSG_* walk stays within msg_controllen, which the kernel
    // set to the bytes it wrote; each SCM_RIGHTS payload holds descriptors
    // the kernel just installed in this process, owned by nobody else.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<std::os::fd::RawFd>();
                let header = libc::CMSG_LEN(0) as usize;
                let count = ((*c).cmsg_len as usize).saturating_sub(header) / FD_SIZE;
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(data.add(i));
                    if fd >= 0 {
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        debug!(
            received = fds.len(),
            "a request's descriptors were cut short"
        );
    }
    Ok((n as usize, byte, fds))
}

/// The wire form of a put's answer.
fn encode_answer(answer: &Result<(B3Digest, u64), Error>) -> Vec<u8> {
    match answer {
        Ok((digest, size)) => {
            let mut out = Vec::with_capacity(1 + B3_LEN + 8);
            out.push(0);
            out.extend_from_slice(digest.as_bytes());
            out.extend_from_slice(&size.to_le_bytes());
            out
        }
        Err(e) => encode_error(e),
    }
}

/// The wire form of an error answer.
fn encode_error(e: &Error) -> Vec<u8> {
    let (kind, text) = match e {
        Error::InvalidRequest(m) => (0u8, m.clone()),
        Error::NotFound(m) => (1, m.clone()),
        Error::Unavailable(m) => (2, m.clone()),
        other => (3, other.to_string()),
    };
    let mut text = text.into_bytes();
    if text.len() > MAX_MESSAGE {
        text.truncate(MAX_MESSAGE);
        // Cut on a character boundary.
        while std::str::from_utf8(&text).is_err() {
            text.pop();
        }
    }
    let mut out = Vec::with_capacity(6 + text.len());
    out.push(1);
    out.push(kind);
    out.extend_from_slice(&(text.len() as u32).to_le_bytes());
    out.extend_from_slice(&text);
    out
}

/// Reads an answer's status: `Ok(())` when it succeeded (its fields follow),
/// the daemon's error otherwise.
async fn read_status(conn: &mut UnixStream) -> std::io::Result<Result<(), Error>> {
    let status = conn.read_u8().await?;
    read_status_after(conn, status).await
}

/// [read_status] once the status byte was read.
async fn read_status_after(
    conn: &mut UnixStream,
    status: u8,
) -> std::io::Result<Result<(), Error>> {
    match status {
        0 => Ok(Ok(())),
        1 => {
            let kind = conn.read_u8().await?;
            let len = conn.read_u32_le().await? as usize;
            if len > MAX_MESSAGE {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("local ingest: error message of {len} bytes"),
                ));
            }
            let mut text = vec![0u8; len];
            conn.read_exact(&mut text).await?;
            let text = format!("daemon: {}", String::from_utf8_lossy(&text));
            Ok(Err(match kind {
                0 => Error::InvalidRequest(text),
                1 => Error::NotFound(text),
                2 => Error::Unavailable(text),
                _ => Error::Storage(text),
            }))
        }
        other => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("local ingest: unknown answer status {other}"),
        )),
    }
}

/// Decodes a put's answer.
async fn read_answer(conn: &mut UnixStream) -> std::io::Result<Result<(B3Digest, u64), Error>> {
    if let Err(e) = read_status(conn).await? {
        return Ok(Err(e));
    }
    let mut digest = [0u8; B3_LEN];
    conn.read_exact(&mut digest).await?;
    let size = conn.read_u64_le().await?;
    Ok(Ok((B3Digest::from(digest), size)))
}

/// The client side: connections to a daemon's socket, kept for reuse (one
/// request at a time on each).
pub struct LocalIngestClient {
    path: PathBuf,
    token: [u8; TOKEN_LEN],
    idle: parking_lot::Mutex<Vec<UnixStream>>,
    exports: bool,
    reads: bool,
}

impl LocalIngestClient {
    /// Connects to the socket at `path` and checks its greeting against
    /// `token`: an error if it is not that daemon's.
    pub async fn connect(path: PathBuf, token: [u8; TOKEN_LEN]) -> std::io::Result<Self> {
        let client = Self {
            path,
            token,
            idle: parking_lot::Mutex::new(Vec::new()),
            exports: false,
            reads: false,
        };
        let conn = client.new_connection().await?;
        client.idle.lock().push(conn);
        Ok(client)
    }

    async fn new_connection(&self) -> std::io::Result<UnixStream> {
        let mut conn = UnixStream::connect(&self.path).await?;
        let mut hello = [0u8; HELLO.len() + TOKEN_LEN];
        tokio::time::timeout(GREETING_TIMEOUT, conn.read_exact(&mut hello))
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("{} did not greet", self.path.display()),
                )
            })??;
        if &hello[..HELLO.len()] != HELLO || hello[HELLO.len()..] != self.token {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} is not the socket of the daemon that named it",
                    self.path.display()
                ),
            ));
        }
        Ok(conn)
    }

    /// Has the daemon store `file` (from its current position to its end);
    /// returns the digest and size of what it stored.
    pub async fn put_file(&self, file: &std::fs::File) -> Result<(B3Digest, u64), Error> {
        let reused = self.idle.lock().pop();
        let mut conn = match reused {
            Some(c) => c,
            None => self.new_connection().await.map_err(unavailable)?,
        };
        send_request(&conn, PUT, file.as_fd())
            .await
            .map_err(unavailable)?;
        let answer = read_answer(&mut conn).await.map_err(unavailable)?;
        // The connection is in a clean state after any answer.
        self.idle.lock().push(conn);
        answer
    }
}

impl LocalIngestClient {
    /// Asks the daemon behind `channel` (a gRPC connection to a daemon on
    /// this machine: the socket path it names is a path here) for its local
    /// socket, connects and checks the token; `None` if it has none, or it
    /// cannot be used.
    pub async fn discover(channel: tonic::transport::Channel) -> Option<Self> {
        use arca_proto::castore_batch as batch_proto;
        let mut client =
            batch_proto::local_ingest_service_client::LocalIngestServiceClient::new(channel);
        let described = match client
            .describe(batch_proto::DescribeLocalIngestRequest {})
            .await
        {
            Ok(r) => r.into_inner(),
            Err(status) => {
                debug!(%status, "the server takes no open files");
                return None;
            }
        };
        let token = <[u8; TOKEN_LEN]>::try_from(&described.token[..]).ok()?;
        match Self::connect(described.socket_path.clone().into(), token).await {
            Ok(mut c) => {
                debug!(socket = described.socket_path, "the daemon's local socket");
                c.exports = described.exports;
                c.reads = described.reads;
                Some(c)
            }
            Err(e) => {
                debug!(socket = described.socket_path, error = %e, "local socket not usable");
                None
            }
        }
    }

    /// Whether the daemon takes export requests ([Self::export]).
    pub fn takes_exports(&self) -> bool {
        self.exports
    }

    /// Whether the daemon takes read requests ([Self::read_files]).
    pub fn takes_reads(&self) -> bool {
        self.reads
    }

    /// Asks the daemon for the files it keeps `digests` in (at most
    /// [MAX_READ_DIGESTS]; see the module docs): one answer per digest, in
    /// order, `None` where it passed none (read that blob over gRPC). The
    /// files are as stored: decode and verify what is read from them
    /// ([read_stored_file]).
    pub async fn read_files(&self, digests: &[B3Digest]) -> Result<Vec<Option<OwnedFd>>, Error> {
        if digests.is_empty() || digests.len() > MAX_READ_DIGESTS {
            return Err(Error::InvalidRequest(format!(
                "a read request for {} blobs (1 to {MAX_READ_DIGESTS})",
                digests.len()
            )));
        }
        let reused = self.idle.lock().pop();
        let mut conn = match reused {
            Some(c) => c,
            None => self.new_connection().await.map_err(unavailable)?,
        };
        let mut request = Vec::with_capacity(5 + digests.len() * B3_LEN);
        request.push(READ);
        request.extend_from_slice(&(digests.len() as u32).to_le_bytes());
        for d in digests {
            request.extend_from_slice(d.as_bytes());
        }
        conn.write_all(&request).await.map_err(unavailable)?;
        // The status byte, with the descriptors (if any) that came with it.
        let Some((status, fds)) = receive(&conn).await.map_err(unavailable)? else {
            return Err(unavailable(std::io::ErrorKind::UnexpectedEof.into()));
        };
        if status != 0 {
            // An error answer carries no descriptor (any that came are closed).
            read_status_after(&mut conn, status)
                .await
                .map_err(unavailable)??;
            return Err(unavailable(std::io::Error::other(
                "an answer without status 0",
            )));
        }
        let mut flags = vec![0u8; digests.len()];
        conn.read_exact(&mut flags).await.map_err(unavailable)?;
        let passed = flags.iter().filter(|&&f| f == 1).count();
        if passed != fds.len() || flags.iter().any(|&f| f > 1) {
            // Out of step: the connection is not reused.
            return Err(unavailable(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "a read answer naming {passed} descriptors came with {}",
                    fds.len()
                ),
            )));
        }
        self.idle.lock().push(conn);
        let mut fds = fds.into_iter();
        Ok(flags
            .into_iter()
            .map(|f| if f == 1 { fds.next() } else { None })
            .collect())
    }

    /// Has the daemon write the export `request` asks for into `out` (see
    /// the module docs); returns the number of bytes it wrote. On a
    /// connection of its own, closed afterwards: dropping the returned
    /// future cancels the export.
    pub async fn export(&self, request: &[u8], out: &impl AsFd) -> Result<u64, Error> {
        if request.len() > MAX_EXPORT_REQUEST {
            return Err(Error::InvalidRequest(format!(
                "an export request of {} bytes (at most {MAX_EXPORT_REQUEST})",
                request.len()
            )));
        }
        let mut conn = self.new_connection().await.map_err(unavailable)?;
        send_request(&conn, EXPORT, out.as_fd())
            .await
            .map_err(unavailable)?;
        let mut body = (request.len() as u32).to_le_bytes().to_vec();
        body.extend_from_slice(request);
        conn.write_all(&body).await.map_err(unavailable)?;
        read_status(&mut conn).await.map_err(unavailable)??;
        conn.read_u64_le().await.map_err(unavailable)
    }
}

/// Reads blob `digest` from a file a daemon passed ([LocalIngestClient::read_files]),
/// on a blocking thread: it must be a regular file of at most
/// [MAX_STORED_FILE_SIZE] bytes (never a pipe or device a read could hang
/// on, nor something huge), and what it holds is decoded and verified
/// against `digest`.
pub fn read_stored_file(digest: &B3Digest, fd: OwnedFd) -> Result<Bytes, Error> {
    use std::io::Read;
    let file = std::fs::File::from(fd);
    let meta = file
        .metadata()
        .map_err(|e| Error::Storage(format!("blob {digest}: cannot stat the file passed: {e}")))?;
    if !meta.is_file() {
        return Err(Error::Storage(format!(
            "blob {digest}: the daemon passed something other than a regular file"
        )));
    }
    if meta.len() > MAX_STORED_FILE_SIZE {
        return Err(Error::Storage(format!(
            "blob {digest}: the file passed has {} bytes (at most {MAX_STORED_FILE_SIZE})",
            meta.len()
        )));
    }
    // One more byte than it had: a file grown since is caught below.
    let mut buf = Vec::with_capacity(meta.len() as usize + 1);
    file.take(MAX_STORED_FILE_SIZE + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::Storage(format!("blob {digest}: reading the file passed: {e}")))?;
    if buf.len() as u64 > MAX_STORED_FILE_SIZE {
        return Err(Error::Storage(format!(
            "blob {digest}: the file passed is larger than {MAX_STORED_FILE_SIZE} bytes"
        )));
    }
    decode_stored_file(digest, Bytes::from(buf))
}

fn unavailable(e: std::io::Error) -> Error {
    Error::Unavailable(format!("local ingest: {e}"))
}

/// Sends a request byte with one descriptor.
async fn send_request(conn: &UnixStream, byte: u8, fd: BorrowedFd<'_>) -> std::io::Result<()> {
    loop {
        conn.writable().await?;
        let sent = conn.try_io(Interest::WRITABLE, || {
            let fds = [fd.as_raw_fd()];
            sendmsg::<()>(
                conn.as_raw_fd(),
                &[IoSlice::new(&[byte])],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(std::io::Error::from)
        });
        match sent {
            Ok(1) => return Ok(()),
            Ok(n) => {
                return Err(std::io::Error::other(format!(
                    "sent {n} bytes of a 1-byte request"
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_round_trip_their_fields() {
        let ok = encode_answer(&Ok((B3Digest::from([7u8; 32]), 1234)));
        assert_eq!(ok.len(), 1 + 32 + 8);
        assert_eq!(ok[0], 0);
        assert_eq!(&ok[1..33], &[7u8; 32]);
        assert_eq!(u64::from_le_bytes(ok[33..].try_into().unwrap()), 1234);
        let err = encode_answer(&Err(Error::InvalidRequest("bad".into())));
        assert_eq!(&err[..2], &[1, 0]);
        assert_eq!(u32::from_le_bytes(err[2..6].try_into().unwrap()), 3);
        assert_eq!(&err[6..], b"bad");
    }

    #[test]
    fn long_error_messages_are_cut_on_a_character_boundary() {
        let text = "é".repeat(MAX_MESSAGE);
        let err = encode_answer(&Err(Error::NotFound(text)));
        let len = u32::from_le_bytes(err[2..6].try_into().unwrap()) as usize;
        assert!(len <= MAX_MESSAGE);
        assert!(std::str::from_utf8(&err[6..]).is_ok());
        assert_eq!(err[1], 1);
    }
}
