//! `dpctl` run as a real binary against a temporary state directory: every
//! command's table and JSON output, and the error line and exit code of
//! every kind of bad argument.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use devplane_control::proto::{DiskStatus, Request, Response, VcpuEnd, VmRunState, VmStatus};
use serde_json::Value;

/// A unique directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("devplane-dpctl-test-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn dpctl_in(dir: &Path, args: &[&str]) -> Out {
    let out = Command::new(env!("CARGO_BIN_EXE_dpctl"))
        .arg("--state")
        .arg(dir)
        .args(args)
        .env_remove("DEVPLANE_STATE")
        .output()
        .unwrap();
    Out {
        code: out.status.code().expect("dpctl exited"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// Runs dpctl and expects success with nothing on stderr.
fn ok(dir: &Path, args: &[&str]) -> String {
    let o = dpctl_in(dir, args);
    assert_eq!(o.code, 0, "dpctl {args:?}: {}", o.stderr);
    assert_eq!(o.stderr, "", "dpctl {args:?}");
    o.stdout
}

fn ok_json(dir: &Path, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let text = ok(dir, &all);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("dpctl {args:?}: {e}: {text}"))
}

/// Runs dpctl and expects exit `code`, no stdout, and one error line that
/// starts with `dpctl: ` and contains `needle`.
fn fails(dir: &Path, args: &[&str], code: i32, needle: &str) -> String {
    let o = dpctl_in(dir, args);
    assert_eq!(o.code, code, "dpctl {args:?}: stderr {}", o.stderr);
    assert_eq!(o.stdout, "", "dpctl {args:?}");
    assert!(
        o.stderr.starts_with("dpctl: "),
        "dpctl {args:?}: {}",
        o.stderr
    );
    assert_eq!(o.stderr.lines().count(), 1, "dpctl {args:?}: {}", o.stderr);
    assert!(o.stderr.ends_with('\n'));
    assert!(
        o.stderr.contains(needle),
        "dpctl {args:?}: {:?} lacks {needle:?}",
        o.stderr
    );
    o.stderr
}

/// The rows of a table, split on runs of spaces; checks that every column
/// starts at the same offset on every line.
fn table(text: &str) -> Vec<Vec<String>> {
    let lines: Vec<&str> = text.lines().collect();
    assert!(!lines.is_empty());
    let header = lines[0];
    let starts: Vec<usize> = header
        .match_indices(|c: char| c != ' ')
        .filter(|&(i, _)| i == 0 || header.as_bytes()[i - 1] == b' ')
        .map(|(i, _)| i)
        .collect();
    for line in &lines[1..] {
        for &s in &starts {
            assert!(
                line.len() > s
                    && line.as_bytes()[s] != b' '
                    && (s == 0 || line.as_bytes()[s - 1] == b' '),
                "column at {s} misaligned in {line:?} (header {header:?})"
            );
        }
    }
    lines
        .iter()
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

/// `key  value` lines as pairs.
fn key_values(text: &str) -> Vec<(String, String)> {
    let width = text.lines().map(|l| l.find("  ").unwrap()).max().unwrap();
    text.lines()
        .map(|l| {
            let (k, v) = l.split_at(width);
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect()
}

fn value<'a>(kv: &'a [(String, String)], key: &str) -> &'a str {
    &kv.iter()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("no {key} in {kv:?}"))
        .1
}

/// Client 7 (hypervisor 2, VM 3), server 1 (model 5 on worker 0 with
/// line 4 to VM 3 at port 0x3f8; model 6 on worker 1 at MMIO 0xfe000000).
fn populate(dir: &Path) {
    // Without a key: `rotate_key_saves_then_hands_out_in_two_steps`
    // gives it its first.
    ok(
        dir,
        &["clients", "add", "7", "--address", "10.0.0.1", "--no-key"],
    );
    ok(dir, &["hypervisors", "add", "2", "--client", "7"]);
    ok(dir, &["vms", "add", "3", "--hypervisor", "2"]);
    ok(dir, &["servers", "add", "1", "--address", "10.0.1.1"]);
    ok(
        dir,
        &[
            "models",
            "add",
            "5",
            "--kind",
            "counter",
            "--server",
            "1",
            "--worker",
            "0",
            "--line",
            "4",
            "--vm",
            "3",
            "--pio-base",
            "0x3f8",
        ],
    );
    ok(
        dir,
        &[
            "models",
            "add",
            "6",
            "--kind",
            "uart",
            "--server",
            "1",
            "--worker",
            "1",
            "--mmio-base",
            "0xfe000000",
        ],
    );
}

#[test]
fn status_of_a_new_and_a_changed_database() {
    let t = TempDir::new();
    let kv = key_values(&ok(t.path(), &["status"]));
    assert_eq!(value(&kv, "generation"), "0");
    assert_eq!(value(&kv, "applied generation"), "0");
    assert_eq!(value(&kv, "maps"), "up to date");
    assert_eq!(value(&kv, "clients"), "0");
    assert_eq!(value(&kv, "state dir"), t.path().display().to_string());

    populate(t.path());
    let kv = key_values(&ok(t.path(), &["status"]));
    assert_eq!(value(&kv, "generation"), "6");
    assert!(value(&kv, "maps").starts_with("behind"));
    assert_eq!(value(&kv, "models"), "2");

    let j = ok_json(t.path(), &["status"]);
    assert_eq!(j["generation"], 6);
    assert_eq!(j["applied_generation"], 0);
    assert_eq!(j["needs_repair"], true);
    assert_eq!(j["clients"], 1);
    assert_eq!(j["hypervisors"], 1);
    assert_eq!(j["vms"], 1);
    assert_eq!(j["models"], 2);
    assert_eq!(j["servers"], 1);
    assert_eq!(j["state_dir"], t.path().display().to_string());
}

/// A state directory that does not exist is an error (a mistyped path
/// must not start an empty state) until `dpctl init` creates it.
#[test]
fn a_missing_state_directory_needs_init() {
    let t = TempDir::new();
    let dir = t.path().join("not/there");
    fails(&dir, &["status"], 1, "no state directory");
    fails(&dir, &["clients", "list"], 1, "dpctl init");
    assert!(!dir.exists(), "a refused command created {}", dir.display());
    let kv = key_values(&ok(&dir, &["init"]));
    assert_eq!(value(&kv, "generation"), "0");
    assert!(dir.is_dir());
    ok(&dir, &["status"]);
}

/// Model kinds are checked against the model registry; tuning values
/// against their ranges, before anything is sent.
#[test]
fn unknown_model_kinds_and_out_of_range_tuning_are_refused() {
    let t = TempDir::new();
    populate(t.path());
    fails(
        t.path(),
        &[
            "models", "add", "77", "--kind", "nosuch", "--server", "1", "--worker", "0",
        ],
        1,
        "unknown device-model kind \"nosuch\"",
    );
    let kv = key_values(&ok(t.path(), &["status"]));
    assert_eq!(value(&kv, "generation"), "6", "nothing was written");
    // No server listens on this socket: the refusal comes first.
    let sock = t.path().join("none.sock");
    let sock = sock.to_str().unwrap();
    for (args, needle) in [
        (
            ["--batch", "4294967295"],
            "tuning.batch = 4294967295 is out of range",
        ),
        (
            ["--idle-sleep-us", "30000000"],
            "tuning.idle_sleep_us = 30000000",
        ),
    ] {
        let mut a = vec!["--socket", sock, "tune"];
        a.extend(args);
        fails(t.path(), &a, 2, needle);
    }
}

#[test]
fn add_prints_what_it_did() {
    let t = TempDir::new();
    assert_eq!(
        ok(t.path(), &["clients", "add", "7", "--address", "10.0.0.1"]),
        "added client 7 (generation 1)\n"
    );
    let j = ok_json(t.path(), &["hypervisors", "add", "2", "--client", "7"]);
    assert_eq!(j["action"], "add");
    assert_eq!(j["kind"], "hypervisor");
    assert_eq!(j["id"], 2);
    assert_eq!(j["generation"], 2);
    let j = ok_json(t.path(), &["vms", "add", "3", "--hypervisor", "2"]);
    assert_eq!(
        (j["kind"].as_str(), j["generation"].as_u64()),
        (Some("vm"), Some(3))
    );
    let j = ok_json(t.path(), &["servers", "add", "1", "--address", "10.0.1.1"]);
    assert_eq!(j["kind"], "server");
    let j = ok_json(
        t.path(),
        &[
            "models", "add", "5", "--kind", "counter", "--server", "1", "--worker", "0",
        ],
    );
    assert_eq!(
        (j["kind"].as_str(), j["id"].as_u64()),
        (Some("model"), Some(5))
    );
}

#[test]
fn clients_list_and_show() {
    let t = TempDir::new();
    assert_eq!(
        table(&ok(t.path(), &["clients", "list"])),
        [["ID", "ADDRESS", "HYPERVISORS", "VMS"]]
    );
    assert_eq!(
        ok_json(t.path(), &["clients", "list"]),
        serde_json::json!([])
    );
    populate(t.path());
    ok(
        t.path(),
        &["clients", "add", "12", "--address", "10.0.0.12"],
    );
    let rows = table(&ok(t.path(), &["clients", "list"]));
    assert_eq!(rows[1], ["7", "10.0.0.1", "2", "3"]);
    assert_eq!(rows[2], ["12", "10.0.0.12", "-", "-"]);

    let j = ok_json(t.path(), &["clients", "list"]);
    let a = j.as_array().unwrap();
    assert_eq!(a.len(), 2);
    assert_eq!(a[0]["id"], 7);
    assert_eq!(a[0]["address"], "10.0.0.1");
    assert_eq!(a[0]["hypervisors"], serde_json::json!([2]));
    assert_eq!(a[0]["vms"], serde_json::json!([3]));
    assert_eq!(a[1]["vms"], serde_json::json!([]));

    let kv = key_values(&ok(t.path(), &["clients", "show", "7"]));
    assert_eq!(value(&kv, "id"), "7");
    assert_eq!(value(&kv, "address"), "10.0.0.1");
    assert_eq!(value(&kv, "hypervisors"), "2");
    let j = ok_json(t.path(), &["clients", "show", "7"]);
    assert_eq!(j["address"], "10.0.0.1");
    assert_eq!(j["vms"], serde_json::json!([3]));
}

#[test]
fn hypervisors_list_and_show() {
    let t = TempDir::new();
    populate(t.path());
    let rows = table(&ok(t.path(), &["hypervisors", "list"]));
    assert_eq!(rows, [["ID", "CLIENT", "VMS"], ["2", "7", "3"]]);
    let j = ok_json(t.path(), &["hypervisors", "list"]);
    assert_eq!(j[0]["client"], 7);
    assert_eq!(j[0]["vms"], serde_json::json!([3]));
    let kv = key_values(&ok(t.path(), &["hypervisors", "show", "2"]));
    assert_eq!(value(&kv, "client"), "7");
    let j = ok_json(t.path(), &["hypervisors", "show", "2"]);
    assert_eq!((j["id"].as_u64(), j["client"].as_u64()), (Some(2), Some(7)));
}

#[test]
fn vms_list_and_show() {
    let t = TempDir::new();
    populate(t.path());
    let rows = table(&ok(t.path(), &["vms", "list"]));
    assert_eq!(rows[0], ["ID", "HYPERVISOR", "CLIENT", "STATE", "MODELS"]);
    assert_eq!(rows[1], ["3", "2", "7", "stopped", "5"]);
    let j = ok_json(t.path(), &["vms", "list"]);
    assert_eq!(j[0]["state"], "stopped");
    assert_eq!(j[0]["client"], 7);
    assert_eq!(j[0]["hypervisor"], 2);
    assert_eq!(j[0]["models"], serde_json::json!([5]));
    let kv = key_values(&ok(t.path(), &["vms", "show", "3"]));
    assert_eq!(value(&kv, "state"), "stopped");
    let j = ok_json(t.path(), &["vms", "show", "3"]);
    assert_eq!(j["id"], 3);
}

#[test]
fn models_list_and_show() {
    let t = TempDir::new();
    populate(t.path());
    let rows = table(&ok(t.path(), &["models", "list"]));
    assert_eq!(
        rows,
        [
            vec![
                "ID",
                "KIND",
                "SERVER",
                "WORKER",
                "LINE",
                "VM",
                "PIO_BASE",
                "MMIO_BASE"
            ],
            vec!["5", "counter", "1", "0", "4", "3", "0x3f8", "-"],
            vec!["6", "uart", "1", "1", "-", "-", "-", "0xfe000000"],
        ]
    );
    let j = ok_json(t.path(), &["models", "list"]);
    assert_eq!(j[0]["kind"], "counter");
    assert_eq!(j[0]["pio_base"], 0x3f8);
    assert_eq!(j[0]["line"], 4);
    assert_eq!(j[0]["vm"], 3);
    assert_eq!(j[1]["mmio_base"], 0xfe00_0000u64);
    assert!(j[1].get("line").is_none());
    let kv = key_values(&ok(t.path(), &["models", "show", "6"]));
    assert_eq!(value(&kv, "kind"), "uart");
    assert_eq!(value(&kv, "mmio base"), "0xfe000000");
    let j = ok_json(t.path(), &["models", "show", "5"]);
    assert_eq!(
        (j["server"].as_u64(), j["worker"].as_u64()),
        (Some(1), Some(0))
    );
}

#[test]
fn servers_list_and_show() {
    let t = TempDir::new();
    populate(t.path());
    let rows = table(&ok(t.path(), &["servers", "list"]));
    assert_eq!(
        rows,
        [["ID", "ADDRESS", "MODELS"], ["1", "10.0.1.1", "5,6"]]
    );
    let j = ok_json(t.path(), &["servers", "list"]);
    assert_eq!(j[0]["address"], "10.0.1.1");
    assert_eq!(j[0]["models"], serde_json::json!([5, 6]));
    let kv = key_values(&ok(t.path(), &["servers", "show", "1"]));
    assert_eq!(value(&kv, "models"), "5,6");
    let j = ok_json(t.path(), &["servers", "show", "1"]);
    assert_eq!(j["id"], 1);
}

#[test]
fn remove_in_dependency_order() {
    let t = TempDir::new();
    populate(t.path());
    assert_eq!(
        ok(t.path(), &["models", "remove", "5"]),
        "removed model 5 (generation 7)\n"
    );
    let j = ok_json(t.path(), &["models", "remove", "6"]);
    assert_eq!(j["action"], "remove");
    assert_eq!(j["generation"], 8);
    ok(t.path(), &["servers", "remove", "1"]);
    ok(t.path(), &["vms", "remove", "3"]);
    ok(t.path(), &["hypervisors", "remove", "2"]);
    ok(t.path(), &["clients", "remove", "7"]);
    let j = ok_json(t.path(), &["status"]);
    assert_eq!(j["generation"], 12);
    for k in ["clients", "hypervisors", "vms", "models", "servers"] {
        assert_eq!(j[k], 0, "{k}");
        assert_eq!(ok_json(t.path(), &[k, "list"]), serde_json::json!([]));
    }
}

#[test]
fn unknown_ids_exit_3() {
    let t = TempDir::new();
    populate(t.path());
    for kind in ["clients", "hypervisors", "vms", "models", "servers"] {
        let e = fails(t.path(), &[kind, "show", "99"], 3, "99 does not exist");
        assert!(e.contains(&format!("dpctl {kind} list")), "{e}");
        fails(t.path(), &[kind, "remove", "99"], 3, "99 does not exist");
        fails(
            t.path(),
            &["--json", kind, "show", "99"],
            3,
            "does not exist",
        );
    }
}

#[test]
fn refused_changes_exit_1_and_change_nothing() {
    let t = TempDir::new();
    populate(t.path());
    let before = fs::read(t.path().join("db.json")).unwrap();
    fails(
        t.path(),
        &["clients", "add", "7", "--address", "10.0.0.9"],
        1,
        "client 7 already exists",
    );
    fails(
        t.path(),
        &["clients", "add", "8", "--address", "10.0.0.1"],
        1,
        "address 10.0.0.1 is already client 7's",
    );
    fails(
        t.path(),
        &["servers", "add", "2", "--address", "10.0.1.1"],
        1,
        "already server 1's",
    );
    fails(
        t.path(),
        &["hypervisors", "add", "9", "--client", "70"],
        1,
        "client 70 does not exist: add it first",
    );
    fails(
        t.path(),
        &["vms", "add", "9", "--hypervisor", "20"],
        1,
        "hypervisor 20 does not exist",
    );
    fails(
        t.path(),
        &[
            "models", "add", "9", "--kind", "null", "--server", "4", "--worker", "0",
        ],
        1,
        "server 4 does not exist",
    );
    fails(
        t.path(),
        &[
            "models", "add", "9", "--kind", "null", "--server", "1", "--worker", "0", "--vm", "30",
        ],
        1,
        "VM 30 does not exist",
    );
    fails(
        t.path(),
        &[
            "models", "add", "9", "--kind", "", "--server", "1", "--worker", "0",
        ],
        1,
        "kind is empty",
    );
    fails(
        t.path(),
        &["clients", "remove", "7"],
        1,
        "client 7 still hosts hypervisor 2, VM 3: remove or move them first",
    );
    fails(
        t.path(),
        &["hypervisors", "remove", "2"],
        1,
        "still hosts VM 3",
    );
    fails(
        t.path(),
        &["vms", "remove", "3"],
        1,
        "receives interrupts from model 5",
    );
    fails(
        t.path(),
        &["servers", "remove", "1"],
        1,
        "still owns model 5, model 6",
    );
    fails(
        t.path(),
        &["--json", "clients", "remove", "7"],
        1,
        "still hosts",
    );
    assert_eq!(fs::read(t.path().join("db.json")).unwrap(), before);
}

#[test]
fn usage_errors_exit_2() {
    let t = TempDir::new();
    populate(t.path());
    fails(
        t.path(),
        &["clients", "add", "8", "--address", "10.0.0"],
        2,
        "invalid value '10.0.0' for '--address <IP>'",
    );
    fails(
        t.path(),
        &["servers", "add", "8", "--address", "host"],
        2,
        "--address",
    );
    fails(
        t.path(),
        &["clients", "add", "8"],
        2,
        "required arguments were not provided: --address <IP>",
    );
    fails(t.path(), &["vms", "add", "8"], 2, "--hypervisor <ID>");
    fails(
        t.path(),
        &["models", "add", "8", "--kind", "null", "--server", "1"],
        2,
        "--worker",
    );
    fails(
        t.path(),
        &[
            "models", "add", "8", "--kind", "null", "--server", "1", "--worker", "0", "--line", "3",
        ],
        2,
        "--vm <ID>",
    );
    fails(
        t.path(),
        &[
            "models",
            "add",
            "8",
            "--kind",
            "x",
            "--server",
            "1",
            "--worker",
            "0",
            "--pio-base",
            "0x10000",
        ],
        2,
        "past the largest port",
    );
    fails(
        t.path(),
        &[
            "models",
            "add",
            "8",
            "--kind",
            "x",
            "--server",
            "1",
            "--worker",
            "0",
            "--mmio-base",
            "0xzz",
        ],
        2,
        "not a number",
    );
    fails(t.path(), &["clients", "show", "0"], 2, "invalid value '0'");
    fails(
        t.path(),
        &["clients", "show", "seven"],
        2,
        "invalid value 'seven'",
    );
    fails(t.path(), &["clients", "show"], 2, "<ID>");
    fails(t.path(), &["clients"], 2, "requires a subcommand");
    fails(t.path(), &[], 2, "requires a subcommand");
    fails(
        t.path(),
        &["frobnicate"],
        2,
        "unrecognized subcommand 'frobnicate'",
    );
    fails(
        t.path(),
        &["clients", "list", "--bogus"],
        2,
        "unexpected argument '--bogus'",
    );
}

#[test]
fn help_for_every_command() {
    let t = TempDir::new();
    let mut commands: Vec<Vec<&str>> = vec![vec![], vec!["status"]];
    for kind in ["clients", "hypervisors", "vms", "models", "servers"] {
        commands.push(vec![kind]);
        for sub in ["list", "show", "add", "remove"] {
            commands.push(vec![kind, sub]);
        }
    }
    for cmd in commands {
        let mut args = cmd.clone();
        args.push("--help");
        let out = ok(t.path(), &args);
        assert!(out.contains("Usage: dpctl"), "{args:?}: {out}");
        assert!(out.contains("--state <DIR>"), "{args:?}: {out}");
        assert!(out.contains("--json"), "{args:?}: {out}");
    }
    let out = ok(t.path(), &["models", "add", "--help"]);
    for flag in [
        "--kind",
        "--server",
        "--worker",
        "--line",
        "--vm",
        "--pio-base",
        "--mmio-base",
    ] {
        assert!(out.contains(flag), "{flag}: {out}");
    }
    assert!(ok(t.path(), &["--version"]).starts_with("dpctl "));
}

#[test]
fn state_dir_from_the_environment() {
    let t = TempDir::new();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_dpctl"))
            .args(args)
            .env("DEVPLANE_STATE", t.path())
            .output()
            .unwrap()
    };
    assert!(
        run(&["servers", "add", "3", "--address", "10.1.1.1"])
            .status
            .success()
    );
    assert!(t.path().join("db.json").is_file());
    let out = run(&["--json", "servers", "list"]);
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j[0]["id"], 3);
}

