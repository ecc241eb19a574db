//! dpbench's command line as a person meets it: a wrong `--server` or a
//! combination that cannot run is one line on stderr and a non-zero exit,
//! before anything is built or measured.

use std::process::{Command, Output};

fn dpbench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dpbench"))
        .args(args)
        .output()
        .expect("running dpbench")
}

fn one_line_error(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.stdout.is_empty(),
        "stdout: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr:?}");
    assert!(stderr.starts_with("dpbench: "), "{stderr:?}");
    stderr
}

#[test]
fn a_bad_server_address_is_one_line_and_exit_2() {
    for bad in [
        "nonsense",
        "10.0.0.1",
        "10.0.0.1:99999",
        "server.example:7700",
    ] {
        let out = dpbench(&["--server", bad, "--out", "/nonexistent/never-written"]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let e = one_line_error(&out);
        assert!(e.contains("--server") && e.contains("IPV4:PORT"), "{e}");
    }
}

#[test]
fn server_with_a_local_only_scenario_is_one_line_and_exit_1() {
    let out = dpbench(&[
        "--server",
        "192.0.2.10:7700",
        "--scenario",
        "parse",
        "--out",
        "/nonexistent/never-written",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let e = one_line_error(&out);
    assert!(
        e.contains("parse scenario needs the embedded topology"),
        "{e}"
    );
}

#[test]
fn help_documents_server_and_the_matrix() {
    let out = dpbench(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for s in [
        "--server <ADDR>",
        "server-remote.toml",
        "--vms <LIST>",
        "--vcpus <LIST>",
    ] {
        assert!(help.contains(s), "{s} missing");
    }
}
