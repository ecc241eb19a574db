//! The server configuration of the multi-tenant tests: registered
//! clients, each owning one VM, served by one worker of a server on the
//! topology's server side. The attack tests (`e2e_attacks`,
//! `e2e_bulk_attacks`, `e2e_adversarial`) build their victim and their
//! attacking tenant with it, so what "a registered tenant" means is said
//! once.

use std::net::Ipv4Addr;

use devplane_control::config::{
    ClientConfig, ClientKey, Mode, ModelConfig, ServerConfig, ServerSection, Tuning, VmConfig,
};

use crate::topology::Topology;

/// The hypervisor id every test tenant's VM names.
pub const HYPERVISOR: u32 = 3;

/// One tenant: a registered client at an address, owning one VM.
#[derive(Debug, Clone)]
pub struct Tenant {
    /// Its client id.
    pub client: u32,
    /// The address it is registered at (the server drops its datagrams
    /// from any other).
    pub address: Ipv4Addr,
    /// The one VM it owns (on hypervisor [`HYPERVISOR`]).
    pub vm: u32,
    /// Its tag key, if its datagrams must be sealed.
    pub key: Option<ClientKey>,
}

/// Server `id` on UDP `port` of `topo`'s server side: one worker on core
/// 0 polling briskly (spin 200, idle 100 us, batch 64), clients checked,
/// its XDP pins in a directory unique to `tag` and this process, serving
/// `models` to `tenants`.
pub fn server_config(
    topo: &Topology,
    mode: Mode,
    tag: &str,
    id: u32,
    port: u16,
    tenants: &[Tenant],
    models: Vec<ModelConfig>,
) -> ServerConfig {
    ServerConfig {
        server: ServerSection {
            id,
            port,
            mode,
            interface: Some(topo.server_ifname().to_string()),
            workers: vec![0],
            pin_dir: Some(format!("/sys/fs/bpf/devplane-test-{tag}-{}", std::process::id()).into()),
            check_clients: true,
        },
        tuning: Tuning {
            spin_budget: 200,
            idle_sleep_us: 100,
            batch: 64,
        },
        clients: tenants
            .iter()
            .map(|t| ClientConfig {
                tag_key: t.key.clone(),
                id: t.client,
                address: t.address,
                budget: None,
            })
            .collect(),
        vms: tenants
            .iter()
            .map(|t| VmConfig {
                id: t.vm,
                client: t.client,
                hypervisor: HYPERVISOR,
            })
            .collect(),
        models,
    }
}