#[test]
fn unusable_state_dir_is_one_line_exit_1() {
    let t = TempDir::new();
    fs::create_dir_all(t.path()).unwrap();
    let file = t.path().join("not-a-dir");
    fs::write(&file, "x").unwrap();
    fails(&file, &["status"], 1, "no state directory");
    fails(&file, &["init"], 1, "cannot create directory");
    let dir = t.path().join("state");
    ok(&dir, &["init"]);
    fs::write(dir.join("db.json"), "garbage").unwrap();
    fails(&dir, &["clients", "list"], 1, "restore it from a backup");
}

/// A stand-in for devplane-client on `path`: answers every request with
/// `answer`, one JSON line each, until the test process ends.
fn fake_client_daemon(path: &Path, answer: fn(Request) -> Response) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let mut line = String::new();
            if BufReader::new(&stream).read_line(&mut line).is_err() {
                continue;
            }
            let req: Request = serde_json::from_str(&line).unwrap();
            let mut text = serde_json::to_string(&answer(req)).unwrap();
            text.push('\n');
            let _ = (&stream).write_all(text.as_bytes());
        }
    });
}

fn vm_status(vm: u32, running: bool) -> VmStatus {
    VmStatus {
        vm,
        hypervisor: 2,
        state: if running {
            VmRunState::Running
        } else {
            VmRunState::Stopped
        },
        vcpus: 1,
        uptime_ms: running.then_some(2500),
        ended: if running {
            Vec::new()
        } else {
            vec![VcpuEnd {
                vcpu: 0,
                exit: "done".into(),
                value: Some(60000),
                error: None,
                exits: 60010,
                remote: 60001,
                local: 0,
                failed: 0,
            }]
        },
        by_itself: !running,
        failed: 0,
        // A running VM's remote disk.
        disks: if running {
            vec![DiskStatus {
                model: 7,
                store: 70,
                submitted: 12,
                completed: 11,
                errors: 1,
                resent: 3,
                dropped: 0,
            }]
        } else {
            Vec::new()
        },
    }
}

