//! devplane's fast path.
//!
//! This crate owns everything on the data path of a request: on the server,
//! loading the XDP steering program ([`xdp`]) and, in later modules, the
//! AF_XDP polling workers that apply requests to device models; on the
//! client, the KVM VMM whose exits become batched io_uring sends. Slow-path
//! decisions (what is registered where) belong to `devplane-control`, which
//! writes them into the eBPF maps this crate reads.
#![deny(missing_docs)]

pub mod client;
pub mod privilege;
pub mod server;
pub mod topology;
pub mod xdp;
