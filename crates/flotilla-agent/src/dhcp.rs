//! The DHCP and DNS server of each overlay network on this node: dnsmasq in a namespace of its
//! own (`flotilla-dhcp-<vni>`), on the network's service port (see
//! [`flotilla_dataplane::ServicePort`]), answering only the reservations the control plane's
//! IPAM made (static mode: no pool), telling guests their MTU (option 26), gateway and DNS, and
//! resolving `<vm>.<network>.<project>.<domain>` for every VM of the network.
//!
//! Everything it serves comes from the API (the network's address list) and is written to files
//! under `<data>/networks/<vni>/`; a change reaches the running server by SIGHUP, which keeps its
//! leases. The agent supervises each server itself (there is no init system to lean on): one
//! that exits is started again with backoff, and one a crashed agent (or an agent whose data
//! directory is gone) left behind is found by its network namespace and replaced. The lease file says which guests took their address:
//! their VMs' `status.interfaces[].source` becomes `dhcp`.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_dataplane::namespace::{
    command_in, ensure_namespace, namespace_inode, namespace_path, namespaces_with_prefix,
    remove_namespace, run_in,
};
use flotilla_dataplane::{service_peer_name, Netlink, ServicePort};
use flotilla_ipam::{Ipv6Prefix, Subnet};
use flotilla_types::NetworkAddress;
use tokio::io::AsyncBufReadExt;
use tokio::sync::{mpsc, oneshot};

use crate::error::{io, AgentError};

/// The namespaces of the agent's DHCP servers are named this, then the VNI.
pub const NAMESPACE_PREFIX: &str = "flotilla-dhcp-";
/// How long a lease lasts; guests renew at half of it.
const LEASE_TIME: &str = "1h";
/// The longest wait before a server that keeps exiting is started again.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What one network's server serves.
pub struct Service<'a> {
    pub vni: u32,
    pub project: &'a str,
    pub network: &'a str,
    /// The DNS domain of the network's VMs: `<network>.<project>.<spec.dns.domain>`.
    pub domain: String,
    pub subnet: Subnet,
    /// The network's IPv6 prefix: router advertisements (SLAAC, no default route) and AAAA names.
    pub prefix6: Option<Ipv6Prefix>,
    pub mtu: u32,
    /// The DNS servers guests are told (the network's own, or this server).
    pub nameservers: Vec<String>,
    /// Every address IPAM gave on the network.
    pub addresses: &'a [NetworkAddress],
}

struct Server {
    project: String,
    network: String,
    args: Vec<String>,
    pid: Arc<AtomicU32>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    reservations: Vec<NetworkAddress>,
}

/// How long a server's files are trusted before a VM reconcile looks at them again (changes of
/// the network reach it at once through the agent's Network watch).
const FRESH_FOR: Duration = Duration::from_secs(10);

/// This node's DHCP servers.
pub struct DhcpServers {
    dir: PathBuf,
    /// Namespaces are named this, then the VNI.
    prefix: String,
    netlink: Netlink,
    servers: tokio::sync::Mutex<HashMap<u32, Server>>,
    /// When each network's server was last ensured.
    ensured: Mutex<HashMap<u32, Instant>>,
    /// What each server's lease file says: (project, network, MAC) → address.
    leases: Mutex<HashMap<(String, String, String), Ipv4Addr>>,
    restarts: Arc<AtomicU64>,
    /// The uids of VMs whose guest just took its lease.
    leased: mpsc::UnboundedSender<String>,
}

impl DhcpServers {
    /// Servers keeping their files under `<data_dir>/networks`, in namespaces named
    /// `<namespace_prefix><vni>` ([`NAMESPACE_PREFIX`] for the agent), with service ports made
    /// through `netlink`; the returned channel yields the uid of each VM whose guest takes a lease.
    pub fn new(
        data_dir: &Path,
        netlink: Netlink,
        namespace_prefix: &str,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<String>) {
        let (leased, rx) = mpsc::unbounded_channel();
        let servers = Arc::new(DhcpServers {
            dir: data_dir.join("networks"),
            prefix: namespace_prefix.to_string(),
            netlink,
            servers: Default::default(),
            ensured: Default::default(),
            leases: Default::default(),
            restarts: Default::default(),
            leased,
        });
        (servers, rx)
    }

