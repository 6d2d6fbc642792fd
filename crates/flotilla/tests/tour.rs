//! The README's tour on real QEMU: `flotilla up` on qemu:///system, then `flotilla apply -f
//! examples/tiny-vm.yaml` (a network and a tiny guest on it). The guest takes its address over
//! DHCP from the node's dnsmasq; `flotilla get vms` shows it, `flotilla get networks` counts it,
//! the VM reports the lease; deleting the VM and the network leaves nothing behind.
//!
//! Needs libvirtd and the tiny guest; `make test` provides both.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};

use support::{cli, eventually, ok, Up, BIN};

#[test]
fn the_tour_gives_a_vm_an_address_on_a_network() {
    let guest = support::tiny_guest();
    let dir = tempfile::tempdir().unwrap();
    // QEMU (libvirt-qemu) reads the seed and disks under the data directory.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let data = dir.path().join("data");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(BIN)
        .args(["up", "--data-dir", data.to_str().unwrap()])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--node-name", "tour-node", "--virt-type", "qemu"])
        .env("XDG_CONFIG_HOME", dir.path().join("config"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _up = Up(child);
    let config = data.join("admin.yaml");
    eventually("the node is Ready", 60, || {
        let out = cli(&config, &["get", "nodes"]);
        (out.status.success() && String::from_utf8_lossy(&out.stdout).contains("True"))
            .then_some(())
    });

    // The example as the README uses it, with the guest where this checkout builds it.
    let example = std::fs::read_to_string(support::repo().join("examples/tiny-vm.yaml"))
        .unwrap()
        .replace("/var/lib/flotilla/guests/tiny", guest.to_str().unwrap());
    let file = dir.path().join("tiny-vm.yaml");
    std::fs::write(&file, example).unwrap();
    ok(cli(&config, &["apply", "-f", file.to_str().unwrap()]));

    let vm = eventually("the guest holds its DHCP lease", 120, || {
        let o = cli(&config, &["get", "vm", "tiny", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        (v["status"]["interfaces"][0]["source"] == "dhcp").then_some(v)
    });
    let ip = vm["status"]["ips"][0].as_str().unwrap().to_string();
    assert_eq!(
        ip, "10.10.0.3",
        "the lowest address past the gateway and DHCP server"
    );
    let table = ok(cli(&config, &["get", "vms"]));
    let row = table.lines().find(|l| l.starts_with("tiny ")).unwrap();
    assert!(row.contains("Running") && row.contains(&ip), "{table}");
    let networks = ok(cli(&config, &["get", "networks"]));
    let row = networks.lines().find(|l| l.starts_with("lan ")).unwrap();
    let columns: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        columns[1..6],
        ["overlay", "10.10.0.0/24", "4096", "1", "252"][..],
        "{networks}"
    );
    let log = eventually("the guest says what it got", 60, || {
        let log = ok(cli(&config, &["vm", "log", "tiny"]));
        log.contains("FLOTILLA-IP").then_some(log)
    });
    assert!(log.contains(&format!("FLOTILLA-IP {ip}/24 MTU ")), "{log}");

    // A second guest on the network, configured by cloud-init's network-config instead of
    // DHCP, reaches the first.
    let peer = format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: peer}}\nspec:\n  \
         resources: {{cpus: 1, memory: 256Mi}}\n  boot: {{kernel: {0}/vmlinuz, initrd: {0}/initramfs.gz, cmdline: console=ttyS0}}\n  \
         networks: [{{network: lan}}]\n  userData: \"#cloud-config\\nflotilla_test_ping: {ip}\\n\"\n",
        guest.display()
    );
    let peer_file = dir.path().join("peer.yaml");
    std::fs::write(&peer_file, peer).unwrap();
    ok(cli(&config, &["apply", "-f", peer_file.to_str().unwrap()]));
    let log = eventually("the second guest pings the first", 120, || {
        let out = cli(&config, &["vm", "log", "peer"]);
        let log = String::from_utf8_lossy(&out.stdout).into_owned();
        log.contains(&format!("FLOTILLA-PING {ip} ok"))
            .then_some(log)
    });
    assert!(log.contains("FLOTILLA-IP 10.10.0.4/24 MTU "), "{log}");
    assert!(log.contains(" VIA static"), "{log}");
    let described = ok(cli(&config, &["describe", "network", "lan"]));
    assert!(
        described.contains("10.10.0.0/24") && described.contains("Ready"),
        "{described}"
    );
    ok(cli(
        &config,
        &["delete", "vm", "peer", "--wait", "--timeout", "60s"],
    ));

    ok(cli(
        &config,
        &["delete", "vm", "tiny", "--wait", "--timeout", "60s"],
    ));
    ok(cli(
        &config,
        &["delete", "network", "lan", "--wait", "--timeout", "30s"],
    ));
    eventually("the network's devices and DHCP server are gone", 30, || {
        let gone = !Path::new("/sys/class/net/fb-4096").exists()
            && !Path::new("/run/netns/flotilla-dhcp-4096").exists();
        gone.then_some(())
    });
}
