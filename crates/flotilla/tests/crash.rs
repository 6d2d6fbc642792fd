//! Crash safety: `kill -9` of the real `flotilla agent` during a create and during a delete, on a
//! real libvirtd with real QEMU. After a restart the VM converges to Running with exactly one
//! domain; after deletion no domain, disk, seed or any other file of it is left.
//!
//! Needs libvirtd and the tiny guest; `make test` provides both.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use flotilla_controllers::testkit::TestCluster;
use flotilla_types::registry::lookup;
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_flotilla");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn spawn_agent(url: &str, token: &str, data_dir: &Path) -> Child {
    Command::new(BIN)
        .args([
            "agent",
            "--server",
            url,
            "--join-token",
            token,
            "--node-name",
            "crash-node",
        ])
        .args([
            "--libvirt-uri",
            "qemu:///system",
            "--virt-type",
            "qemu",
            "--data-dir",
        ])
        .arg(data_dir)
        .env("FLOTILLA_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn kill9(child: &mut Child) {
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

async fn eventually(what: &str, secs: u64, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {secs}s waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn domains_with_uuid(uuid: &str) -> usize {
    let out = Command::new("virsh")
        .args(["-c", "qemu:///system", "list", "--all", "--uuid"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.trim() == uuid)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_create_and_delete_converges_and_leaks_nothing() {
    let status = Command::new(repo().join("scripts/build-tiny-guest.sh"))
        .status()
        .unwrap();
    assert!(status.success());
    let guest = repo().join("target/guests/tiny");
    let cluster = TestCluster::start().await;
    let (server, admin, tmp) = (&cluster.server, &cluster.admin, &cluster.dir);
    let token = cluster.join_token().await;
    let agent_dir = tmp.path().join("agent");
    let vms = lookup("vm").unwrap();
    let run = rand::random::<u32>() % 100_000;

    for (i, delay_ms) in [0u64, 150, 400, 900].into_iter().enumerate() {
        let name = format!("crash-{run}-{i}");
        let mut agent = spawn_agent(&server.url, &token, &agent_dir);
        let vm = json!({"metadata": {"name": name}, "spec": {
            "nodeName": "crash-node", "resources": {"cpus": 1, "memory": "128Mi"}, "rootDisk": {"size": "64Mi"},
            "boot": {"kernel": guest.join("vmlinuz"), "initrd": guest.join("initramfs.gz"), "cmdline": "console=ttyS0"}}});
        let created = admin.create(vms, Some("default"), &vm).await.unwrap();
        let uid = created["metadata"]["uid"].as_str().unwrap().to_string();
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        kill9(&mut agent);

        let mut agent = spawn_agent(&server.url, &token, &agent_dir);
        eventually(
            &format!("{name} runs after the agent restarted"),
            90,
            async || {
                admin
                    .get(vms, Some("default"), &name)
                    .await
                    .is_ok_and(|v| v["status"]["phase"] == "Running")
            },
        )
        .await;
        assert_eq!(domains_with_uuid(&uid), 1, "{name}: exactly one domain");

        admin.delete(vms, Some("default"), &name).await.unwrap();
        tokio::time::sleep(Duration::from_millis(delay_ms / 2)).await;
        kill9(&mut agent);
        let mut agent = spawn_agent(&server.url, &token, &agent_dir);
        eventually(
            &format!("{name} is deleted after the agent restarted"),
            90,
            async || {
                admin
                    .get(vms, Some("default"), &name)
                    .await
                    .is_err_and(|e| e.code() == Some(404))
            },
        )
        .await;
        assert_eq!(domains_with_uuid(&uid), 0, "{name}: the domain is gone");
        assert!(
            !agent_dir.join("vms").join(&uid).exists(),
            "{name}: its files are gone"
        );
        kill9(&mut agent);
    }
    let leftovers: Vec<_> = std::fs::read_dir(agent_dir.join("vms"))
        .map(|d| d.filter_map(|e| e.ok()).collect())
        .unwrap_or_default();
    assert!(
        leftovers.is_empty(),
        "no VM directory is left: {leftovers:?}"
    );
}
