//! The client daemon (`devplane-client`): holds the VMs of one client
//! platform, launched and shut down one at a time by `dpctl vms
//! launch|shutdown` over its control socket, and suspended, resumed,
//! snapshotted, restored and live-migrated to another client daemon
//! (`dpctl vms suspend|resume|snapshot|restore|migrate`; see
//! [`Client::suspend`], [`Client::snapshot`], [`super::migrate`]).
//!
//! The VMs a daemon may run come from its configuration file
//! ([`config::ClientFile`]). Each launched VM is a [`Client`] of its own,
//! with its own vCPU threads, engine thread, io_uring lanes and sockets:
//! VMs start and stop independently and share nothing, so starting one
//! never pauses another and shutting one down (stopping its vCPUs and
//! engine, unmapping its memory) cannot touch another's in-flight
//! requests. The price is one engine thread per VM instead of one per
//! client, which the direct mode (the default) keeps off the hot path.
//!
//! A guest that stops by itself (it reported on its done port, shut down
//! or rebooted) is noticed at every request and by [`Daemon::reap`], which
//! the daemon's owner calls periodically: the VM is then stopped, its
//! resources freed, and how its vCPUs ended is kept — the next
//! [`Daemon::shutdown`] of that VM returns it (with `by_itself` set), and
//! [`Daemon::list`] shows it.
//!
//! *Noticing it* asks [`Client::finished`], which looks at the VM's vCPU
//! threads without stopping them.

pub mod config;
mod reconcile;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use devplane_control::proto::{Request, Response, VcpuEnd, VmRunState, VmStatus};

use super::migrate::{self, Migration, MigrationToken};
use super::snapshot::VmSnapshot;
use super::vmm::{Client, ClientError, SuspendError, VcpuReport};
use config::{ClientFile, ConfigError};

/// Why a daemon request was refused.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// No such VM in the configuration.
    #[error("VM {vm} is not in this client's configuration (configured: {configured})")]
    UnknownVm {
        /// The VM asked for.
        vm: u32,
        /// The configured VM ids, comma-separated.
        configured: String,
    },
    /// Launch of a VM that runs.
    #[error("VM {0} is already running: shut it down first")]
    AlreadyRunning(u32),
    /// Shutdown, suspend or resume of a VM that does not run.
    #[error("VM {0} is not running")]
    NotRunning(u32),
    /// Suspend of a suspended VM, resume of a running one, or its vCPUs
    /// did not hold in time.
    #[error("VM {vm}: {source}")]
    Suspend {
        /// The VM.
        vm: u32,
        /// Why.
        source: SuspendError,
    },
    /// A migration could not start or failed.
    #[error("{0}")]
    Migrate(String),
    /// A model could not be pointed at another server.
    #[error("{0}")]
    Retarget(String),
    /// A snapshot could not be taken, written, read or restored.
    #[error("{0}")]
    Snapshot(String),
    /// The VM's spec could not be built.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// Keys for another client platform.
    #[error("these keys are client {client}'s; this daemon is client {this}")]
    ForeignKeys {
        /// The client the keys were for.
        client: u32,
        /// This daemon's client.
        this: u32,
    },
    /// KVM, the engine or a socket refused.
    #[error("cannot start VM {vm}: {source}")]
    Start {
        /// The VM.
        vm: u32,
        /// Why.
        source: ClientError,
    },
}

/// How long a suspend waits for a VM's vCPUs to hold (a vCPU waiting for
/// a remote answer finishes that exit first). Below the control socket's
/// 10 s per request, so that a suspend that cannot finish is answered
/// (and the VM runs on) rather than cut off.
const SUSPEND_TIMEOUT: Duration = Duration::from_secs(8);

/// How long a retarget waits for each VM's lanes to take it (a lane
/// busy with a burst takes it at its next step).
const RETARGET_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a migration target waits for its source.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(30);

/// A launched VM.
struct Running {
    client: Client,
    since: Instant,
}

/// One configured VM.
#[derive(Default)]
struct Slot {
    running: Option<Running>,
    /// How its vCPUs ended the last time it stopped.
    ended: Vec<VcpuEnd>,
    /// It stopped by itself the last time.
    by_itself: bool,
    /// Its remote disks' counters when it last stopped.
    disks: Vec<devplane_control::proto::DiskStatus>,
    /// It stopped by itself and no shutdown has reported it yet.
    unclaimed: bool,
}

