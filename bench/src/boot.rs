//! The `boot` scenario: the minimal guest kernel (`scripts/guest-kernel.sh`)
//! boots from its ext2 root disk to its init (`guest/min-init.c`), which
//! writes a line to the disk, syncs it and restarts the VM through the
//! i8042; once with the console, RTC and disk local, once with them on a
//! server behind XDP (the embedded topology), in the same run. Rows: the
//! time from the VM's start to the kernel's banner, the root mount, the
//! init's marker and the VM's end; the remote rows' floors are the local
//! ones, so their ratio is remote over local. The KVM exits of each boot
//! and the accesses served remotely are in the rows' knobs and the notes.
//! The device setup and the console watch are the boot tests' own
//! (`devplane_vmm::boot::minimal`).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use devplane_testkit::host::ServerThread;
use devplane_testkit::topology::{Side, Topology};
use devplane_vmm::boot::minimal::{self, Milestones, ServerPlace, Watch};
use devplane_vmm::boot::{self, LinuxBoot, MinimalKernel};
use devplane_vmm::kvm::VcpuExit;
use devplane_vmm::vmm::{Client, ClientSpec, LinuxVm, VcpuReport};

use crate::hist::Latency;
use crate::report::{Floor, Row, progress};

/// The scenario's name.
pub const NAME: &str = "boot";
/// How long the default suite lets this scenario take.
pub const SUITE_BUDGET: Duration = Duration::from_secs(120);
/// How long one boot may take before the scenario fails.
const LIMIT: Duration = Duration::from_secs(240);
/// The UDP port of the embedded server.
const PORT: u16 = 7820;
/// The file, beside the minimal kernel, that keeps how long the last runs
/// of this scenario took on this host (seconds, one a line, the last
/// [`KEPT`]): the default suite decides by the longest, so that a host
/// near the budget does not run it one time and skip it the next.
const MEASURED: &str = "boot-scenario.secs";
const KEPT: usize = 3;
/// What the two boots take where the scenario never ran here yet: the
/// minimal kernel boots in about a minute where `/dev/kvm` emulates guest kernel
/// code (nested PVM), in a few seconds where KVM runs it on the CPU.
const EMULATED_GUESS: Duration = Duration::from_secs(130);
const NATIVE_GUESS: Duration = Duration::from_secs(20);

/// The command that runs this scenario alone.
pub const COMMAND: &str = "target/release/dpbench --scenario boot";

/// How long the scenario takes on this host, and how that is known.
pub fn estimate(kernel: &MinimalKernel) -> (Duration, String) {
    let runs = measured_runs(kernel);
    if let Some(s) = runs.iter().copied().reduce(f64::max) {
        return (
            Duration::from_secs_f64(s),
            format!(
                "the longest of its last {} runs here took {s:.0} s",
                runs.len()
            ),
        );
    }
    if boot::kvm_emulates_kernel_code() {
        (
            EMULATED_GUESS,
            "/dev/kvm emulates guest kernel code here (nested PVM): two boots of \
             about a minute each"
                .into(),
        )
    } else {
        (
            NATIVE_GUESS,
            "KVM runs guest kernel code on the CPU here: a boot takes seconds".into(),
        )
    }
}

/// The times [`MEASURED`] keeps (anything else in it is ignored).
fn measured_runs(kernel: &MinimalKernel) -> Vec<f64> {
    let text = std::fs::read_to_string(measured_file(kernel)).unwrap_or_default();
    let runs: Vec<f64> = text
        .lines()
        .filter_map(|l| l.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && (0.0..1e6).contains(s))
        .collect();
    runs[runs.len().saturating_sub(KEPT)..].to_vec()
}

fn measured_file(kernel: &MinimalKernel) -> PathBuf {
    kernel
        .vmlinux
        .parent()
        .unwrap_or(Path::new("."))
        .join(MEASURED)
}

