//! A test that needs etcd fails, not skips, when etcd is missing and
//! `DEVPLANE_REQUIRE_PRIVILEGED=1` is set (as `.ci/run` sets it); without
//! it, the test skips with a message. Checked by running this binary's
//! ignored test again with etcd's path pointed at nothing.

use std::process::Command;

use devplane_testkit::etcd::Etcd;
use devplane_testkit::privilege::REQUIRE_ENV;

/// What a test that needs etcd does first (run only by the test below,
/// in a child process with `DEVPLANE_ETCD` set).
#[test]
#[ignore = "run by a_missing_etcd_fails_when_required_and_skips_otherwise"]
fn needs_etcd() {
    let Some(_etcd) = Etcd::start("needs_etcd") else {
        return;
    };
}

fn run_child(require: bool) -> std::process::Output {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", "needs_etcd", "--ignored", "--nocapture"])
        .env("DEVPLANE_ETCD", "/nonexistent/etcd");
    if require {
        c.env(REQUIRE_ENV, "1");
    } else {
        c.env_remove(REQUIRE_ENV);
    }
    c.output().unwrap()
}

#[test]
fn a_missing_etcd_fails_when_required_and_skips_otherwise() {
    let out = run_child(true);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "did not fail: {text}");
    assert!(
        text.contains("/nonexistent/etcd is missing") && text.contains(REQUIRE_ENV),
        "{text}"
    );
    let out = run_child(false);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("SKIPPED needs_etcd"), "{text}");
}
