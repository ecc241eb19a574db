//! A server on a thread of its own (optionally inside a network namespace),
//! driven over a channel: how tests, the benchmark and the embedded
//! topology run a server. The [`Server`] never leaves that thread (its
//! UMEM is not `Send`).

use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;

use devplane_control::config::ServerConfig;
use devplane_control::socket::{ControlSocket, Pending};

use devplane_server::stats::WorkerSnapshot;
use devplane_server::xdp::Stats;
use devplane_server::{Attach, QueueStats, Server, ServerError};

/// A server's counters at one moment.
#[derive(Debug, Clone, Default)]
pub struct ServerSnapshot {
    /// Each worker's counters.
    pub workers: Vec<WorkerSnapshot>,
    /// The XDP program's counters (XDP mode).
    pub xdp: Option<Stats>,
    /// Per device queue counters (XDP mode).
    pub queues: Option<QueueStats>,
}

type Call = Box<dyn FnOnce(&mut Server) + Send>;

enum Cmd {
    Snapshot(Sender<ServerSnapshot>),
    Call(Call),
    Control(Pending),
    Stop,
}

/// A running server on its own thread. Dropping it stops the server.
pub struct ServerThread {
    tx: Sender<Cmd>,
    join: Option<JoinHandle<()>>,
    attach: Option<Attach>,
    /// The control socket, if [`ServerThread::listen`] opened one.
    control: Option<Box<ControlSocket>>,
}

fn serve(mut server: Server, rx: Receiver<Cmd>) {
    while let Ok(cmd) = rx.recv() {
        match cmd {
            Cmd::Snapshot(reply) => {
                let snap = ServerSnapshot {
                    workers: server.worker_stats(),
                    xdp: server.xdp_stats().and_then(Result::ok),
                    queues: server.queue_stats(),
                };
                let _ = reply.send(snap);
            }
            Cmd::Call(f) => f(&mut server),
            Cmd::Control(p) => devplane_server::control::serve(&mut server, p),
            Cmd::Stop => break,
        }
    }
    server.stop();
}

impl ServerThread {
    /// Starts a server for `cfg` on a new thread, inside network namespace
    /// `netns` if given; returns once it runs (or failed to start).
    pub fn spawn(cfg: ServerConfig, netns: Option<&str>) -> Result<ServerThread, ServerError> {
        let (tx, rx) = mpsc::channel::<Cmd>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<Option<Attach>, ServerError>>();
        let body = move || match Server::start(&cfg) {
            Ok(server) => {
                let _ = ready_tx.send(Ok(server.attach_mode()));
                serve(server, rx);
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        };
        let thread = |source| ServerError::Thread { index: 0, source };
        let join = match netns {
            Some(ns) => crate::topology::spawn_in_netns(ns, "dp-server", body).map_err(thread)?,
            None => std::thread::Builder::new()
                .name("dp-server".into())
                .spawn(body)
                .map_err(thread)?,
        };
        let attach = match ready_rx.recv() {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                let _ = join.join();
                return Err(e);
            }
            Err(_) => {
                let _ = join.join();
                return Err(ServerError::Thread {
                    index: 0,
                    source: std::io::Error::other("the server thread died while starting"),
                });
            }
        };
        Ok(ServerThread {
            tx,
            join: Some(join),
            attach,
            control: None,
        })
    }

    /// Answers `dpctl --socket PATH` as `devplane-server` does, on the
    /// server's thread, until the server stops (the socket is removed
    /// then).
    pub fn listen(&mut self, path: &std::path::Path) -> std::io::Result<()> {
        let (ctl_tx, ctl_rx) = mpsc::channel::<Pending>();
        self.control = Some(Box::new(ControlSocket::bind(path, ctl_tx)?));
        let fwd = self.tx.clone();
        std::thread::spawn(move || {
            for p in ctl_rx {
                if fwd.send(Cmd::Control(p)).is_err() {
                    break;
                }
            }
        });
        Ok(())
    }

    /// How XDP is attached (XDP mode).
    pub fn attach_mode(&self) -> Option<Attach> {
        self.attach
    }

    /// The server's counters now.
    pub fn snapshot(&self) -> ServerSnapshot {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Cmd::Snapshot(tx)).is_err() {
            return ServerSnapshot::default();
        }
        rx.recv().unwrap_or_default()
    }

    /// Runs `f` on the server's thread (lifecycle operations: moving a
    /// model, suspending a VM, ...) and returns its result; `None` if the
    /// server thread is gone.
    pub fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Server) -> R + Send + 'static,
    ) -> Option<R> {
        let (tx, rx) = mpsc::channel();
        let call: Call = Box::new(move |s| {
            let _ = tx.send(f(s));
        });
        self.tx.send(Cmd::Call(call)).ok()?;
        rx.recv().ok()
    }

    /// Stops the server and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.control = None;
        let _ = self.tx.send(Cmd::Stop);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        self.shutdown();
    }
}
