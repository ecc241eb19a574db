//! The control protocol between `dpctl` and the running daemons: one JSON
//! request per line over a Unix socket (owner-only permissions), one JSON
//! response per line back. To a server it carries what the eBPF maps alone
//! cannot do: moving a model between workers, holding a VM's interrupts,
//! counters, tuning. To a client daemon (`devplane-client`) it carries VM
//! launch, shutdown and listing ([`Request::LaunchVm`],
//! [`Request::ShutdownVm`], [`Request::ListVms`]). [`Request::SuspendVm`]
//! and [`Request::ResumeVm`] go to both: the server holds the VM's
//! interrupts, the client daemon holds its vCPUs. A client daemon also
//! writes a suspended VM's snapshot and restores one
//! ([`Request::SnapshotVm`], [`Request::RestoreVm`]). A model moved
//! between servers (`dpctl models move --to-server`) takes
//! [`Request::LendModel`], [`Request::StagePart`], [`Request::StageModel`],
//! [`Request::CommitModel`], [`Request::ReleaseModel`] (and the undo steps
//! [`Request::TakeBackModel`], [`Request::DiscardModel`]) on the servers and
//! [`Request::RetargetModel`] on the client daemons. Each daemon refuses the
//! other requests meant for the other with [`Response::Error`].

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where server `id` listens unless told otherwise.
pub fn default_socket(id: u32) -> PathBuf {
    PathBuf::from(format!("/run/devplane/server-{id}.sock"))
}

/// Where client daemon `id` (`devplane-client`) listens unless told
/// otherwise.
pub fn default_client_socket(id: u32) -> PathBuf {
    PathBuf::from(format!("/run/devplane/client-{id}.sock"))
}

