//! The CPI's lifecycle as a director drives it, one run of the **binary** per call with literal
//! JSON requests (as the CPI releases' own lifecycle specs do), against a real Flotilla server
//! and a real agent on libvirtd with QEMU guests (TCG); the CPI signs in with a service
//! account's token. Also: the config drive read back from the VM's disk (label, files, the
//! agent's settings parsed into a mirror of the agent's struct, MACs equal to the domain's),
//! every negative case the director relies on, parallel create_vm, and a real guest (the tiny
//! guest) that reads the config drive and prints the agent id and static IP.
//!
//! Needs libvirtd, xorriso, qemu-img and the tiny guest; `make test` provides all of them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use flotilla_agent::domain::VirtType;
use flotilla_agent::libvirt::Libvirt;
use flotilla_agent::AgentConfig;
use flotilla_bosh_cpi::settings::AgentSettings;
use flotilla_controllers::testkit::{eventually, log_until, TestCluster};
use flotilla_types::registry::lookup;
use reqwest::Method;
use serde_json::{json, Value};

const NODE: &str = "bosh-node";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tiny_guest() -> PathBuf {
    let dir = repo().join("target/guests/tiny");
    let status = Command::new(repo().join("scripts/build-tiny-guest.sh"))
        .status()
        .unwrap();
    assert!(status.success(), "building the tiny guest failed");
    dir.canonicalize().unwrap()
}

/// The CPI binary with its config: each call is a process.
struct Cpi {
    config: PathBuf,
}

impl Cpi {
    /// The whole response to `method(arguments)` at CPI API `version`.
    fn respond(&self, method: &str, arguments: Value, version: u64) -> Value {
        let request = json!({
            "method": method, "arguments": arguments,
            "context": {"director_uuid": "6d0d5c1c-0000-4000-8000-000000000001", "request_id": "cpi-1"},
            "api_version": version,
        });
        let mut child = Command::new(env!("CARGO_BIN_EXE_flotilla-bosh-cpi"))
            .arg(&self.config)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(request.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{method}: exit 0 always: {out:?}"
        );
        let response: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(response["log"].is_string(), "{method}: {response}");
        response
    }

    /// The result of a call that must succeed (API v2).
    fn ok(&self, method: &str, arguments: Value) -> Value {
        let r = self.respond(method, arguments, 2);
        assert!(r["error"].is_null(), "{method} failed: {r}");
        r["result"].clone()
    }

    /// The error type of a call that must fail (API v2).
    fn fails(&self, method: &str, arguments: Value) -> (String, Value) {
        let r = self.respond(method, arguments, 2);
        let kind = r["error"]["type"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} succeeded: {r}"));
        (kind.to_string(), r["error"].clone())
    }
}

/// A stemcell's `image` file as the director hands it over: a gzipped tar holding root.img.
fn stemcell_image(dir: &Path) -> (PathBuf, String) {
    let work = dir.join("stemcell");
    std::fs::create_dir_all(&work).unwrap();
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(work.join("root.img"))
        .arg("64M")
        .status()
        .unwrap();
    assert!(status.success());
    let status = Command::new("tar")
        .arg("-czf")
        .arg(work.join("image"))
        .arg("-C")
        .arg(&work)
        .arg("root.img")
        .status()
        .unwrap();
    assert!(status.success());
    use sha2::Digest;
    let sha = hex::encode(sha2::Sha256::digest(
        std::fs::read(work.join("root.img")).unwrap(),
    ));
    (work.join("image"), sha)
}

