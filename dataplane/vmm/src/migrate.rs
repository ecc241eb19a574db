//! Live migration of a VM between two clients over a TCP stream.
//!
//! The source ([`send`]) turns on KVM's dirty-page log and sends all of
//! guest memory while the guest runs, then, round after round, the pages
//! written meanwhile, until a round finds few enough ([`STOP_PAGES`]) or
//! [`MAX_ROUNDS`] have passed. It then waits for the target to have
//! written every page sent so far into its guest memory (a sync message:
//! the first full copy may still sit in the socket's buffers, and the
//! target catching up on it must not be downtime), sends the pages
//! written meanwhile, and suspends the VM (every vCPU
//! finishes its exit and its posted writes: see
//! [`Client::suspend`]), sends the pages dirtied since the last round and
//! the VM's state without memory (a [`VmSnapshot`]: vCPUs, in-kernel
//! devices and clock, local models, request sequences), and waits for the
//! target's word that it holds the VM. The source VM stays suspended: it
//! is freed only once the target runs it (the caller's next step). If
//! anything fails before the target's word, the source VM runs again.
//!
//! The target ([`receive`]) starts the VM held as soon as the header names
//! it ([`Client::start_held`]: VM, engine, lanes and vCPU threads are made
//! while memory arrives, not in the downtime), writes the pages into its
//! guest memory as they come, puts the state in ([`Client::apply_state`]),
//! hands the VM over, and answers.
//!
//! Messages, integers little-endian:
//!
//! ```text
//! header: "DPMIGR02"  u32 vm  u64 memory size
//! pages:  u8 1  u64 gpa  u32 length  bytes
//! state:  u8 2  u64 length  snapshot file bytes (memory empty)
//! sync:   u8 3
//! answer (target to source): u8 0 (holds it) | u8 1 u32 length message
//!                            | u8 2 (to a sync: every page before it is in)
//! ```

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::kvm::Vm;
use crate::snapshot::VmSnapshot;
use crate::vmm::{Client, ClientSpec};

/// The stream's first bytes.
const MAGIC: &[u8; 8] = b"DPMIGR02";
const PAGE: usize = 4096;
/// Stop copying while the guest runs once a round finds at most this many
/// dirty pages (256 KiB).
pub const STOP_PAGES: usize = 64;
/// Most pre-copy rounds after the first full copy.
pub const MAX_ROUNDS: usize = 16;
/// Largest state message accepted (the state without memory is tens of
/// KiB).
const MAX_STATE: u64 = 64 << 20;
/// Pages per message when sending all of memory.
const CHUNK_PAGES: usize = 256;
/// How long the source waits for its vCPUs to hold.
const SUSPEND_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the source waits for the target to take data or answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
const TAG_PAGES: u8 = 1;
const TAG_STATE: u8 = 2;
const TAG_SYNC: u8 = 3;
/// The target's answer to a sync.
const CAUGHT_UP: u8 = 2;

/// What a migration did.
#[derive(Debug, Clone, Default)]
pub struct Migration {
    /// Pre-copy rounds after the first full copy.
    pub rounds: usize,
    /// Bytes sent in all.
    pub bytes: u64,
    /// Pages sent while the VM was suspended.
    pub final_pages: usize,
    /// From the suspend to the target's word that it holds the VM.
    pub downtime: Duration,
    /// The whole migration.
    pub total: Duration,
}

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The stream failed (the other side went away).
    #[error("the migration stream failed: {0}")]
    Io(#[from] std::io::Error),
    /// The VM is not there, KVM refused, or the state did not fit.
    #[error("{0}")]
    Vm(String),
    /// The other side sent something that is not this protocol.
    #[error("the other side broke the migration protocol: {0}")]
    Protocol(String),
    /// The target refused the VM.
    #[error("the target refused the VM: {0}")]
    Refused(String),
}

fn vm_err(e: impl std::fmt::Display) -> MigrateError {
    MigrateError::Vm(e.to_string())
}

/// Sends VM `vm` of `client` to the target at the other end of `stream`
/// (see the module documentation). On success the VM is suspended here
/// and held by the target; on failure it runs here again.
pub fn send(client: &Client, vm: u32, stream: TcpStream) -> Result<Migration, MigrateError> {
    let kvm = client
        .vm(vm)
        .ok_or_else(|| MigrateError::Vm(format!("VM {vm} is not in this client")))?;
    kvm.log_dirty(true).map_err(vm_err)?;
    let mut suspended = false;
    let result = send_logged(client, kvm, vm, stream, &mut suspended);
    let _ = kvm.log_dirty(false);
    if result.is_err() && suspended {
        let _ = client.resume();
    }
    result
}