/// A request to a running server or client daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Counters: per worker, and the XDP program's.
    Stats,
    /// Move a device model to another worker of this server.
    MoveModel {
        /// The model.
        model: u32,
        /// The worker index to move it to.
        worker: usize,
    },
    /// Start serving a device model (already in the database) live.
    AddModel {
        /// The model, as the server's configuration describes it.
        model: crate::config::ModelConfig,
    },
    /// Stop serving a device model live.
    RemoveModel {
        /// The model.
        model: u32,
    },
    /// Owner server: forward a device model's requests to the I/O server
    /// that hosts it (its XDP program rewrites them and sends them on).
    ForwardModel {
        /// The model (not served by this server).
        model: u32,
        /// The I/O server's platform id.
        server: u32,
        /// Its IPv4 address (the same devplane port).
        ip: std::net::Ipv4Addr,
        /// Its MAC, or the next hop's.
        mac: [u8; 6],
    },
    /// Owner server: stop forwarding a device model.
    UnforwardModel {
        /// The model.
        model: u32,
    },
    /// Server: hold a VM's interrupts. Client daemon: hold its vCPUs
    /// (answered with [`Response::Vm`]).
    SuspendVm {
        /// The VM.
        vm: u32,
    },
    /// Server: deliver a VM's held interrupts, in order. Client daemon:
    /// run its vCPUs again (answered with [`Response::Vm`]).
    ResumeVm {
        /// The VM.
        vm: u32,
    },
    /// Send a VM's interrupts to another client platform.
    MigrateVm {
        /// The VM.
        vm: u32,
        /// Its new client platform.
        client: u32,
    },
    /// Change polling settings live (absent fields keep their value).
    Tune {
        /// Empty polls before a worker sleeps.
        spin_budget: Option<u32>,
        /// Longest idle sleep, microseconds.
        idle_sleep_us: Option<u64>,
        /// Most frames per poll.
        batch: Option<u32>,
    },
    /// Client daemon: start a configured VM.
    LaunchVm {
        /// The VM.
        vm: u32,
    },
    /// Client daemon: stop a VM and report how its vCPUs ended.
    ShutdownVm {
        /// The VM.
        vm: u32,
    },
    /// Client daemon: every configured VM and whether it runs.
    ListVms,
    /// Client daemon: write a snapshot of a suspended VM to a file (an
    /// absolute path on the daemon's host).
    SnapshotVm {
        /// The VM.
        vm: u32,
        /// Where to write it.
        path: PathBuf,
    },
    /// Client daemon: start the VM of a snapshot file, held until
    /// [`Request::ResumeVm`]. The daemon must be client platform `client`
    /// and have the VM configured, not running.
    RestoreVm {
        /// The snapshot file (an absolute path on the daemon's host).
        path: PathBuf,
        /// The client platform that should run it.
        client: u32,
    },
    /// Client daemon (migration target): listen for VM `vm` coming from
    /// another client daemon (answered with [`Response::Listening`]); the
    /// VM arrives held until [`Request::ResumeVm`].
    ReceiveVm {
        /// The VM.
        vm: u32,
    },
    /// Client daemon (migration source): live-migrate VM `vm` to the
    /// target listening at `to` (answered with [`Response::Migrated`]); the
    /// VM stays suspended here until shut down, and runs again here if
    /// the migration fails.
    SendVm {
        /// The VM.
        vm: u32,
        /// The target daemon's migration listener.
        to: std::net::SocketAddr,
        /// The target's one-time secret for this migration (from its
        /// [`Response::Listening`]): the stream proves it knows it.
        token: MigrationToken,
    },
    /// Server: attach to the console of VM `vm` (its UART model on this
    /// server, or model `model`). Answered with [`Response::Console`] (or
    /// an error) on the connection, which then stays open as the console:
    /// the server streams what the guest transmits, raw bytes, and, for
    /// the writer, takes what comes back as typed input. One writer at a
    /// time; `write: false` watches read-only.
    Console {
        /// The VM.
        vm: u32,
        /// The UART model, when the VM has several on this server.
        #[serde(default)]
        model: Option<u32>,
        /// Type into the console (the one writer) rather than watch.
        #[serde(default)]
        write: bool,
    },
    /// Server (source of a move between servers): stop serving model
    /// `model` and keep it aside, not served (answered with
    /// [`Response::Lent`]: its configuration and [`ModelHandover`]). Step 1
    /// of `devplane_control::handover`.
    LendModel {
        /// The model.
        model: u32,
        /// The server it goes to (remembered until the move is settled,
        /// and told by [`Response::Placement`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<u32>,
    },
    /// Server (target of a move): one piece of a [`ModelHandover`] as JSON
    /// text, appended to what came before for `model` (a hand-over may be
    /// larger than one control request; see [`HANDOVER_PART_BYTES`]).
    StagePart {
        /// The model.
        model: u32,
        /// The next piece of the JSON text.
        part: String,
    },
    /// Server (target of a move): build `model` from the pieces sent with
    /// [`Request::StagePart`], not served yet (step 2).
    StageModel {
        /// The model's configuration here (its worker is this server's).
        model: crate::config::ModelConfig,
    },
    /// Server (target of a move): serve the staged model (step 4, the
    /// commit).
    CommitModel {
        /// The model.
        model: u32,
    },
    /// Server (source of a move): drop the lent copy, its route and
    /// configuration (step 5).
    ReleaseModel {
        /// The model.
        model: u32,
    },
    /// Server (source of a cancelled move): serve the lent copy again.
    TakeBackModel {
        /// The model.
        model: u32,
    },
    /// Server (target of a cancelled move): drop the staged copy and the
    /// pieces received (answered with [`Response::Discarded`]).
    DiscardModel {
        /// The model.
        model: u32,
    },
    /// Server: whether it serves, lends or stages model `model` (answered
    /// with [`Response::Placement`]).
    ModelPlacement {
        /// The model.
        model: u32,
    },
    /// Client daemon: point remote model `model` at server `server` (one
    /// of its `[[servers]]`) in every running VM that uses it, and in
    /// every VM launched, restored or received later (answered with
    /// [`Response::Retargeted`]).
    RetargetModel {
        /// The model.
        model: u32,
        /// The server that serves it from now on.
        server: u32,
    },
    /// Server and client daemon: client `client`'s datagrams are sealed
    /// with `current` from now on, and tags under `current` or `previous`
    /// are accepted (a key rotation's grace period; without `previous`,
    /// only `current`). Without `current` the client's datagrams are
    /// untagged. See [`key_ring`].
    SetKeys {
        /// The client platform.
        client: u32,
        /// The key datagrams are sealed with.
        #[serde(default)]
        current: Option<crate::config::ClientKey>,
        /// The key it replaced, still accepted.
        #[serde(default)]
        previous: Option<crate::config::ClientKey>,
    },
}

