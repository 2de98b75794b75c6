//! Writing a stream (a NAR) to a file descriptor from async code, with the
//! `write(2)` calls on a thread of their own.
//!
//! Writing a large NAR into a file is the kernel copying every byte into
//! the page cache: a third of the CPU time of `arca nar dump`. On a thread
//! of its own that copy overlaps with fetching, decoding and verifying the
//! next blobs on the runtime's threads, instead of taking turns with them.
//! `tokio::io::stdout` (and `tokio::fs::File`) would also hand writes to the
//! blocking pool, but one at a time, each behind a copy into a buffer of
//! their own.
use super::writer::NarOutput;
use bytes::{Bytes, BytesMut};
use std::future::Future;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::PollSender;

/// Bytes gathered before they are handed to the writing thread.
const BUFFER: usize = 1024 * 1024;
/// Buffers queued for the writing thread (so memory is bounded by about
/// `(QUEUED + 2) * 2 * BUFFER`).
const QUEUED: usize = 4;

/// What the writing thread is handed.
enum Piece {
    /// Gathered writes; the buffer comes back for reuse.
    Gathered(BytesMut),
    /// A piece taken whole ([NarOutput::poll_take]).
    Taken(Bytes),
}

/// An [tokio::io::AsyncWrite] writing to a file descriptor on a thread of
/// its own. Writes are gathered into buffers of [BUFFER] bytes, which the
/// thread writes in order while the caller goes on (at most [QUEUED]
/// waiting). [Self::finish] waits for everything to be written; dropping the
/// writer instead abandons what is queued: the thread stops after the write
/// under way (a descriptor in non-blocking mode is waited on with `poll(2)`,
/// and given up on at once).
pub struct FdWriter {
    buf: BytesMut,
    tx: PollSender<Piece>,
    /// Set when the writer is dropped before [Self::finish].
    abandoned: Arc<AtomicBool>,
    finished: bool,
    /// Emptied buffers the thread gives back, reused (no new allocation,
    /// and no fresh pages to fault in, per megabyte written).
    spare: Arc<parking_lot::Mutex<Vec<BytesMut>>>,
    /// The thread's result: bytes written, or its first error.
    done: Option<oneshot::Receiver<io::Result<u64>>>,
}

impl FdWriter {
    /// Starts the writing thread for `fd` (which it closes when done).
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        let (tx, mut rx) = mpsc::channel::<Piece>(QUEUED);
        let (done_tx, done_rx) = oneshot::channel();
        let spare = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let give_back = spare.clone();
        let abandoned = Arc::new(AtomicBool::new(false));
        let given_up = abandoned.clone();
        let mut file = std::fs::File::from(fd);
        std::thread::Builder::new()
            .name("arca-write-out".into())
            .spawn(move || {
                let mut written = 0u64;
                let result = loop {
                    let Some(piece) = rx.blocking_recv() else {
                        break Ok(written);
                    };
                    if given_up.load(Ordering::Relaxed) {
                        break Err(io::Error::other("abandoned"));
                    }
                    let bytes: &[u8] = match &piece {
                        Piece::Gathered(b) => b,
                        Piece::Taken(b) => b,
                    };
                    if let Err(e) = write_fully(&mut file, bytes, &given_up) {
                        break Err(e);
                    }
                    written += bytes.len() as u64;
                    if let Piece::Gathered(mut buf) = piece {
                        buf.clear();
                        let mut spare = give_back.lock();
                        if spare.len() < QUEUED {
                            spare.push(buf);
                        }
                    }
                };
                let _ = done_tx.send(result);
            })?;
        Ok(Self {
            buf: BytesMut::with_capacity(BUFFER),
            tx: PollSender::new(tx),
            abandoned,
            finished: false,
            spare,
            done: Some(done_rx),
        })
    }

    /// Hands what is buffered to the thread, waits for it to write
    /// everything, and returns the number of bytes written.
    pub async fn finish(mut self) -> io::Result<u64> {
        std::future::poll_fn(|cx| self.poll_hand_over(cx)).await?;
        self.finished = true;
        self.tx.close();
        self.thread_result().await
    }

    /// The thread's result (it has stopped, or stops once its queue is empty).
    async fn thread_result(&mut self) -> io::Result<u64> {
        match self.done.take() {
            Some(done) => done.await.unwrap_or_else(|_| Err(thread_gone())),
            None => Err(thread_gone()),
        }
    }

    /// Hands the buffer to the thread (waiting for room in its queue).
    fn poll_hand_over(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.buf.is_empty() {
            return Poll::Ready(Ok(()));
        }
        self.poll_send(cx, |this| {
            let next = this
                .spare
                .lock()
                .pop()
                .unwrap_or_else(|| BytesMut::with_capacity(BUFFER));
            Piece::Gathered(std::mem::replace(&mut this.buf, next))
        })
    }

    /// Queues the piece `make` gives once the thread's queue has room (made
    /// only then, so nothing is lost while waiting).
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        make: impl FnOnce(&mut Self) -> Piece,
    ) -> Poll<io::Result<()>> {
        if ready!(self.tx.poll_reserve(cx)).is_err() {
            // The thread stopped: its error says why.
            return self.poll_thread_error(cx);
        }
        let piece = make(self);
        if self.tx.send_item(piece).is_err() {
            return self.poll_thread_error(cx);
        }
        Poll::Ready(Ok(()))
    }

    /// The error the thread stopped with.
    fn poll_thread_error(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(done) = self.done.as_mut() else {
            return Poll::Ready(Err(thread_gone()));
        };
        let result = ready!(Pin::new(done).poll(cx));
        self.done = None;
        Poll::Ready(match result {
            Ok(Err(e)) => Err(e),
            _ => Err(thread_gone()),
        })
    }
}

