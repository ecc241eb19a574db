//! The `irq` scenario: a remote device model's interrupt, from the guest
//! asking for it to the guest's handler acknowledging it, on the embedded
//! topology (XDP server, real KVM guest) or against `--server`.
//!
//! The guest is `guests::irq_chain`: it programs the 8259 PIC (in-kernel
//! irqchip), then writes 1 to the interrupt register (`REG_IRQ`) of a
//! remote counter model, whose worker raises one edge on line
//! [`IRQ_LINE`] and sends the interrupt datagram to the client, which
//! injects it (`KVM_IRQ_LINE`). The guest waits in `sti; hlt`; its handler
//! acknowledges by writing the count to a *local* null device at
//! [`ACK_PORT`], asks for the next interrupt (writes `REG_IRQ` again), sends
//! the EOI and returns. One interrupt is outstanding at a time.
//!
//! What is timed: the vCPU's exits that reach userspace alternate between
//! the trigger write `T` (remote, not posted) and the acknowledgement `A`
//! (local): `A0 T0 A1 T1 ... A(n-1) T(n-1) An` (the PIC's ports, the EOI
//! and `hlt` stay in the kernel). The exit-interval samples alternate
//! likewise, and the odd ones are `T(k) -> A(k+1)`: from the trigger
//! write's exit reaching the VMM, through its round trip to the model
//! (which raises the line), the interrupt datagram's trip back, the
//! injection, the guest waking from `hlt` and entering its handler, to the
//! handler's acknowledging write exiting to the VMM. The row
//! `trigger-to-ack` holds those samples; the even ones (`A -> T`: a local
//! exit and a few guest instructions) are left out. The run checks the
//! alternation: the guest counted exactly n interrupts, and its vCPU made
//! n + 1 local and n remote accesses and 2n exit intervals.
//!
//! The floor is a local exit plus a UDP round trip (`exit-floor` +
//! `udp-floor`, or `rtt-floor` with `--server`), as for the `client`
//! scenario's remote rows: what one trigger-to-ack could cost at least.

use std::time::Duration;

use anyhow::{Result, bail, ensure};
use devplane_devmodels::Space;
use devplane_devmodels::counter::REG_IRQ;
use devplane_vmm::guests;

use crate::report::{self, Floor, Row, progress};
use crate::rig::{
    ACK_PORT, Drain, IRQ_BASE, IRQ_LINE, LOCAL_VM, NULL_PIO, Rig, dev, histogram, irq_model,
    vm_spec,
};
use devplane_vmm::vmm::{DeviceSpec, Place};

const SCENARIO: &str = "irq";

/// The interrupt round trips in a vCPU's exit intervals: the odd-indexed
/// samples (`T(k) -> A(k+1)`, see the module documentation), of a run
/// that took `irqs` interrupts. Fails unless there are exactly `2 * irqs`
/// samples, which the alternation implies.
pub fn round_trips(samples: &[u32], irqs: usize) -> Result<Vec<u32>> {
    ensure!(
        samples.len() == 2 * irqs,
        "{} exit intervals for {irqs} interrupts (expected {}): the trigger and \
         acknowledgement exits did not alternate",
        samples.len(),
        2 * irqs
    );
    Ok(samples.iter().skip(1).step_by(2).copied().collect())
}

/// How long a run of `irqs` interrupts may take before it is given up.
pub fn timeout(irqs: u16) -> Duration {
    Duration::from_secs(5) + Duration::from_millis(1) * u32::from(irqs)
}

