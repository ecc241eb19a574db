//! The worker: one pinned polling thread per configured core, owning its
//! [`crate::dispatch::Dispatcher`] (and so its device models), its
//! interrupt router and its side of a transport.
//!
//! One loop ([`run`]) serves both transports: it asks the
//! [`Transport`] for a batch of received frames (which the transport hands
//! to dispatch), lets the interrupt router queue interrupt datagrams on the
//! transport, has the transport transmit what was queued and take back the
//! frames the kernel is done with, and then spins or sleeps
//! ([`backoff`]). The AF_XDP transport is [`crate::afxdp`], the UDP socket
//! one [`crate::socket`].
//!
//! Files, leaves first (no file imports one that imports it): [`config`]
//! (the loop's settings), [`backoff`], [`stats`] (counters),
//! [`transport`] (the trait), [`lifecycle`] (commands applied between two
//! batches), [`run`] (the loop).

pub mod backoff;
pub mod config;
pub mod lifecycle;
pub mod run;
pub mod stats;
pub mod transport;

pub use config::LoopConfig;
pub use run::run;
pub use transport::{Transport, Work};