impl Drop for FdWriter {
    fn drop(&mut self) {
        if !self.finished {
            self.abandoned.store(true, Ordering::Relaxed);
        }
    }
}

/// Writes all of `bytes`, retrying `EINTR`, unless the writer is abandoned
/// (checked before every `write(2)`); a descriptor in non-blocking mode
/// (`EAGAIN`) is waited on with `poll(2)`, a second at a time.
fn write_fully(
    file: &mut std::fs::File,
    mut bytes: &[u8],
    abandoned: &AtomicBool,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    while !bytes.is_empty() {
        if abandoned.load(Ordering::Relaxed) {
            return Err(io::Error::other("abandoned"));
        }
        match file.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut pfd = libc::pollfd {
                    fd: file.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, 1000) };
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn thread_gone() -> io::Error {
    io::Error::other("the writing thread stopped")
}

impl NarOutput for FdWriter {
    const TAKES: bool = true;

    /// Takes every piece offered, after what was gathered before it.
    fn poll_take(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &mut Option<Bytes>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_hand_over(cx))?;
        let Some(piece) = data.take() else {
            return Poll::Ready(Ok(()));
        };
        // Given back if the queue has no room yet (Pending) or the thread
        // stopped: the caller keeps it.
        let mut piece = Some(piece);
        let r = this.poll_send(cx, |_| Piece::Taken(piece.take().expect("made once")));
        if piece.is_some() {
            *data = piece;
        }
        r
    }
}

