//! A private etcd for a test: [`Etcd`] starts Debian's `etcd` (the
//! `etcd-server` package, installed by `scripts/setup.sh`) on loopback
//! with its own data directory and ports, and on drop kills it and
//! removes the directory. Tests that need a store start their own, so
//! neither `.ci/run` nor a developer has a service to run.
//!
//! [`Etcd::start_in`] starts it inside a network namespace instead (a
//! host of a [`crate::lan::Lan`]), listening on that host's address, so
//! that agents in the other hosts' namespaces reach it over the LAN.
//!
//! A missing `etcd` binary skips the test with a message, or fails it when
//! `DEVPLANE_REQUIRE_PRIVILEGED` is set ([`crate::privilege::unavailable`]).

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The etcd binary (Debian's path; `DEVPLANE_ETCD` overrides).
pub const ETCD_BIN: &str = "/usr/bin/etcd";

/// How long etcd may take to answer after it is started.
const READY_WITHIN: Duration = Duration::from_secs(20);

/// A running private etcd.
#[derive(Debug)]
pub struct Etcd {
    child: Option<Child>,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    bin: PathBuf,
    /// The namespace it runs in (`None`: the test's own) and the address
    /// it listens on there.
    netns: Option<String>,
    host: Ipv4Addr,
}

fn free_port() -> std::io::Result<u16> {
    let l = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))?;
    Ok(l.local_addr()?.port())
}

fn bin() -> PathBuf {
    std::env::var_os("DEVPLANE_ETCD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(ETCD_BIN))
}

impl Etcd {
    /// Starts a private etcd for test `test`. `None` (after a skip
    /// message) when etcd is not installed and skipping is allowed; a
    /// panic when it is required or etcd does not come up.
    pub fn start(test: &str) -> Option<Etcd> {
        Self::start_at(test, None, Ipv4Addr::LOCALHOST)
    }

    /// Starts a private etcd inside network namespace `netns`, listening
    /// on `host` (an address of that namespace). `None` and a panic as
    /// for [`Etcd::start`].
    pub fn start_in(test: &str, netns: &str, host: Ipv4Addr) -> Option<Etcd> {
        Self::start_at(test, Some(netns.to_string()), host)
    }

    fn start_at(test: &str, netns: Option<String>, host: Ipv4Addr) -> Option<Etcd> {
        let bin = bin();
        if !bin.exists() {
            crate::privilege::unavailable(
                test,
                &format!(
                    "{} is missing: install Debian's etcd-server (scripts/setup.sh does)",
                    bin.display()
                ),
            );
            return None;
        }
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "devplane-etcd-{}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
        ));
        let mut last = String::new();
        // A port found free can be taken before etcd binds it: try again.
        for _ in 0..3 {
            // A namespace of its own has every port free.
            let ports = match netns {
                None => (free_port(), free_port()),
                Some(_) => (Ok(2379), Ok(2380)),
            };
            let (Ok(client_port), Ok(peer_port)) = ports else {
                continue;
            };
            let mut e = Etcd {
                child: None,
                dir: dir.clone(),
                client_port,
                peer_port,
                bin: bin.clone(),
                netns: netns.clone(),
                host,
            };
            match e.launch() {
                Ok(()) => return Some(e),
                Err(why) => {
                    last = why;
                    e.kill();
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
        }
        panic!("{test}: cannot start etcd: {last}");
    }

    fn launch(&mut self) -> Result<(), String> {
        let client = self.endpoint();
        let peer = format!("http://{}:{}", self.host, self.peer_port);
        let mut cmd = match &self.netns {
            None => Command::new(&self.bin),
            Some(ns) => {
                // nsenter execs etcd: the child's pid is etcd's.
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/var/run/netns/{ns}"))
                    .arg("--")
                    .arg(&self.bin);
                c
            }
        };
        let child = cmd
            .arg("--name")
            .arg("devplane-test")
            .arg("--data-dir")
            .arg(&self.dir)
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("devplane-test={peer}"))
            .arg("--logger")
            .arg("zap")
            .arg("--log-level")
            .arg("error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", self.bin.display()))?;
        self.child = Some(child);
        let end = Instant::now() + READY_WITHIN;
        let addr = SocketAddrV4::new(self.host, self.client_port);
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                return Err(format!("etcd exited at start: {status}"));
            }
            if self.healthy() {
                return Ok(());
            }
            if Instant::now() >= end {
                return Err(format!(
                    "etcd did not answer on {addr} within {READY_WITHIN:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether etcd answers `/health` with `"health":"true"` (asked from
    /// its namespace).
    pub fn healthy(&self) -> bool {
        match &self.netns {
            None => self.healthy_here(),
            Some(ns) => crate::topology::run_in_netns(ns, || self.healthy_here()).unwrap_or(false),
        }
    }

    fn healthy_here(&self) -> bool {
        use std::io::{Read, Write};
        let addr = SocketAddrV4::new(self.host, self.client_port);
        let Ok(mut s) = TcpStream::connect_timeout(&addr.into(), Duration::from_millis(500)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let req = format!(
            "GET /health HTTP/1.1\r\nHost: {}:{}\r\nConnection: close\r\n\r\n",
            self.host, self.client_port
        );
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.contains("\"health\":\"true\"")
    }

    /// `http://HOST:PORT` (`127.0.0.1` unless started in a namespace).
    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", self.host, self.client_port)
    }

    /// The `--store` value: `etcd:http://HOST:PORT`.
    pub fn store_url(&self) -> String {
        format!("etcd:{}", self.endpoint())
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// Kills etcd (SIGKILL, as a crash) and keeps its data.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts etcd again on the same ports and data (after [`Etcd::kill`]).
    pub fn restart(&mut self) {
        self.kill();
        if let Err(why) = self.launch() {
            panic!("cannot restart etcd: {why}");
        }
    }

    /// Compacts etcd's history up to `revision` (with `etcdctl`): watches
    /// from before it are cancelled.
    pub fn compact(&self, revision: u64) {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.endpoint())
            .arg("compact")
            .arg(revision.to_string())
            .output()
            .expect("etcdctl runs (Debian's etcd-client package)");
        assert!(
            out.status.success(),
            "etcdctl compact {revision}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
