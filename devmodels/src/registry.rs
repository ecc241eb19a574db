//! Builds models by kind name, as configuration files name them.

use crate::DeviceModel;
use crate::counter::Counter;
use crate::null::{Echo, Null};

/// The kinds [`build`] knows.
pub const KINDS: &[&str] = &["null", "echo", "counter"];

/// Parameters a model may take from its configuration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModelParams {
    /// The interrupt line the model raises, if any.
    pub line: Option<u32>,
}

/// Why a model could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// No such kind.
    #[error("unknown device-model kind {0:?} (known: {k})", k = KINDS.join(", "))]
    UnknownKind(String),
}

/// A new model of `kind`.
pub fn build(kind: &str, params: ModelParams) -> Result<Box<dyn DeviceModel>, BuildError> {
    Ok(match kind {
        "null" => Box::new(Null),
        "echo" => Box::new(Echo::default()),
        "counter" => Box::new(Counter::new(params.line.unwrap_or(0))),
        other => return Err(BuildError::UnknownKind(other.to_string())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_every_kind_and_rejects_others() {
        for k in KINDS {
            assert_eq!(build(k, ModelParams::default()).unwrap().kind(), *k);
        }
        let e = build("uart", ModelParams::default()).err().unwrap();
        assert!(e.to_string().contains("known: null, echo, counter"), "{e}");
    }
}
