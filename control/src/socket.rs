//! The daemons' control socket: a Unix socket (mode 0600) where `dpctl`
//! sends [`Request`]s, one JSON line per connection, answered by one JSON
//! line. A listener thread serves every connection at once with
//! non-blocking I/O and `poll`, and hands each complete request through a
//! channel to the thread that owns the daemon's state, which answers them
//! one at a time. `devplane-server` and `devplane-client` both listen with
//! this [`ControlSocket`]; what each answers is theirs.
//!
//! Bounds: at most [`MAX_CONNECTIONS`] connections are held (a new one
//! past it closes the oldest that has not sent its whole request yet); a
//! request is at most [`MAX_REQUEST_BYTES`] and must arrive within
//! [`READ_DEADLINE`] of the connection; the daemon has
//! [`ANSWER_DEADLINE`] to answer it and the peer [`WRITE_DEADLINE`] to take
//! the answer. An idle or slow peer therefore holds one connection slot for
//! a bounded time and never delays another peer's request.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SendError, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::proto::{Request, Response};

/// Most connections held at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Longest request line, in bytes.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// A request must arrive whole within this of its connection.
pub const READ_DEADLINE: Duration = Duration::from_secs(5);
/// The daemon's owning thread must answer within this.
pub const ANSWER_DEADLINE: Duration = Duration::from_secs(10);
/// The peer must take the answer within this.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(5);

/// Where the answer to a [`Pending`] request goes.
pub struct Reply {
    tx: Sender<Response>,
    wake: Arc<OwnedFd>,
    /// A [`Request::Console`]'s connection, handed over whole: the
    /// listener keeps nothing of it (see [`Reply::take_stream`]).
    stream: Option<UnixStream>,
}

impl Reply {
    /// Sends the answer (and wakes the listener to write it). Fails when
    /// the connection is gone (its deadline passed). For a connection
    /// handed over ([`Reply::take_stream`] not taken), the answer is
    /// written on it here, within [`WRITE_DEADLINE`], and it is closed.
    pub fn send(&self, answer: Response) -> Result<(), SendError<Response>> {
        if let Some(stream) = &self.stream {
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_write_timeout(Some(WRITE_DEADLINE));
            if let State::Writing(line, _) = self::answer(answer.clone()) {
                let mut s = stream;
                return s.write_all(&line).map_err(|_| SendError(answer));
            }
            return Ok(());
        }
        self.tx.send(answer)?;
        ring(&self.wake);
        Ok(())
    }

    /// A [`Request::Console`]'s connection (non-blocking), which stays
    /// open as the console's stream: the daemon writes its answer line on
    /// it, then the console's bytes. `None` for every other request (the
    /// listener answers those).
    pub fn take_stream(&mut self) -> Option<UnixStream> {
        self.stream.take()
    }
}

/// A request waiting for the daemon's owning thread, with where its answer goes.
pub struct Pending {
    /// The request.
    pub request: Request,
    /// Where the answer goes.
    pub reply: Reply,
}

/// The listening socket; removed on drop.
pub struct ControlSocket {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    /// Wakes the listener thread: to stop, or to write an answer (it
    /// blocks in `poll`: a listener that polled with a timer would wake on
    /// a data-path core for nothing).
    wake: Arc<OwnedFd>,
    join: Option<JoinHandle<()>>,
}

fn ring(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a valid u64 to an eventfd we hold.
    unsafe { libc::write(fd.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8) };
}

fn drain(fd: &OwnedFd) {
    let mut v: u64 = 0;
    // SAFETY: reads at most 8 bytes into a valid u64 from a non-blocking
    // eventfd we hold.
    unsafe { libc::read(fd.as_raw_fd(), &mut v as *mut u64 as *mut libc::c_void, 8) };
}