/// A service account of project `default` with the admin role; its token.
async fn service_account(admin: &flotilla_client::Client) -> String {
    let send = async |path: &str, body: Value| {
        admin
            .request_json(
                Method::POST,
                path,
                &[],
                Some(("application/json", serde_json::to_vec(&body).unwrap())),
            )
            .await
            .unwrap()
    };
    send(
        "/api/v1/namespaces/default/serviceaccounts",
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "bosh"}}),
    )
    .await;
    send(
        "/apis/rbac.authorization.k8s.io/v1/namespaces/default/rolebindings",
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "bosh"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "admin"},
            "subjects": [{"kind": "ServiceAccount", "name": "bosh"}]}),
    )
    .await;
    let token = send(
        "/api/v1/namespaces/default/serviceaccounts/bosh/token",
        json!({"spec": {"expirationSeconds": 3600}}),
    )
    .await;
    token["status"]["token"].as_str().unwrap().to_string()
}

fn manual_network(ip: &str) -> Value {
    json!({"default": {
        "type": "manual", "ip": ip, "netmask": "255.255.255.0", "gateway": "10.77.0.1",
        "dns": ["10.77.0.2"], "default": ["dns", "gateway"],
        "cloud_properties": {"network": "bosh-net"},
    }})
}

/// The config drive of VM `uid`, extracted with xorriso; (its volume id, the directory).
fn read_config_drive(agent_dir: &Path, uid: &str, into: &Path) -> (String, PathBuf) {
    let iso = agent_dir.join("vms").join(uid).join("seed.iso");
    let out = into.join(format!("drive-{uid}"));
    let run = Command::new("xorriso")
        .args(["-osirrox", "on", "-indev"])
        .arg(&iso)
        .args(["-extract", "/"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report = String::from_utf8_lossy(&run.stderr).to_string();
    let label = report
        .lines()
        .find_map(|l| l.strip_prefix("Volume id    : '"))
        .and_then(|l| l.strip_suffix('\''))
        .unwrap_or_default()
        .to_string();
    (label, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_director_lifecycle_through_the_binary() {
    let guest = tiny_guest();
    let cluster = TestCluster::start().await;
    let (server, admin, tmp) = (&cluster.server, &cluster.admin, &cluster.dir);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let agent_dir = tmp.path().join("agent");
    let mut agent = AgentConfig::new(vec![server.url.clone()], NODE, &agent_dir);
    agent.join_token = Some(cluster.join_token().await);
    agent.libvirt_uri = "qemu:///system".into();
    agent.virt_type = VirtType::Qemu;
    agent.shutdown_timeout = Duration::from_secs(3);
    let libvirt = Libvirt::open("qemu:///system")
        .await
        .expect("libvirtd is running (make test starts it)");
    let (_stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(flotilla_agent::run_with(agent, libvirt.clone(), rx));
    let (vms, volumes, images, snapshots) = (
        lookup("vm").unwrap(),
        lookup("volume").unwrap(),
        lookup("image").unwrap(),
        lookup("volumesnapshot").unwrap(),
    );
    admin
        .create(
            lookup("network").unwrap(),
            Some("default"),
            &json!({"metadata": {"name": "bosh-net"}, "spec": {"cidr": "10.77.0.0/24"}}),
        )
        .await
        .unwrap();
    eventually("the node serves the default pool", 60, async || {
        let p = admin
            .get(lookup("storagepool").unwrap(), None, "default")
            .await
            .ok()?;
        (p["status"]["nodes"][NODE]["phase"] == "Ready").then_some(())
    })
    .await;
    let token = service_account(admin).await;
    let config = tmp.path().join("cpi.json");
    std::fs::write(
        &config,
        json!({
            "flotilla": {"api_urls": [server.url], "ca_cert": server.ca_pem, "token": token, "project": "default", "timeout_seconds": 120},
            "agent": {"mbus": "nats://nats:nats@10.77.0.5:4222", "ntp": ["time.example.org"],
                      "blobstore": {"provider": "dav", "options": {"endpoint": "http://10.77.0.5:25250"}}},
        })
        .to_string(),
    )
    .unwrap();
    let cpi = Cpi { config };

    // A stemcell: imported as an uploaded Image whose checksum is the root image's.
    let (image_path, sha) = stemcell_image(tmp.path());
    let stemcell = cpi.ok(
        "create_stemcell",
        json!([image_path, {"name": "bosh-flotilla-kvm-ubuntu-jammy", "version": "1.1", "disk_format": "qcow2", "infrastructure": "openstack"}]),
    );
    let stemcell = stemcell.as_str().unwrap().to_string();
    let image = admin.get(images, Some("default"), &stemcell).await.unwrap();
    assert_eq!(image["status"]["upload"]["sha256"], sha.as_str(), "{image}");
    assert_eq!(image["spec"]["format"], "qcow2");

    // create_vm (v2): [vm_cid, networks].
    let env = json!({"bosh": {"group": "director-cf-router", "groups": ["director", "cf"], "password": "$6$salt$hash"}});
    let networks = manual_network("10.77.0.10");
    let created = cpi.ok(
        "create_vm",
        json!(["agent-one", stemcell, {"cpus": 1, "memory": 256}, networks, [], env]),
    );
    let vm_cid = created[0].as_str().unwrap().to_string();
    assert_eq!(created[1], networks, "v2 answers the networks");
    assert_eq!(cpi.ok("has_vm", json!([vm_cid])), true);
    let vm = admin.get(vms, Some("default"), &vm_cid).await.unwrap();
    let uid = vm["metadata"]["uid"].as_str().unwrap().to_string();
    assert_eq!(vm["spec"]["cloudInit"], "configDrive");
    assert_eq!(
        vm["status"]["ips"][0], "10.77.0.10",
        "IPAM holds the manual IP: {vm}"
    );

    // The config drive, read back: label, files, the settings as the agent's struct.
    let (label, drive) = read_config_drive(&agent_dir, &uid, tmp.path());
    assert_eq!(label, "config-2");
    let user_data = std::fs::read(drive.join("ec2/latest/user-data")).unwrap();
    let settings: AgentSettings = serde_json::from_slice(&user_data).unwrap();
    let raw: Value = serde_json::from_slice(&user_data).unwrap();
    assert!(
        raw["disks"]["system"].is_string(),
        "disks.system is a plain string: {raw}"
    );
    assert_eq!(settings.agent_id, "agent-one");
    assert_eq!(settings.vm.name, vm_cid);
    assert_eq!(settings.env, env, "env passes through unchanged");
    assert_eq!(
        settings.mbus.as_deref(),
        Some("nats://nats:nats@10.77.0.5:4222")
    );
    assert_eq!(settings.ntp, ["time.example.org"]);
    assert_eq!(settings.blobstore.as_ref().unwrap()["provider"], "dav");
    let nic = &settings.networks["default"];
    assert_eq!(
        (
            nic.ip.as_deref(),
            nic.netmask.as_deref(),
            nic.gateway.as_deref()
        ),
        (Some("10.77.0.10"), Some("255.255.255.0"), Some("10.77.0.1"))
    );
    assert_eq!(nic.default, ["dns", "gateway"]);
    let mac = nic.mac.clone().unwrap();
    assert_eq!(mac, mac.to_lowercase());
    let xml = libvirt.xml(&uid).await.unwrap().unwrap();
    assert!(
        xml.contains(&format!("<mac address='{mac}'/>")),
        "the settings' MAC is the domain's: {xml}"
    );
    assert_eq!(
        std::fs::read(drive.join("openstack/latest/user_data")).unwrap(),
        user_data
    );
    let meta: Value =
        serde_json::from_slice(&std::fs::read(drive.join("ec2/latest/meta-data.json")).unwrap())
            .unwrap();
    assert_eq!(meta["instance-id"], uid.as_str());
    let os_meta: Value = serde_json::from_slice(
        &std::fs::read(drive.join("openstack/latest/meta_data.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(os_meta["uuid"], uid.as_str());
    let net_data: Value = serde_json::from_slice(
        &std::fs::read(drive.join("openstack/latest/network_data.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(net_data["links"][0]["ethernet_mac_address"], mac.as_str());
    assert_eq!(net_data["networks"][0]["ip_address"], "10.77.0.10");

    // Metadata as labels.
    cpi.ok(
        "set_vm_metadata",
        json!([vm_cid, {"director": "bosh", "deployment": "cf", "job": "router", "index": "0", "name": "router/5a1e"}]),
    );
    let vm = admin.get(vms, Some("default"), &vm_cid).await.unwrap();
    assert_eq!(
        vm["metadata"]["labels"]["bosh.flotilla.dev/deployment"],
        "cf"
    );
    assert_eq!(
        vm["metadata"]["annotations"]["bosh.flotilla.dev/name"],
        "router/5a1e"
    );

    // A real guest reads the config drive: the tiny guest, booted directly (the test's
    // stemcell is a blank disk), prints the agent id and the static IP from the settings, and
    // its NIC has the settings' MAC. (A guest is also what lets go of an unplugged disk.)
    let patch = json!({"spec": {"boot": {"kernel": guest.join("vmlinuz"), "initrd": guest.join("initramfs.gz"), "cmdline": "console=ttyS0 panic=-1"}}});
    admin
        .patch(vms, Some("default"), &vm_cid, &patch, false)
        .await
        .unwrap();
    cpi.ok("reboot_vm", json!([vm_cid]));
    let log = log_until(admin, &vm_cid, "the guest reads its settings", 120, |t| {
        t.contains("FLOTILLA-BOSH ")
    })
    .await;
    let line = log
        .lines()
        .find(|l| l.starts_with("FLOTILLA-BOSH "))
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(
        line,
        format!("FLOTILLA-BOSH agent_id=agent-one ip=10.77.0.10 netmask=255.255.255.0 mac={mac} eth0={mac}"),
        "{log}"
    );
    assert!(log.contains("FLOTILLA-CONFIG-DRIVE ec2/latest/meta-data.json ec2/latest/user-data openstack/latest/meta_data.json openstack/latest/network_data.json openstack/latest/user_data "), "{log}");

    // A persistent disk beside the VM, attached with its CID as the serial the guest sees.
    let disk = cpi.ok("create_disk", json!([64, {}, vm_cid]));
    let disk = disk.as_str().unwrap().to_string();
    assert!(
        disk.len() <= 20,
        "a disk CID fits the virtio serial: {disk}"
    );
    assert_eq!(cpi.ok("has_disk", json!([disk])), true);
    let volume = admin.get(volumes, Some("default"), &disk).await.unwrap();
    assert_eq!(
        volume["spec"]["nodeName"], NODE,
        "made on the VM's node: {volume}"
    );
    cpi.ok(
        "set_disk_metadata",
        json!([disk, {"deployment": "cf", "instance_id": "5a1e"}]),
    );
    let hint = cpi.ok("attach_disk", json!([vm_cid, disk]));
    assert_eq!(hint["id"], disk.as_str(), "{hint}");
    assert!(
        hint["path"].as_str().unwrap().starts_with("/dev/vd"),
        "{hint}"
    );
    let xml = libvirt.xml(&uid).await.unwrap().unwrap();
    assert!(xml.contains(&format!("<serial>{disk}</serial>")), "{xml}");
    // The guest sees it by that serial: /dev/disk/by-id/virtio-<disk CID>.
    let serial = format!("serial={disk} ");
    let log = log_until(admin, &vm_cid, "the guest sees the disk", 60, |t| {
        t.contains(&serial)
    })
    .await;
    let seen = log.lines().find(|l| l.contains(&serial)).unwrap();
    assert!(
        seen.starts_with(&format!(
            "FLOTILLA-DISK {}",
            &hint["path"].as_str().unwrap()[5..]
        )),
        "{seen}"
    );
    assert_eq!(
        cpi.ok("attach_disk", json!([vm_cid, disk])),
        hint,
        "attach again: the same"
    );
    assert_eq!(cpi.ok("get_disks", json!([vm_cid])), json!([disk]));
    // v1 answers attach_disk with null.
    assert_eq!(
        cpi.respond("attach_disk", json!([vm_cid, disk]), 1)["result"],
        Value::Null
    );

    cpi.ok("resize_disk", json!([disk, 128]));
    let volume = admin.get(volumes, Some("default"), &disk).await.unwrap();
    assert!(
        volume["status"]["capacity"].as_u64().unwrap() >= 128 << 20,
        "{volume}"
    );
    assert_eq!(
        cpi.fails("resize_disk", json!([disk, 32])).0,
        "Bosh::Clouds::NotSupported"
    );
    assert_eq!(
        cpi.fails("update_disk", json!([disk, 256, {}])).0,
        "Bosh::Clouds::NotSupported"
    );

    let snapshot = cpi.ok(
        "snapshot_disk",
        json!([disk, {"deployment": "cf", "job": "router"}]),
    );
    let snapshot = snapshot.as_str().unwrap().to_string();
    let taken = admin
        .get(snapshots, Some("default"), &snapshot)
        .await
        .unwrap();
    assert_eq!(taken["status"]["phase"], "Ready", "{taken}");
    assert_eq!(taken["spec"]["volume"], disk.as_str());
    cpi.ok("delete_snapshot", json!([snapshot]));
    assert!(admin
        .get(snapshots, Some("default"), &snapshot)
        .await
        .is_err());
    cpi.ok("delete_snapshot", json!([snapshot]));

    cpi.ok("detach_disk", json!([vm_cid, disk]));
    assert_eq!(cpi.ok("get_disks", json!([vm_cid])), json!([]));
    assert_eq!(
        cpi.fails("detach_disk", json!([vm_cid, disk])).0,
        "Bosh::Clouds::DiskNotAttached"
    );
    cpi.ok("delete_disk", json!([disk]));
    assert_eq!(cpi.ok("has_disk", json!([disk])), false);
    cpi.ok("delete_disk", json!([disk]));

    cpi.ok("delete_vm", json!([vm_cid]));
    assert_eq!(cpi.ok("has_vm", json!([vm_cid])), false);
    cpi.ok("delete_vm", json!([vm_cid]));
    assert!(
        libvirt.xml(&uid).await.unwrap().is_none(),
        "the domain is gone"
    );
    assert!(
        !agent_dir.join("vms").join(&uid).exists(),
        "its files are gone"
    );

    // What the director relies on for missing things.
    let missing_vm = "vm-00000000000000000000000000000000";
    assert_eq!(cpi.ok("has_vm", json!([missing_vm])), false);
    assert_eq!(cpi.ok("has_disk", json!(["disk0000000000000000"])), false);
    for (method, args, kind) in [
        ("set_vm_metadata", json!([missing_vm, {}]), "VMNotFound"),
        ("reboot_vm", json!([missing_vm]), "VMNotFound"),
        ("get_disks", json!([missing_vm]), "VMNotFound"),
        (
            "attach_disk",
            json!([missing_vm, "disk0000000000000000"]),
            "DiskNotFound",
        ),
        (
            "detach_disk",
            json!([missing_vm, "disk0000000000000000"]),
            "VMNotFound",
        ),
        (
            "set_disk_metadata",
            json!(["disk0000000000000000", {}]),
            "DiskNotFound",
        ),
        (
            "resize_disk",
            json!(["disk0000000000000000", 10]),
            "DiskNotFound",
        ),
        (
            "snapshot_disk",
            json!(["disk0000000000000000", {}]),
            "DiskNotFound",
        ),
    ] {
        assert_eq!(
            cpi.fails(method, args).0,
            format!("Bosh::Clouds::{kind}"),
            "{method}"
        );
    }
    cpi.ok("delete_vm", json!([missing_vm]));
    cpi.ok("delete_disk", json!(["disk0000000000000000"]));

    // A create_vm that fails leaves nothing behind and says VMCreationFailed.
    for (args, kind, says) in [
        (
            json!(["a", "sc-missing", {"cpus": 1, "memory": 128}, manual_network("10.77.0.11"), [], {}]),
            "VMCreationFailed",
            "stemcell",
        ),
        (
            json!(["a", stemcell, {"cpus": 1}, manual_network("10.77.0.11"), [], {}]),
            "VMCreationFailed",
            "memory",
        ),
        (
            json!(["a", stemcell, {"cpus": 1, "memory": 128}, manual_network("10.99.0.11"), [], {}]),
            "VMCreationFailed",
            "10.99.0.11",
        ),
        (
            json!(["a", stemcell, {"cpus": 1, "memory": 128},
            {"n": {"type": "manual", "ip": "10.77.0.11", "cloud_properties": {"network": "nope"}}}, [], {}]),
            "NetworkNotFound",
            "nope",
        ),
        (
            json!(["a", stemcell, {"cpus": 1, "memory": 128, "ephemeral_disk": {"size": 64}},
            {"n": {"type": "dynamic", "cloud_properties": {}}}, [], {}]),
            "VMCreationFailed",
            "cloud_properties.network",
        ),
    ] {
        let (got, error) = cpi.fails("create_vm", args.clone());
        assert_eq!(got, format!("Bosh::Clouds::{kind}"), "{args}: {error}");
        assert!(
            error["message"].as_str().unwrap().contains(says),
            "{args}: {error}"
        );
        let left = admin
            .list(vms, Some("default"), &Default::default())
            .await
            .unwrap();
        assert_eq!(left["items"], json!([]), "nothing is left: {args}");
        let left = admin
            .list(volumes, Some("default"), &Default::default())
            .await
            .unwrap();
        assert_eq!(left["items"], json!([]), "no disk is left: {args}");
    }

    // Several create_vm at once on one stemcell (dynamic networks, an ephemeral disk each,
    // one at API v1), then deleted at once: nothing is left.
    let calls: Vec<_> = (0..4)
        .map(|i| {
            let cpi = Cpi { config: cpi.config.clone() };
            let stemcell = stemcell.clone();
            std::thread::spawn(move || {
                let networks = json!({"private": {"type": "dynamic", "cloud_properties": {"network": "bosh-net"}}});
                let version = if i == 0 { 1 } else { 2 };
                let r = cpi.respond(
                    "create_vm",
                    json!([format!("agent-{i}"), stemcell, {"cpus": 1, "memory": 128, "ephemeral_disk": {"size": 32}}, networks, [], {}]),
                    version,
                );
                assert!(r["error"].is_null(), "{r}");
                match version {
                    1 => r["result"].as_str().unwrap().to_string(),
                    _ => r["result"][0].as_str().unwrap().to_string(),
                }
            })
        })
        .collect();
    let created: Vec<String> = calls.into_iter().map(|c| c.join().unwrap()).collect();
    let mut distinct = created.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 4);
    for vm in &created {
        assert_eq!(
            cpi.ok("get_disks", json!([vm])),
            json!([]),
            "the ephemeral disk is no persistent one"
        );
        let v = admin.get(vms, Some("default"), vm).await.unwrap();
        let uid = v["metadata"]["uid"].as_str().unwrap();
        let (_, drive) = read_config_drive(&agent_dir, uid, tmp.path());
        let settings: AgentSettings =
            serde_json::from_slice(&std::fs::read(drive.join("ec2/latest/user-data")).unwrap())
                .unwrap();
        assert_eq!(
            settings.disks.ephemeral.as_ref().unwrap()["id"],
            "ephemeral"
        );
        assert_eq!(settings.networks["private"].network_type, "dynamic");
    }
    let deletes: Vec<_> = created
        .iter()
        .map(|vm| {
            let (cpi, vm) = (
                Cpi {
                    config: cpi.config.clone(),
                },
                vm.clone(),
            );
            std::thread::spawn(move || cpi.ok("delete_vm", json!([vm])))
        })
        .collect();
    for d in deletes {
        d.join().unwrap();
    }
    let left = admin
        .list(volumes, Some("default"), &Default::default())
        .await
        .unwrap();
    assert_eq!(
        left["items"],
        json!([]),
        "the ephemeral disks went with their VMs"
    );

    // Two nodes (the second simulated, libvirt's test driver, which cannot hot-plug): a
    // node-local disk on one is refused to a VM on the other, saying why; create_vm's
    // disk_cids place a VM beside its disk, and create_disk's VM places a disk beside its VM.
    // A VM on the real node, made while it is the only one.
    let here = cpi.ok(
        "create_vm",
        json!(["agent-here", stemcell, {"cpus": 1, "memory": 128}, manual_network("10.77.0.20"), [], {}]),
    );
    let here = here[0].as_str().unwrap().to_string();
    let mut sim = AgentConfig::new(vec![server.url.clone()], "bosh-sim", tmp.path().join("sim"));
    sim.join_token = Some(cluster.join_token().await);
    sim.libvirt_uri = "test:///default".into();
    sim.firewall = false;
    let (_stop_sim, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move { flotilla_agent::run(sim, rx).await.expect("the agent runs") });
    eventually(
        "the simulated node serves the default pool",
        60,
        async || {
            let p = admin
                .get(lookup("storagepool").unwrap(), None, "default")
                .await
                .ok()?;
            (p["status"]["nodes"]["bosh-sim"]["phase"] == "Ready").then_some(())
        },
    )
    .await;
    let elsewhere = json!({"metadata": {"name": "elsewhere"}, "spec": {"size": "16Mi", "nodeName": "bosh-sim"}});
    admin
        .create(volumes, Some("default"), &elsewhere)
        .await
        .unwrap();
    eventually("the disk is made on the simulated node", 60, async || {
        let v = admin
            .get(volumes, Some("default"), "elsewhere")
            .await
            .ok()?;
        (v["status"]["phase"] == "Available" && v["status"]["node"] == "bosh-sim").then_some(())
    })
    .await;
    let (kind, error) = cpi.fails("attach_disk", json!([here, "elsewhere"]));
    assert_eq!(kind, "Bosh::Clouds::CloudError", "{error}");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("bosh-sim") && message.contains(NODE) && message.contains("shared pool"),
        "{message}"
    );
    assert_eq!(
        cpi.ok("get_disks", json!([here])),
        json!([]),
        "nothing was attached"
    );
    let beside = cpi.ok(
        "create_vm",
        json!(["agent-beside", stemcell, {"cpus": 1, "memory": 128}, {}, ["elsewhere"], {}]),
    );
    let beside = beside[0].as_str().unwrap().to_string();
    let vm = admin.get(vms, Some("default"), &beside).await.unwrap();
    assert_eq!(vm["status"]["nodeName"], "bosh-sim", "{vm}");
    let near = cpi.ok("create_disk", json!([16, {}, beside]));
    let near = admin
        .get(volumes, Some("default"), near.as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(near["status"]["node"], "bosh-sim", "{near}");
    for vm in [&here, &beside] {
        cpi.ok("delete_vm", json!([vm]));
    }
    for disk in ["elsewhere", near["metadata"]["name"].as_str().unwrap()] {
        cpi.ok("delete_disk", json!([disk]));
    }

    cpi.ok("delete_stemcell", json!([stemcell]));
    cpi.ok("delete_stemcell", json!([stemcell]));
    assert!(admin.get(images, Some("default"), &stemcell).await.is_err());
}