    /// How many times a server exited and was started again.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// Whether `network`'s server was not ensured lately (or never).
    pub fn stale(&self, network: &flotilla_types::Network) -> bool {
        let Some(vni) = network.status.as_ref().and_then(|s| s.vni) else {
            return true;
        };
        self.ensured
            .lock()
            .expect("ensured lock")
            .get(&vni)
            .is_none_or(|at| at.elapsed() > FRESH_FOR)
    }

    fn server_dir(&self, vni: u32) -> PathBuf {
        self.dir.join(vni.to_string())
    }

    /// Makes the network's server run with what `service` says: namespace, service port, files
    /// (a change is signalled with SIGHUP), and leases of addresses IPAM no longer gives
    /// released. The overlay's bridge must exist.
    pub async fn ensure(&self, service: &Service<'_>) -> Result<(), AgentError> {
        let vni = service.vni;
        // One change of the servers at a time: two VMs of a network reconciled together must
        // not both make its namespace.
        let mut servers = self.servers.lock().await;
        let dir = self.server_dir(vni);
        tokio::fs::create_dir_all(&dir).await.map_err(io(&dir))?;
        // dnsmasq reads its files again (on SIGHUP) after dropping to an unprivileged user.
        for d in [&self.dir, &dir] {
            tokio::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
                .await
                .map_err(io(d))?;
        }
        let name = format!("{}{vni}", self.prefix);
        let namespace = tokio::task::spawn_blocking(move || ensure_namespace(&name))
            .await
            .expect("the namespace task does not panic")
            .map_err(|e| AgentError::Config(e.to_string()))?;
        self.netlink
            .ensure_service_port(&ServicePort {
                vni,
                namespace: namespace.clone(),
                address: service.subnet.dhcp_server,
                prefix_len: service.subnet.cidr.prefix(),
                address6: service.prefix6.map(|p| p.host(2)),
                mtu: service.mtu,
            })
            .await
            .map_err(|e| AgentError::Config(format!("network {:?}: {e}", service.network)))?;

        let mut changed = false;
        for (file, content) in [
            ("hosts", hosts_file(service)),
            ("names", names_file(service)),
            ("options", options_file(service)),
        ] {
            changed |= write_if_changed(&dir.join(file), &content).await?;
        }
        self.release_stale_leases(service, &namespace).await;

        self.ensured
            .lock()
            .expect("ensured lock")
            .insert(vni, Instant::now());
        let args = arguments(service, &dir);
        let running = servers
            .get(&vni)
            .is_some_and(|s| s.args == args && !s.task.is_finished());
        if running {
            let server = servers.get_mut(&vni).expect("running");
            server.reservations = service.addresses.to_vec();
            if changed {
                let pid = server.pid.load(Ordering::Relaxed);
                if pid != 0 {
                    // SAFETY: a signal to the child this agent started.
                    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
                    tracing::debug!(vni, "the DHCP server reads its reservations again");
                }
            }
            return Ok(());
        }
        match servers.remove(&vni) {
            Some(old) => stop(old).await,
            // One a crashed agent left behind holds the port: it goes first.
            None => kill_left_behind(&namespace, &self.server_dir(vni).join("pid")).await,
        }
        let pid = Arc::new(AtomicU32::new(0));
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(supervise(
            vni,
            args.clone(),
            namespace,
            pid.clone(),
            stop_rx,
            self.restarts.clone(),
        ));
        servers.insert(
            vni,
            Server {
                project: service.project.to_string(),
                network: service.network.to_string(),
                args,
                pid,
                stop: Some(stop_tx),
                task,
                reservations: service.addresses.to_vec(),
            },
        );
        Ok(())
    }