#[test]
fn client_daemon_commands() {
    let t = TempDir::new();
    fs::create_dir_all(t.path()).unwrap();
    let sock = t.path().join("client.sock");
    let sock_arg = sock.to_str().unwrap().to_string();
    fn with<'a>(sock: &'a str, args: &[&'a str]) -> Vec<&'a str> {
        let mut all = vec!["--client-socket", sock];
        all.extend_from_slice(args);
        all
    }
    let run = |args: &[&'static str]| with(&sock_arg, args);
    // Nobody listening: exit 1, one line.
    fails(
        t.path(),
        &run(&["vms", "running"]),
        1,
        "is devplane-client running?",
    );
    fake_client_daemon(&sock, |req| match req {
        Request::ListVms => Response::Vms {
            vms: vec![vm_status(1, false), vm_status(2, true)],
        },
        Request::LaunchVm { vm: 2 } => Response::Vm {
            vm: vm_status(2, true),
        },
        Request::LaunchVm { vm } | Request::ShutdownVm { vm } if vm > 2 => Response::NotFound {
            message: format!("VM {vm} is not in this client's configuration"),
        },
        Request::ShutdownVm { vm: 1 } => Response::Vm {
            vm: vm_status(1, false),
        },
        Request::ShutdownVm { vm } => Response::Error {
            message: format!("VM {vm} is not running"),
        },
        _ => Response::Error {
            message: "unexpected".into(),
        },
    });
    let out = ok(t.path(), &run(&["vms", "running"]));
    let (vms, disks) = out.split_once("\n\n").expect("a disks table");
    let rows = table(vms);
    assert_eq!(
        rows[0],
        [
            "VM",
            "HYPERVISOR",
            "STATE",
            "VCPUS",
            "UPTIME",
            "FAILED",
            "ENDED"
        ]
    );
    assert_eq!(rows[1][..7], ["1", "2", "stopped", "1", "-", "0", "done"]);
    assert!(rows[1].join(" ").ends_with("done 60000 (by itself)"));
    assert_eq!(rows[2], ["2", "2", "running", "1", "2.5s", "0", "-"]);
    let rows = table(disks);
    assert_eq!(
        rows[0],
        [
            "VM",
            "DISK",
            "STORE",
            "SUBMITTED",
            "COMPLETED",
            "ERRORS",
            "RESENT",
            "DROPPED"
        ]
    );
    assert_eq!(rows[1..], [["2", "7", "70", "12", "11", "1", "3", "0"]]);
    let j = ok_json(t.path(), &run(&["vms", "running"]));
    assert_eq!(j[1]["disks"][0]["resent"], 3);
    assert!(j[0].get("disks").is_none(), "VM 1 has no disks");
    assert_eq!(j[0]["vm"], 1);
    assert_eq!(j[0]["ended"][0]["value"], 60000);
    assert_eq!(j[1]["state"], "running");
    assert_eq!(
        ok(t.path(), &run(&["vms", "launch", "2"])),
        "launched VM 2 (1 vCPU)\n"
    );
    let j = ok_json(t.path(), &run(&["vms", "launch", "2"]));
    assert_eq!(
        (j["action"].as_str(), j["vm"].as_u64()),
        (Some("launch"), Some(2))
    );
    let out = ok(t.path(), &run(&["vms", "shutdown", "1"]));
    let (head, rest) = out.split_once('\n').unwrap();
    assert_eq!(head, "VM 1 had stopped by itself; freed");
    let rows = table(rest);
    assert_eq!(rows[1], ["0", "done", "60000", "60010", "60001", "0"]);
    let j = ok_json(t.path(), &run(&["vms", "shutdown", "1"]));
    assert_eq!(j["action"], "shutdown");
    assert_eq!(j["by_itself"], true);
    fails(t.path(), &run(&["vms", "launch", "9"]), 3, "VM 9 is not in");
    fails(t.path(), &run(&["vms", "shutdown", "9"]), 3, "VM 9");
    fails(
        t.path(),
        &run(&["vms", "shutdown", "2"]),
        1,
        "the client daemon refused: VM 2 is not running",
    );
    fails(t.path(), &run(&["vms", "launch", "0"]), 2, "0");
    fails(t.path(), &run(&["vms", "launch"]), 2, "<ID>");
    for cmd in ["launch", "shutdown", "running"] {
        let out = ok(t.path(), &["vms", cmd, "--help"]);
        assert!(out.contains("--client-socket <PATH>"), "{cmd}: {out}");
        assert!(out.contains("client daemon"), "{cmd}: {out}");
    }
}

/// A stand-in daemon on `path` that answers `Ok` to every request and
/// records each.
fn recording_daemon(path: &Path) -> std::sync::Arc<std::sync::Mutex<Vec<Request>>> {
    use std::io::{BufRead, BufReader, Write};
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let mut line = String::new();
            if BufReader::new(&stream).read_line(&mut line).is_err() {
                continue;
            }
            let req: Request = serde_json::from_str(&line).unwrap();
            log.lock().unwrap().push(req);
            let _ = (&stream).write_all(b"{\"result\":\"ok\"}\n");
        }
    });
    seen
}