fn send_logged(
    client: &Client,
    kvm: &Vm,
    vm: u32,
    stream: TcpStream,
    suspended: &mut bool,
) -> Result<Migration, MigrateError> {
    let start = Instant::now();
    let _ = stream.set_nodelay(true);
    // A target that stops reading or answering fails the migration.
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    stream.set_write_timeout(Some(ANSWER_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = BufWriter::with_capacity(1 << 20, stream);
    let size = kvm.mem_size();
    let mut m = Migration::default();
    out.write_all(MAGIC)?;
    out.write_all(&vm.to_le_bytes())?;
    out.write_all(&(size as u64).to_le_bytes())?;
    // The log is on: what the guest writes from now on is sent again.
    let _ = kvm.dirty_log().map_err(vm_err)?;
    let mut buf = vec![0u8; CHUNK_PAGES * PAGE];
    let mut gpa = 0usize;
    while gpa < size {
        let len = (size - gpa).min(buf.len());
        kvm.read_memory(gpa as u64, &mut buf[..len])
            .map_err(vm_err)?;
        m.bytes += send_pages(&mut out, gpa as u64, &buf[..len])?;
        gpa += len;
    }
    loop {
        let dirty = kvm.dirty_log().map_err(vm_err)?;
        let n = count(&dirty);
        if n <= STOP_PAGES || m.rounds >= MAX_ROUNDS {
            // Pages from this log are sent with the final ones.
            m.bytes += send_dirty(&mut out, kvm, &dirty, &mut buf)?;
            break;
        }
        m.bytes += send_dirty(&mut out, kvm, &dirty, &mut buf)?;
        m.rounds += 1;
    }
    // Wait for the target to have taken in everything sent so far, then
    // send what the guest wrote meanwhile: the downtime below then holds
    // only the last few pages and the state.
    out.write_all(&[TAG_SYNC])?;
    out.flush()?;
    let mut tag = [0u8; 1];
    reader.read_exact(&mut tag)?;
    match tag[0] {
        CAUGHT_UP => {}
        1 => {
            let why = read_message(&mut reader)?;
            return Err(MigrateError::Refused(why));
        }
        t => return Err(MigrateError::Protocol(format!("answer {t} to a sync"))),
    }
    let dirty = kvm.dirty_log().map_err(vm_err)?;
    m.bytes += send_dirty(&mut out, kvm, &dirty, &mut buf)?;
    let stop = Instant::now();
    client
        .suspend(SUSPEND_TIMEOUT)
        .map_err(|e| MigrateError::Vm(format!("VM {vm}: {e}")))?;
    *suspended = true;
    let dirty = kvm.dirty_log().map_err(vm_err)?;
    m.final_pages = count(&dirty);
    m.bytes += send_dirty(&mut out, kvm, &dirty, &mut buf)?;
    let state = client.snapshot_with(vm, false).map_err(vm_err)?.encode();
    out.write_all(&[TAG_STATE])?;
    out.write_all(&(state.len() as u64).to_le_bytes())?;
    out.write_all(&state)?;
    out.flush()?;
    m.bytes += 9 + state.len() as u64;
    let mut tag = [0u8; 1];
    reader.read_exact(&mut tag)?;
    match tag[0] {
        0 => {}
        1 => {
            let why = read_message(&mut reader)?;
            return Err(MigrateError::Refused(why));
        }
        t => return Err(MigrateError::Protocol(format!("answer {t}"))),
    }
    m.downtime = stop.elapsed();
    m.total = start.elapsed();
    Ok(m)
}

fn count(bitmap: &[u64]) -> usize {
    bitmap.iter().map(|w| w.count_ones() as usize).sum()
}

fn send_pages(out: &mut impl Write, gpa: u64, bytes: &[u8]) -> Result<u64, MigrateError> {
    out.write_all(&[TAG_PAGES])?;
    out.write_all(&gpa.to_le_bytes())?;
    out.write_all(&(bytes.len() as u32).to_le_bytes())?;
    out.write_all(bytes)?;
    Ok(13 + bytes.len() as u64)
}

/// Sends the pages set in `bitmap`, runs of adjacent pages together.
fn send_dirty(
    out: &mut impl Write,
    kvm: &Vm,
    bitmap: &[u64],
    buf: &mut [u8],
) -> Result<u64, MigrateError> {
    let pages = kvm.mem_size() / PAGE;
    let dirty = |p: usize| bitmap.get(p / 64).is_some_and(|w| w & (1 << (p % 64)) != 0);
    let mut sent = 0;
    let mut p = 0;
    while p < pages {
        if !dirty(p) {
            p += 1;
            continue;
        }
        let first = p;
        while p < pages && dirty(p) && p - first < CHUNK_PAGES {
            p += 1;
        }
        let len = (p - first) * PAGE;
        kvm.read_memory((first * PAGE) as u64, &mut buf[..len])
            .map_err(vm_err)?;
        sent += send_pages(out, (first * PAGE) as u64, &buf[..len])?;
    }
    Ok(sent)
}

fn read_message(r: &mut impl Read) -> Result<String, MigrateError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len).min(4096) as usize;
    let mut b = vec![0u8; len];
    r.read_exact(&mut b)?;
    Ok(String::from_utf8_lossy(&b).into_owned())
}