    /// Stops the server of `vni` and removes its namespace and files (whatever of them exists).
    pub async fn remove(&self, vni: u32) -> Result<(), AgentError> {
        let dir = self.server_dir(vni);
        let name = format!("{}{vni}", self.prefix);
        let mut servers = self.servers.lock().await;
        self.ensured.lock().expect("ensured lock").remove(&vni);
        match servers.remove(&vni) {
            Some(server) => stop(server).await,
            None => kill_left_behind(&namespace_path(&name), &dir.join("pid")).await,
        }
        self.netlink
            .remove_service_port(vni)
            .await
            .map_err(|e| AgentError::Config(e.to_string()))?;
        tokio::task::spawn_blocking(move || remove_namespace(&name))
            .await
            .expect("the namespace task does not panic")
            .map_err(|e| AgentError::Config(e.to_string()))?;
        match tokio::fs::remove_dir_all(&dir).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&dir)(e)),
            _ => Ok(()),
        }
    }

    /// Removes the servers (and namespaces, left by a crash too) of networks not in `keep`.
    /// The namespace of network `vni`'s server.
    pub fn namespace_of(&self, vni: u32) -> std::path::PathBuf {
        namespace_path(&format!("{}{vni}", self.prefix))
    }

    pub async fn remove_all_but(&self, keep: &std::collections::BTreeSet<u32>) -> Vec<u32> {
        let mut vnis: std::collections::BTreeSet<u32> = namespaces_with_prefix(&self.prefix)
            .iter()
            .filter_map(|n| n[self.prefix.len()..].parse().ok())
            .collect();
        vnis.extend(self.servers.lock().await.keys());
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            vnis.extend(entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()));
        }
        vnis.extend(running_servers(&self.dir));
        let mut removed = Vec::new();
        for vni in vnis.difference(keep) {
            match self.remove(*vni).await {
                Ok(()) => removed.push(*vni),
                Err(e) => tracing::warn!(vni, error = %e, "cannot remove a DHCP server"),
            }
        }
        removed
    }

    /// The address the guest with `mac` on `project`/`network` holds a lease for, if any.
    pub fn leased(&self, project: &str, network: &str, mac: &str) -> Option<Ipv4Addr> {
        self.leases
            .lock()
            .expect("leases lock")
            .get(&(project.to_string(), network.to_string(), mac.to_string()))
            .copied()
    }

    /// Reads every server's lease file; reports the VMs whose guest took a lease since the last
    /// read.
    pub async fn read_leases(&self) {
        let servers: Vec<(u32, String, String, Vec<NetworkAddress>)> = self
            .servers
            .lock()
            .await
            .iter()
            .map(|(vni, s)| {
                (
                    *vni,
                    s.project.clone(),
                    s.network.clone(),
                    s.reservations.clone(),
                )
            })
            .collect();
        let mut now = HashMap::new();
        for (vni, project, network, reservations) in servers {
            let text = tokio::fs::read_to_string(self.server_dir(vni).join("leases"))
                .await
                .unwrap_or_default();
            for (mac, ip) in parse_leases(&text) {
                if let Some(r) = reservations
                    .iter()
                    .find(|r| r.mac_address == mac && r.address == ip.to_string())
                {
                    now.insert((project.clone(), network.clone(), mac), (ip, r.uid.clone()));
                }
            }
        }
        let mut leases = self.leases.lock().expect("leases lock");
        for (key, (ip, uid)) in &now {
            if leases.get(key) != Some(ip) {
                let _ = self.leased.send(uid.clone());
            }
        }
        *leases = now.into_iter().map(|(k, (ip, _))| (k, ip)).collect();
    }

    /// Leases the lease file holds for addresses or MACs no reservation has any more (a deleted
    /// VM's) are released, so that a new VM can take the address at once. Waits (up to a second)
    /// until dnsmasq has dropped them from its lease file.
    async fn release_stale_leases(&self, service: &Service<'_>, namespace: &Path) {
        let file = self.server_dir(service.vni).join("leases");
        let stale = |text: &str| -> Vec<(String, Ipv4Addr)> {
            parse_leases(text)
                .into_iter()
                .filter(|(mac, ip)| {
                    !service
                        .addresses
                        .iter()
                        .any(|a| a.mac_address == *mac && a.address == ip.to_string())
                })
                .collect()
        };
        let text = tokio::fs::read_to_string(&file).await.unwrap_or_default();
        let released = stale(&text);
        if released.is_empty() {
            return;
        }
        for (mac, ip) in released {
            let interface = service_peer_name(service.vni);
            let ip_text = ip.to_string();
            let args = [interface.as_str(), ip_text.as_str(), mac.as_str()];
            match run_in("dhcp_release", &args, namespace, None).await {
                Ok(()) => tracing::info!(vni = service.vni, %ip, %mac, "released a stale lease"),
                Err(e) => {
                    tracing::warn!(vni = service.vni, %ip, error = %e, "cannot release a lease")
                }
            }
        }
        for _ in 0..20 {
            let text = tokio::fs::read_to_string(&file).await.unwrap_or_default();
            if stale(&text).is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `<expiry> <mac> <ip> <hostname> <client-id>` lines: (MAC, address) of each.
fn parse_leases(text: &str) -> Vec<(String, Ipv4Addr)> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace().skip(1);
            let mac = fields.next()?.to_ascii_lowercase();
            let ip = fields.next()?.parse().ok()?;
            Some((mac, ip))
        })
        .collect()
}

