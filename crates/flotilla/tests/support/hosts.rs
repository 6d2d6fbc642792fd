//! Real hosts on one machine (`../shared/recipes/two-hosts.md`): each is its own libvirtd,
//! virtlogd and `flotilla agent` in network, mount, UTS and PID namespaces of their own, with
//! private libvirt directories, on an underlay bridge in the test's namespace where the API
//! server listens. Each libvirtd also listens on TCP on its namespace-private address, so that
//! VMs can migrate between hosts (no authentication: that address exists only inside the
//! underlay this test made).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use flotilla_controllers::testkit::TestCluster;

/// Runs inside a host's namespaces as its PID namespace's init: private libvirt directories,
/// virtlogd, libvirtd, then the command (the agent) beside a loop that reaps every orphan (QEMU
/// processes libvirtd starts to probe capabilities end up here; unreaped, libvirtd waits for
/// them forever). An agent that dies is started again; the host ends when its PID namespace is
/// killed.
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
libvirtd -d --listen
i=0
until [ -S /run/libvirt/libvirt-sock ] || [ $i -ge 100 ]; do sleep 0.1; i=$((i+1)); done
# The agent, started again whenever it dies (as systemd's Restart=always would), beside the
# orphans' reaper this shell is.
while true; do "$@" || true; sleep 0.5; done
"#;

pub fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The underlay and the hosts' namespaces, removed however the test ends.
pub struct Fabric {
    /// `10.<net>.0.0/24`: the underlay's subnet (distinct per test binary).
    pub net: u8,
    pub tag: String,
    pub bridge: String,
    /// Extra links to delete at the end (e.g. an external LAN's bridge).
    pub links: Vec<String>,
    pub namespaces: Vec<String>,
    pub hosts: Vec<Option<Child>>,
    /// Each host's output (its agent's log), shown when the test fails.
    pub logs: Vec<PathBuf>,
    /// Each host's directory (libvirt's private directories, the agent's data directory).
    pub roots: Vec<PathBuf>,
    /// Where the hosts' directories are (removed after the hosts, and after their logs
    /// were shown).
    dir: tempfile::TempDir,
}

