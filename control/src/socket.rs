//! The daemons' control socket: a Unix socket (mode 0600) where `dpctl`
//! sends [`Request`]s. A listener thread reads one request per connection
//! and hands it through a channel to the thread that owns the daemon's
//! state, which answers it. `devplane-server` and `devplane-client` both
//! listen with this [`ControlSocket`]; what each answers is theirs.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::proto::{Request, Response};

/// A request waiting for the daemon's owning thread, with where its answer goes.
pub struct Pending {
    /// The request.
    pub request: Request,
    /// Where the answer goes.
    pub reply: Sender<Response>,
}

/// The listening socket; removed on drop.
pub struct ControlSocket {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    /// Wakes the listener thread to stop (it blocks in `poll`: a listener
    /// that polled with a timer would wake on a data-path core for
    /// nothing).
    wake: Arc<OwnedFd>,
    join: Option<JoinHandle<()>>,
}

impl ControlSocket {
    /// Listens on `path` (its directory is created; a stale socket file is
    /// replaced) and forwards each request to `to`.
    pub fn bind(path: &Path, to: Sender<Pending>) -> std::io::Result<ControlSocket> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
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
            .spawn(move || accept_loop(listener, to, s, w))?;
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
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
        unsafe {
            libc::write(
                self.wake.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(
    listener: UnixListener,
    to: Sender<Pending>,
    stop: Arc<AtomicBool>,
    wake: Arc<OwnedFd>,
) {
    while !stop.load(Ordering::Relaxed) {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut fds = [
                    libc::pollfd {
                        fd: listener.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                    libc::pollfd {
                        fd: wake.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                ];
                // SAFETY: `fds` is valid for the call; no timeout.
                unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
                continue;
            }
            Err(_) => {
                // A transient error (out of fds, say): do not spin.
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut line = String::new();
        if BufReader::new(&stream).read_line(&mut line).is_err() {
            continue;
        }
        let answer = match serde_json::from_str::<Request>(&line) {
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
            Ok(request) => {
                let (tx, rx) = mpsc::channel();
                if to.send(Pending { request, reply: tx }).is_err() {
                    break;
                }
                rx.recv_timeout(Duration::from_secs(10))
                    .unwrap_or(Response::Error {
                        message: "the daemon did not answer in time".into(),
                    })
            }
        };
        if let Ok(mut text) = serde_json::to_string(&answer) {
            text.push('\n');
            let _ = (&stream).write_all(text.as_bytes());
        }
    }
}
