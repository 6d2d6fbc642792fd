//! `flotilla up` (server, controllers and local agent in one process) on libvirt's test driver,
//! driven through the CLI: nodes, join tokens, adopting an existing domain, power operations.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use support::{cli, eventually, ok, Up, BIN};

fn json(config: &Path, args: &[&str]) -> Option<serde_json::Value> {
    let o = cli(config, args);
    o.status
        .success()
        .then(|| serde_json::from_slice(&o.stdout).ok())
        .flatten()
}

#[test]
fn up_runs_everything_and_adopts_an_existing_domain() {
    let dir = tempfile::tempdir().unwrap();
    let data: PathBuf = dir.path().join("data");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(BIN)
        .args([
            "up",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args([
            "--libvirt-uri",
            "test:///default",
            "--node-name",
            "up-node",
            "--virt-type",
            "qemu",
        ])
        .args(["--node-label", "topology.flotilla.dev/zone=z1"])
        .env("XDG_CONFIG_HOME", dir.path().join("config"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _up = Up(child);
    let config = data.join("admin.yaml");
    let node = eventually("the local node is Ready", 30, || {
        let n = json(&config, &["get", "node", "up-node", "-o", "json"])?;
        let ready = n["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        ready.then_some(n)
    });
    assert_eq!(
        node["metadata"]["labels"]["topology.flotilla.dev/zone"],
        "z1"
    );
    let unmanaged = node["status"]["unmanagedDomains"].as_array().unwrap();
    assert!(
        unmanaged
            .iter()
            .any(|d| d["name"] == "test" && d["running"] == true),
        "{unmanaged:?}"
    );
    // `up` pointed the user's CLI config at this server: the CLI works without FLOTILLA_CONFIG.
    let linked = dir.path().join("config/flotilla/config.yaml");
    assert_eq!(
        std::fs::read_link(&linked).unwrap(),
        data.canonicalize().unwrap().join("admin.yaml")
    );
    let plain = Command::new(BIN)
        .args(["get", "nodes"])
        .env_remove("FLOTILLA_CONFIG")
        .env("XDG_CONFIG_HOME", dir.path().join("config"))
        .output()
        .unwrap();
    assert!(ok(plain).contains("up-node"));
    assert!(ok(cli(&config, &["get", "nodes"])).contains("up-node"));
    assert_eq!(
        ok(cli(&config, &["node", "cordon", "up-node"])),
        "node/up-node cordoned\n"
    );
    assert_eq!(
        json(&config, &["get", "node", "up-node", "-o", "json"]).unwrap()["spec"]["unschedulable"],
        true
    );
    assert_eq!(
        ok(cli(&config, &["node", "uncordon", "up-node"])),
        "node/up-node uncordoned\n"
    );
    assert!(
        json(&config, &["get", "node", "up-node", "-o", "json"]).unwrap()["spec"]
            .get("unschedulable")
            .is_none()
    );
    let token = ok(cli(&config, &["node", "token", "create", "--ttl", "10m"]));
    assert!(token.trim().contains("::sha256:"), "{token}");

    assert_eq!(
        ok(cli(&config, &["vm", "adopt", "up-node", "test"])),
        "virtualmachine/test adopted domain test on up-node\n"
    );
    let vm = eventually("the adopted VM is Running", 30, || {
        let v = json(&config, &["get", "vm", "test", "-o", "json"])?;
        (v["status"]["phase"] == "Running").then_some(v)
    });
    assert_eq!(vm["spec"]["nodeName"], "up-node");
    let again = cli(&config, &["vm", "adopt", "up-node", "test"]);
    assert!(!again.status.success(), "a domain is adopted once");

    ok(cli(&config, &["vm", "stop", "test"]));
    eventually("the adopted VM is Stopped", 30, || {
        (json(&config, &["get", "vm", "test", "-o", "json"])?["status"]["phase"] == "Stopped")
            .then_some(())
    });
    ok(cli(&config, &["vm", "start", "test"]));
    eventually("the adopted VM runs again", 30, || {
        (json(&config, &["get", "vm", "test", "-o", "json"])?["status"]["phase"] == "Running")
            .then_some(())
    });
    assert_eq!(
        ok(cli(
            &config,
            &["delete", "vm", "test", "--wait", "--timeout", "30s"]
        )),
        "virtualmachine/test deleted\n"
    );
}
