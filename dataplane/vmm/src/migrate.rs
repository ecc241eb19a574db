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
//! Trust: the target listens for one migration it was told to expect,
//! with a one-time token of 32 random bytes ([`MigrationToken`]) that the
//! operator's tool hands to the source's daemon over the daemons' local
//! control sockets. The stream carries a keyed BLAKE3 MAC (the token the
//! key) over everything before it at two points: right after the header
//! (the proof: a connection without it is refused before the target
//! allocates anything, within [`PROOF_TIMEOUT`], and the target goes on
//! listening for the real source) and after the state (the whole stream:
//! a page or state altered on the path is refused before the VM is taken
//! in). The target's word that it holds the VM is MACed too, so nothing
//! on the path can make the source believe it. Everything after the magic
//! is encrypted ([`StreamCipher`]: BLAKE3's keyed extendable output, under
//! a key drawn from the token, as a keystream) and the MAC is over what
//! goes on the wire (encrypt-then-MAC): guest memory and state do not
//! cross the client hosts' network in clear. The target's answers do (a
//! status byte, its MAC, a refusal's reason).
//!
//! Messages, integers little-endian, from the source encrypted after the
//! magic and the nonce (16 random bytes: the keystream is drawn from them
//! and the token, so a send tried again under the same token never reuses
//! a keystream):
//!
//! ```text
//! header: "DPMIGR04"  nonce(16)  u32 vm  u64 memory size  mac(32)
//! pages:  u8 1  u64 gpa  u32 length  bytes
//! state:  u8 2  u64 length  snapshot file bytes (memory empty)  mac(32)
//! sync:   u8 3
//! answer (target to source): u8 0 mac'(32) (holds it)
//!                            | u8 1 u32 length message
//!                            | u8 2 (to a sync: every page before it is in)
//! ```
//!
//! `mac` is the keyed hash of every byte of the stream before it as sent
//! (ciphertext; itself sent encrypted); `mac'` the keyed hash of [`HELD`]
//! and the state's `mac`.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

pub use devplane_control::proto::MigrationToken;

use crate::kvm::Vm;
use crate::snapshot::VmSnapshot;
use crate::vmm::{Client, ClientSpec};

/// The stream's first bytes.
const MAGIC: &[u8; 8] = b"DPMIGR04";
/// How long a target waits for a connection's header and proof before it
/// drops it and listens again: a stalled or hostile connection delays the
/// real source by at most this.
pub const PROOF_TIMEOUT: Duration = Duration::from_secs(1);
/// What the target's MACed word that it holds the VM says.
const HELD: &[u8] = b"devplane migration: the target holds the VM";
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

/// The stream's cipher: the keystream is the extendable output of BLAKE3
/// keyed with a key drawn from the token and the source's nonce (BLAKE3's
/// key derivation, a context of its own: the MAC keyed by the token never
/// meets it), a PRF in counter mode. One key per stream, in one direction
/// (the target's answers carry no secret and go in clear): no keystream is
/// used twice, even when a send is tried again under the same token. BLAKE3 rather than AES-CTR: the crate is
/// already here and non-generic (a debug build runs it optimized, where
/// a generic cipher instantiated in this crate ran at a few MB/s), and its
/// output is generated many blocks at a time with SIMD.
struct StreamCipher {
    xof: blake3::OutputReader,
    pad: Vec<u8>,
}

impl StreamCipher {
    /// The keystream of the stream `token` keys and `nonce` (the source's
    /// random bytes after the magic) names.
    fn new(token: &MigrationToken, nonce: &[u8; NONCE_LEN]) -> StreamCipher {
        let mut material = [0u8; 32 + NONCE_LEN];
        material[..32].copy_from_slice(&token.0);
        material[32..].copy_from_slice(nonce);
        let key = blake3::derive_key(
            "devplane 2026-12 live migration stream cipher, source to target",
            &material,
        );
        StreamCipher {
            xof: blake3::Hasher::new_keyed(&key).finalize_xof(),
            pad: Vec::new(),
        }
    }

    /// XORs the next `data.len()` bytes of the keystream into `data` (a
    /// reader's bytes, in place).
    fn apply_keystream(&mut self, data: &mut [u8]) {
        self.pad.resize(data.len(), 0);
        self.xof.fill(&mut self.pad);
        xor(data, &self.pad);
    }

    /// `out` = `plain` XOR the next `plain.len()` bytes of the keystream
    /// (a writer's: the keystream goes straight into `out`, no pad).
    fn encrypt(&mut self, plain: &[u8], out: &mut [u8]) {
        self.xof.fill(out);
        xor(out, plain);
    }
}