/// The keys of a [`Request::SetKeys`] as a receiver holds them: `None`
/// without a current key.
pub fn key_ring(
    current: Option<crate::config::ClientKey>,
    previous: Option<crate::config::ClientKey>,
) -> Option<devplane_wire::tag::KeyRing> {
    let mut ring = devplane_wire::tag::KeyRing::new(current?.0);
    ring.previous = previous.map(|k| k.0).filter(|k| k.id != ring.current.id);
    Some(ring)
}

/// Longest [`Request::StagePart`] piece `dpctl` sends, in bytes: with
/// JSON's escaping it stays well inside one control request.
pub const HANDOVER_PART_BYTES: usize = 16 * 1024;

/// Most bytes of [`Request::StagePart`] pieces a server holds, every
/// model's together (a worker's duplicate windows at most, with room to
/// spare): a piece past it is refused and that model's pieces dropped.
pub const MAX_HANDOVER_BYTES: usize = 256 * 1024 * 1024;

/// Most models whose [`Request::StagePart`] pieces a server holds at once
/// (moves to one server run one at a time per model; pieces left by a
/// mover that died are dropped by [`Request::DiscardModel`], which
/// settling the move sends).
pub const MAX_HANDOVER_MODELS: usize = 16;

/// A device model as one server hands it to another: its state, its
/// settings, the source worker's duplicate windows (so a write applied
/// on the source and retransmitted to the target is not applied again)
/// and its interrupts not yet acknowledged (the target sends them again).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelHandover {
    /// The model kind (`devplane_devmodels::registry::KINDS`).
    pub kind: String,
    /// Layout version of `snapshot`.
    pub snapshot_version: u32,
    /// The model's encoded state.
    pub snapshot: Vec<u8>,
    /// Port base.
    pub pio_base: u64,
    /// MMIO base.
    pub mmio_base: u64,
    /// Interrupt target (VM, hypervisor).
    pub irq_target: Option<(u32, u32)>,
    /// Next interrupt sequence number.
    pub irq_seq: u64,
    /// Duplicate windows: (client, VM, vCPU) and their answers (sequence
    /// number, status byte, data).
    pub windows: Vec<HandedWindow>,
    /// Unacknowledged interrupts, oldest first.
    pub irqs: Vec<HandedIrq>,
}

impl ModelHandover {
    /// Reads a hand-over from its JSON text (the pieces of
    /// [`Request::StagePart`], joined).
    pub fn from_json(text: &str) -> Result<ModelHandover, String> {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }
}

/// One duplicate window of a [`ModelHandover`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandedWindow {
    /// Client platform.
    pub client: u32,
    /// VM.
    pub vm: u32,
    /// vCPU.
    pub vcpu: u16,
    /// (sequence number, status byte, data), oldest first.
    pub answers: Vec<(u64, u8, u64)>,
}

/// One unacknowledged interrupt of a [`ModelHandover`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandedIrq {
    /// The VM it is for.
    pub vm: u32,
    /// Its hypervisor.
    pub hypervisor: u32,
    /// The line (GSI).
    pub line: u32,
    /// The action byte (`devplane_wire::IrqAction`).
    pub action: u8,
    /// Per-model interrupt sequence number.
    pub seq: u64,
}

/// One worker's counters, as reported.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerCounters {
    /// Worker index.
    pub worker: usize,
    /// Named counters.
    pub counters: Vec<(String, u64)>,
}

/// One console's counters on a server.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleCounters {
    /// The UART model.
    pub model: u32,
    /// Viewers attached now (the writer included).
    pub viewers: u64,
    /// A writer is attached now.
    pub writer: bool,
    /// Bytes the guest transmitted since the console was first attached.
    pub output_bytes: u64,
    /// Bytes typed into the guest.
    pub input_bytes: u64,
    /// Bytes not delivered to a viewer that did not keep up (per viewer,
    /// summed): the model and the other viewers never wait for one.
    pub viewer_dropped_bytes: u64,
    /// Bytes of output lost before the console thread took them (it fell
    /// behind the worker).
    pub tap_dropped_bytes: u64,
    /// Writers refused because the console had one.
    pub writers_refused: u64,
}

/// Whether a client daemon's VM runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmRunState {
    /// Its vCPUs run.
    Running,
    /// Launched, its vCPUs held by a suspend until a resume.
    Suspended,
    /// Never launched, shut down, or its guest stopped by itself.
    Stopped,
}