/// The VMs of one client platform: which run, and how the others ended.
pub struct Daemon {
    file: ClientFile,
    slots: BTreeMap<u32, Slot>,
    /// VMs migrated in ([`Daemon::receive`]), from their receiving threads.
    arrivals: (Sender<Client>, Receiver<Client>),
    /// VMs noticed stopping by themselves, not yet returned by
    /// [`Daemon::reap`].
    noticed: Vec<VmStatus>,
    /// This client's tag keys now (from the configuration, then from
    /// [`Request::SetKeys`]): what every VM's engine seals and verifies
    /// with.
    keys: Option<devplane_wire::tag::KeyRing>,
    /// As an agent of the store: the key the store gave this client last
    /// (at start, the configuration's).
    store_key: Option<devplane_wire::tag::TagKey>,
    /// A key change from the store still being carried out, and when it
    /// was learnt ([`devplane_control::store::plan::KeyRoll`]).
    key_roll: Option<(devplane_control::store::plan::KeyRoll, Instant)>,
    /// Remote models moved to another server since the daemon started
    /// ([`Daemon::retarget`]): model -> server id. VMs launched, restored
    /// or received later reach them there.
    moved: BTreeMap<u32, u32>,
}

/// How one vCPU ended, for the protocol.
pub fn vcpu_end(r: &VcpuReport) -> VcpuEnd {
    let (exit, value, error) = match &r.exit {
        Ok(super::kvm::VcpuExit::Done(v)) => ("done".to_string(), Some(*v), None),
        Ok(other) => (format!("{other:?}").to_lowercase(), None, None),
        Err(e) => ("error".to_string(), None, Some(e.to_string())),
    };
    VcpuEnd {
        vcpu: r.vcpu,
        exit,
        value,
        error,
        exits: r.exits,
        remote: r.stats.remote.load(Ordering::Relaxed),
        local: r.stats.local.load(Ordering::Relaxed),
        failed: r.failed(),
    }
}

impl Daemon {
    /// A daemon for this configuration, with no VM running.
    pub fn new(file: ClientFile) -> Daemon {
        let slots = file.vms.iter().map(|v| (v.id, Slot::default())).collect();
        let keys = file
            .client
            .tag_key
            .clone()
            .map(|k| devplane_wire::tag::KeyRing::new(k.0));
        Daemon {
            keys: keys.clone(),
            store_key: keys.map(|k| k.current),
            key_roll: None,
            file,
            slots,
            arrivals: mpsc::channel(),
            noticed: Vec::new(),
            moved: BTreeMap::new(),
        }
    }

    /// The client platform id.
    pub fn client_id(&self) -> u32 {
        self.file.client.id
    }

    /// VM `vm`'s spec, with the client's keys now.
    fn spec(&self, vm: u32) -> Result<super::vmm::ClientSpec, DaemonError> {
        let mut spec = self.file.client_spec_moved(vm, &self.moved)?;
        spec.engine.tag_keys = self.keys.clone();
        Ok(spec)
    }

    /// Seals with `keys`' current key and accepts its keys from now on,
    /// in every running VM and every VM started later (a key rotation;
    /// `None`: untagged). Refused for another client's keys.
    pub fn set_keys(
        &mut self,
        client: u32,
        keys: Option<devplane_wire::tag::KeyRing>,
    ) -> Result<(), DaemonError> {
        if client != self.client_id() {
            return Err(DaemonError::ForeignKeys {
                client,
                this: self.client_id(),
            });
        }
        self.notice();
        self.keys = keys.clone();
        for slot in self.slots.values() {
            if let Some(r) = &slot.running
                && let Some(e) = r.client.engine()
            {
                e.tag_keys().set(keys.clone());
            }
        }
        Ok(())
    }