/// Names and MACs reach dnsmasq's files only when they are what the API allows (DNS labels,
/// hex MACs): a line can never be broken into two.
fn safe(value: &str) -> bool {
    !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b':')
}

/// `--dhcp-hostsfile`: `<mac>,<address>,<vm>` per reservation.
fn hosts_file(service: &Service<'_>) -> String {
    service
        .addresses
        .iter()
        .filter(|a| safe(&a.mac_address) && safe(&a.vm) && safe(&a.address))
        .map(|a| format!("{},{},{}\n", a.mac_address, a.address, a.vm))
        .collect()
}

/// `--addn-hosts`: `<address> <vm>.<domain> <vm>` per reservation (and per IPv6 address).
fn names_file(service: &Service<'_>) -> String {
    let mut out = String::new();
    for a in service
        .addresses
        .iter()
        .filter(|a| safe(&a.vm) && safe(&a.address))
    {
        out.push_str(&format!(
            "{} {}.{} {}\n",
            a.address, a.vm, service.domain, a.vm
        ));
        if let Some(v6) = service.prefix6.and_then(|p| p.eui64(&a.mac_address)) {
            out.push_str(&format!("{v6} {}.{} {}\n", a.vm, service.domain, a.vm));
        }
    }
    out
}

/// `--dhcp-optsfile`: gateway, DNS server, domain and MTU.
fn options_file(service: &Service<'_>) -> String {
    let subnet = &service.subnet;
    let servers: Vec<&str> = service
        .nameservers
        .iter()
        .map(String::as_str)
        .filter(|s| s.parse::<Ipv4Addr>().is_ok())
        .collect();
    let mut out = format!(
        "option:router,{}\noption:dns-server,{}\noption:mtu,{}\n",
        subnet.gateway,
        servers.join(","),
        service.mtu
    );
    // The metadata service through this server, as Neutron's isolated metadata; with classless
    // routes a client ignores option 3, so the default route is among them.
    out.push_str(&format!(
        "option:classless-static-route,{}/32,{},0.0.0.0/0,{}\n",
        crate::metadata::METADATA_ADDRESS,
        subnet.dhcp_server,
        subnet.gateway
    ));
    if safe(&service.domain) {
        out.push_str(&format!("option:domain-search,{}\n", service.domain));
    }
    out
}

