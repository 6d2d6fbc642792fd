//! Two real hosts on one machine (`../shared/recipes/two-hosts.md`): each is its own libvirtd,
//! virtlogd and `flotilla agent` in network, mount, UTS and PID namespaces of their own, with
//! private libvirt directories, on an underlay bridge in this test's namespace where the API
//! server listens. A tiny guest on host A (address from network-config) and one on host B
//! (address over DHCP from host B's dnsmasq) share an overlay network: each pings the other
//! across the VXLAN between the hosts. Then a router with an external LAN (a bridge on each host
//! joined to one "upstream" namespace) is placed on host A; a guest on host B reaches upstream
//! through it; host A dies (its PID namespace killed, its links down), and the router is placed
//! again on host B and rebuilt there from the API: the outage is measured.
//!
//! Needs root, libvirtd's binaries and the tiny guest; `make test` provides them.

mod support;

use std::path::Path;
use std::process::{Child, Command};

use flotilla_controllers::testkit::{eventually, TestCluster};
use flotilla_types::registry::lookup;
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_flotilla");

/// Runs inside a host's namespaces as its PID namespace's init: private libvirt directories,
/// virtlogd, libvirtd, then the command (the agent) beside a loop that reaps every orphan (QEMU
/// processes libvirtd starts to probe capabilities end up here; unreaped, libvirtd waits for
/// them forever). It ends with the agent.
const HOST_INIT: &str = r#"#!/bin/sh
set -e
R="$1"; shift
mount --make-rprivate /
mkdir -p "$R/etc" "$R/run" "$R/lib" "$R/log/qemu" "$R/cache"
mount --bind "$R/etc" /etc/libvirt
mount --bind "$R/run" /run
mount --bind "$R/lib" /var/lib/libvirt
mount --bind "$R/log" /var/log/libvirt
mount --bind "$R/cache" /var/cache/libvirt
mkdir -p /run/libvirt /run/netns
virtlogd -d
libvirtd -d
i=0
until [ -S /run/libvirt/libvirt-sock ] || [ $i -ge 100 ]; do sleep 0.1; i=$((i+1)); done
"$@" &
agent=$!
while kill -0 "$agent" 2>/dev/null; do sleep 0.2; done
"#;

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The underlay and the hosts' namespaces, removed however the test ends.
struct Fabric {
    bridge: String,
    /// The external LAN (routers' way out) and its upstream host.
    external: String,
    namespaces: Vec<String>,
    hosts: Vec<Child>,
    /// Each host's output (its agent's log), shown when the test fails.
    logs: Vec<std::path::PathBuf>,
}