impl std::fmt::Display for VmRunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmRunState::Running => "running",
            VmRunState::Suspended => "suspended",
            VmRunState::Stopped => "stopped",
        })
    }
}

/// How one vCPU of a client daemon's VM ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuEnd {
    /// vCPU index.
    pub vcpu: u16,
    /// `done` (the guest reported `value`), `shutdown`, `reset`, `halt`,
    /// `stopped` (shut down from outside) or `error`.
    pub exit: String,
    /// The value a `done` guest reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<u32>,
    /// What went wrong, for `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// KVM exits it took.
    pub exits: u64,
    /// Accesses served by remote models.
    pub remote: u64,
    /// Accesses served by local models.
    pub local: u64,
    /// Remote requests that failed (an error answer, or none within the
    /// client engine's horizon; posted writes never confirmed included).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failed: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One VM of a client daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    /// VM id.
    pub vm: u32,
    /// Its hypervisor id.
    pub hypervisor: u32,
    /// Whether it runs.
    pub state: VmRunState,
    /// Its vCPUs.
    pub vcpus: usize,
    /// Milliseconds since it was launched (running VMs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_ms: Option<u64>,
    /// How its vCPUs ended the last time it stopped (empty if it never
    /// ran or runs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ended: Vec<VcpuEnd>,
    /// The last time it stopped, its guest stopped by itself (rather than
    /// being shut down).
    #[serde(default)]
    pub by_itself: bool,
    /// Remote requests that failed: of the running VM so far, or of its
    /// last run (the sum of `ended`'s).
    #[serde(default)]
    pub failed: u64,
    /// Its remote disks' counters (a virtio-blk device whose disk is a
    /// `blockstore` on a server, in bulk): of the running VM so far, or
    /// of its last run; empty when it has none or never ran.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskStatus>,
}

/// The counters of one remote disk of a VM (its bulk disk), for `dpctl
/// vms running`. Every field has a default: a counter added later does
/// not break an older daemon's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DiskStatus {
    /// The virtio-blk device's model id (its `[[vms.devices]]` entry).
    pub model: u32,
    /// The `blockstore` model on the server holding the disk.
    pub store: u32,
    /// Block requests the guest submitted.
    pub submitted: u64,
    /// Of those, completed (answered, or failed).
    pub completed: u64,
    /// Of those completed, failed: an error answer, or none within the
    /// disk's give-up time (an I/O error to the guest).
    pub errors: u64,
    /// Datagrams sent again after a timeout.
    pub resent: u64,
    /// Answers dropped: malformed, bad tag, unknown or duplicate.
    pub dropped: u64,
}

/// A daemon's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Done.
    Ok,
    /// One VM of a client daemon, after a launch or a shutdown.
    Vm {
        /// The VM.
        vm: VmStatus,
    },
    /// Every VM of a client daemon.
    Vms {
        /// The VMs, by id.
        vms: Vec<VmStatus>,
    },
    /// Counters.
    Stats {
        /// Server id.
        server: u32,
        /// Per worker.
        workers: Vec<WorkerCounters>,
        /// The XDP program's non-zero counters (XDP mode).
        xdp: Vec<(String, u64)>,
        /// Each console (UART model) an operator attached to.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        consoles: Vec<ConsoleCounters>,
    },
    /// Attached to a console ([`Request::Console`]): raw bytes follow.
    Console {
        /// The server.
        server: u32,
        /// The UART model.
        model: u32,
        /// This viewer is the console's writer (else read-only).
        writer: bool,
    },
    /// A migration target listens here ([`Request::ReceiveVm`]).
    Listening {
        /// Its address.
        addr: std::net::SocketAddr,
        /// The one-time secret a source must prove to be let in: hand it
        /// only to the source's daemon ([`Request::SendVm`]).
        token: MigrationToken,
    },
    /// A migration source sent the VM ([`Request::SendVm`]).
    Migrated {
        /// The VM.
        vm: u32,
        /// Pre-copy rounds after the first full copy of memory.
        rounds: usize,
        /// Bytes sent.
        bytes: u64,
        /// Pages sent while the VM was suspended.
        final_pages: usize,
        /// From the suspend to the target's word that it holds the VM,
        /// microseconds.
        downtime_us: u64,
        /// The whole migration, microseconds.
        total_us: u64,
    },
    /// A server lent a model ([`Request::LendModel`]).
    Lent {
        /// Its configuration on the source.
        model: crate::config::ModelConfig,
        /// What goes to the target.
        handover: Box<ModelHandover>,
    },
    /// A server dropped a staged model ([`Request::DiscardModel`]), or
    /// says it serves it already.
    Discarded {
        /// It serves the model (its commit went through): nothing was
        /// dropped.
        serving: bool,
    },
    /// Where a server stands with a model ([`Request::ModelPlacement`]).
    Placement(Placement),
    /// A client daemon pointed a model at another server
    /// ([`Request::RetargetModel`]).
    Retargeted {
        /// Running VMs that use the model (retargeted now).
        vms: Vec<u32>,
        /// Datagrams in flight resent to the new server.
        resent: usize,
    },
    /// Refused, with the reason.
    Error {
        /// What was wrong and what to do.
        message: String,
    },
    /// Refused: an id in the request does not exist (`dpctl` exits 3).
    NotFound {
        /// Which id, and what to do.
        message: String,
    },
}

