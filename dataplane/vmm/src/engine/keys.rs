//! A client's tag keys, changed while its lanes run (a key rotation).
//!
//! The engine holds one [`LiveKeys`]; every lane's protocol keeps its own
//! copy of the ring and looks at the generation counter once per datagram
//! it seals or receives (one atomic load): only after a change does it take
//! the lock and copy the new ring.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use devplane_wire::tag::KeyRing;

#[derive(Debug, Default)]
struct Shared {
    generation: AtomicU64,
    ring: Mutex<Option<KeyRing>>,
}

/// The keys every lane of an engine seals and verifies with; cloning
/// shares them.
#[derive(Debug, Clone, Default)]
pub struct LiveKeys(Arc<Shared>);

impl LiveKeys {
    /// Keys starting as `ring` (`None`: untagged).
    pub fn new(ring: Option<KeyRing>) -> LiveKeys {
        let k = LiveKeys::default();
        *k.0.ring.lock().unwrap_or_else(|e| e.into_inner()) = ring;
        k
    }

    /// From now on, seal with `ring`'s current key and accept its keys
    /// (`None`: untagged).
    pub fn set(&self, ring: Option<KeyRing>) {
        *self.0.ring.lock().unwrap_or_else(|e| e.into_inner()) = ring;
        self.0.generation.fetch_add(1, Ordering::Release);
    }

    /// The keys now.
    pub fn get(&self) -> Option<KeyRing> {
        self.0
            .ring
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Changes so far.
    pub(crate) fn generation(&self) -> u64 {
        self.0.generation.load(Ordering::Acquire)
    }
}

/// A lane's view of [`LiveKeys`]: its own copy, refreshed after a change.
#[derive(Debug, Clone, Default)]
pub(crate) struct KeyWatch {
    keys: Option<LiveKeys>,
    seen: u64,
}

impl KeyWatch {
    /// Watches `keys`.
    pub(crate) fn new(keys: LiveKeys) -> KeyWatch {
        KeyWatch {
            seen: keys.generation(),
            keys: Some(keys),
        }
    }

    /// The keys if they changed since the last call.
    pub(crate) fn changed(&mut self) -> Option<Option<KeyRing>> {
        let keys = self.keys.as_ref()?;
        let g = keys.generation();
        if g == self.seen {
            return None;
        }
        self.seen = g;
        Some(keys.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devplane_wire::tag::TagKey;

    #[test]
    fn a_watch_sees_each_change_once() {
        let k1 = TagKey::new(1, [1; 16]);
        let live = LiveKeys::new(Some(KeyRing::new(k1.clone())));
        let mut w = KeyWatch::new(live.clone());
        assert_eq!(w.changed(), None);
        live.set(None);
        assert_eq!(w.changed(), Some(None));
        assert_eq!(w.changed(), None);
        live.set(Some(KeyRing::new(k1.clone())));
        assert_eq!(w.changed(), Some(Some(KeyRing::new(k1))));
        assert_eq!(KeyWatch::default().changed(), None);
    }
}