/// Runs the scenario once on `rig`: `irqs` interrupts (and as many floor
/// samples), the first tenth as warm-up. What the scenario reports about
/// itself goes to `notes`.
pub fn run(rig: &mut Rig, irqs: u16, notes: &mut Vec<String>) -> Result<Vec<Row>> {
    let warm = usize::from(irqs / 10);
    progress(format_args!("irq: network floor, {irqs} round trips"));
    let (net_name, net) = rig.net_floor(warm as u32, u32::from(irqs))?;
    rig.serve()?;
    progress(format_args!("irq: exit-floor, {irqs} exits"));
    let exit = rig.exit_floor(irqs, warm)?;
    progress(format_args!("irq: irq-local, {irqs} interrupts"));
    let local = local_floor(rig, irqs, warm)?;
    // The least a remote interrupt costs: the same interrupt raised by a
    // local model (an exit, the injection, the guest's way to its
    // handler and the acknowledging exit) plus the network's round trip
    // (the trigger's way there, the interrupt's way back).
    let floor = Floor {
        name: format!("{SCENARIO}/irq-local+{SCENARIO}/{net_name}"),
        parts: vec![local.clone(), net.clone()],
    };
    let exit_net = Floor {
        name: format!("{SCENARIO}/exit-floor+{SCENARIO}/{net_name}"),
        parts: vec![exit.clone(), net.clone()],
    };

    progress(format_args!("irq: trigger-to-ack, {irqs} interrupts"));
    let trigger = IRQ_BASE + REG_IRQ as u16;
    let drain = Drain::from_env();
    let mut retried = false;
    let out = loop {
        let (vm, model) = rig.irq_slot()?;
        let g = guests::irq_chain(IRQ_LINE, irqs, ACK_PORT, trigger)?;
        let devices = vec![
            dev(Space::Pio, IRQ_BASE as u64, 0x20, model, false, false),
            dev(Space::Pio, ACK_PORT as u64, 4, NULL_PIO, false, true),
        ];
        let before = rig.server_tx_full();
        let resent_before = rig.server_irqs_resent();
        let res = rig.run_vms(
            "irq/trigger-to-ack",
            vec![vm_spec(vm, &[g], devices)],
            2 * usize::from(irqs) + 8,
            drain,
            timeout(irqs),
        );
        match (res, before, rig.server_tx_full()) {
            (Ok(out), ..) => break (out, resent_before),
            // The embedded server dropped a frame on a full TX ring during
            // the run: an interrupt datagram may have waited for its resend
            // long enough to end the run. Say so, and run again once, under
            // a new slot.
            (Err(e), Some(b), Some(a)) if a > b && !retried => {
                retried = true;
                notes.push(report::warning(format_args!(
                    "irq: a run lost an interrupt: the server dropped {} frame(s) on a full \
                     AF_XDP TX ring (worker counter tx_full); ran it again under a new VM \
                     ({e:#})",
                    a - b
                )));
            }
            (Err(e), ..) => return Err(e),
        }
    };
    let (out, resent_before) = out;
    let resent = match (resent_before, rig.server_irqs_resent()) {
        (Some(b), Some(a)) => a.saturating_sub(b).to_string(),
        _ => "?".to_string(),
    };
    let [v] = out.vcpus.as_slice() else {
        bail!("expected one vCPU, got {}", out.vcpus.len());
    };
    let n = u64::from(irqs);
    ensure!(
        v.done == u32::from(irqs) && v.local == n + 1 && v.remote == n,
        "the guest counted {} of {irqs} interrupts with {} acknowledgements and {} \
         triggers (expected {irqs}, {}, {irqs})",
        v.done,
        v.local,
        v.remote,
        n + 1
    );
    let rtts = round_trips(&v.samples, usize::from(irqs))?;
    let irq = histogram(rtts.into_iter().skip(warm));
    notes.push(judge(&irq, &floor, &exit_net));
    let server = rig.server_name();
    let rows = vec![
        Row::floor(SCENARIO, "exit-floor", exit).with_knobs([("exits", irqs)]),
        Row::floor(SCENARIO, "irq-local", local).with_knobs([
            ("irqs", irqs.to_string()),
            (
                "trigger",
                format!("local counter@{IRQ_LINE} REG_IRQ port {trigger:#x}"),
            ),
        ]),
        Row::floor(SCENARIO, net_name, net).with_knobs([
            ("round_trips", irqs.to_string()),
            ("server", server.clone()),
        ]),
        Row::latency(SCENARIO, "trigger-to-ack", irq, floor).with_knobs([
            ("irqs", irqs.to_string()),
            ("warmup", warm.to_string()),
            ("line", IRQ_LINE.to_string()),
            (
                "trigger",
                format!("remote counter REG_IRQ port {trigger:#x}, not posted"),
            ),
            ("ack", format!("local null port {ACK_PORT:#x}")),
            ("drain", drain.name().to_string()),
            ("server", server),
            ("server_irqs_resent", resent.clone()),
            (
                "injected_by_vcpu",
                out.irqs.map_or_else(|| "?".into(), |(_, v)| v.to_string()),
            ),
        ]),
    ];
    notes.extend(rig.take_warnings());
    if let Some((all, vcpu)) = out.irqs {
        notes.push(format!(
            "irq: of {all} interrupts injected, the vCPU's thread injected {vcpu} itself \
             (reaped on its own lane while it waited for the trigger's answer), the engine \
             thread {}; the server resent {resent} interrupt datagram(s) (an acknowledgement \
             later than its resend timer, at least 5 ms)",
            all.saturating_sub(vcpu)
        ));
    }
    notes.push(format!(
        "irq: trigger-to-ack is the guest's REG_IRQ write exit (remote, not posted) to its \
         handler's acknowledging write exit (local), one interrupt at a time, an interrupt \
         counter (models {}-{}, one per run) raising line {IRQ_LINE} of its VM; its floor \
         is irq-local (the same interrupt from a local counter model: no network) + \
         {net_name}; rings drained {drain:?}",
        irq_model(1),
        irq_model(rig.irq_slots())
    ));
    Ok(rows)
}