/// `clients rotate-key`: the database takes a new random key (the next
/// id), every server and the client daemon are told the new key beside
/// the old one, then the new alone; the key itself is never printed and
/// the database file is owner-only. A daemon that is not running is an
/// error that says the database already holds the key.
#[test]
fn rotate_key_saves_then_hands_out_in_two_steps() {
    use std::os::unix::fs::PermissionsExt;
    let t = TempDir::new();
    let dir = t.path();
    ok(dir, &["init"]);
    populate(dir);
    let (s1, s2, c) = (dir.join("s1.sock"), dir.join("s2.sock"), dir.join("c.sock"));
    let (seen1, seen2, seen_c) = (
        recording_daemon(&s1),
        recording_daemon(&s2),
        recording_daemon(&c),
    );
    let args = |extra: &[&'static str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "--json",
            "--client-socket",
            c.to_str().unwrap(),
            "clients",
            "rotate-key",
            "7",
            "--grace-ms",
            "10",
            "--server-socket",
            s1.to_str().unwrap(),
            "--server-socket",
            s2.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |extra: &[&'static str]| {
        let a = args(extra);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let text = ok(dir, &refs);
        serde_json::from_str::<Value>(&text).unwrap()
    };
    let first = run(&[]);
    assert_eq!(first["key_id"], 1, "{first}");
    assert!(first["previous_key_id"].is_null(), "{first}");
    let second = run(&[]);
    assert_eq!(second["key_id"], 2, "{second}");
    assert_eq!(second["previous_key_id"], 1, "{second}");

    let db_text = fs::read_to_string(dir.join("db.json")).unwrap();
    let db: Value = serde_json::from_str(&db_text).unwrap();
    let stored = db.to_string();
    let key2 = stored
        .split("\"2:")
        .nth(1)
        .map(|rest| rest[..32].to_string())
        .unwrap_or_else(|| panic!("no key 2 in the database: {stored}"));
    let mode = fs::metadata(dir.join("db.json"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the database holds keys");

    for seen in [&seen1, &seen2, &seen_c] {
        let seen = seen.lock().unwrap();
        let keys: Vec<(Option<u8>, Option<u8>)> = seen
            .iter()
            .map(|r| match r {
                Request::SetKeys {
                    client: 7,
                    current,
                    previous,
                } => (
                    current.as_ref().map(|k| k.0.id),
                    previous.as_ref().map(|k| k.0.id),
                ),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            keys,
            [
                (Some(1), None),
                (Some(1), None),
                (Some(2), Some(1)),
                (Some(2), None)
            ]
        );
        if let Request::SetKeys {
            current: Some(k), ..
        } = &seen[3]
        {
            let hex: String = k.0.bytes().iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(hex, key2, "the daemons got the database's key");
        }
    }
    // Shown by id and fingerprint only.
    let shown = ok(dir, &["--json", "clients", "show", "7"]);
    let v: Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(v["tag_key"]["id"], 2, "{v}");
    assert!(
        !shown.contains(&key2) && !shown.contains(&key2[4..]),
        "{shown}"
    );
    let listed = ok(dir, &["--json", "clients", "list"]);
    assert!(!listed.contains(&key2[4..]), "{listed}");

    // Saved in the database only.
    let v: Value = serde_json::from_str(&ok(
        dir,
        &["--json", "clients", "rotate-key", "7", "--db-only"],
    ))
    .unwrap();
    assert_eq!(v["key_id"], 3);
    assert_eq!(seen_c.lock().unwrap().len(), 4, "--db-only told a daemon");
    // Nobody listening: one line saying what the database holds.
    let e = fails(
        dir,
        &[
            "--socket",
            dir.join("none.sock").to_str().unwrap(),
            "clients",
            "rotate-key",
            "7",
            "--no-client",
        ],
        1,
        "the database holds key 4 of client 7",
    );
    assert!(e.contains("is devplane-server running?"), "{e}");
    fails(
        dir,
        &["clients", "rotate-key", "99", "--db-only"],
        3,
        "client 99",
    );
}

/// Issue 13: a client is added with a random key unless --no-key; the
/// key is shown by id and fingerprint only, and `export-key` prints the
/// TOML line a daemon without a store needs (which the config parser
/// reads back to the same key); a client without a key, or none, is a
/// clear error.
#[test]
fn clients_get_a_key_by_default_and_export_key_prints_its_toml_line() {
    let t = TempDir::new();
    let dir = t.path();
    ok(dir, &["init"]);
    ok(dir, &["clients", "add", "7", "--address", "10.0.0.7"]);
    ok(dir, &["clients", "add", "8", "--address", "10.0.0.8"]);
    ok(
        dir,
        &["clients", "add", "9", "--address", "10.0.0.9", "--no-key"],
    );
    let shown = |id: &str| -> Value {
        serde_json::from_str(&ok(dir, &["--json", "clients", "show", id])).unwrap()
    };
    let (s7, s8, s9) = (shown("7"), shown("8"), shown("9"));
    assert_eq!(s7["tag_key"]["id"], 1, "{s7}");
    assert_eq!(s8["tag_key"]["id"], 1, "{s8}");
    assert!(s9["tag_key"].is_null(), "--no-key gave a key: {s9}");
    assert_ne!(
        s7["tag_key"]["fingerprint"], s8["tag_key"]["fingerprint"],
        "two clients share a key"
    );

    let line = ok(dir, &["clients", "export-key", "7"]);
    let value = line
        .strip_prefix("tag_key = \"")
        .and_then(|r| r.strip_suffix("\"\n"))
        .unwrap_or_else(|| panic!("not a TOML line: {line:?}"));
    let key =
        devplane_control::config::ClientKey::parse(value).expect("the config parser reads it");
    assert_eq!(key.0.id, 1);
    assert_eq!(
        key.0.fingerprint().to_string(),
        s7["tag_key"]["fingerprint"].as_str().unwrap(),
        "the exported key is the database's"
    );
    // The key itself is in no listing.
    let listed = ok(dir, &["--json", "clients", "list"]);
    assert!(!listed.contains(&value[2..]), "{listed}");
    assert!(!ok(dir, &["clients", "show", "7"]).contains(&value[2..]));
    let v: Value =
        serde_json::from_str(&ok(dir, &["--json", "clients", "export-key", "7"])).unwrap();
    assert_eq!(
        (v["client"].as_u64(), v["key_id"].as_u64()),
        (Some(7), Some(1))
    );
    assert_eq!(v["tag_key"].as_str(), Some(value));

    fails(
        dir,
        &["clients", "export-key", "9"],
        1,
        "client 9 has no tag key",
    );
    fails(dir, &["clients", "export-key", "99"], 3, "client 99");
}

/// `--store file:DIR`: the same database through the store interface;
/// placement and desired state are changes like any other, and status
/// lists every platform's agent (none running here: down).
#[test]
fn store_file_places_sets_state_and_shows_agents() {
    let dir = TempDir::new();
    let url = format!("file:{}", dir.0.display());
    let with = |args: &[&str]| {
        let mut all = vec!["--store", url.as_str()];
        all.extend_from_slice(args);
        ok(&dir.0, &all)
    };
    with(&["init"]);
    with(&["servers", "add", "1", "--address", "10.0.0.1"]);
    with(&["clients", "add", "7", "--address", "10.0.0.7"]);
    with(&["clients", "add", "8", "--address", "10.0.0.8"]);
    with(&["hypervisors", "add", "70", "--client", "7"]);
    with(&["hypervisors", "add", "80", "--client", "8"]);
    with(&["vms", "add", "1", "--hypervisor", "70"]);
    with(&[
        "models", "add", "42", "--kind", "counter", "--server", "1", "--worker", "0", "--vm", "1",
    ]);
    assert!(with(&["vms", "place", "1", "--hypervisor", "80"]).starts_with("placed VM 1"));
    assert!(with(&["vms", "set-state", "1", "running"]).starts_with("set the state of VM 1"));
    with(&["models", "place", "42", "--server", "1", "--worker", "3"]);
    let vm = ok_json(&dir.0, &["--store", &url, "vms", "show", "1"]);
    assert_eq!(vm["client"], 8, "{vm}");
    assert_eq!(vm["state"], "running", "{vm}");
    fails(
        &dir.0,
        &["--store", &url, "vms", "set-state", "1", "flying"],
        2,
        "not a VM state",
    );
    fails(
        &dir.0,
        &["--store", &url, "vms", "place", "1", "--hypervisor", "99"],
        1,
        "hypervisor 99",
    );
    let st = ok_json(&dir.0, &["--store", &url, "status"]);
    assert_eq!(st["revision"], 10, "{st}");
    let agents = st["agents"].as_array().unwrap();
    assert_eq!(agents.len(), 3, "{st}");
    assert!(agents.iter().all(|a| a["up"] == false), "{st}");
}

#[test]
fn models_forward_takes_an_owner_with_an_etcd_store_or_a_route_for_a_socket() {
    let t = TempDir::new();
    populate(t.path());
    fails(
        t.path(),
        &["models", "forward", "10", "--owner", "2"],
        2,
        "give --store etcd:",
    );
    fails(
        t.path(),
        &["models", "forward", "10"],
        2,
        "--to-server <ID>",
    );
    fails(
        t.path(),
        &[
            "models",
            "forward",
            "10",
            "--owner",
            "2",
            "--to-server",
            "3",
        ],
        2,
        "cannot be used with",
    );
}