impl Drop for Fabric {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for log in &self.logs {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(60).collect();
                eprintln!("--- {} (last lines)", log.display());
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        // Killing a host's unshare kills its PID namespace: agent, libvirtd, QEMU, dnsmasq.
        for host in self.hosts.iter_mut().flatten() {
            let _ = host.kill();
            let _ = host.wait();
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        for link in std::iter::once(&self.bridge).chain(&self.links) {
            let _ = Command::new("ip").args(["link", "del", link]).status();
        }
    }
}

impl Fabric {
    /// The underlay bridge `10.<net>.0.254/24`, where the API server listens.
    pub fn new(prefix: &str, net: u8) -> Self {
        let tag = format!("{prefix}{}", std::process::id() % 100_000);
        let fabric = Fabric {
            net,
            bridge: format!("{tag}sw"),
            tag,
            links: Vec::new(),
            namespaces: Vec::new(),
            hosts: Vec::new(),
            logs: Vec::new(),
            roots: Vec::new(),
            dir: super::traversable_tempdir(),
        };
        run(&["ip", "link", "add", &fabric.bridge, "type", "bridge"]);
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", fabric.server_address()),
            "dev",
            &fabric.bridge,
        ]);
        run(&["ip", "link", "set", &fabric.bridge, "up"]);
        fabric
    }

    pub fn server_address(&self) -> String {
        format!("10.{}.0.254", self.net)
    }

    /// Host `i`'s underlay address.
    pub fn address(&self, i: usize) -> String {
        format!("10.{}.0.{}", self.net, i + 1)
    }

    /// Host `i`'s network namespace.
    pub fn namespace(&self, i: usize) -> String {
        format!("{}-{i}", self.tag)
    }

    /// The agent's data directory on host `i`.
    pub fn agent_dir(&self, i: usize) -> PathBuf {
        self.roots[i].join("agent")
    }

    /// The PID (in this namespace) of host `i`'s agent.
    pub fn agent_pid(&self, i: usize) -> Option<u32> {
        // Not the host's init script (its arguments are the agent's), not the watchdog.
        let pattern = format!(
            "^{} agent .*data-dir {}",
            super::BIN,
            self.agent_dir(i).display()
        );
        let out = Command::new("pgrep").args(["-f", &pattern]).output().ok()?;
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// Starts host `name` (its index is the number of hosts so far) and its agent, joined to
    /// `cluster`, with `extra` arguments for the agent. Returns the host's index.
    pub async fn add_host(&mut self, cluster: &TestCluster, name: &str, extra: &[&str]) -> usize {
        let token = cluster.join_token().await;
        self.add_host_to(&cluster.server.url, &token, name, extra)
    }

    /// Like [`Fabric::add_host`], joined to the server at `url` with `token`.
    pub fn add_host_to(&mut self, url: &str, token: &str, name: &str, extra: &[&str]) -> usize {
        let i = self.hosts.len();
        let ns = self.namespace(i);
        run(&["ip", "netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        let port = format!("{}h{i}", self.tag);
        run(&[
            "ip", "link", "add", &port, "type", "veth", "peer", "name", "ul", "netns", &ns,
        ]);
        run(&["ip", "link", "set", &port, "master", &self.bridge, "up"]);
        let address = self.address(i);
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

        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        configure_libvirt(
            &dir,
            &format!("00000000-0000-4000-8000-0000000000{:02}", i + 1),
            &address,
        );
        let init = dir.join("host-init.sh");
        std::fs::write(&init, HOST_INIT).unwrap();
        std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let log = dir.join("host.log");
        let output = std::fs::File::create(&log).unwrap();
        self.logs.push(log);
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
            .args([super::BIN, "agent", "--server", url])
            .args(["--join-token", token])
            .args(["--node-name", name, "--virt-type", "qemu"])
            .args(["--tunnel-address", &address, "--shutdown-timeout", "1s"])
            .args(["--log-listen", &format!("{address}:0")])
            .args(["--migration-uri", &format!("qemu+tcp://{address}/system")])
            .args(extra)
            .arg("--data-dir")
            .arg(dir.join("agent"))
            .env("FLOTILLA_LOG", "info,flotilla_agent=debug")
            .stdout(output.try_clone().unwrap())
            .stderr(output)
            .spawn()
            .unwrap();
        self.hosts.push(Some(child));
        self.roots.push(dir);
        i
    }

    /// Host `i` dies: everything in its PID namespace, and its uplink.
    pub fn kill_host(&mut self, i: usize) {
        if let Some(mut host) = self.hosts[i].take() {
            let _ = host.kill();
            let _ = host.wait();
        }
        let _ = Command::new("ip")
            .args(["-n", &self.namespace(i), "link", "set", "ul", "down"])
            .status();
    }

    /// A command in host `i`'s mount, UTS and network namespaces (virsh sees its libvirtd).
    pub fn in_host(&self, i: usize, args: &[&str]) -> std::process::Output {
        let pid = self.hosts[i].as_ref().expect("the host runs").id();
        // `unshare --fork` is the host's PID 1's parent: its child holds the namespaces.
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        let init = children
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        Command::new("nsenter")
            .args(["-t", &init, "-m", "-u", "-n", "--"])
            .args(args)
            .output()
            .unwrap()
    }
}

impl Fabric {
    /// Waits until every host's Node is Ready and publishes where it takes migrations.
    pub async fn wait_ready(&self, admin: &flotilla_client::Client) {
        let nodes = flotilla_types::registry::lookup("node").unwrap();
        let hosts = self.hosts.len();
        flotilla_controllers::testkit::eventually("every host is Ready", 60, async || {
            let list = admin.list(nodes, None, &Default::default()).await.ok()?;
            let ready = list["items"]
                .as_array()?
                .iter()
                .filter(|n| {
                    n["status"]["nodeInfo"]["migrationUri"].is_string()
                        && n["status"]["conditions"].as_array().is_some_and(|c| {
                            c.iter()
                                .any(|c| c["type"] == "Ready" && c["status"] == "True")
                        })
                })
                .count();
            (ready == hosts).then_some(())
        })
        .await;
    }
}

/// Writes a host's libvirt configuration under `root`: its own host UUID, TCP on its private
/// address (for migrations), QEMU as root without cgroups (two daemons on one kernel).
fn configure_libvirt(root: &Path, uuid: &str, address: &str) {
    let etc = root.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(
        etc.join("libvirtd.conf"),
        format!(
            "unix_sock_rw_perms = \"0700\"\nhost_uuid = \"{uuid}\"\nlisten_tls = 0\nlisten_tcp = 1\n\
             listen_addr = \"{address}\"\nauth_tcp = \"none\"\n"
        ),
    )
    .unwrap();
    std::fs::write(
        etc.join("qemu.conf"),
        "user = \"root\"\ngroup = \"root\"\ndynamic_ownership = 0\nremember_owner = 0\n\
         security_driver = \"none\"\ncgroup_controllers = [ ]\nstdio_handler = \"logd\"\n\
         migration_port_min = 49152\nmigration_port_max = 49215\n",
    )
    .unwrap();
}

/// The serial console of the VM `uid` on the host whose agent keeps its files in `agent_dir`.
pub fn console(agent_dir: &Path, uid: &str) -> String {
    std::fs::read_to_string(agent_dir.join("vms").join(uid).join("console.log")).unwrap_or_default()
}