/// Why the scenario does not run within `budget` here, if it does not:
/// its kernel is missing, or it would take longer.
pub fn skip_reason(budget: Duration) -> Option<String> {
    let kernel = match MinimalKernel::locate() {
        Ok(k) => k,
        Err(e) => return Some(format!("{e} (scripts/guest-kernel.sh builds it)")),
    };
    let (took, why) = estimate(&kernel);
    (took >= budget).then(|| {
        format!(
            "takes ~{:.0} s here ({why}), over the {} s budget (--boot-budget); \
             run it with `{COMMAND}`",
            took.as_secs_f64(),
            budget.as_secs()
        )
    })
}

/// A file removed on drop.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What one boot gave.
struct Boot {
    seen: Milestones,
    total: Duration,
    exits: u64,
    /// Exits served by a remote model.
    remote_exits: u64,
    /// All remote accesses: those exits and the disk's blockstore's.
    remote: u64,
    local: u64,
}

/// Boots `kernel` with the client `spec` starts (in `netns` if given) and
/// waits for the VM's end; fails unless the init synced its line and the
/// VM ended through the i8042.
fn boot_once(
    label: &str,
    kernel: &MinimalKernel,
    spec: ClientSpec,
    topo: Option<&Topology>,
) -> Result<Boot> {
    progress(format_args!("{NAME}: {label} boot"));
    let linux = LinuxBoot::from_root_disk(kernel);
    let console = linux.console.clone();
    let t0 = Instant::now();
    let watch = Watch::start(&console, t0);
    let vms = vec![LinuxVm {
        vm: minimal::VM,
        boot: linux,
    }];
    let started = match topo {
        Some(t) => t
            .run(Side::Client, move || Client::start_linux(spec, vms))
            .context("entering the client namespace")?,
        None => Client::start_linux(spec, vms),
    };
    let mut client = match started {
        Ok(c) => c,
        Err(e) => {
            watch.finish();
            bail!("{label}: starting the Linux VM: {e}");
        }
    };
    let reports: Vec<VcpuReport> = client.wait(LIMIT);
    let total = t0.elapsed();
    let seen = watch.finish();
    drop(client);
    let tail = || {
        let t = console.text();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    };
    let Some(r) = reports.first() else {
        bail!("{label}: the VM reported no vCPU");
    };
    if !matches!(r.exit, Ok(VcpuExit::Reset)) {
        bail!(
            "{label}: the VM did not end through the i8042 within {LIMIT:?} ({:?}); \
             console tail:\n{}",
            r.exit.as_ref().map_err(|e| e.to_string()),
            tail()
        );
    }
    if let Some(at) = seen.panic {
        bail!(
            "{label}: the kernel panicked at {:.1} s; console tail:\n{}",
            at.as_secs_f64(),
            tail()
        );
    }
    if seen.banner.is_none() || seen.root.is_none() || seen.init.is_none() || seen.synced.is_none()
    {
        bail!(
            "{label}: the boot missed a milestone ({}); console tail:\n{}",
            seen.summary(),
            tail()
        );
    }
    Ok(Boot {
        seen,
        total,
        exits: r.exits,
        remote_exits: r.stats.remote_exits.load(Ordering::Relaxed),
        remote: r.stats.remote.load(Ordering::Relaxed),
        local: r.stats.local.load(Ordering::Relaxed),
    })
}

