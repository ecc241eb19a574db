//! Builds models by kind name, as configuration files name them.

use std::path::PathBuf;

use crate::DeviceModel;
use crate::blockstore::{self, Blockstore};
use crate::cmos::Cmos;
use crate::counter::Counter;
use crate::i8042::I8042;
use crate::null::{Echo, Null};
use crate::uart::{self, Uart};

/// The kinds [`build`] knows.
pub const KINDS: &[&str] = &[
    "null",
    "echo",
    "counter",
    "uart",
    "cmos",
    "i8042",
    "blockstore",
];

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
    /// The kind needs a backing file and none was given.
    #[error(
        "a {0} model needs a backing file: give the model one in the \
         configuration (its `backing` path, on the server that runs it)"
    )]
    MissingBacking(&'static str),
    /// The backing file could not be used.
    #[error(
        "a {kind} model cannot use its backing file {path}: {why}",
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
                        why: format!(
                            "{e} (check that the directory exists and the server may write there)"
                        ),
                    })?)
                }
                None => Box::new(Uart::new(line)),
            }
        }
        "cmos" => Box::new(Cmos::new()),
        "i8042" => Box::new(I8042::new()),
        "blockstore" => {
            let path = params
                .backing
                .as_ref()
                .ok_or(BuildError::MissingBacking(blockstore::KIND))?;
            Box::new(Blockstore::open(path).map_err(|e| BuildError::Backing {
                kind: blockstore::KIND,
                path: path.clone(),
                why: e.to_string(),
            })?)
        }
        other => return Err(BuildError::UnknownKind(other.to_string())),
    })
}

#[cfg(test)]
mod tests {
    use devplane_wire::AccessSize;

    use super::*;
    use crate::Space;

    /// A unique directory under the temporary directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let dir = std::env::temp_dir()
                .join(format!("devplane-registry-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn builds_every_kind_and_rejects_others() {
        let dir = TempDir::new("kinds");
        for k in KINDS {
            let params = ModelParams {
                backing: Some(dir.0.join(format!("{k}.backing"))),
                ..Default::default()
            };
            assert_eq!(build(k, params).unwrap().kind(), *k);
        }
        let e = build("floppy", ModelParams::default()).err().unwrap();
        assert!(
            e.to_string()
                .contains("known: null, echo, counter, uart, cmos, i8042, blockstore"),
            "{e}"
        );
    }

    #[test]
    fn a_blockstore_needs_a_backing_file() {
        let e = build("blockstore", ModelParams::default()).err().unwrap();
        assert_eq!(e, BuildError::MissingBacking("blockstore"));
        assert!(e.to_string().contains("needs a backing file"), "{e}");
        let path = PathBuf::from("/nonexistent-devplane-dir/disk.img");
        let e = build(
            "blockstore",
            ModelParams {
                backing: Some(path.clone()),
                ..Default::default()
            },
        )
        .err()
        .unwrap();
        let msg = e.to_string();
        assert!(msg.contains("/nonexistent-devplane-dir/disk.img"), "{msg}");
        assert!(msg.contains("directory exists"), "{msg}");
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
