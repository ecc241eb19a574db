//! Frame-level work of an AF_XDP worker: answering a request frame in place
//! (Ethernet, IPv4 and UDP headers turned around, payload answered by the
//! dispatcher) and building interrupt frames.

use devplane_wire::frame::{self, ETH_HLEN, Flow, UDP_HLEN};
use devplane_wire::tag::TagKey;
use devplane_wire::{DatagramWriter, Header, Interrupt, Kind, Record};

use super::dispatch::{Dispatcher, Outcome, PendingIrq};
use super::irq::Peers;

/// What to do with a received frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameOutcome {
    /// Send the (rewritten) frame back; its length is unchanged.
    Reply,
    /// Recycle the frame (malformed, not for a model held here).
    Recycle,
    /// An acknowledgement of model `model`'s interrupts up to `seq`:
    /// recycle the frame and tell the router.
    Ack {
        /// The model.
        model: u32,
        /// The highest sequence number acknowledged.
        seq: u64,
        /// (client, VM, where to): an address for the VM's interrupts,
        /// to take if none is known yet.
        learn: Option<(u32, u32, Flow)>,
    },
    /// A block request taken by the bulk engine: recycle the frame; its
    /// answers go back along `back`.
    Bulk {
        /// The client.
        client: u32,
        /// Its VM.
        vm: u32,
        /// The flow back to the sender.
        back: Flow,
    },
    /// Not a UDP/IPv4 frame at all.
    BadFrame,
    /// A wrong IPv4 header checksum, or a wrong non-zero UDP checksum.
    BadChecksum,
}

/// Answers the request frame in place. On `Reply`, the frame holds the
/// response with addresses and ports swapped and the UDP checksum zeroed
/// (IPv4 allows it); the IPv4 checksum is unchanged because swapping the
/// source and destination addresses does not change the sum.
pub fn answer_in_place(
    frame: &mut [u8],
    disp: &mut Dispatcher,
    peers: &mut Peers<Flow>,
) -> FrameOutcome {
    let Ok(udp) = frame::parse_udp(frame) else {
        return FrameOutcome::BadFrame;
    };
    let udp_start = udp.payload_offset - UDP_HLEN;
    let (Some(ip), Some(udp_bytes)) = (
        frame.get(ETH_HLEN..udp_start),
        frame.get(udp_start..udp.payload_offset + udp.payload_len),
    ) else {
        return FrameOutcome::BadFrame;
    };
    if !frame::checksums_ok(ip, udp_bytes) {
        return FrameOutcome::BadChecksum;
    }
    let payload = &mut frame[udp.payload_offset..udp.payload_offset + udp.payload_len];
    let (client, vm, irq_port, fresh) = match disp.handle(payload) {
        Outcome::Respond {
            client,
            vm,
            irq_port,
            fresh,
            ..
        } => (client, vm, irq_port, fresh),
        Outcome::Acked {
            model,
            seq,
            client,
            vm,
            irq_port,
        } => {
            // Where the VM's interrupts go, if nothing better is known
            // (a client's announcement to a model's new server).
            let learn = vm.map(|vm| (client, vm, irq_flow(udp.flow.reversed(), irq_port)));
            return FrameOutcome::Ack { model, seq, learn };
        }
        Outcome::Bulk { client, vm } => {
            return FrameOutcome::Bulk {
                client,
                vm,
                back: udp.flow.reversed(),
            };
        }
        Outcome::Consumed
        | Outcome::NotHere
        | Outcome::Malformed(_)
        | Outcome::Foreign
        | Outcome::BadTag => {
            return FrameOutcome::Recycle;
        }
    };
    let back = udp.flow.reversed();
    let irq_to = irq_flow(back, irq_port);
    if fresh {
        peers.learn(client, vm, irq_to);
    } else {
        peers.learn_first(client, vm, irq_to);
    }
    // Ethernet: swap MACs.
    frame[0..6].copy_from_slice(&back.dst_mac);
    frame[6..12].copy_from_slice(&back.src_mac);
    // IPv4: swap addresses (checksum unchanged).
    let ip = ETH_HLEN;
    frame[ip + 12..ip + 16].copy_from_slice(&back.src_ip);
    frame[ip + 16..ip + 20].copy_from_slice(&back.dst_ip);
    // UDP: swap ports, zero the checksum.
    let u = udp.payload_offset - UDP_HLEN;
    frame[u..u + 2].copy_from_slice(&back.src_port.to_be_bytes());
    frame[u + 2..u + 4].copy_from_slice(&back.dst_port.to_be_bytes());
    frame[u + 6..u + 8].copy_from_slice(&[0, 0]);
    FrameOutcome::Reply
}

/// Writes an interrupt datagram for `irqs` (all from `model`; `ids` is
/// (server, client, model)) into `buf` as a whole frame along `flow`,
/// sealed with `key` if given; returns the frame length.
pub fn interrupt_frame(
    buf: &mut [u8],
    flow: &Flow,
    ids: (u32, u32, u32),
    irqs: &[PendingIrq],
    key: Option<&TagKey>,
) -> Option<usize> {
    let payload_len = {
        let body = buf.get_mut(frame::PAYLOAD_OFFSET..)?;
        interrupt_datagram(body, ids, irqs, key)?
    };
    frame::write_headers(buf, flow, payload_len)
}

/// Writes an interrupt datagram (UDP payload only; `ids` is (server,
/// client, model)) into `buf`, sealed with `key` if given.
pub fn interrupt_datagram(
    buf: &mut [u8],
    (server, client, model): (u32, u32, u32),
    irqs: &[PendingIrq],
    key: Option<&TagKey>,
) -> Option<usize> {
    let mut w =
        DatagramWriter::new(buf, Header::new(Kind::Interrupt, model, server, client)).ok()?;
    for irq in irqs {
        let rec = Record::Interrupt(Interrupt {
            vm: irq.vm,
            hypervisor: irq.hypervisor,
            line: irq.event.line,
            action: irq.event.action,
            seq: irq.seq,
        });
        w.push(&rec).ok()?;
    }
    let len = w.finish();
    match key {
        Some(key) => devplane_wire::tag::seal(buf, len, key),
        None => Some(len),
    }
}

/// Where a client's interrupts go: the port it named, at the address it
/// sent from (`back`, the frame's flow reversed), or that flow itself.
fn irq_flow(back: Flow, port: Option<u16>) -> Flow {
    match port {
        Some(port) => Flow {
            dst_port: port,
            ..back
        },
        None => back,
    }
}
