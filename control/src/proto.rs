//! The control protocol between `dpctl` and a running server: one JSON
//! request per line over a Unix socket (owner-only permissions), one JSON
//! response per line back. It carries what the eBPF maps alone cannot do:
//! moving a model between workers, holding a VM's interrupts, counters,
//! tuning.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where server `id` listens unless told otherwise.
pub fn default_socket(id: u32) -> PathBuf {
    PathBuf::from(format!("/run/devplane/server-{id}.sock"))
}

/// A request to a running server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Counters: per worker, and the XDP program's.
    Stats,
    /// Move a device model to another worker of this server.
    MoveModel {
        /// The model.
        model: u32,
        /// The worker index to move it to.
        worker: usize,
    },
    /// Start serving a device model (already in the database) live.
    AddModel {
        /// The model, as the server's configuration describes it.
        model: crate::config::ModelConfig,
    },
    /// Stop serving a device model live.
    RemoveModel {
        /// The model.
        model: u32,
    },
    /// Hold a VM's interrupts.
    SuspendVm {
        /// The VM.
        vm: u32,
    },
    /// Deliver a VM's held interrupts, in order.
    ResumeVm {
        /// The VM.
        vm: u32,
    },
    /// Send a VM's interrupts to another client platform.
    MigrateVm {
        /// The VM.
        vm: u32,
        /// Its new client platform.
        client: u32,
    },
    /// Change polling settings live (absent fields keep their value).
    Tune {
        /// Empty polls before a worker sleeps.
        spin_budget: Option<u32>,
        /// Longest idle sleep, microseconds.
        idle_sleep_us: Option<u64>,
        /// Most frames per poll.
        batch: Option<u32>,
    },
}

/// One worker's counters, as reported.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerCounters {
    /// Worker index.
    pub worker: usize,
    /// Named counters.
    pub counters: Vec<(String, u64)>,
}

/// A server's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Done.
    Ok,
    /// Counters.
    Stats {
        /// Server id.
        server: u32,
        /// Per worker.
        workers: Vec<WorkerCounters>,
        /// The XDP program's non-zero counters (XDP mode).
        xdp: Vec<(String, u64)>,
    },
    /// Refused, with the reason.
    Error {
        /// What was wrong and what to do.
        message: String,
    },
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// Nothing listens there.
    #[error(
        "no server listening on {path} ({source}): is devplane-server running? (pass --socket if it uses another path)"
    )]
    NotRunning {
        /// The socket path.
        path: PathBuf,
        /// The connect error.
        source: std::io::Error,
    },
    /// Talking to it failed.
    #[error("talking to the server on {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It answered something that is not a response.
    #[error("the server on {path} answered garbage: {why}")]
    BadAnswer {
        /// The socket path.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

/// Sends `req` to the server listening on `path` and returns its answer.
pub fn call(path: &Path, req: &Request, timeout: Duration) -> Result<Response, ProtoError> {
    let io = |source| ProtoError::Io {
        path: path.to_path_buf(),
        source,
    };
    let stream = UnixStream::connect(path).map_err(|source| ProtoError::NotRunning {
        path: path.to_path_buf(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_string(req).map_err(|e| ProtoError::BadAnswer {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    line.push('\n');
    (&stream).write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).map_err(io)?;
    serde_json::from_str(&answer).map_err(|e| ProtoError::BadAnswer {
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_responses_round_trip_as_json_lines() {
        let reqs = [
            Request::Stats,
            Request::MoveModel {
                model: 4,
                worker: 1,
            },
            Request::AddModel {
                model: crate::config::ModelConfig::new(9, "counter", 1),
            },
            Request::RemoveModel { model: 9 },
            Request::SuspendVm { vm: 2 },
            Request::ResumeVm { vm: 2 },
            Request::MigrateVm { vm: 2, client: 8 },
            Request::Tune {
                spin_budget: Some(5),
                idle_sleep_us: None,
                batch: Some(32),
            },
        ];
        for r in reqs {
            let text = serde_json::to_string(&r).unwrap();
            assert!(!text.contains('\n'));
            assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        }
        let text = r#"{"op":"move_model","model":4,"worker":1}"#;
        assert_eq!(
            serde_json::from_str::<Request>(text).unwrap(),
            Request::MoveModel {
                model: 4,
                worker: 1
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"reboot"}"#).is_err());
        let rsp = Response::Error {
            message: "no".into(),
        };
        let t = serde_json::to_string(&rsp).unwrap();
        assert_eq!(serde_json::from_str::<Response>(&t).unwrap(), rsp);
    }

    #[test]
    fn a_missing_server_says_so() {
        let e = call(
            Path::new("/nonexistent/devplane.sock"),
            &Request::Stats,
            Duration::from_millis(100),
        )
        .unwrap_err();
        assert!(matches!(e, ProtoError::NotRunning { .. }));
        assert!(e.to_string().contains("is devplane-server running"));
    }
}