/// The trigger-to-ack target: p50 at most this many times the floor
/// (`irq-local` + the network floor, percentile by percentile).
const TARGET: f64 = 1.5;

/// `trigger-to-ack` judged against its floor (met or not), with its ratio
/// over `exit-floor` + the network floor beside (the floor it had before
/// `irq-local` was measured).
fn judge(irq: &crate::hist::Latency, floor: &Floor, exit_net: &Floor) -> String {
    let p50 = irq.summary().p50 as f64;
    let ratio = |f: &Floor| p50 / f.summary().p50.max(1) as f64;
    let r = ratio(floor);
    format!(
        "irq: trigger-to-ack p50 {:.1} us is {r:.2}x irq-local + the network floor \
         ({:.1} us; target <= {TARGET}x: {}); {:.2}x exit-floor + the network floor",
        p50 / 1000.0,
        floor.summary().p50 as f64 / 1000.0,
        if r <= TARGET { "met" } else { "NOT met" },
        ratio(exit_net),
    )
}

/// The interrupt floor: the same guest with its counter model local (the
/// vCPU thread injects the interrupt right after the trigger's exit), one
/// interrupt at a time; the trigger-to-ack intervals after `warm`.
fn local_floor(rig: &Rig, irqs: u16, warm: usize) -> Result<crate::hist::Latency> {
    let trigger = IRQ_BASE + REG_IRQ as u16;
    let g = guests::irq_chain(IRQ_LINE, irqs, ACK_PORT, trigger)?;
    let counter = DeviceSpec {
        space: Space::Pio,
        base: IRQ_BASE as u64,
        len: 0x20,
        model: 0,
        posted: false,
        place: Place::Local {
            kind: format!("counter@{IRQ_LINE}"),
        },
    };
    let devices = vec![
        counter,
        dev(Space::Pio, ACK_PORT as u64, 4, NULL_PIO, false, true),
    ];
    let out = rig.run_vms(
        "irq/irq-local",
        vec![vm_spec(LOCAL_VM, &[g], devices)],
        2 * usize::from(irqs) + 8,
        Drain::Direct,
        timeout(irqs),
    )?;
    let [v] = out.vcpus.as_slice() else {
        bail!("irq-local: expected one vCPU, got {}", out.vcpus.len());
    };
    ensure!(
        v.done == u32::from(irqs) && v.local == 2 * u64::from(irqs) + 1,
        "irq-local: the guest counted {} of {irqs} interrupts with {} local accesses \
         (expected {})",
        v.done,
        v.local,
        2 * u64::from(irqs) + 1
    );
    let rtts = round_trips(&v.samples, usize::from(irqs))?;
    Ok(histogram(rtts.into_iter().skip(warm)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_are_the_odd_intervals() {
        // A0->T0, T0->A1, A1->T1, T1->A2: two interrupts.
        let s = [5, 40, 6, 41];
        assert_eq!(round_trips(&s, 2).unwrap(), [40, 41]);
        assert!(round_trips(&s[..3], 2).is_err());
        assert!(round_trips(&[5, 40, 6, 41, 7], 2).is_err());
        assert!(round_trips(&[], 0).unwrap().is_empty());
    }

    #[test]
    fn timeouts_grow_with_the_count() {
        assert_eq!(timeout(0), Duration::from_secs(5));
        assert_eq!(timeout(5_000), Duration::from_secs(10));
    }
}