/// dnsmasq's command line: what needs a restart to change (the files change by SIGHUP).
fn arguments(service: &Service<'_>, dir: &Path) -> Vec<String> {
    let file = |name: &str| dir.join(name).display().to_string();
    let subnet = &service.subnet;
    let mut args = vec![
        "--keep-in-foreground".to_string(),
        "--conf-file=/dev/null".into(),
        "--log-facility=-".into(),
        "--no-hosts".into(),
        // Nothing to forward to yet: the network's namespace has no way out (routers come later).
        "--no-resolv".into(),
        format!("--interface={}", service_peer_name(service.vni)),
        "--except-interface=lo".into(),
        "--bind-interfaces".into(),
        format!("--pid-file={}", file("pid")),
        format!(
            "--dhcp-range={},static,{},{LEASE_TIME}",
            subnet.cidr.network(),
            subnet.cidr.netmask()
        ),
        format!("--dhcp-hostsfile={}", file("hosts")),
        format!("--dhcp-optsfile={}", file("options")),
        format!("--addn-hosts={}", file("names")),
        format!("--dhcp-leasefile={}", file("leases")),
        "--dhcp-authoritative".into(),
        "--quiet-dhcp".into(),
    ];
    if let Some(prefix) = service.prefix6 {
        // Router advertisements for SLAAC, which derives the same address IPAM gave; a router
        // lifetime of 0: this server is no default router.
        args.push("--enable-ra".into());
        args.push(format!("--dhcp-range={},ra-only,64", prefix.network()));
        args.push(format!(
            "--ra-param={},mtu:{},10,0",
            service_peer_name(service.vni),
            service.mtu
        ));
    }
    if safe(&service.domain) {
        args.push(format!("--domain={}", service.domain));
        args.push(format!("--local=/{}/", service.domain));
    }
    args
}

/// Writes `content` to `path` (atomically, 0644) unless it is there already; says whether it
/// wrote.
async fn write_if_changed(path: &Path, content: &str) -> Result<bool, AgentError> {
    if tokio::fs::read_to_string(path).await.ok().as_deref() == Some(content) {
        return Ok(false);
    }
    crate::datadir::write_file(path, content.as_bytes().to_vec(), 0o644).await?;
    Ok(true)
}

