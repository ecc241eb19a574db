//! `devplane-testkit`: the harness of devplane's tests and benchmark.
//!
//! It owns: the single-machine network topology ([`topology`]: namespaces,
//! veth, cleanup of what dead test processes left), the privilege checks
//! that turn a missing capability into a skip or, on CI, a failure
//! ([`privilege`]), and a server running on a thread of its own inside a
//! namespace ([`host`]), a model's move between two of them as the
//! hand-over's parties ([`mover`]), the tag keys of test clients
//! ([`keys`]), and the server configuration of multi-tenant tests
//! ([`tenants`]).
//!
//! It must never be a dependency of a production crate: `devplane-server`
//! and `devplane-vmm` take it as a dev-dependency only, `dpbench` as a
//! dependency.
#![deny(missing_docs)]

pub mod attacker;
pub mod etcd;
pub mod host;
pub mod keys;
pub mod lan;
pub mod mover;
pub mod peer;
pub mod privilege;
pub mod raw;
pub mod tenants;
pub mod topology;