impl Drop for Fabric {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for log in &self.logs {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!("--- {} (last lines)", log.display());
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        // Killing a host's unshare kills its PID namespace: agent, libvirtd, QEMU, dnsmasq.
        for host in &mut self.hosts {
            let _ = host.kill();
            let _ = host.wait();
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        for bridge in [&self.bridge, &self.external] {
            let _ = Command::new("ip").args(["link", "del", bridge]).status();
        }
    }
}

/// Writes host `name`'s libvirt configuration under `root`.
fn configure_libvirt(root: &Path, uuid: &str) {
    let etc = root.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(
        etc.join("libvirtd.conf"),
        format!("unix_sock_rw_perms = \"0700\"\nhost_uuid = \"{uuid}\"\n"),
    )
    .unwrap();
    std::fs::write(
        etc.join("qemu.conf"),
        "user = \"root\"\ngroup = \"root\"\ndynamic_ownership = 0\nremember_owner = 0\n\
         security_driver = \"none\"\ncgroup_controllers = [ ]\nstdio_handler = \"logd\"\n",
    )
    .unwrap();
}

/// The serial console of the VM `uid` on the host whose agent keeps its files in `agent_dir`.
fn console(agent_dir: &Path, uid: &str) -> String {
    std::fs::read_to_string(agent_dir.join("vms").join(uid).join("console.log")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_on_two_hosts_reach_each_other_over_the_overlay() {
    let guest = support::tiny_guest();
    let tag = std::process::id() % 100_000;
    let mut fabric = Fabric {
        bridge: format!("f2hsw{tag}"),
        external: format!("f2hex{tag}"),
        namespaces: Vec::new(),
        hosts: Vec::new(),
        logs: Vec::new(),
    };
    run(&["ip", "link", "add", &fabric.bridge, "type", "bridge"]);
    run(&["ip", "addr", "add", "10.77.0.254/24", "dev", &fabric.bridge]);
    run(&["ip", "link", "set", &fabric.bridge, "up"]);
    // The external LAN, with an upstream host that has no route to any overlay network.
    run(&["ip", "link", "add", &fabric.external, "type", "bridge"]);
    run(&["ip", "link", "set", &fabric.external, "up"]);
    let upstream = format!("f2h{tag}-up");
    run(&["ip", "netns", "add", &upstream]);
    fabric.namespaces.push(upstream.clone());
    let up_port = format!("f2h{tag}up");
    run(&[
        "ip", "link", "add", &up_port, "type", "veth", "peer", "name", "eth0", "netns", &upstream,
    ]);
    run(&[
        "ip",
        "link",
        "set",
        &up_port,
        "master",
        &fabric.external,
        "up",
    ]);
    run(&[
        "ip",
        "-n",
        &upstream,
        "addr",
        "add",
        "203.0.113.1/24",
        "dev",
        "eth0",
    ]);
    run(&["ip", "-n", &upstream, "link", "set", "eth0", "up"]);
    let cluster = TestCluster::start_on("10.77.0.254:0".parse().unwrap()).await;
    let admin = &cluster.admin;
    let root = cluster.dir.path().join("hosts");

    let mut agent_dirs = Vec::new();
    for (i, host) in ["a", "b"].into_iter().enumerate() {
        let ns = format!("f2h{tag}-{host}");
        run(&["ip", "netns", "add", &ns]);
        fabric.namespaces.push(ns.clone());
        let port = format!("f2h{tag}{host}");
        run(&[
            "ip", "link", "add", &port, "type", "veth", "peer", "name", "ul", "netns", &ns,
        ]);
        run(&["ip", "link", "set", &port, "master", &fabric.bridge, "up"]);
        let address = format!("10.77.0.{}", i + 1);
        run(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            "ul",
        ]);
        run(&["ip", "-n", &ns, "link", "set", "ul", "up"]);
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        // The host's bridge on the external LAN.
        let ex_port = format!("f2x{tag}{host}");
        run(&[
            "ip", "link", "add", &ex_port, "type", "veth", "peer", "name", "exv", "netns", &ns,
        ]);
        run(&[
            "ip",
            "link",
            "set",
            &ex_port,
            "master",
            &fabric.external,
            "up",
        ]);
        run(&["ip", "-n", &ns, "link", "add", "br-ex", "type", "bridge"]);
        run(&[
            "ip", "-n", &ns, "link", "set", "exv", "master", "br-ex", "up",
        ]);
        run(&["ip", "-n", &ns, "link", "set", "br-ex", "up"]);

        let dir = root.join(host);
        std::fs::create_dir_all(&dir).unwrap();
        configure_libvirt(
            &dir,
            &format!("00000000-0000-4000-8000-00000000000{}", i + 1),
        );
        let init = dir.join("host-init.sh");
        std::fs::write(&init, HOST_INIT).unwrap();
        std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let agent_dir = dir.join("agent");
        let log = dir.join("host.log");
        let output = std::fs::File::create(&log).unwrap();
        fabric.logs.push(log);
        let child = Command::new("ip")
            .args([
                "netns", "exec", &ns, "unshare", "--mount", "--uts", "--pid", "--fork",
            ])
            .args([
                "--mount-proc",
                "--propagation",
                "private",
                "--kill-child=SIGKILL",
            ])
            .arg(&init)
            .arg(&dir)
            .args([BIN, "agent", "--server", &cluster.server.url])
            .args(["--join-token", &cluster.join_token().await])
            .args([
                "--node-name",
                &format!("host-{host}"),
                "--virt-type",
                "qemu",
            ])
            .args(["--tunnel-address", &address, "--shutdown-timeout", "1s"])
            .args(["--log-listen", &format!("{address}:0")])
            .arg("--data-dir")
            .arg(&agent_dir)
            .env("FLOTILLA_LOG", "info,flotilla_agent=debug")
            .stdout(output.try_clone().unwrap())
            .stderr(output)
            .spawn()
            .unwrap();
        fabric.hosts.push(child);
        agent_dirs.push(agent_dir);
    }
    let nodes = lookup("node").unwrap();
    eventually("both hosts are Ready", 60, async || {
        let list = admin.list(nodes, None, &Default::default()).await.ok()?;
        let ready = list["items"]
            .as_array()?
            .iter()
            .filter(|n| {
                n["status"]["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
            })
            .count();
        (ready == 2).then_some(())
    })
    .await;

    admin
        .create(
            lookup("network").unwrap(),
            Some("default"),
            &json!({"metadata": {"name": "lan"}, "spec": {"cidr": "10.7.0.0/24"}}),
        )
        .await
        .unwrap();
    let vms = lookup("vm").unwrap();
    let mut uids = Vec::new();
    for (host, ip, peer, cmdline) in [
        ("a", "10.7.0.10", "10.7.0.11", "console=ttyS0 panic=-1"),
        (
            "b",
            "10.7.0.11",
            "10.7.0.10",
            "console=ttyS0 panic=-1 flotilla.dhcp",
        ),
    ] {
        let vm = json!({"metadata": {"name": format!("on-{host}")}, "spec": {
            "nodeName": format!("host-{host}"),
            "resources": {"cpus": 1, "memory": "256Mi"},
            "boot": {"kernel": guest.join("vmlinuz"), "initrd": guest.join("initramfs.gz"), "cmdline": cmdline},
            "userData": format!("#cloud-config\nflotilla_test_ping: {peer}\n"),
            "networks": [{"network": "lan", "ip": ip}],
        }});
        let made = admin.create(vms, Some("default"), &vm).await.unwrap();
        uids.push(made["metadata"]["uid"].as_str().unwrap().to_string());
    }
    // Each guest reaches the other through the tunnel between the hosts.
    for (i, (own, peer, via)) in [
        ("10.7.0.10", "10.7.0.11", "static"),
        ("10.7.0.11", "10.7.0.10", "dhcp"),
    ]
    .into_iter()
    .enumerate()
    {
        let (dir, uid) = (&agent_dirs[i], &uids[i]);
        let log = eventually(
            &format!("the guest on host {i} pings {peer}"),
            120,
            async || {
                let log = console(dir, uid);
                log.contains(&format!("FLOTILLA-PING {peer} ok"))
                    .then_some(log)
            },
        )
        .await;
        assert!(
            log.contains(&format!("FLOTILLA-IP {own}/24 MTU 1450 VIA {via}")),
            "{log}"
        );
    }
    // The serial logs of guests on other hosts come through the API too.
    let log = admin.vm_log("default", "on-b", false).await.unwrap();
    let mut log = Box::pin(log);
    let mut text = Vec::new();
    while let Some(Ok(chunk)) = futures::StreamExt::next(&mut log).await {
        text.extend_from_slice(&chunk);
    }
    assert!(
        String::from_utf8_lossy(&text).contains("FLOTILLA-PING 10.7.0.10 ok"),
        "{}",
        String::from_utf8_lossy(&text)
    );
    // Host B's agent saw the lease its dnsmasq gave.
    eventually("on-b reports its DHCP lease", 10, async || {
        let b = admin.get(vms, Some("default"), "on-b").await.ok()?;
        (b["status"]["interfaces"][0]["source"] == "dhcp").then_some(())
    })
    .await;
    // A VM made on host B later: host A's DNS server knows its name within seconds (its agent
    // follows the network), not at its next resync.
    let late = json!({"metadata": {"name": "late"}, "spec": {
        "nodeName": "host-b", "resources": {"cpus": 1, "memory": "128Mi"}, "powerState": "Stopped",
        "boot": {"kernel": guest.join("vmlinuz")}, "networks": [{"network": "lan"}]}});
    let late = admin.create(vms, Some("default"), &late).await.unwrap();
    let late_ip = late["status"]["ips"][0].as_str().unwrap().to_string();
    let names = agent_dirs[0].join("networks/4096/names");
    eventually("host A's DNS server knows the new VM", 10, async || {
        let text = std::fs::read_to_string(&names).ok()?;
        text.contains(&format!(
            "{late_ip} late.lan.default.flotilla.internal late"
        ))
        .then_some(())
    })
    .await;
    let network = admin
        .get(lookup("network").unwrap(), Some("default"), "lan")
        .await
        .unwrap();
    assert_eq!(network["status"]["nodes"], json!(["host-a", "host-b"]));

    // A router to the external LAN, placed on host A (the least loaded, first by name).
    admin
        .create(
            lookup("network").unwrap(),
            Some("default"),
            &json!({"metadata": {"name": "ext"}, "spec": {"type": "bridged", "bridge": "br-ex",
                "cidr": "203.0.113.0/24", "gateway": "203.0.113.1", "ranges": [{"start": "203.0.113.10", "end": "203.0.113.20"}]}}),
        )
        .await
        .unwrap();
    let routers = lookup("router").unwrap();
    admin
        .create(
            routers,
            Some("default"),
            &json!({"metadata": {"name": "gw"}, "spec": {"external": {"network": "ext"}, "networks": ["lan"]}}),
        )
        .await
        .unwrap();
    eventually("the router is placed on host A", 10, async || {
        let r = admin.get(routers, Some("default"), "gw").await.ok()?;
        (r["status"]["nodeName"] == "host-a").then_some(())
    })
    .await;
    // A guest on host B reaches upstream through it, across the tunnel to host A.
    let watcher = json!({"metadata": {"name": "watcher"}, "spec": {
        "nodeName": "host-b", "resources": {"cpus": 1, "memory": "256Mi"},
        "boot": {"kernel": guest.join("vmlinuz"), "initrd": guest.join("initramfs.gz"), "cmdline": "console=ttyS0 panic=-1"},
        "userData": "#cloud-config\nflotilla_test_ping: 203.0.113.1\n",
        "networks": [{"network": "lan", "ip": "10.7.0.30"}]}});
    let watcher_uid = admin.create(vms, Some("default"), &watcher).await.unwrap()["metadata"]
        ["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let (ok, lost) = (
        "FLOTILLA-PING 203.0.113.1 ok",
        "FLOTILLA-PING 203.0.113.1 lost",
    );
    let b_dir = agent_dirs[1].clone();
    let count = |line: &str| console(&b_dir, &watcher_uid).matches(line).count();
    eventually(
        "the guest on host B reaches upstream through the router on host A",
        120,
        async || (count(ok) == 1).then_some(()),
    )
    .await;

    // Host A dies: everything in its PID namespace (agent, libvirtd, QEMU, the router's
    // namespace with it), and its links.
    let died = std::time::Instant::now();
    let mut host_a = fabric.hosts.remove(0);
    let _ = host_a.kill();
    let _ = host_a.wait();
    for link in ["ul", "exv"] {
        run(&[
            "ip",
            "-n",
            &fabric.namespaces[1],
            "link",
            "set",
            link,
            "down",
        ]);
    }
    eventually("the guest loses upstream", 30, async || {
        (count(lost) == 1).then_some(())
    })
    .await;
    eventually("the router is placed again on host B", 60, async || {
        let r = admin.get(routers, Some("default"), "gw").await.ok()?;
        (r["status"]["nodeName"] == "host-b").then_some(())
    })
    .await;
    let placed = died.elapsed();
    eventually("the guest reaches upstream again", 60, async || {
        (count(ok) == 2).then_some(())
    })
    .await;
    eprintln!(
        "router failover: host A dies -> placed on host B {:.1} s -> the guest reaches upstream again {:.1} s (node grace 10 s)",
        placed.as_secs_f64(),
        died.elapsed().as_secs_f64()
    );
    drop(fabric);
}