/// `dst` ^= `src`, eight bytes at a time.
fn xor(dst: &mut [u8], src: &[u8]) {
    let mut d = dst.chunks_exact_mut(8);
    let mut p = src.chunks_exact(8);
    for (d, p) in (&mut d).zip(&mut p) {
        let x = u64::from_ne_bytes(d.try_into().expect("8 bytes"))
            ^ u64::from_ne_bytes(p.try_into().expect("8 bytes"));
        d.copy_from_slice(&x.to_ne_bytes());
    }
    for (d, p) in d.into_remainder().iter_mut().zip(p.remainder()) {
        *d ^= p;
    }
}

/// Random bytes the source sends in clear after the magic: its stream's
/// keystream is drawn from them and the token, so that two streams under
/// one token (a send tried again) never share a keystream.
const NONCE_LEN: usize = 16;

/// Leading bytes of the stream sent in clear: the magic (a peer of another
/// format is told so) and the nonce. The MAC covers them.
const CLEAR: usize = MAGIC.len() + NONCE_LEN;

/// A fresh nonce.
fn nonce() -> std::io::Result<[u8; NONCE_LEN]> {
    let mut b = [0u8; NONCE_LEN];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b)
}

/// A writer that encrypts what goes through it (after the first [`CLEAR`]
/// bytes) and MACs what it sends (encrypt-then-MAC, both keyed by the
/// token).
struct Sealing<W> {
    inner: W,
    mac: blake3::Hasher,
    cipher: StreamCipher,
    /// Bytes of the stream still to send in clear.
    clear: usize,
    /// Scratch for the ciphertext.
    buf: Vec<u8>,
}

impl<W: Write> Sealing<W> {
    /// A stream under `token` that has sent its first [`CLEAR`] bytes: the
    /// magic and `nonce`.
    fn start(
        inner: W,
        token: &MigrationToken,
        nonce: &[u8; NONCE_LEN],
    ) -> std::io::Result<Sealing<W>> {
        let mut w = Sealing {
            inner,
            mac: blake3::Hasher::new_keyed(&token.0),
            cipher: StreamCipher::new(token, nonce),
            clear: CLEAR,
            buf: Vec::new(),
        };
        w.write_all(MAGIC)?;
        w.write_all(nonce)?;
        Ok(w)
    }
}

impl<W: Write> Write for Sealing<W> {
    /// Takes all of `b` or fails: the keystream moves on with what is
    /// taken, so the ciphertext goes out whole (`write_all` below).
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let clear = self.clear.min(b.len());
        self.buf.resize(b.len(), 0);
        self.buf[..clear].copy_from_slice(&b[..clear]);
        self.cipher.encrypt(&b[clear..], &mut self.buf[clear..]);
        self.clear -= clear;
        self.inner.write_all(&self.buf)?;
        self.mac.update(&self.buf);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<W: Write> Sealing<W> {
    /// Writes the MAC of everything written so far; returns it.
    fn seal(&mut self) -> Result<blake3::Hash, MigrateError> {
        let mac = self.mac.finalize();
        self.write_all(mac.as_bytes())?;
        Ok(mac)
    }
}

/// A reader that MACs what the protocol takes from it and decrypts it
/// ([`Sealing`]'s other end).
struct Checking<R> {
    inner: R,
    mac: blake3::Hasher,
    token: MigrationToken,
    /// The stream's first [`CLEAR`] bytes as they come (magic, nonce).
    head: [u8; CLEAR],
    /// How many of them came.
    got: usize,
    /// Made once the nonce is in.
    cipher: Option<StreamCipher>,
}

impl<R: Read> Checking<R> {
    fn new(inner: R, token: &MigrationToken) -> Checking<R> {
        Checking {
            inner,
            mac: blake3::Hasher::new_keyed(&token.0),
            token: token.clone(),
            head: [0; CLEAR],
            got: 0,
            cipher: None,
        }
    }
}

impl<R: Read> Read for Checking<R> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(b)?;
        self.mac.update(&b[..n]);
        let clear = (CLEAR - self.got).min(n);
        self.head[self.got..self.got + clear].copy_from_slice(&b[..clear]);
        self.got += clear;
        if self.cipher.is_none() && self.got == CLEAR {
            let nonce: [u8; NONCE_LEN] = self.head[MAGIC.len()..].try_into().expect("nonce");
            self.cipher = Some(StreamCipher::new(&self.token, &nonce));
        }
        if let Some(c) = &mut self.cipher {
            c.apply_keystream(&mut b[clear..n]);
        }
        Ok(n)
    }
}