/// The milestones a row is made of, by name.
fn milestones(b: &Boot) -> [(&'static str, Duration); 4] {
    let at = |d: Option<Duration>| d.unwrap_or_default();
    [
        ("banner", at(b.seen.banner)),
        ("root", at(b.seen.root)),
        ("init", at(b.seen.init)),
        ("end", b.total),
    ]
}

fn sample(d: Duration) -> Latency {
    let mut h = Latency::up_to(LIMIT.as_nanos() as u64 * 2);
    h.record(d.as_nanos() as u64);
    h
}

/// Runs the two boots; returns the rows and the table, and adds the
/// exits' notes.
pub fn run(notes: &mut Vec<String>) -> Result<(Vec<Row>, String)> {
    let kernel = MinimalKernel::locate().context("the minimal guest kernel")?;
    let started = Instant::now();
    let pid = std::process::id();
    let tmp = std::env::temp_dir();
    let disk = TempFile(tmp.join(format!("dpbench-boot-root-{pid}.img")));
    let log = TempFile(tmp.join(format!("dpbench-boot-console-{pid}.log")));

    minimal::new_disk(&disk.0, &kernel.init).context("making the root disk")?;
    let local = boot_once("local", &kernel, minimal::local_spec(Some(&disk.0)), None)?;

    minimal::new_disk(&disk.0, &kernel.init).context("making the root disk")?;
    let topo = Topology::new("bboot").context("building the netns topology (needs root)")?;
    let server = ServerThread::spawn(
        minimal::server_config(&ServerPlace {
            interface: topo.server_ifname(),
            port: PORT,
            pin_dir: format!("/sys/fs/bpf/dpbench-boot-{pid}").into(),
            client_ip: topo.client_ip(),
            disk: &disk.0,
            log: &log.0,
        }),
        Some(topo.server_netns()),
    )
    .context("starting the XDP server")?;
    let spec = minimal::remote_spec(
        topo.client_ip(),
        std::net::SocketAddr::from((topo.server_ip(), PORT)),
    );
    let remote = boot_once("remote", &kernel, spec, Some(&topo));
    server.stop();
    let remote = remote?;
    if remote.remote_exits == 0 {
        bail!("remote: no exit was served by the server");
    }

    let knobs = |b: &Boot, devices: &str| {
        [
            ("kernel", kernel.version.clone()),
            ("devices", devices.to_string()),
            ("kvm_exits", b.exits.to_string()),
            ("remote_exits", b.remote_exits.to_string()),
            ("remote_accesses", b.remote.to_string()),
            ("local_accesses", b.local.to_string()),
        ]
    };
    let mut rows = Vec::new();
    for ((name, l), (_, r)) in milestones(&local).into_iter().zip(milestones(&remote)) {
        let lh = sample(l);
        let f = Floor::of(format!("{NAME}/local/{name}"), &lh);
        rows.push(Row::floor(NAME, format!("local/{name}"), lh).with_knobs(knobs(&local, "local")));
        rows.push(
            Row::latency(NAME, format!("remote/{name}"), sample(r), f)
                .with_knobs(knobs(&remote, "console, RTC and disk on the server")),
        );
    }
    notes.push(format!(
        "{NAME}: the remote boot's server served {} of its {} KVM exits (the console and RTC) \
         and {} accesses in all (with the disk's blockstore), {} accesses local; the local \
         boot had {} KVM exits, {} accesses local",
        remote.remote_exits, remote.exits, remote.remote, remote.local, local.exits, local.local
    ));
    let mut runs = measured_runs(&kernel);
    runs.push(started.elapsed().as_secs_f64());
    let keep = &runs[runs.len().saturating_sub(KEPT)..];
    let text: String = keep.iter().map(|s| format!("{s:.1}\n")).collect();
    // Only the default suite's choice depends on it: a read-only guest
    // directory leaves it to the guess.
    let _ = std::fs::write(measured_file(&kernel), text);
    Ok((rows, table(&kernel.version, &local, &remote)))
}

/// The scenario's table, in seconds.
fn table(version: &str, local: &Boot, remote: &Boot) -> String {
    let mut out = format!(
        "{NAME} (minimal kernel {version}, ext2 root on virtio-blk; remote: exits served \
         by the server, + disk: with the disk's accesses)\n\
         {:<14} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10}\n",
        "", "banner s", "root s", "init s", "end s", "KVM exits", "remote", "+ disk"
    );
    let line = |label: &str, b: &Boot| {
        let m = milestones(b);
        format!(
            "{label:<14} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>10} {:>10} {:>10}\n",
            m[0].1.as_secs_f64(),
            m[1].1.as_secs_f64(),
            m[2].1.as_secs_f64(),
            m[3].1.as_secs_f64(),
            b.exits,
            b.remote_exits,
            b.remote
        )
    };
    out += &line("local", local);
    out += &line("remote", remote);
    let (l, r) = (milestones(local), milestones(remote));
    let ratio = |i: usize| r[i].1.as_secs_f64() / l[i].1.as_secs_f64().max(1e-9);
    out += &format!(
        "{:<14} {:>9.2} {:>9.2} {:>9.2} {:>9.2}\n",
        "remote/local",
        ratio(0),
        ratio(1),
        ratio(2),
        ratio(3)
    );
    out
}