/// Where a server stands with a model: the fields of
/// [`Response::Placement`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The server's id.
    pub server: u32,
    /// The worker serving it here, if it is served here.
    pub worker: Option<usize>,
    /// Lent to another server by a move not yet settled.
    pub lent: bool,
    /// The server it is lent to, if the mover said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lent_to: Option<u32>,
    /// How long ago it was lent, in milliseconds, if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lent_ms: Option<u64>,
    /// How long the server has run, in milliseconds (a target that
    /// restarted since a lend may have committed and lost the model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_ms: Option<u64>,
    /// Staged here by a move not yet committed.
    pub staged: bool,
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// Nothing listens there.
    #[error(
        "no server listening on {path} ({source}): is devplane-server running? (pass --socket if it uses another path)"
    )]
    NotRunning {
        /// The socket path.
        path: PathBuf,
        /// The connect error.
        source: std::io::Error,
    },
    /// No client daemon listens there ([`call_client`]).
    #[error(
        "no client daemon listening on {path} ({source}): is devplane-client running? (pass --client-socket if it uses another path)"
    )]
    ClientNotRunning {
        /// The socket path.
        path: PathBuf,
        /// The connect error.
        source: std::io::Error,
    },
    /// Talking to it failed.
    #[error("talking to the daemon on {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It answered something that is not a response.
    #[error("the daemon on {path} answered garbage: {why}")]
    BadAnswer {
        /// The socket path.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

/// Sends `req` to the server listening on `path` and returns its answer.
pub fn call(path: &Path, req: &Request, timeout: Duration) -> Result<Response, ProtoError> {
    let io = |source| ProtoError::Io {
        path: path.to_path_buf(),
        source,
    };
    let stream = UnixStream::connect(path).map_err(|source| ProtoError::NotRunning {
        path: path.to_path_buf(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_string(req).map_err(|e| ProtoError::BadAnswer {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    line.push('\n');
    (&stream).write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).map_err(io)?;
    serde_json::from_str(&answer).map_err(|e| ProtoError::BadAnswer {
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

/// [`call`] for a client daemon: a missing daemon is
/// [`ProtoError::ClientNotRunning`].
pub fn call_client(path: &Path, req: &Request, timeout: Duration) -> Result<Response, ProtoError> {
    call(path, req, timeout).map_err(|e| match e {
        ProtoError::NotRunning { path, source } => ProtoError::ClientNotRunning { path, source },
        other => other,
    })
}

/// A migration target's one-time secret (32 random bytes): the key of
/// the migration stream's keyed BLAKE3 MAC (`devplane_vmm::migrate`), so
/// that only a source that was handed it may bring a VM in, and nothing
/// on the path can alter the stream unnoticed. It travels only over the
/// daemons' local control sockets (as 64 hex digits); it is never shown
/// (`Debug` hides it).
#[derive(Clone, PartialEq, Eq)]
pub struct MigrationToken(pub [u8; 32]);

impl MigrationToken {
    /// A fresh token from the kernel's random source.
    pub fn random() -> std::io::Result<MigrationToken> {
        use std::io::Read;
        let mut b = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
        Ok(MigrationToken(b))
    }

    fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn from_hex(text: &str) -> Option<MigrationToken> {
        let t = text.as_bytes();
        if t.len() != 64 {
            return None;
        }
        let mut b = [0u8; 32];
        for (i, pair) in t.chunks(2).enumerate() {
            let s = std::str::from_utf8(pair).ok()?;
            b[i] = u8::from_str_radix(s, 16).ok()?;
        }
        Some(MigrationToken(b))
    }
}

impl std::fmt::Debug for MigrationToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MigrationToken(..)")
    }
}

impl Serialize for MigrationToken {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for MigrationToken {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        MigrationToken::from_hex(&text)
            .ok_or_else(|| serde::de::Error::custom("a migration token is 64 hex digits"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_responses_round_trip_as_json_lines() {
        let reqs = [
            Request::Stats,
            Request::MoveModel {
                model: 4,
                worker: 1,
            },
            Request::AddModel {
                model: crate::config::ModelConfig::new(9, "counter", 1),
            },
            Request::RemoveModel { model: 9 },
            Request::ForwardModel {
                model: 9,
                server: 2,
                ip: std::net::Ipv4Addr::new(10, 0, 0, 3),
                mac: [2, 0, 0, 0, 0, 3],
            },
            Request::UnforwardModel { model: 9 },
            Request::SuspendVm { vm: 2 },
            Request::ResumeVm { vm: 2 },
            Request::MigrateVm { vm: 2, client: 8 },
            Request::Tune {
                spin_budget: Some(5),
                idle_sleep_us: None,
                batch: Some(32),
            },
            Request::LaunchVm { vm: 3 },
            Request::ShutdownVm { vm: 3 },
            Request::ListVms,
            Request::SnapshotVm {
                vm: 3,
                path: "/tmp/vm3.snap".into(),
            },
            Request::RestoreVm {
                path: "/tmp/vm3.snap".into(),
                client: 8,
            },
            Request::ReceiveVm { vm: 3 },
            Request::SendVm {
                vm: 3,
                to: "10.0.0.2:4000".parse().unwrap(),
                token: MigrationToken([0xa5; 32]),
            },
            Request::Console {
                vm: 3,
                model: Some(5),
                write: true,
            },
            Request::LendModel {
                model: 4,
                to: Some(2),
            },
            Request::StagePart {
                model: 4,
                part: "{\"kind\":".into(),
            },
            Request::StageModel {
                model: crate::config::ModelConfig::new(4, "counter", 0),
            },
            Request::CommitModel { model: 4 },
            Request::ReleaseModel { model: 4 },
            Request::TakeBackModel { model: 4 },
            Request::DiscardModel { model: 4 },
            Request::ModelPlacement { model: 4 },
            Request::RetargetModel {
                model: 4,
                server: 2,
            },
        ];
        for r in reqs {
            let text = serde_json::to_string(&r).unwrap();
            assert!(!text.contains('\n'));
            assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        }
        let text = r#"{"op":"move_model","model":4,"worker":1}"#;
        assert_eq!(
            serde_json::from_str::<Request>(text).unwrap(),
            Request::MoveModel {
                model: 4,
                worker: 1
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"reboot"}"#).is_err());
        let rsp = Response::Error {
            message: "no".into(),
        };
        let t = serde_json::to_string(&rsp).unwrap();
        assert_eq!(serde_json::from_str::<Response>(&t).unwrap(), rsp);
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"launch_vm","vm":3}"#).unwrap(),
            Request::LaunchVm { vm: 3 }
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"launch_vm"}"#).is_err());
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"console","vm":3}"#).unwrap(),
            Request::Console {
                vm: 3,
                model: None,
                write: false
            },
            "read-only unless asked"
        );
        let running = VmStatus {
            vm: 1,
            hypervisor: 2,
            state: VmRunState::Running,
            vcpus: 1,
            uptime_ms: Some(1500),
            ended: Vec::new(),
            by_itself: false,
            failed: 0,
            disks: vec![DiskStatus {
                model: 7,
                store: 70,
                submitted: 12,
                completed: 11,
                errors: 1,
                resent: 3,
                dropped: 0,
            }],
        };
        let stopped = VmStatus {
            vm: 4,
            state: VmRunState::Stopped,
            uptime_ms: None,
            ended: vec![
                VcpuEnd {
                    vcpu: 0,
                    exit: "done".into(),
                    value: Some(60000),
                    error: None,
                    exits: 60003,
                    remote: 60001,
                    local: 0,
                    failed: 0,
                },
                VcpuEnd {
                    vcpu: 1,
                    exit: "error".into(),
                    value: None,
                    error: Some("KVM_RUN failed".into()),
                    exits: 7,
                    remote: 0,
                    local: 2,
                    failed: 0,
                },
            ],
            by_itself: true,
            // A VM without remote disks: the field is left out of its
            // JSON and read back empty.
            disks: Vec::new(),
            ..running.clone()
        };
        let rsps = [
            Response::Ok,
            Response::Vm {
                vm: stopped.clone(),
            },
            Response::Vms {
                vms: vec![running, stopped],
            },
            Response::NotFound {
                message: "VM 9 is not configured".into(),
            },
            Response::Console {
                server: 1,
                model: 5,
                writer: false,
            },
            Response::Stats {
                server: 1,
                workers: Vec::new(),
                xdp: Vec::new(),
                consoles: vec![ConsoleCounters {
                    model: 5,
                    viewers: 2,
                    writer: true,
                    output_bytes: 10,
                    ..ConsoleCounters::default()
                }],
            },
            Response::Lent {
                model: crate::config::ModelConfig::new(4, "counter", 1),
                handover: Box::new(ModelHandover {
                    kind: "counter".into(),
                    snapshot_version: 1,
                    snapshot: vec![1, 2, 3],
                    pio_base: 0x500,
                    mmio_base: 0,
                    irq_target: Some((1, 2)),
                    irq_seq: 7,
                    windows: vec![HandedWindow {
                        client: 7,
                        vm: 1,
                        vcpu: 0,
                        answers: vec![(10, 0, 5), (11, 0, 6)],
                    }],
                    irqs: vec![HandedIrq {
                        vm: 1,
                        hypervisor: 2,
                        line: 4,
                        action: 3,
                        seq: 6,
                    }],
                }),
            },
            Response::Discarded { serving: true },
            Response::Listening {
                addr: "10.0.0.2:4000".parse().unwrap(),
                token: MigrationToken::random().unwrap(),
            },
            Response::Placement(Placement {
                server: 2,
                worker: Some(0),
                lent: false,
                lent_to: None,
                lent_ms: None,
                uptime_ms: Some(5),
                staged: false,
            }),
            Response::Retargeted {
                vms: vec![1, 2],
                resent: 1,
            },
        ];
        for r in rsps {
            let text = serde_json::to_string(&r).unwrap();
            assert!(!text.contains('\n'));
            assert_eq!(serde_json::from_str::<Response>(&text).unwrap(), r);
        }
        let v: serde_json::Value = serde_json::from_str(
            &serde_json::to_string(&Response::Vms { vms: Vec::new() }).unwrap(),
        )
        .unwrap();
        assert_eq!(v["result"], "vms");
    }

    #[test]
    fn a_migration_token_is_64_hex_digits_and_never_shown() {
        let t = MigrationToken::random().unwrap();
        assert_ne!(t, MigrationToken::random().unwrap(), "tokens repeat");
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json.len(), 66, "{json}");
        assert_eq!(serde_json::from_str::<MigrationToken>(&json).unwrap(), t);
        assert!(!format!("{t:?}").contains(&json[1..9]));
        let mut odd = json.clone();
        odd.replace_range(5..6, "g");
        for bad in ["\"00\"", "\"\"", "7", &odd] {
            assert!(
                serde_json::from_str::<MigrationToken>(bad).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_missing_server_says_so() {
        let e = call(
            Path::new("/nonexistent/devplane.sock"),
            &Request::Stats,
            Duration::from_millis(100),
        )
        .unwrap_err();
        assert!(matches!(e, ProtoError::NotRunning { .. }));
        assert!(e.to_string().contains("is devplane-server running"));
        let e = call_client(
            Path::new("/nonexistent/devplane.sock"),
            &Request::ListVms,
            Duration::from_millis(100),
        )
        .unwrap_err();
        assert!(matches!(e, ProtoError::ClientNotRunning { .. }));
        assert!(e.to_string().contains("is devplane-client running"));
        assert!(e.to_string().contains("--client-socket"));
    }
}