impl<R: Read> Checking<R> {
    /// Reads a MAC and checks it against everything read before it
    /// (compared in constant time); returns it.
    fn check(&mut self, what: &str) -> Result<blake3::Hash, MigrateError> {
        let want = self.mac.finalize();
        let mut got = [0u8; 32];
        self.read_exact(&mut got)?;
        if blake3::Hash::from_bytes(got) != want {
            return Err(MigrateError::Protocol(format!(
                "{what} does not carry this migration's MAC (a stranger, or altered on the way)"
            )));
        }
        Ok(want)
    }
}

/// The MAC of the target's word that it holds the VM.
fn held_mac(token: &MigrationToken, state_mac: &blake3::Hash) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(&token.0);
    h.update(HELD);
    h.update(state_mac.as_bytes());
    h.finalize()
}

/// Sends VM `vm` of `client` to the target at the other end of `stream`
/// (see the module documentation). On success the VM is suspended here
/// and held by the target; on failure it runs here again.
pub fn send(
    client: &Client,
    vm: u32,
    stream: TcpStream,
    token: &MigrationToken,
) -> Result<Migration, MigrateError> {
    let kvm = client
        .vm(vm)
        .ok_or_else(|| MigrateError::Vm(format!("VM {vm} is not in this client")))?;
    kvm.log_dirty(true).map_err(vm_err)?;
    let mut suspended = false;
    let result = send_logged(client, kvm, vm, stream, token, &mut suspended);
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
    token: &MigrationToken,
    suspended: &mut bool,
) -> Result<Migration, MigrateError> {
    let start = Instant::now();
    let _ = stream.set_nodelay(true);
    // A target that stops reading or answering fails the migration.
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    stream.set_write_timeout(Some(ANSWER_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let nonce = nonce()?;
    let mut out = Sealing::start(BufWriter::with_capacity(1 << 20, stream), token, &nonce)?;
    let size = kvm.mem_size();
    let mut m = Migration::default();
    out.write_all(&vm.to_le_bytes())?;
    out.write_all(&(size as u64).to_le_bytes())?;
    out.seal()?;
    m.bytes += (CLEAR + 12 + 32) as u64;
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
    let state_mac = out.seal()?;
    out.flush()?;
    m.bytes += 9 + state.len() as u64 + 32;
    let mut tag = [0u8; 1];
    reader.read_exact(&mut tag)?;
    match tag[0] {
        0 => {
            let mut mac = [0u8; 32];
            reader.read_exact(&mut mac)?;
            if blake3::Hash::from_bytes(mac) != held_mac(token, &state_mac) {
                return Err(MigrateError::Protocol(
                    "the word that the target holds the VM is not MACed with this \
                     migration's token"
                        .into(),
                ));
            }
        }
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

/// A connection to a migration target that proved the migration's token
/// ([`admit`]): the VM it brings and its memory size, the rest of the
/// stream to come.
pub struct Admitted {
    vm: u32,
    size: u64,
    r: Checking<BufReader<TcpStream>>,
    out: TcpStream,
    token: MigrationToken,
}

impl Admitted {
    /// The VM the source brings.
    pub fn vm(&self) -> u32 {
        self.vm
    }
}

/// Reads a connection's header and proof within [`PROOF_TIMEOUT`]: a
/// connection that does not prove `token` is refused (told why, dropped)
/// before anything is allocated for it. The stream's read timeout is set
/// back to what it was for the rest.
pub fn admit(stream: TcpStream, token: &MigrationToken) -> Result<Admitted, MigrateError> {
    let mut out = stream.try_clone()?;
    let timeout = stream.read_timeout()?;
    stream.set_read_timeout(Some(PROOF_TIMEOUT))?;
    let mut r = Checking::new(BufReader::with_capacity(1 << 20, stream), token);
    let proved = (|| {
        let mut head = [0u8; CLEAR + 12];
        // The magic first: a stranger's shorter message is told at once.
        r.read_exact(&mut head[..MAGIC.len()])?;
        if &head[..MAGIC.len()] != MAGIC {
            return Err(MigrateError::Protocol("not a devplane migration".into()));
        }
        r.read_exact(&mut head[MAGIC.len()..])?;
        r.check("the stream's header")?;
        Ok(head)
    })();
    let head = match proved {
        Ok(h) => h,
        Err(e) => {
            refuse(&mut out, &e.to_string());
            return Err(e);
        }
    };
    r.inner.get_ref().set_read_timeout(timeout)?;
    Ok(Admitted {
        vm: u32::from_le_bytes(head[CLEAR..CLEAR + 4].try_into().expect("4 bytes")),
        size: u64::from_le_bytes(head[CLEAR + 4..CLEAR + 12].try_into().expect("8 bytes")),
        r,
        out,
        token: token.clone(),
    })
}

/// Receives the VM of an [`admit`]ted connection: `spec` gives, for the
/// VM id the source names, the client to restore it in (its
/// configuration here). The restored client (suspended) goes to `deliver`
/// before the source is told the target holds it.
pub fn receive(
    a: Admitted,
    spec: impl FnOnce(u32) -> Result<ClientSpec, String>,
    deliver: impl FnOnce(Client) -> Result<(), String>,
) -> Result<u32, MigrateError> {
    let Admitted {
        vm,
        size,
        mut r,
        mut out,
        token,
    } = a;
    match receive_vm(vm, size, &mut r, &mut out, spec) {
        Ok((client, state_mac)) => match deliver(client) {
            Ok(()) => {
                out.write_all(&[0])?;
                out.write_all(held_mac(&token, &state_mac).as_bytes())?;
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

fn receive_vm<R: Read>(
    vm: u32,
    size: u64,
    r: &mut Checking<R>,
    out: &mut impl Write,
    spec: impl FnOnce(u32) -> Result<ClientSpec, String>,
) -> Result<(Client, blake3::Hash), MigrateError> {
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
                // Nothing of the stream is trusted before this: pages went
                // into guest memory of a VM that has not run, and is
                // dropped if this fails.
                let mac = r.check("the migration stream")?;
                let snap = VmSnapshot::decode(&state).map_err(vm_err)?;
                if snap.vm != vm {
                    return Err(MigrateError::Protocol(format!(
                        "the state is of VM {}, the stream of VM {vm}",
                        snap.vm
                    )));
                }
                client.apply_state(&snap).map_err(vm_err)?;
                return Ok((client, mac));
            }
            TAG_SYNC => {
                out.write_all(&[CAUGHT_UP])?;
                out.flush()?;
            }
            t => return Err(MigrateError::Protocol(format!("message {t}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn token(b: u8) -> MigrationToken {
        MigrationToken([b; 32])
    }

    /// A header for VM 5 of 64 KiB, MACed under `key`.
    fn header(key: &MigrationToken) -> Vec<u8> {
        let mut w = Sealing::start(Vec::new(), key, &[9; NONCE_LEN]).unwrap();
        w.write_all(&5u32.to_le_bytes()).unwrap();
        w.write_all(&0x1_0000u64.to_le_bytes()).unwrap();
        w.seal().unwrap();
        w.inner
    }

    /// Connects to a fresh listener, sends `bytes` (and keeps the
    /// connection open), and returns what [`admit`] made of it and what
    /// the connecting side read back.
    fn admit_of(bytes: Vec<u8>, key: &MigrationToken) -> (Result<Admitted, MigrateError>, Vec<u8>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let peer = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(&bytes).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut back = Vec::new();
            let _ = s.read_to_end(&mut back);
            back
        });
        let (s, _) = l.accept().unwrap();
        let got = admit(s, key);
        // Let the peer's read end: a refused stream is dropped already.
        if let Ok(a) = &got {
            let _ = a.out.shutdown(std::net::Shutdown::Both);
        }
        (got, peer.join().unwrap())
    }

    #[test]
    fn a_source_with_the_token_is_admitted() {
        let (got, back) = admit_of(header(&token(1)), &token(1));
        let a = got.expect("admitted");
        assert_eq!((a.vm(), a.size), (5, 0x1_0000));
        assert!(back.is_empty(), "told something: {back:?}");
    }

    #[test]
    fn a_stranger_without_the_token_is_refused_before_anything_is_made() {
        for (bytes, why) in [
            (header(&token(2)), "does not carry this migration's MAC"),
            (
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
                "not a devplane",
            ),
        ] {
            let (got, back) = admit_of(bytes, &token(1));
            let e = got.err().expect("refused").to_string();
            assert!(e.contains(why), "{e}");
            // It is told why, as a refusal message.
            assert_eq!(back.first(), Some(&1), "{back:?}");
            assert!(String::from_utf8_lossy(&back).contains(why), "{back:?}");
        }
        // A right header with its proof cut short.
        let mut h = header(&token(1));
        h.truncate(h.len() - 1);
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let peer = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(&h).unwrap();
            s
        });
        let (s, _) = l.accept().unwrap();
        let _hold = peer.join().unwrap();
        // A silent (or slow) connection costs the target at most the
        // proof timeout, then it listens again.
        let t = Instant::now();
        assert!(admit(s, &token(1)).is_err());
        let took = t.elapsed();
        assert!(
            took >= PROOF_TIMEOUT && took < PROOF_TIMEOUT * 3,
            "{took:?}"
        );
    }

    /// The stream after the magic is ciphertext: the same bytes written in
    /// any pieces read back in any other pieces under the token, and
    /// something else under another token (whose MAC then fails).
    #[test]
    fn the_stream_is_encrypted_after_the_magic() {
        let key = token(6);
        let plain: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let nonce = [5u8; NONCE_LEN];
        let mut w = Sealing::start(Vec::new(), &key, &nonce).unwrap();
        let mut at = 0;
        for piece in [1usize, 7, 4096, 13, 9000].iter().cycle() {
            if at == plain.len() {
                break;
            }
            let end = (at + piece).min(plain.len());
            w.write_all(&plain[at..end]).unwrap();
            at = end;
        }
        w.seal().unwrap();
        let wire = w.inner;
        assert_eq!(&wire[..8], MAGIC, "the magic goes in clear");
        assert_eq!(wire[8..CLEAR], nonce, "so does the nonce");
        let body = &wire[CLEAR..CLEAR + plain.len()];
        assert!(
            !body
                .windows(16)
                .any(|x| plain.windows(16).take(300).any(|p| p == x)),
            "plaintext on the wire"
        );
        let read = |key: &MigrationToken, pieces: usize| {
            let mut r = Checking::new(&wire[..], key);
            let mut head = [0u8; CLEAR];
            r.read_exact(&mut head).unwrap();
            let magic: [u8; 8] = head[..8].try_into().unwrap();
            let mut got = vec![0u8; plain.len()];
            for chunk in got.chunks_mut(pieces) {
                r.read_exact(chunk).unwrap();
            }
            (magic, got, r.check("the stream").is_ok())
        };
        for pieces in [1, 3, 4096, 20_000] {
            assert_eq!(
                read(&key, pieces),
                (*MAGIC, plain.clone(), true),
                "{pieces}"
            );
        }
        let (magic, other, ok) = read(&token(7), 4096);
        assert_eq!(&magic, MAGIC);
        assert_ne!(other, plain);
        assert!(!ok, "another token's MAC");
        // Another nonce under the same token: another keystream.
        let mut again = Sealing::start(Vec::new(), &key, &[6u8; NONCE_LEN]).unwrap();
        again.write_all(&plain).unwrap();
        let again = again.inner;
        let same = again[CLEAR..]
            .iter()
            .zip(&wire[CLEAR..CLEAR + plain.len()])
            .filter(|(a, b)| a == b)
            .count();
        assert!(
            same < plain.len() / 64,
            "{same} bytes alike under two nonces"
        );
    }

    #[test]
    fn any_byte_of_the_stream_altered_fails_its_mac() {
        let key = token(3);
        let mut w = Sealing::start(Vec::new(), &key, &[3; NONCE_LEN]).unwrap();
        w.write_all(&[TAG_PAGES]).unwrap();
        w.write_all(&[0x5a; 300]).unwrap();
        w.write_all(&[TAG_STATE]).unwrap();
        let mac = w.seal().unwrap();
        let clean = w.inner;
        let read = |bytes: &[u8], key: &MigrationToken| {
            let mut r = Checking::new(bytes, key);
            let mut body = vec![0u8; bytes.len() - 32];
            r.read_exact(&mut body).unwrap();
            r.check("the migration stream")
        };
        assert_eq!(read(&clean, &key).unwrap(), mac);
        assert!(read(&clean, &token(4)).is_err(), "another key");
        for i in 0..clean.len() {
            let mut bad = clean.clone();
            bad[i] ^= 0x01;
            let e = read(&bad, &key).expect_err("altered byte accepted");
            assert!(e.to_string().contains("altered"), "{e}");
        }
        // The target's word: bound to the token and the stream.
        assert_ne!(held_mac(&key, &mac), held_mac(&token(4), &mac));
        assert_ne!(held_mac(&key, &mac), held_mac(&key, &blake3::hash(b"x")));
    }
}
