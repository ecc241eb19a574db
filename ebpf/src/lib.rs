//! Library face of the XDP program crate: empty. It exists so that
//! `dataplane/` can name this crate as a build dependency (cargo then
//! rebuilds the program when it changes); the program is `src/main.rs`.
#![no_std]