fn refuse(out: &mut impl Write, why: &str) {
    let b = why.as_bytes();
    let _ = out.write_all(&[1]);
    let _ = out.write_all(&(b.len() as u32).to_le_bytes());
    let _ = out.write_all(b);
    let _ = out.flush();
}

/// Receives a VM from the source at the other end of `stream`: `spec`
/// gives, for the VM id the source names, the client to restore it in
/// (its configuration here). The restored client (suspended) goes to
/// `deliver` before the source is told the target holds it.
pub fn receive(
    stream: TcpStream,
    spec: impl FnOnce(u32) -> Result<ClientSpec, String>,
    deliver: impl FnOnce(Client) -> Result<(), String>,
) -> Result<u32, MigrateError> {
    let mut out = stream.try_clone()?;
    let mut r = BufReader::with_capacity(1 << 20, stream);
    match receive_vm(&mut r, &mut out, spec) {
        Ok((vm, client)) => match deliver(client) {
            Ok(()) => {
                out.write_all(&[0])?;
                out.flush()?;
                Ok(vm)
            }
            Err(why) => {
                refuse(&mut out, &why);
                Err(MigrateError::Vm(why))
            }
        },
        Err(e) => {
            refuse(&mut out, &e.to_string());
            Err(e)
        }
    }
}

fn receive_vm(
    r: &mut impl Read,
    out: &mut impl Write,
    spec: impl FnOnce(u32) -> Result<ClientSpec, String>,
) -> Result<(u32, Client), MigrateError> {
    let mut head = [0u8; 20];
    r.read_exact(&mut head)?;
    if &head[..8] != MAGIC {
        return Err(MigrateError::Protocol("not a devplane migration".into()));
    }
    let vm = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    let size = u64::from_le_bytes(head[12..20].try_into().expect("8 bytes"));
    let spec = spec(vm).map_err(MigrateError::Vm)?;
    let want = spec
        .vms
        .iter()
        .find(|v| v.id == vm)
        .map(|v| v.mem_bytes)
        .ok_or_else(|| MigrateError::Vm(format!("VM {vm} is not configured here")))?;
    if size != want as u64 {
        return Err(MigrateError::Vm(format!(
            "VM {vm} has {size:#x} bytes of memory at the source, {want:#x} here"
        )));
    }
    // The VM, its engine and vCPU threads are made while memory arrives,
    // not in the downtime; they hold until resumed.
    let client = Client::start_held(spec).map_err(vm_err)?;
    let kvm = client
        .vm(vm)
        .ok_or_else(|| MigrateError::Vm(format!("VM {vm} did not start")))?;
    let mut buf = vec![0u8; CHUNK_PAGES * PAGE];
    loop {
        let mut tag = [0u8; 1];
        r.read_exact(&mut tag)?;
        match tag[0] {
            TAG_PAGES => {
                let mut h = [0u8; 12];
                r.read_exact(&mut h)?;
                let gpa = u64::from_le_bytes(h[..8].try_into().expect("8 bytes"));
                let len = u32::from_le_bytes(h[8..].try_into().expect("4 bytes")) as usize;
                if len > buf.len() || gpa.checked_add(len as u64).is_none_or(|e| e > want as u64) {
                    return Err(MigrateError::Protocol(format!(
                        "pages {gpa:#x}+{len:#x} beyond memory or too many at once"
                    )));
                }
                r.read_exact(&mut buf[..len])?;
                kvm.load(gpa, &buf[..len]).map_err(vm_err)?;
            }
            TAG_STATE => {
                let mut h = [0u8; 8];
                r.read_exact(&mut h)?;
                let len = u64::from_le_bytes(h);
                if len > MAX_STATE {
                    return Err(MigrateError::Protocol(format!("a state of {len} bytes")));
                }
                let mut state = vec![0u8; len as usize];
                r.read_exact(&mut state)?;
                let snap = VmSnapshot::decode(&state).map_err(vm_err)?;
                if snap.vm != vm {
                    return Err(MigrateError::Protocol(format!(
                        "the state is of VM {}, the stream of VM {vm}",
                        snap.vm
                    )));
                }
                client.apply_state(&snap).map_err(vm_err)?;
                return Ok((vm, client));
            }
            TAG_SYNC => {
                out.write_all(&[CAUGHT_UP])?;
                out.flush()?;
            }
            t => return Err(MigrateError::Protocol(format!("message {t}"))),
        }
    }
}
