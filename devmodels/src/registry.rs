//! Builds models by kind name, as configuration files name them.

use std::path::PathBuf;

use crate::DeviceModel;
use crate::cmos::Cmos;
use crate::counter::Counter;
use crate::i8042::I8042;
use crate::null::{Echo, Null};
use crate::uart::{self, Uart};

/// The kinds [`build`] knows.
pub const KINDS: &[&str] = &["null", "echo", "counter", "uart", "cmos", "i8042"];

/// Parameters a model may take from its configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelParams {
    /// The interrupt line the model raises, if any.
    pub line: Option<u32>,
    /// A file on the host running the model: the `uart`'s console log
    /// (optional; appended to) or the `blockstore`'s disk image.
    pub backing: Option<PathBuf>,
}

/// Why a model could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// No such kind.
    #[error("unknown device-model kind {0:?} (known: {k})", k = KINDS.join(", "))]
    UnknownKind(String),
    /// The backing file could not be opened or created.
    #[error(
        "cannot open {path} as the backing file of a {kind} model: {why} \
         (check that the directory exists and is writable by the server)",
        path = .path.display()
    )]
    Backing {
        /// The model kind.
        kind: &'static str,
        /// The file.
        path: PathBuf,
        /// What the system said.
        why: String,
    },
}

/// A new model of `kind`.
pub fn build(kind: &str, params: ModelParams) -> Result<Box<dyn DeviceModel>, BuildError> {
    Ok(match kind {
        "null" => Box::new(Null),
        "echo" => Box::new(Echo::default()),
        "counter" => Box::new(Counter::new(params.line.unwrap_or(0))),
        "uart" => {
            let line = params.line.unwrap_or(uart::DEFAULT_LINE);
            match &params.backing {
                Some(log) => {
                    Box::new(Uart::with_log(line, log).map_err(|e| BuildError::Backing {
                        kind: uart::KIND,
                        path: log.clone(),
                        why: e.to_string(),
                    })?)
                }
                None => Box::new(Uart::new(line)),
            }
        }
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
        assert_eq!(
            line(ModelParams {
                line: Some(3),
                ..Default::default()
            }),
            Some(3)
        );
    }

    #[test]
    fn an_unopenable_console_log_is_a_clear_error() {
        let path = PathBuf::from("/nonexistent-devplane-dir/console.log");
        let e = build(
            "uart",
            ModelParams {
                backing: Some(path.clone()),
                ..Default::default()
            },
        )
        .err()
        .unwrap();
        assert!(matches!(&e, BuildError::Backing { kind: "uart", path: p, .. } if *p == path));
        let msg = e.to_string();
        assert!(
            msg.contains("/nonexistent-devplane-dir/console.log"),
            "{msg}"
        );
        assert!(msg.contains("uart"), "{msg}");
    }
}