/// Runs dnsmasq until told to stop, starting it again (with backoff) whenever it exits.
async fn supervise(
    vni: u32,
    args: Vec<String>,
    namespace: PathBuf,
    pid: Arc<AtomicU32>,
    mut stop: oneshot::Receiver<()>,
    restarts: Arc<AtomicU64>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = Instant::now();
        let spawned = command_in("dnsmasq", &namespace)
            .map_err(|e| AgentError::Config(e.to_string()))
            .and_then(|(mut command, _namespace)| {
                command
                    .args(&args)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .kill_on_drop(true)
                    .spawn()
                    .map_err(|source| AgentError::Tool {
                        program: "dnsmasq".into(),
                        source,
                    })
            });
        match spawned {
            Err(e) => tracing::warn!(vni, error = %e, "cannot start the DHCP server"),
            Ok(mut child) => {
                pid.store(child.id().unwrap_or_default(), Ordering::Relaxed);
                if let Some(stderr) = child.stderr.take() {
                    tokio::spawn(async move {
                        let mut lines = tokio::io::BufReader::new(stderr).lines();
                        while let Ok(Some(line)) = lines.next_line().await {
                            tracing::debug!(vni, "dnsmasq: {line}");
                        }
                    });
                }
                tracing::debug!(vni, pid = child.id(), "the DHCP server started");
                tokio::select! {
                    _ = &mut stop => {
                        terminate(&mut child).await;
                        return;
                    }
                    status = child.wait() => {
                        pid.store(0, Ordering::Relaxed);
                        restarts.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(vni, ?status, "the DHCP server exited; starting it again");
                    }
                }
            }
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(100);
        }
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// SIGTERM, then SIGKILL after a second.
async fn terminate(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        // SAFETY: a signal to this agent's own child.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    if tokio::time::timeout(Duration::from_secs(1), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

async fn stop(mut server: Server) {
    if let Some(stop) = server.stop.take() {
        let _ = stop.send(());
    }
    let _ = (&mut server.task).await;
}

/// The networks of every dnsmasq running with a pid file in `dir` (`<dir>/<vni>/pid`): also
/// those whose namespace and directory an earlier life removed while it started them.
fn running_servers(dir: &Path) -> Vec<u32> {
    let prefix = format!("--pid-file={}/", dir.display());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| {
            let cmdline = std::fs::read(e.ok()?.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline);
            let rest = cmdline
                .split('\0')
                .find_map(|arg| arg.strip_prefix(&prefix))?;
            rest.strip_suffix("/pid")?.parse().ok()
        })
        .collect()
}

/// Stops any dnsmasq left running for this network: by a crashed agent, or by one whose data
/// directory is gone (only the namespace tells). Every dnsmasq whose network namespace is this
/// one, and every dnsmasq of this server's command line (`--pid-file=<pid_file>`) wherever it
/// is: one a killed agent was starting while another life removed the namespace runs on in
/// a namespace no path names any more.
async fn kill_left_behind(namespace: &Path, pid_file: &Path) {
    let wanted = namespace_inode(namespace);
    let ours = format!("--pid-file={}\0", pid_file.display());
    let pids: Vec<i32> = std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                .filter(|pid| {
                    let proc = PathBuf::from(format!("/proc/{pid}"));
                    let dnsmasq = std::fs::read_to_string(proc.join("comm"))
                        .is_ok_and(|c| c.trim() == "dnsmasq");
                    let here = wanted.is_some() && namespace_inode(&proc.join("ns/net")) == wanted;
                    let named = || {
                        std::fs::read(proc.join("cmdline"))
                            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&ours))
                    };
                    dnsmasq && (here || named())
                })
                .collect()
        })
        .unwrap_or_default();
    for pid in pids {
        // SAFETY: signals to a process checked above to be dnsmasq in this network's namespace.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let proc = PathBuf::from(format!("/proc/{pid}"));
        let mut gone = false;
        for _ in 0..20 {
            if !proc.exists() {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !gone {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        tracing::info!(pid, "stopped a DHCP server left by an earlier run");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service<'a>(addresses: &'a [NetworkAddress]) -> Service<'a> {
        Service {
            vni: 4096,
            project: "p",
            network: "net",
            domain: "net.p.flotilla.internal".into(),
            subnet: Subnet::new("10.0.0.0/24".parse().unwrap(), None).unwrap(),
            prefix6: None,
            mtu: 1450,
            nameservers: vec!["10.0.0.2".into()],
            addresses,
        }
    }

    fn address(ip: &str, vm: &str, mac: &str) -> NetworkAddress {
        NetworkAddress {
            address: ip.into(),
            vm: vm.into(),
            uid: format!("uid-{vm}"),
            mac_address: mac.into(),
        }
    }

    #[test]
    fn files_carry_reservations_names_and_options() {
        let addresses = [
            address("10.0.0.3", "web", "02:46:4c:00:00:01"),
            address("10.0.0.4", "db", "02:46:4c:00:00:02"),
        ];
        let s = service(&addresses);
        assert_eq!(
            hosts_file(&s),
            "02:46:4c:00:00:01,10.0.0.3,web\n02:46:4c:00:00:02,10.0.0.4,db\n"
        );
        assert_eq!(
            names_file(&s),
            "10.0.0.3 web.net.p.flotilla.internal web\n10.0.0.4 db.net.p.flotilla.internal db\n"
        );
        assert_eq!(
            options_file(&s),
            "option:router,10.0.0.1\noption:dns-server,10.0.0.2\noption:mtu,1450\n\
             option:classless-static-route,169.254.169.254/32,10.0.0.2,0.0.0.0/0,10.0.0.1\n\
             option:domain-search,net.p.flotilla.internal\n"
        );
        let args = arguments(&s, Path::new("/d"));
        assert!(args.contains(&"--dhcp-range=10.0.0.0,static,255.255.255.0,1h".to_string()));
        assert!(args.contains(&"--interface=fdn-4096".to_string()));
    }

    #[test]
    fn a_value_that_could_break_a_line_never_reaches_the_files() {
        let addresses = [address(
            "10.0.0.3",
            "web\n10.0.0.9 evil",
            "02:46:4c:00:00:01",
        )];
        let s = service(&addresses);
        assert_eq!(hosts_file(&s), "");
        assert_eq!(names_file(&s), "");
    }

    #[test]
    fn lease_lines_are_read() {
        let text = "1796113233 02:46:4C:00:00:01 10.0.0.3 web *\nbroken\n";
        assert_eq!(
            parse_leases(text),
            vec![("02:46:4c:00:00:01".to_string(), "10.0.0.3".parse().unwrap())]
        );
    }
}