impl tokio::io::AsyncWrite for FdWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.buf.len() >= BUFFER {
            ready!(this.poll_hand_over(cx))?;
        }
        // At most one buffer's worth past the mark: memory stays bounded
        // whatever the caller's write sizes.
        let n = data.len().min(BUFFER);
        this.buf.extend_from_slice(&data[..n]);
        Poll::Ready(Ok(n))
    }

    /// Hands the buffered bytes to the thread; [FdWriter::finish] waits
    /// until they are written.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_hand_over(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_hand_over(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn pipe() -> (OwnedFd, OwnedFd) {
        let (r, w) = std::io::pipe().unwrap();
        (r.into(), w.into())
    }

    #[tokio::test]
    async fn writes_everything_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let file = std::fs::File::create(&path).unwrap();
        let mut w = FdWriter::new(file.into()).unwrap();
        let mut expected = Vec::new();
        for i in 0..300usize {
            // Sizes from 1 byte to well over a buffer.
            let len = if i % 100 == 50 {
                2_500_000
            } else {
                (i * 7919) % 70_000 + 1
            };
            let piece: Vec<u8> = (0..len).map(|j| (j * (i + 1) % 251) as u8).collect();
            w.write_all(&piece).await.unwrap();
            expected.extend_from_slice(&piece);
        }
        w.flush().await.unwrap();
        assert_eq!(w.finish().await.unwrap(), expected.len() as u64);
        assert_eq!(std::fs::read(&path).unwrap(), expected);
    }

    #[tokio::test]
    async fn taken_pieces_keep_their_place_between_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let mut w = FdWriter::new(std::fs::File::create(&path).unwrap().into()).unwrap();
        let mut expected = Vec::new();
        for i in 0..50usize {
            let small: Vec<u8> = (0..(i * 37 % 500)).map(|j| (i + j) as u8).collect();
            w.write_all(&small).await.unwrap();
            expected.extend_from_slice(&small);
            let big = Bytes::from(
                (0..(i * 7919 % 300_000 + 1))
                    .map(|j| (j % 253) as u8)
                    .collect::<Vec<u8>>(),
            );
            let mut offered = Some(big.clone());
            std::future::poll_fn(|cx| Pin::new(&mut w).poll_take(cx, &mut offered))
                .await
                .unwrap();
            assert!(offered.is_none(), "an FdWriter takes every piece");
            expected.extend_from_slice(&big);
        }
        assert_eq!(w.finish().await.unwrap(), expected.len() as u64);
        assert_eq!(std::fs::read(&path).unwrap(), expected);
    }

    #[tokio::test]
    async fn a_failing_descriptor_is_an_error_not_a_hang() {
        let (read_end, write_end) = pipe();
        drop(read_end);
        let mut w = FdWriter::new(write_end).unwrap();
        let piece = vec![7u8; BUFFER];
        let mut failed = None;
        // EPIPE (SIGPIPE is ignored in Rust programs) on the first write; the
        // queue fills up to QUEUED buffers at most before that shows.
        for _ in 0..QUEUED + 8 {
            if let Err(e) = w.write_all(&piece).await {
                failed = Some(e);
                break;
            }
        }
        let e = match failed {
            Some(e) => e,
            None => w.finish().await.expect_err("writes into a closed pipe"),
        };
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
    }

    #[tokio::test]
    async fn an_abandoned_writer_on_a_full_non_blocking_pipe_stops() {
        let (read_end, write_end) = pipe();
        // SAFETY: F_SETFL on a descriptor this test owns.
        unsafe {
            use std::os::fd::AsRawFd;
            libc::fcntl(write_end.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK);
        }
        let mut w = FdWriter::new(write_end).unwrap();
        // More than the pipe holds: the thread waits in poll(2), the queue fills.
        let piece = vec![1u8; BUFFER];
        for _ in 0..QUEUED {
            w.write_all(&piece).await.unwrap();
            w.flush().await.unwrap();
        }
        drop(w);
        // The thread gives up: its end of the pipe closes, so reading ends,
        // well short of everything queued.
        let reader = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(1500));
            let mut out = Vec::new();
            std::io::Read::read_to_end(&mut std::fs::File::from(read_end), &mut out).unwrap();
            out.len()
        });
        let got = reader.join().unwrap();
        assert!(
            got < QUEUED * BUFFER,
            "{got} bytes: queued data was written after the drop"
        );
    }

    #[tokio::test]
    async fn dropping_the_writer_stops_the_thread() {
        let (read_end, write_end) = pipe();
        let mut w = FdWriter::new(write_end).unwrap();
        w.write_all(b"abc").await.unwrap();
        w.flush().await.unwrap();
        drop(w);
        // The thread stops and closes its end (reading ends); what was
        // queued may or may not have been written before the drop.
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut std::fs::File::from(read_end), &mut out).unwrap();
        assert!(out.is_empty() || out == b"abc", "{out:?}");
    }
}
