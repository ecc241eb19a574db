//! Capability checks for privileged tests and tools.
//!
//! Tests that need root, `/dev/kvm`, bpffs, XDP or network namespaces call
//! [`require`]. On a developer machine a missing capability skips the test
//! with a message; when [`REQUIRE_ENV`] is set (CI sets it) it fails the
//! test instead, so that CI can never pass by skipping.

use std::path::Path;

/// Environment variable that turns a missing capability into a failure.
pub const REQUIRE_ENV: &str = "DEVPLANE_REQUIRE_PRIVILEGED";

/// A capability a test may need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    /// Effective uid 0.
    Root,
    /// `/dev/kvm` openable read-write.
    Kvm,
    /// Loading BPF programs (root, and the bpf syscall not blocked).
    Bpf,
}

/// A capability that is missing, and how to get it.
#[derive(Debug, thiserror::Error)]
pub enum Missing {
    /// Not running as root.
    #[error("{0:?} needs root: run the tests as root (sudo -E make test)")]
    NotRoot(Capability),
    /// `/dev/kvm` cannot be opened.
    #[error(
        "/dev/kvm is not usable ({0}): enable KVM (nested virtualisation in a VM) and run as root"
    )]
    NoKvm(std::io::Error),
}

/// Whether `cap` is present; `Err` says what is missing and how to fix it.
pub fn check(cap: Capability) -> Result<(), Missing> {
    match cap {
        Capability::Root | Capability::Bpf => {
            // SAFETY: geteuid has no preconditions and cannot fail.
            if unsafe { libc::geteuid() } == 0 {
                Ok(())
            } else {
                Err(Missing::NotRoot(cap))
            }
        }
        Capability::Kvm => {
            let p = Path::new("/dev/kvm");
            match std::fs::OpenOptions::new().read(true).write(true).open(p) {
                Ok(_) => Ok(()),
                Err(e) => Err(Missing::NoKvm(e)),
            }
        }
    }
}

/// Whether missing capabilities must fail rather than skip.
pub fn required() -> bool {
    std::env::var_os(REQUIRE_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// Returns `true` if every capability is present. Otherwise prints a skip
/// message and returns `false`, or panics when [`required`] is set.
pub fn require(test: &str, caps: &[Capability]) -> bool {
    for &cap in caps {
        if let Err(why) = check(cap) {
            if required() {
                panic!("{test}: {why} ({REQUIRE_ENV} is set, so this fails instead of skipping)");
            }
            eprintln!("SKIPPED {test}: {why}");
            return false;
        }
    }
    true
}

/// Handles a capability failure found while running (say, XDP attach or
/// netns creation was refused): skip with a message, or panic when
/// [`required`] is set. Returns `false` so callers can `return`.
pub fn unavailable(test: &str, why: &str) -> bool {
    if required() {
        panic!("{test}: {why} ({REQUIRE_ENV} is set, so this fails instead of skipping)");
    }
    eprintln!("SKIPPED {test}: {why}");
    false
}