    /// Points remote model `model` at server `server` (one of the
    /// configuration's `[[servers]]`): in every running VM whose devices
    /// use it (requests in flight are resent there with their sequence
    /// numbers; see [`Client::retarget`]), and in every VM started later.
    /// Returns the running VMs retargeted and how many datagrams in
    /// flight were resent. A VM that does not take it in time fails the
    /// whole request (the VMs before it keep the new server: the caller
    /// points them back on failure).
    pub fn retarget(&mut self, model: u32, server: u32) -> Result<(Vec<u32>, usize), DaemonError> {
        self.notice();
        if !self.file.servers.iter().any(|s| s.id == server) {
            return Err(DaemonError::Retarget(format!(
                "server {server} is not among this client's [[servers]] ({}): add it to the \
                 configuration and restart devplane-client",
                self.file
                    .servers
                    .iter()
                    .map(|s| s.id.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            )));
        }
        // The configured VMs with a device that `uses` the model.
        let vms_where = |uses: &dyn Fn(&config::DeviceEntry) -> bool| -> Vec<u32> {
            self.file
                .vms
                .iter()
                .filter(|v| v.devices.iter().any(uses))
                .map(|v| v.id)
                .collect()
        };
        let users =
            vms_where(&|d| d.model == model && matches!(d.place, config::PlaceEntry::Remote(_)));
        // VMs whose remote disk is this blockstore: the next launch finds
        // it on the new server, but a running one cannot follow (its bulk
        // disk's socket is connected to the old server).
        let disk_users = vms_where(&|d| d.disk.is_some_and(|k| k.store == model));
        if let Some(vm) = disk_users
            .iter()
            .find(|vm| self.slots.get(vm).is_some_and(|s| s.running.is_some()))
        {
            return Err(DaemonError::Retarget(format!(
                "VM {vm} runs with blockstore {model} as its remote disk, which cannot follow a \
                 move while it runs: shut VM {vm} down, move the model, and launch it again"
            )));
        }
        let (mut vms, mut resent) = (Vec::new(), 0);
        for vm in &users {
            let Some(r) = self.slots.get(vm).and_then(|s| s.running.as_ref()) else {
                continue;
            };
            resent += r
                .client
                .retarget(model, server, RETARGET_TIMEOUT)
                .map_err(|e| DaemonError::Retarget(format!("VM {vm}: {e}")))?;
            vms.push(*vm);
        }
        if !users.is_empty() || !disk_users.is_empty() {
            self.moved.insert(model, server);
        }
        Ok((vms, resent))
    }

    fn slot(&mut self, vm: u32) -> Result<&mut Slot, DaemonError> {
        if !self.slots.contains_key(&vm) {
            return Err(DaemonError::UnknownVm {
                vm,
                configured: self
                    .slots
                    .keys()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            });
        }
        Ok(self.slots.get_mut(&vm).expect("checked above"))
    }

    /// Starts VM `vm` as a [`Client`] of its own.
    pub fn launch(&mut self, vm: u32) -> Result<VmStatus, DaemonError> {
        self.notice();
        if self.slot(vm)?.running.is_some() {
            return Err(DaemonError::AlreadyRunning(vm));
        }
        let spec = self.spec(vm)?;
        let client = Client::start(spec).map_err(|source| DaemonError::Start { vm, source })?;
        let slot = self.slot(vm)?;
        *slot = Slot {
            running: Some(Running {
                client,
                since: Instant::now(),
            }),
            ..Slot::default()
        };
        Ok(self.status(vm))
    }

    /// Stops VM `vm`, frees it, and reports how its vCPUs ended. A VM
    /// whose guest stopped by itself is reported once more by its next
    /// shutdown (with `by_itself` set).
    pub fn shutdown(&mut self, vm: u32) -> Result<VmStatus, DaemonError> {
        self.notice();
        let slot = self.slot(vm)?;
        match slot.running.take() {
            Some(r) => Self::stop(slot, r),
            None if slot.unclaimed => slot.unclaimed = false,
            None => return Err(DaemonError::NotRunning(vm)),
        }
        Ok(self.status(vm))
    }

    /// Holds VM `vm`'s vCPUs (see [`Client::suspend`]): each finishes the
    /// exit it is in first, so nothing is lost or repeated.
    pub fn suspend(&mut self, vm: u32) -> Result<VmStatus, DaemonError> {
        self.notice();
        let r = self
            .slot(vm)?
            .running
            .as_ref()
            .ok_or(DaemonError::NotRunning(vm))?;
        r.client
            .suspend(SUSPEND_TIMEOUT)
            .map_err(|source| DaemonError::Suspend { vm, source })?;
        Ok(self.status(vm))
    }

    /// Lets VM `vm`'s held vCPUs run again.
    pub fn resume(&mut self, vm: u32) -> Result<VmStatus, DaemonError> {
        self.notice();
        let r = self
            .slot(vm)?
            .running
            .as_ref()
            .ok_or(DaemonError::NotRunning(vm))?;
        r.client
            .resume()
            .map_err(|source| DaemonError::Suspend { vm, source })?;
        Ok(self.status(vm))
    }

    /// Writes a snapshot of suspended VM `vm` to `path` (see
    /// [`Client::snapshot`]; replaced whole, never half-written).
    pub fn snapshot(&mut self, vm: u32, path: &Path) -> Result<VmStatus, DaemonError> {
        self.notice();
        if !path.is_absolute() {
            return Err(DaemonError::Snapshot(format!(
                "{}: give an absolute path",
                path.display()
            )));
        }
        let r = self
            .slot(vm)?
            .running
            .as_ref()
            .ok_or(DaemonError::NotRunning(vm))?;
        let snap = r
            .client
            .snapshot(vm)
            .map_err(|e| DaemonError::Snapshot(e.to_string()))?;
        snap.write_file(path)
            .map_err(|e| DaemonError::Snapshot(e.to_string()))?;
        Ok(self.status(vm))
    }

    /// Starts the VM of the snapshot file at `path`, held until
    /// [`Daemon::resume`] (its servers are told of its new client first).
    /// This daemon must be client `client`; the VM must be configured here
    /// with the snapshot's hypervisor, memory size and vCPUs, and not run.
    pub fn restore(&mut self, path: &Path, client: u32) -> Result<VmStatus, DaemonError> {
        self.notice();
        if client != self.client_id() {
            return Err(DaemonError::Snapshot(format!(
                "this daemon is client {}, not client {client}",
                self.client_id()
            )));
        }
        let snap = VmSnapshot::read_file(path).map_err(|e| DaemonError::Snapshot(e.to_string()))?;
        let vm = snap.vm;
        if self.slot(vm)?.running.is_some() {
            return Err(DaemonError::AlreadyRunning(vm));
        }
        let hypervisor = self.file.vm(vm).map_or(0, |e| e.hypervisor);
        if snap.hypervisor != hypervisor {
            return Err(DaemonError::Snapshot(format!(
                "the snapshot's VM {vm} ran on hypervisor {}, configured here on {hypervisor}",
                snap.hypervisor
            )));
        }
        let spec = self.spec(vm)?;
        let client =
            Client::restore(spec, snap).map_err(|source| DaemonError::Start { vm, source })?;
        *self.slot(vm)? = Slot {
            running: Some(Running {
                client,
                since: Instant::now(),
            }),
            ..Slot::default()
        };
        Ok(self.status(vm))
    }

    /// Stops every running VM (Ctrl-C); returns each one's status.
    pub fn shutdown_all(&mut self) -> Vec<VmStatus> {
        let ids: Vec<u32> = self
            .slots
            .iter()
            .filter(|(_, s)| s.running.is_some())
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .filter_map(|id| self.shutdown(id).ok())
            .collect()
    }

    /// Stops and drops `r`, recording how its vCPUs ended in `slot`.
    fn stop(slot: &mut Slot, mut r: Running) {
        let reports = r.client.wait(Duration::ZERO);
        // Final once its vCPUs have stopped: nothing more is submitted.
        slot.disks = match r.client.vm_ids().first() {
            Some(&vm) => r.client.disks(vm),
            None => Vec::new(),
        };
        drop(r.client);
        slot.ended = reports.iter().map(vcpu_end).collect();
        slot.by_itself = !slot.ended.iter().any(|e| e.exit == "stopped");
    }

    /// Notices the VMs whose guests stopped by themselves, frees them, and
    /// returns the status of every VM noticed so since the last call (here
    /// or while answering a request).
    pub fn reap(&mut self) -> Vec<VmStatus> {
        self.notice();
        std::mem::take(&mut self.noticed)
    }

    /// Listens for VM `vm`, which must be configured here and not run,
    /// coming from another client daemon ([`Daemon::send`] there); returns
    /// where, and the one-time token the source must prove
    /// ([`migrate::admit`]). A thread takes one migration (for up to
    /// 30 s); connections that do not prove the token are refused and
    /// logged, and it listens on; the VM arrives held, and is this
    /// daemon's from the next request on.
    pub fn receive(&mut self, vm: u32) -> Result<(SocketAddr, MigrationToken), DaemonError> {
        self.notice();
        if self.slot(vm)?.running.is_some() {
            return Err(DaemonError::AlreadyRunning(vm));
        }
        let spec = self.spec(vm)?;
        let ip = self
            .file
            .client
            .bind
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let token = MigrationToken::random()
            .map_err(|e| DaemonError::Migrate(format!("cannot read /dev/urandom: {e}")))?;
        let migrate = |e: std::io::Error| DaemonError::Migrate(format!("listen on {ip}: {e}"));
        let listener = TcpListener::bind((ip, 0)).map_err(migrate)?;
        let addr = listener.local_addr().map_err(migrate)?;
        listener.set_nonblocking(true).map_err(migrate)?;
        let tx = self.arrivals.0.clone();
        let secret = token.clone();
        std::thread::Builder::new()
            .name(format!("dp-migrate-in-{vm}"))
            .spawn(move || {
                let deadline = Instant::now() + RECEIVE_TIMEOUT;
                let admitted = loop {
                    match listener.accept() {
                        Ok((s, peer)) => {
                            let _ = s.set_nonblocking(false);
                            // A source that stops sending mid-stream ends
                            // the receive (and frees the held VM) instead
                            // of blocking this thread.
                            let _ = s.set_read_timeout(Some(RECEIVE_TIMEOUT));
                            match migrate::admit(s, &secret) {
                                Ok(a) => break a,
                                Err(e) => eprintln!(
                                    "devplane-client: refused a connection from {peer} \
                                     to VM {vm}'s migration: {e}"
                                ),
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            if Instant::now() > deadline {
                                eprintln!("devplane-client: no migration of VM {vm} came");
                                return;
                            }
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(e) => {
                            eprintln!("devplane-client: migration of VM {vm}: {e}");
                            return;
                        }
                    }
                };
                let got = migrate::receive(
                    admitted,
                    |from| match from == vm {
                        true => Ok(spec),
                        false => Err(format!("expected VM {vm}, not VM {from}")),
                    },
                    |client| {
                        tx.send(client)
                            .map_err(|_| "the daemon is stopping".to_string())
                    },
                );
                if let Err(e) = got {
                    eprintln!("devplane-client: migration of VM {vm} in failed: {e}");
                }
            })
            .map_err(|e| DaemonError::Migrate(format!("start the receiving thread: {e}")))?;
        Ok((addr, token))
    }

    /// Live-migrates VM `vm` to the daemon listening at `to` (see
    /// [`migrate::send`]). On success the VM stays here suspended until
    /// shut down (once the target runs it); on failure it runs here again.
    pub fn send(
        &mut self,
        vm: u32,
        to: SocketAddr,
        token: &MigrationToken,
    ) -> Result<Migration, DaemonError> {
        self.notice();
        let r = self
            .slot(vm)?
            .running
            .as_ref()
            .ok_or(DaemonError::NotRunning(vm))?;
        let stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))
            .map_err(|e| DaemonError::Migrate(format!("connect to the target at {to}: {e}")))?;
        migrate::send(&r.client, vm, stream, token).map_err(|e| {
            DaemonError::Migrate(format!("VM {vm} runs on here: the migration failed: {e}"))
        })
    }

    /// Frees the VMs whose guests stopped by themselves.
    fn notice(&mut self) {
        while let Ok(client) = self.arrivals.1.try_recv() {
            let Some(vm) = client.vm_ids().first().copied() else {
                continue;
            };
            if let Some(e) = client.engine() {
                e.tag_keys().set(self.keys.clone());
            }
            match self.slots.get_mut(&vm) {
                Some(slot) if slot.running.is_none() => {
                    *slot = Slot {
                        running: Some(Running {
                            client,
                            since: Instant::now(),
                        }),
                        ..Slot::default()
                    };
                }
                _ => eprintln!("devplane-client: VM {vm} migrated in but runs here already"),
            }
        }
        let mut stopped = Vec::new();
        for (id, slot) in &mut self.slots {
            let finished = slot.running.as_ref().is_some_and(|r| r.client.finished());
            if finished && let Some(r) = slot.running.take() {
                Self::stop(slot, r);
                slot.unclaimed = true;
                stopped.push(*id);
            }
        }
        for id in stopped {
            let status = self.status(id);
            self.noticed.push(status);
        }
    }

    fn status(&self, vm: u32) -> VmStatus {
        let entry = self.file.vm(vm);
        let slot = self.slots.get(&vm);
        let running = slot.and_then(|s| s.running.as_ref());
        VmStatus {
            vm,
            hypervisor: entry.map_or(0, |e| e.hypervisor),
            state: match running {
                Some(r) if r.client.suspended() => VmRunState::Suspended,
                Some(_) => VmRunState::Running,
                None => VmRunState::Stopped,
            },
            vcpus: entry.map_or(0, config::VmEntry::vcpus),
            uptime_ms: running.map(|r| r.since.elapsed().as_millis() as u64),
            ended: match (running, slot) {
                (None, Some(s)) => s.ended.clone(),
                _ => Vec::new(),
            },
            by_itself: running.is_none() && slot.is_some_and(|s| s.by_itself),
            failed: match (running, slot) {
                (Some(r), _) => r.client.failed_requests(),
                (None, Some(s)) => s.ended.iter().map(|e| e.failed).sum(),
                (None, None) => 0,
            },
            disks: match (running, slot) {
                (Some(r), _) => r.client.disks(vm),
                (None, Some(s)) => s.disks.clone(),
                (None, None) => Vec::new(),
            },
        }
    }

    /// Every configured VM, by id.
    pub fn list(&mut self) -> Vec<VmStatus> {
        self.notice();
        self.slots.keys().map(|&id| self.status(id)).collect()
    }

    /// Answers a control-socket request (on the daemon's owning thread).
    pub fn handle(&mut self, request: Request) -> Response {
        let answer = |r: Result<VmStatus, DaemonError>| match r {
            Ok(vm) => Response::Vm { vm },
            Err(e @ DaemonError::UnknownVm { .. }) => Response::NotFound {
                message: e.to_string(),
            },
            Err(e) => Response::Error {
                message: e.to_string(),
            },
        };
        match request {
            Request::LaunchVm { vm } => answer(self.launch(vm)),
            Request::ShutdownVm { vm } => answer(self.shutdown(vm)),
            Request::ListVms => Response::Vms { vms: self.list() },
            Request::SuspendVm { vm } => answer(self.suspend(vm)),
            Request::ResumeVm { vm } => answer(self.resume(vm)),
            Request::SnapshotVm { vm, path } => answer(self.snapshot(vm, &path)),
            Request::RestoreVm { path, client } => answer(self.restore(&path, client)),
            Request::ReceiveVm { vm } => match self.receive(vm) {
                Ok((addr, token)) => Response::Listening { addr, token },
                Err(e) => answer(Err(e)),
            },
            Request::SendVm { vm, to, token } => match self.send(vm, to, &token) {
                Ok(m) => Response::Migrated {
                    vm,
                    rounds: m.rounds,
                    bytes: m.bytes,
                    final_pages: m.final_pages,
                    downtime_us: m.downtime.as_micros() as u64,
                    total_us: m.total.as_micros() as u64,
                },
                Err(e) => answer(Err(e)),
            },
            Request::SetKeys {
                client,
                current,
                previous,
            } => {
                match self.set_keys(client, devplane_control::proto::key_ring(current, previous)) {
                    Ok(()) => Response::Ok,
                    Err(e) => Response::Error {
                        message: e.to_string(),
                    },
                }
            }
            Request::RetargetModel { model, server } => match self.retarget(model, server) {
                Ok((vms, resent)) => Response::Retargeted { vms, resent },
                Err(e) => Response::Error {
                    message: e.to_string(),
                },
            },
            Request::Stats
            | Request::LendModel { .. }
            | Request::StagePart { .. }
            | Request::StageModel { .. }
            | Request::CommitModel { .. }
            | Request::ReleaseModel { .. }
            | Request::TakeBackModel { .. }
            | Request::DiscardModel { .. }
            | Request::ModelPlacement { .. }
            | Request::MoveModel { .. }
            | Request::AddModel { .. }
            | Request::RemoveModel { .. }
            | Request::ForwardModel { .. }
            | Request::UnforwardModel { .. }
            | Request::MigrateVm { .. }
            | Request::Console { .. }
            | Request::Tune { .. } => Response::Error {
                message: "devplane-client only launches, shuts down, suspends, resumes, \
                          snapshots, restores and lists VMs: send this to devplane-server \
                          (dpctl --socket)"
                    .into(),
            },
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shutdown_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn daemon() -> Daemon {
        Daemon::new(
            ClientFile::from_toml_str(
                "[client]\nid = 7\n\n[[vms]]\nid = 1\nhypervisor = 2\n\
                 guest = { kind = \"pio-read-loop\", port = 0x80, iterations = 1 }\n",
            )
            .unwrap(),
        )
    }

    #[test]
    fn a_retargeted_model_is_remembered_for_later_launches() {
        let mut d = Daemon::new(
            ClientFile::from_toml_str(
                "[client]\nid = 7\n\n[[servers]]\nid = 1\naddress = \"10.0.0.2:7700\"\n\n\
                 [[servers]]\nid = 2\naddress = \"10.0.0.3:7700\"\n\n[[vms]]\nid = 1\n\
                 hypervisor = 2\nguest = { kind = \"pio-loop\", port = 0x500, iterations = 1 }\n\
                 [[vms.devices]]\nspace = \"pio\"\nbase = 0x500\nlen = 0x10\nmodel = 11\n\
                 place = \"remote:1\"\n",
            )
            .unwrap(),
        );
        // Every configured server is in the spec, the device on server 1.
        let spec = d.spec(1).unwrap();
        let ids: Vec<u32> = spec.servers.iter().map(|s| s.id).collect();
        assert_eq!(ids, [1, 2]);
        assert_eq!(
            spec.vms[0].devices[0].place,
            crate::vmm::Place::Remote { server: 0 }
        );
        let e = d.retarget(11, 9).unwrap_err();
        assert!(e.to_string().contains("server 9 is not among"), "{e}");
        // No VM runs: nothing retargeted now, the move remembered.
        assert_eq!(d.retarget(11, 2).unwrap(), (vec![], 0));
        let spec = d.spec(1).unwrap();
        let crate::vmm::Place::Remote { server } = spec.vms[0].devices[0].place else {
            panic!("not remote");
        };
        assert_eq!(spec.servers[server].id, 2);
        // A model no VM uses: nothing to remember.
        assert_eq!(d.retarget(99, 2).unwrap(), (vec![], 0));
        assert!(!d.moved.contains_key(&99));
        assert!(matches!(
            d.handle(Request::RetargetModel {
                model: 11,
                server: 9
            }),
            Response::Error { .. }
        ));
    }

    #[test]
    fn refusals_are_typed_and_need_no_kvm() {
        let mut d = daemon();
        let e = d.launch(9).unwrap_err();
        assert!(matches!(e, DaemonError::UnknownVm { vm: 9, .. }), "{e}");
        assert!(e.to_string().contains("configured: 1"), "{e}");
        assert!(matches!(d.shutdown(1), Err(DaemonError::NotRunning(1))));
        let list = d.list();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].state, VmRunState::Stopped);
        assert_eq!(list[0].hypervisor, 2);
        assert!(list[0].ended.is_empty() && !list[0].by_itself);
        assert!(matches!(
            d.handle(Request::LaunchVm { vm: 9 }),
            Response::NotFound { .. }
        ));
        assert!(matches!(
            d.handle(Request::ShutdownVm { vm: 1 }),
            Response::Error { message } if message == "VM 1 is not running"
        ));
        assert!(matches!(d.handle(Request::Stats), Response::Error { .. }));
        for r in [Request::SuspendVm { vm: 1 }, Request::ResumeVm { vm: 1 }] {
            assert!(matches!(
                d.handle(r),
                Response::Error { message } if message == "VM 1 is not running"
            ));
        }
        assert!(matches!(
            d.handle(Request::SuspendVm { vm: 9 }),
            Response::NotFound { .. }
        ));
        let refused = |d: &mut Daemon, r: Request| match d.handle(r) {
            Response::Error { message } => message,
            other => panic!("not refused: {other:?}"),
        };
        let to = "127.0.0.1:1".parse().unwrap();
        assert_eq!(
            refused(
                &mut d,
                Request::SendVm {
                    vm: 1,
                    to,
                    token: MigrationToken([0; 32])
                }
            ),
            "VM 1 is not running"
        );
        let m = refused(
            &mut d,
            Request::SnapshotVm {
                vm: 1,
                path: "relative.snap".into(),
            },
        );
        assert!(m.contains("give an absolute path"), "{m}");
        let m = refused(
            &mut d,
            Request::RestoreVm {
                path: "/nonexistent/vm1.snap".into(),
                client: 9,
            },
        );
        assert_eq!(m, "this daemon is client 7, not client 9");
        let m = refused(
            &mut d,
            Request::RestoreVm {
                path: "/nonexistent/vm1.snap".into(),
                client: 7,
            },
        );
        assert!(m.contains("/nonexistent/vm1.snap"), "{m}");
        assert!(matches!(d.handle(Request::ListVms), Response::Vms { vms } if vms.len() == 1));
    }
}
