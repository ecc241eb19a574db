//! `dpctl vms console ID`: the operator's terminal on a VM's console,
//! which lives on the server that runs its UART model. The terminal is
//! put in raw mode (restored on the way out); what the guest writes is
//! copied to stdout as it comes; what is typed goes to the guest (unless
//! `--read-only`) until the detach key (Ctrl-] unless `--escape`).
//! Messages go to stderr, so stdout carries the guest's bytes only.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use devplane_control::console::{parse_escape, scan, show_escape};
use devplane_control::proto::{Request, Response};

use super::{Cli, EXIT_FAILED, EXIT_NOT_FOUND, EXIT_USAGE, Failure};

/// What `vms console` was asked.
pub(super) struct Args<'a> {
    pub vm: u32,
    pub model: Option<u32>,
    pub read_only: bool,
    pub escape: &'a str,
}

fn failed(message: String) -> Failure {
    Failure {
        code: EXIT_FAILED,
        message,
    }
}

/// The terminal's settings before raw mode, put back on drop.
struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    /// Raw mode on `fd` if it is a terminal (keys arrive one by one, no
    /// echo, Ctrl-C goes to the guest); `None` if it is not one.
    fn enter(fd: i32) -> Option<RawMode> {
        // SAFETY: isatty only inspects the fd.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: a zeroed termios is a valid out-parameter for tcgetattr.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is valid for the call.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: `raw` is a valid termios.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: `raw` is valid for the call.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the settings read by `enter` on the same fd.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// Connects, asks for the console and reads the server's answer line
/// (byte by byte: the console's bytes follow it on the same stream).
fn attach(cli: &Cli, a: &Args<'_>) -> Result<(UnixStream, u32, u32), Failure> {
    let path = &cli.socket;
    let stream = UnixStream::connect(path).map_err(|e| {
        failed(format!(
            "no server listening on {} ({e}): is devplane-server running? (pass --socket if it uses another path)",
            path.display()
        ))
    })?;
    let req = Request::Console {
        vm: a.vm,
        model: a.model,
        write: !a.read_only,
    };
    let mut line = serde_json::to_vec(&req).map_err(|e| failed(e.to_string()))?;
    line.push(b'\n');
    (&stream)
        .write_all(&line)
        .map_err(|e| failed(format!("talking to the server on {}: {e}", path.display())))?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .map_err(|e| failed(e.to_string()))?;
    let mut answer = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match (&stream).read(&mut b) {
            Ok(0) => {
                return Err(failed(format!(
                    "the server on {} closed the connection without an answer",
                    path.display()
                )));
            }
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) if answer.len() > 64 * 1024 => {
                return Err(failed("the server's answer is too long".into()));
            }
            Ok(_) => answer.push(b[0]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(failed(format!(
                    "waiting for the server on {}: {e}",
                    path.display()
                )));
            }
        }
    }
    let rsp: Response = serde_json::from_slice(&answer)
        .map_err(|e| failed(format!("the server answered garbage: {e}")))?;
    match rsp {
        Response::Console { server, model, .. } => {
            stream
                .set_read_timeout(None)
                .map_err(|e| failed(e.to_string()))?;
            Ok((stream, server, model))
        }
        Response::Error { message } => Err(failed(format!("the server refused: {message}"))),
        Response::NotFound { message } => Err(Failure {
            code: EXIT_NOT_FOUND,
            message,
        }),
        other => Err(failed(format!(
            "the server answered the console with {other:?}"
        ))),
    }
}

/// Runs the console until the detach key, the end of the server's stream,
/// or (read-only, stdin at its end) forever as a pure viewer.
pub(super) fn run(cli: &Cli, a: &Args<'_>) -> Result<String, Failure> {
    let key = parse_escape(a.escape).map_err(|e| Failure {
        code: EXIT_USAGE,
        message: format!("--escape: {e}"),
    })?;
    let (mut stream, server, model) = attach(cli, a)?;
    eprintln!(
        "dpctl: VM {}'s console (model {model} on server {server}){}; {} detaches",
        a.vm,
        if a.read_only { ", read-only" } else { "" },
        show_escape(key)
    );
    let stdin = std::io::stdin();
    let in_fd = stdin.as_raw_fd();
    let raw = RawMode::enter(in_fd);
    let mut stdout = std::io::stdout().lock();
    let mut stdin_open = true;
    let mut buf = vec![0u8; 16 * 1024];
    let outcome = loop {
        let mut fds = [
            libc::pollfd {
                fd: stream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if stdin_open { in_fd } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is valid for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            break Err(failed(format!("poll: {e}")));
        }
        if fds[0].revents != 0 {
            match stream.read(&mut buf) {
                Ok(0) => break Err(failed("the server closed the console".into())),
                Ok(n) => {
                    if stdout
                        .write_all(&buf[..n])
                        .and_then(|()| stdout.flush())
                        .is_err()
                    {
                        // Nowhere to show it (a closed pipe): leave.
                        break Ok(());
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => break Err(failed(format!("reading the console: {e}"))),
            }
        }
        if fds[1].revents != 0 {
            match stdin.lock().read(&mut buf) {
                Ok(0) => stdin_open = false,
                Ok(n) => {
                    let s = scan(&buf[..n], key);
                    if !a.read_only
                        && !s.forward.is_empty()
                        && let Err(e) = stream.write_all(s.forward)
                    {
                        break Err(failed(format!("typing into the console: {e}")));
                    }
                    if s.detach {
                        break Ok(());
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => stdin_open = false,
            }
        }
    };
    drop(raw);
    outcome.map(|()| {
        eprintln!("\ndpctl: detached from VM {}'s console", a.vm);
        String::new()
    })
}
