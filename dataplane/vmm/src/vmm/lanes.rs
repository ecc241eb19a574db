//! The engine's lanes for a client's vCPUs: one shared lane for every vCPU,
//! or (direct mode) one lane per vCPU plus one that receives interrupts.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;

use super::{BuiltVm, ClientError, ClientSpec, io_err};
use crate::engine::{Injector, Lane, VcpuPort};
use crate::kvm::{IrqHandle, Trigger};
use crate::ring::ExitRing;

/// A vCPU's end of the wire: its exit ring and the lane that serves it.
pub(super) struct VcpuWire {
    /// The ring its remote accesses go through.
    pub(super) ring: Arc<ExitRing>,
    /// Index of its lane in [`Wiring::lanes`].
    pub(super) lane: usize,
}

/// The engine's lanes and each vCPU's place on them.
pub(super) struct Wiring {
    /// The lanes, for [`crate::engine::Engine::spawn`].
    pub(super) lanes: Vec<Lane>,
    /// Per vCPU, VM by VM in order.
    pub(super) vcpus: Vec<VcpuWire>,
}

/// Lanes for the vCPUs of `vms`.
pub(super) fn wire(spec: &ClientSpec, vms: &[BuiltVm]) -> Result<Wiring, ClientError> {
    let servers: HashMap<u32, SocketAddr> = spec.servers.iter().map(|s| (s.id, s.addr)).collect();
    let via = via(spec);
    let handles: HashMap<u32, IrqHandle> = vms.iter().map(|v| (v.id, v.vm.irq_handle())).collect();
    let mut lanes = Vec::new();
    let mut ports = Vec::new();
    let mut vcpus = Vec::new();
    for v in vms {
        for i in 0..v.vcpus.len() {
            let ring = Arc::new(ExitRing::new().map_err(io_err("exit ring"))?);
            let port = VcpuPort {
                vm: v.id,
                hypervisor: v.hypervisor,
                vcpu: i as u16,
                ring: ring.clone(),
                models: v.remotes.clone(),
            };
            let lane = if spec.direct {
                lanes.push(direct_lane(spec, port, &servers)?);
                lanes.len() - 1
            } else {
                ports.push(port);
                0
            };
            vcpus.push(VcpuWire { ring, lane });
        }
    }
    if spec.direct {
        let irq = interrupt_lane(spec, &mut lanes, &handles, &servers)?;
        lanes.push(irq);
    } else {
        lanes.push(Lane {
            sockets: sockets(spec)?,
            vcpus: ports,
            injectors: injectors(&handles),
            direct: false,
            irq_ports: Vec::new(),
            irq_sockets: 0,
            servers,
            via,
        });
    }
    Ok(Wiring { lanes, vcpus })
}

/// The servers reached through an owner server, and the owner's address.
fn via(spec: &ClientSpec) -> HashMap<u32, SocketAddr> {
    spec.servers
        .iter()
        .filter_map(|s| Some((s.id, s.via?)))
        .collect()
}

/// A direct-mode vCPU's own lane.
fn direct_lane(
    spec: &ClientSpec,
    port: VcpuPort,
    servers: &HashMap<u32, SocketAddr>,
) -> Result<Lane, ClientError> {
    Ok(Lane {
        sockets: sockets(spec)?,
        vcpus: vec![port],
        // Interrupts come to the interrupt lane's socket.
        injectors: HashMap::new(),
        direct: true,
        irq_ports: Vec::new(),
        irq_sockets: 0,
        servers: servers.clone(),
        via: via(spec),
    })
}

/// Direct lanes are their vCPUs' own, reaped only while they wait for an
/// answer: their requests name the engine's interrupt socket for their
/// server (one per server, connected to it, so the kernel takes nothing on
/// it from anyone else), and the engine injects them into any VM of this
/// client. Points the direct lanes at them and returns their lane.
fn interrupt_lane(
    spec: &ClientSpec,
    direct: &mut [Lane],
    handles: &HashMap<u32, IrqHandle>,
    servers: &HashMap<u32, SocketAddr>,
) -> Result<Lane, ClientError> {
    let irq = sockets(spec)?;
    let mut irq_ports = Vec::new();
    for s in &irq {
        let addr = s
            .local_addr()
            .map_err(io_err("bind the interrupt socket"))?;
        irq_ports.push(addr.port());
    }
    for lane in direct {
        lane.irq_ports = irq_ports.clone();
        // Also here: an interrupt from a server that does not know the
        // interrupt-port flag comes to the lane that spoke last.
        lane.injectors = injectors(handles);
        // The vCPU's lane receives on the same sockets (its thread reads
        // them while it waits for an answer; the engine's ring has a multishot
        // receive on each): whichever reads a datagram first applies it,
        // once (the lanes share the interrupt numbers applied).
        if spec.engine.irqs_on_lanes {
            for s in &irq {
                lane.sockets.push(
                    s.try_clone()
                        .map_err(io_err("share the interrupt socket"))?,
                );
            }
            lane.irq_sockets = irq.len();
        }
    }
    Ok(Lane {
        sockets: irq,
        vcpus: Vec::new(),
        injectors: injectors(handles),
        direct: false,
        irq_ports: Vec::new(),
        irq_sockets: 0,
        servers: servers.clone(),
        // Only acknowledgements leave from here, straight to the server.
        via: HashMap::new(),
    })
}

/// One connected UDP socket per server, in server order.
fn sockets(spec: &ClientSpec) -> Result<Vec<UdpSocket>, ClientError> {
    let bind = spec.bind.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let mut out = Vec::new();
    for s in &spec.servers {
        let sock = UdpSocket::bind((bind, 0)).map_err(io_err("bind client socket"))?;
        sock.connect(s.addr)
            .map_err(io_err("connect client socket"))?;
        out.push(sock);
    }
    Ok(out)
}

/// Remote models' interrupts, per VM: through the VM's [`Trigger`], the
/// same path as local models' and virtio devices'.
fn injectors(handles: &HashMap<u32, IrqHandle>) -> HashMap<u32, Injector> {
    handles
        .iter()
        .map(|(vm, h)| {
            let h = h.clone();
            let inject: Injector = Box::new(move |line, action| h.trigger(line, action).is_ok());
            (*vm, inject)
        })
        .collect()
}
