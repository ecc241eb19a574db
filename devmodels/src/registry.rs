//! Builds models by kind name, as configuration files name them.

use crate::DeviceModel;
use crate::cmos::Cmos;
use crate::counter::Counter;
use crate::i8042::I8042;
use crate::null::{Echo, Null};
use crate::uart::{self, Uart};

/// The kinds [`build`] knows.
pub const KINDS: &[&str] = &["null", "echo", "counter", "uart", "cmos", "i8042"];

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
        "uart" => Box::new(Uart::new(params.line.unwrap_or(uart::DEFAULT_LINE))),
        "cmos" => Box::new(Cmos::new()),
        "i8042" => Box::new(I8042::new()),
        other => return Err(BuildError::UnknownKind(other.to_string())),
    })
}

#[cfg(test)]
mod tests {
    use devplane_wire::AccessSize;

    use super::*;
    use crate::Space;

    #[test]
    fn builds_every_kind_and_rejects_others() {
        for k in KINDS {
            assert_eq!(build(k, ModelParams::default()).unwrap().kind(), *k);
        }
        let e = build("floppy", ModelParams::default()).err().unwrap();
        assert!(
            e.to_string()
                .contains("known: null, echo, counter, uart, cmos, i8042"),
            "{e}"
        );
    }

    #[test]
    fn the_uart_line_defaults_to_com1s() {
        let line = |params| {
            let mut m = build("uart", params).unwrap();
            m.write(Space::Pio, 1, AccessSize::B1, 0x02).unwrap();
            m.take_irq().map(|e| e.line)
        };
        assert_eq!(line(ModelParams::default()), Some(4));
        assert_eq!(line(ModelParams { line: Some(3) }), Some(3));
    }
}