impl ControlSocket {
    /// Listens on `path` (its directory is created; a stale socket file is
    /// replaced) and forwards each request to `to`. Fails with
    /// [`ErrorKind::AddrInUse`] when a daemon already answers on `path`.
    pub fn bind(path: &Path, to: Sender<Pending>) -> std::io::Result<ControlSocket> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                ErrorKind::AddrInUse,
                format!(
                    "another daemon answers on the control socket {}",
                    path.display()
                ),
            ));
        }
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        // SAFETY: plain syscall; the fd is owned by the OwnedFd below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `efd` is a new, valid fd that nothing else owns.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
        let (s, w) = (stop.clone(), wake.clone());
        let join = std::thread::Builder::new()
            .name("dp-control".into())
            .spawn(move || Listener::new(listener, to, w).run(&s))?;
        Ok(ControlSocket {
            path: path.to_path_buf(),
            stop,
            wake,
            join: Some(join),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        ring(&self.wake);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Where one connection is.
enum State {
    /// Reading its request line.
    Reading(Vec<u8>),
    /// Waiting for the daemon's answer.
    Waiting(Receiver<Response>),
    /// Writing the answer; the offset written so far.
    Writing(Vec<u8>, usize),
    /// Done: to be closed.
    Closed,
}

struct Conn {
    stream: UnixStream,
    state: State,
    /// When the current state must end.
    deadline: Instant,
}

struct Listener {
    listener: UnixListener,
    to: Sender<Pending>,
    wake: Arc<OwnedFd>,
    /// Oldest first.
    conns: VecDeque<Conn>,
    fds: Vec<libc::pollfd>,
}

impl Listener {
    fn new(listener: UnixListener, to: Sender<Pending>, wake: Arc<OwnedFd>) -> Listener {
        Listener {
            listener,
            to,
            wake,
            conns: VecDeque::new(),
            fds: Vec::new(),
        }
    }

    fn run(mut self, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            self.wait();
            drain(&self.wake);
            self.accept();
            let now = Instant::now();
            for i in 0..self.conns.len() {
                self.progress(i, now);
            }
            self.conns.retain(|c| !matches!(c.state, State::Closed));
        }
    }

    /// Sleeps in `poll` until the listener, the wake fd or a connection is
    /// ready, or the earliest deadline.
    fn wait(&mut self) {
        self.fds.clear();
        for fd in [self.listener.as_raw_fd(), self.wake.as_raw_fd()] {
            self.fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let mut first: Option<Instant> = None;
        for c in &self.conns {
            let events = match c.state {
                State::Reading(_) => libc::POLLIN,
                State::Writing(..) => libc::POLLOUT,
                State::Waiting(_) | State::Closed => 0,
            };
            if events != 0 {
                self.fds.push(libc::pollfd {
                    fd: c.stream.as_raw_fd(),
                    events,
                    revents: 0,
                });
            }
            first = Some(first.map_or(c.deadline, |f| f.min(c.deadline)));
        }
        let timeout = first.map_or(-1, |t| {
            let left = t.saturating_duration_since(Instant::now());
            // Rounded up: waking a little early would spin.
            left.as_millis().min(i32::MAX as u128 - 1) as i32 + 1
        });
        // SAFETY: `fds` is valid for the call.
        unsafe { libc::poll(self.fds.as_mut_ptr(), self.fds.len() as _, timeout) };
    }

    /// Accepts every waiting connection; past [`MAX_CONNECTIONS`], the
    /// oldest connection still reading its request is closed for it.
    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // WouldBlock, or a transient error (out of fds, say): the
                // next wake-up tries again.
                Err(_) => return,
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            if self.conns.len() >= MAX_CONNECTIONS {
                let oldest = self
                    .conns
                    .iter()
                    .position(|c| matches!(c.state, State::Reading(_)));
                match oldest {
                    Some(i) => {
                        self.conns.remove(i);
                    }
                    // Every slot has a request in hand: refuse this one.
                    None => continue,
                }
            }
            self.conns.push_back(Conn {
                stream,
                state: State::Reading(Vec::new()),
                deadline: Instant::now() + READ_DEADLINE,
            });
            // Its request is usually there already.
            let i = self.conns.len() - 1;
            self.progress(i, Instant::now());
        }
    }

    /// Moves connection `i` on as far as it can go without blocking.
    fn progress(&mut self, i: usize, now: Instant) {
        let c = &mut self.conns[i];
        if let State::Reading(buf) = &mut c.state {
            match read_request(&mut c.stream, buf) {
                Got::More if now >= c.deadline => c.state = State::Closed,
                Got::More => {}
                Got::Gone => c.state = State::Closed,
                Got::Line(line) => {
                    c.state = match serde_json::from_slice::<Request>(&line) {
                        Err(e) => answer(Response::Error {
                            message: format!("bad request: {e}"),
                        }),
                        Ok(request) => {
                            let (tx, rx) = mpsc::channel();
                            // A console keeps its connection: it is handed
                            // over with the request (a duplicate of the
                            // socket; this one is closed here).
                            let handed = matches!(request, Request::Console { .. });
                            let stream = if handed {
                                c.stream.try_clone().ok()
                            } else {
                                None
                            };
                            // Not duplicated (out of fds): answered as any
                            // request, so the daemon's refusal is seen.
                            let handed = stream.is_some();
                            let reply = Reply {
                                tx,
                                wake: self.wake.clone(),
                                stream,
                            };
                            match self.to.send(Pending { request, reply }) {
                                Ok(()) if handed => State::Closed,
                                Ok(()) => State::Waiting(rx),
                                Err(_) => answer(Response::Error {
                                    message: "the daemon is stopping".into(),
                                }),
                            }
                        }
                    };
                    c.deadline = now
                        + if matches!(c.state, State::Waiting(_)) {
                            ANSWER_DEADLINE
                        } else {
                            WRITE_DEADLINE
                        };
                }
            }
        }
        if let State::Waiting(rx) = &c.state {
            let got = match rx.try_recv() {
                Ok(r) => Some(r),
                Err(TryRecvError::Disconnected) => Some(Response::Error {
                    message: "the daemon dropped the request".into(),
                }),
                Err(TryRecvError::Empty) if now >= c.deadline => Some(Response::Error {
                    message: "the daemon did not answer in time".into(),
                }),
                Err(TryRecvError::Empty) => None,
            };
            if let Some(r) = got {
                c.state = answer(r);
                c.deadline = now + WRITE_DEADLINE;
            }
        }
        if let State::Writing(out, at) = &mut c.state {
            loop {
                match c.stream.write(&out[*at..]) {
                    Ok(0) => {
                        c.state = State::Closed;
                        break;
                    }
                    Ok(n) => {
                        *at += n;
                        if *at == out.len() {
                            c.state = State::Closed;
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        if now >= c.deadline {
                            c.state = State::Closed;
                        }
                        break;
                    }
                    Err(_) => {
                        c.state = State::Closed;
                        break;
                    }
                }
            }
        }
    }
}

/// An answer as the state that writes it.
fn answer(r: Response) -> State {
    let mut text = serde_json::to_vec(&r).unwrap_or_else(|e| {
        format!("{{\"Error\":{{\"message\":\"answer not encodable: {e}\"}}}}").into_bytes()
    });
    text.push(b'\n');
    State::Writing(text, 0)
}

/// What reading a request found.
enum Got {
    /// Not all of it yet.
    More,
    /// The peer left without a request, or it was too long.
    Gone,
    /// The request line (without its newline; or all the peer sent before
    /// it closed its side).
    Line(Vec<u8>),
}

fn read_request(stream: &mut UnixStream, buf: &mut Vec<u8>) -> Got {
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Got::Gone,
            Ok(0) => return Got::Line(std::mem::take(buf)),
            Ok(n) => {
                let part = &chunk[..n];
                if let Some(nl) = part.iter().position(|&b| b == b'\n') {
                    buf.extend_from_slice(&part[..nl]);
                    return if buf.len() > MAX_REQUEST_BYTES {
                        Got::Gone
                    } else {
                        Got::Line(std::mem::take(buf))
                    };
                }
                buf.extend_from_slice(part);
                if buf.len() > MAX_REQUEST_BYTES {
                    return Got::Gone;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Got::More,
            Err(_) => return Got::Gone,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::call;

    /// A daemon's owning thread: answers each request, one at a time, with
    /// an error naming it (any answer would do).
    fn serve(dir: &Path) -> (ControlSocket, PathBuf, JoinHandle<()>) {
        let path = dir.join("control.sock");
        let (tx, rx) = mpsc::channel::<Pending>();
        let sock = ControlSocket::bind(&path, tx).unwrap();
        let owner = std::thread::spawn(move || {
            for p in rx {
                let _ = p.reply.send(Response::Error {
                    message: format!("answered {:?}", p.request),
                });
            }
        });
        (sock, path, owner)
    }

    fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dp-ctlsock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// One request, timed.
    fn stats(path: &Path) -> (Response, Duration) {
        let t = Instant::now();
        let r = call(path, &Request::Stats, Duration::from_secs(3)).expect("answered");
        (r, t.elapsed())
    }

    fn is_answer(r: &Response) -> bool {
        matches!(r, Response::Error { message } if message.contains("Stats"))
    }

    #[test]
    fn idle_peers_do_not_delay_a_request() {
        let dir = tempdir("idle");
        let (sock, path, owner) = serve(&dir);
        // 500 peers that connect and send nothing, more than the listener
        // holds.
        let idle: Vec<UnixStream> = (0..500)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        let (r, took) = stats(&path);
        assert!(is_answer(&r), "{r:?}");
        assert!(took < Duration::from_millis(500), "took {took:?}");
        // The oldest idle peers were closed to make room.
        let mut closed = 0;
        for mut s in idle {
            s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
            if matches!(s.read(&mut [0u8; 1]), Ok(0)) {
                closed += 1;
            }
        }
        assert!(closed >= 500 - MAX_CONNECTIONS, "{closed} closed");
        drop(sock);
        owner.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_slow_peer_does_not_delay_a_request_and_is_cut_off() {
        let dir = tempdir("slow");
        let (sock, path, owner) = serve(&dir);
        // A peer that sends a byte of its request every 2 s.
        let p = path.clone();
        let slow = std::thread::spawn(move || {
            let mut s = UnixStream::connect(&p).unwrap();
            let started = Instant::now();
            for b in b"\"Stats\"\n" {
                std::thread::sleep(Duration::from_secs(2));
                if s.write_all(&[*b]).is_err() {
                    break;
                }
            }
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            (started.elapsed(), out)
        });
        std::thread::sleep(Duration::from_millis(2500));
        for _ in 0..3 {
            let (r, took) = stats(&path);
            assert!(is_answer(&r), "{r:?}");
            assert!(took < Duration::from_millis(500), "took {took:?}");
            std::thread::sleep(Duration::from_millis(700));
        }
        let (took, out) = slow.join().unwrap();
        assert!(out.is_empty(), "the slow peer was answered: {out:?}");
        assert!(
            took < READ_DEADLINE + Duration::from_secs(3),
            "the slow peer was held {took:?}"
        );
        drop(sock);
        owner.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_console_request_hands_its_connection_over() {
        let dir = tempdir("console");
        let path = dir.join("control.sock");
        let (tx, rx) = mpsc::channel::<Pending>();
        let sock = ControlSocket::bind(&path, tx).unwrap();
        let mut ours = UnixStream::connect(&path).unwrap();
        ours.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        ours.write_all(b"{\"op\":\"console\",\"vm\":1,\"write\":true}\n")
            .unwrap();
        let mut p = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(
            matches!(
                p.request,
                Request::Console {
                    vm: 1,
                    model: None,
                    write: true
                }
            ),
            "{:?}",
            p.request
        );
        let theirs = p
            .reply
            .take_stream()
            .expect("the connection is handed over");
        assert!(p.reply.take_stream().is_none());
        // Bytes both ways on it; the listener keeps nothing of it.
        (&theirs).write_all(b"out").unwrap();
        let mut got = [0u8; 3];
        ours.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"out");
        ours.write_all(b"in").unwrap();
        theirs.set_nonblocking(false).unwrap();
        let mut got = [0u8; 2];
        (&theirs).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"in");
        // A daemon that does not take it (the client daemon) answers on it.
        let mut other = UnixStream::connect(&path).unwrap();
        other
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        other.write_all(b"{\"op\":\"console\",\"vm\":2}\n").unwrap();
        let p = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        p.reply
            .send(Response::Error {
                message: "no consoles here".into(),
            })
            .unwrap();
        drop(p);
        let mut text = String::new();
        other.read_to_string(&mut text).unwrap();
        assert!(
            text.contains("no consoles here") && text.ends_with('\n'),
            "{text}"
        );
        drop(sock);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_second_daemon_and_oversized_requests_are_refused() {
        let dir = tempdir("late");
        let path = dir.join("control.sock");
        let (tx, rx) = mpsc::channel::<Pending>();
        let sock = ControlSocket::bind(&path, tx).unwrap();
        // A second daemon on the same path is refused.
        let (tx2, _rx2) = mpsc::channel::<Pending>();
        let e = ControlSocket::bind(&path, tx2).err().expect("refused");
        assert_eq!(e.kind(), ErrorKind::AddrInUse);
        assert!(e.to_string().contains("another daemon"), "{e}");
        // A request too long is cut off unanswered.
        let mut s = UnixStream::connect(&path).unwrap();
        let _ = s.write_all(&vec![b' '; MAX_REQUEST_BYTES + 10]);
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        assert!(out.is_empty());
        drop(sock);
        drop(rx);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
