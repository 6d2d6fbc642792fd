//! The CPI binary's contract with bosh-cli and the director, without a Flotilla server: every
//! answer is one JSON document on stdout with a string `log`, the exit code is 0 whatever the
//! request, and each fault has the director's error type.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

/// Runs the CPI binary with `config` on `input`; its response (exit code 0 asserted).
fn run(config: &std::path::Path, input: &[u8]) -> Value {
    let mut child = Command::new(env!("CARGO_BIN_EXE_flotilla-bosh-cpi"))
        .arg(config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "exit 0 always: {out:?}");
    let response: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("one JSON document on stdout ({e}): {out:?}"));
    assert!(response["log"].is_string(), "log is a string: {response}");
    assert!(
        response.get("result").is_some() && response.get("error").is_some(),
        "{response}"
    );
    response
}

fn error_type(response: &Value) -> String {
    response["error"]["type"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// A config naming a server nobody listens on.
fn config(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let path = dir.path().join("cpi.json");
    let body =
        json!({"flotilla": {"api_urls": [format!("https://127.0.0.1:{port}")], "token": "t"}});
    std::fs::write(&path, body.to_string()).unwrap();
    path
}

#[test]
fn malformed_requests_get_cpi_errors_and_exit_zero() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dir);
    for (input, says) in [
        (&b"{not json"[..], "not JSON"),
        (b"", "not JSON"),
        (b"[1,2]", "not a JSON object"),
        (br#"{"arguments":[]}"#, "method is missing"),
        (br#"{"method":"has_vm"}"#, "arguments are missing"),
        (
            br#"{"method":"has_vm","arguments":"vm-1"}"#,
            "arguments must be an array",
        ),
    ] {
        let r = run(&config, input);
        assert_eq!(error_type(&r), "Bosh::Clouds::CpiError", "{r}");
        assert!(
            r["error"]["message"].as_str().unwrap().contains(says),
            "{says}: {r}"
        );
        assert_eq!(r["error"]["ok_to_retry"], false);
        assert_eq!(r["result"], Value::Null);
    }
}

#[test]
fn unknown_methods_are_not_implemented() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(&config(&dir), br#"{"method":"make_coffee","arguments":[]}"#);
    assert_eq!(error_type(&r), "Bosh::Clouds::NotImplemented", "{r}");
    assert!(r["error"]["message"]
        .as_str()
        .unwrap()
        .contains("make_coffee"));
}

#[test]
fn info_names_api_version_2_and_the_openstack_formats_and_tolerates_extras() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(
        &config(&dir),
        br#"{"method":"info","arguments":["extra"],"context":{"director_uuid":"d"},"api_version":2,"more":true}"#,
    );
    assert_eq!(r["error"], Value::Null, "{r}");
    assert_eq!(
        r["result"],
        json!({"api_version": 2, "stemcell_formats": ["openstack-qcow2", "openstack-raw"]})
    );
    // Without a config at all, info still answers (bosh-cli asks it first).
    let r = run(
        &dir.path().join("missing.json"),
        br#"{"method":"info","arguments":[]}"#,
    );
    assert_eq!(r["result"]["api_version"], 2, "{r}");
}

#[test]
fn wrong_arguments_say_which_and_extra_ones_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dir);
    let r = run(&config, br#"{"method":"has_vm","arguments":[42]}"#);
    assert_eq!(error_type(&r), "Bosh::Clouds::CpiError", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("argument 1"),
        "{r}"
    );
    let r = run(
        &config,
        br#"{"method":"create_disk","arguments":["big",{},null]}"#,
    );
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("whole number"),
        "{r}"
    );
    // calculate_vm_cloud_properties needs no server; an extra argument changes nothing.
    let r = run(
        &config,
        br#"{"method":"calculate_vm_cloud_properties","arguments":[{"cpu":2,"ram":2048,"ephemeral_disk_size":4096},"extra"]}"#,
    );
    assert_eq!(
        r["result"],
        json!({"cpus": 2, "memory": 2048, "ephemeral_disk": {"size": 4096}}),
        "{r}"
    );
    let r = run(
        &config,
        br#"{"method":"calculate_vm_cloud_properties","arguments":[{"cpu":2}]}"#,
    );
    assert_eq!(error_type(&r), "Bosh::Clouds::CpiError", "{r}");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("ram"),
        "{r}"
    );
    let r = run(
        &config,
        br#"{"method":"update_disk","arguments":["disk1",1024,{}]}"#,
    );
    assert_eq!(error_type(&r), "Bosh::Clouds::NotSupported", "{r}");
}

#[test]
fn an_unreachable_server_is_a_retryable_cloud_error_and_a_bad_config_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(
        &config(&dir),
        br#"{"method":"has_vm","arguments":["vm-1"],"api_version":2}"#,
    );
    assert_eq!(error_type(&r), "Bosh::Clouds::CloudError", "{r}");
    assert_eq!(r["error"]["ok_to_retry"], true, "{r}");
    let missing = dir.path().join("missing.json");
    let r = run(&missing, br#"{"method":"has_vm","arguments":["vm-1"]}"#);
    assert_eq!(error_type(&r), "Bosh::Clouds::CpiError", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("missing.json"),
        "{r}"
    );
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"flotilla": {"api_urls": [], "token": "t"}}"#).unwrap();
    let r = run(&bad, br#"{"method":"has_vm","arguments":["vm-1"]}"#);
    assert!(
        r["error"]["message"].as_str().unwrap().contains("api_urls"),
        "{r}"
    );
}
