//! The agent's main loop: node status, heartbeat, and one actor per VM bound to this node.
//!
//! VMs reach the agent through a list and a watch of the VMs bound to its node. Any broken watch
//! ends in a full relist, and so does a timer ([`AgentConfig::relist`]), the last line of defence
//! against a missed event. The main loop owns the actors: it hands each the newest state of its
//! VM, and an actor that finishes reports back, so that a state delivered while it was finishing
//! is never dropped (a new actor takes it over).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use flotilla_client::{Client, ClientError, ListParams};
use flotilla_types::registry::lookup;
use flotilla_types::{EventType, ObjectReference, VirtualMachine};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, Notify};

use crate::disks::{CacheNotice, Disks};
use crate::domain::{Owner, VirtType};
use crate::error::AgentError;
use crate::libvirt::Libvirt;
use crate::recorder::Recorder;
use crate::vm::{self, Context, Outcome};

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub servers: Vec<String>,
    pub join_token: Option<String>,
    pub node_name: String,
    pub libvirt_uri: String,
    pub data_dir: PathBuf,
    pub virt_type: VirtType,
    /// Concurrent disk-heavy operations (downloads, conversions, disk creation).
    pub disk_concurrency: usize,
    pub heartbeat: Duration,
    /// Every VM is reconciled again at least this often.
    pub resync: Duration,
    /// The VMs bound to this node are listed afresh at least this often, watch or not.
    pub relist: Duration,
    pub shutdown_timeout: Duration,
    /// Where the agent serves VM logs to the API server (mutually authenticated HTTPS).
    pub listen: std::net::SocketAddr,
    /// The host name or address the API server should use to reach `listen`.
    pub advertise: Option<String>,
    /// Labels set on this node's Node at start (e.g. `topology.flotilla.dev/zone=a`), for
    /// node selectors and placement rules.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Reported capacity (CPUs, memory bytes) instead of the host's: for simulated nodes.
    pub capacity: Option<(u32, u64)>,
    /// Allocatable = capacity x ratio: vCPUs per host CPU (4.0, Nova's default) and memory (1.0).
    pub cpu_overcommit: f64,
    pub memory_overcommit: f64,
    /// This node's end of the overlay networks' tunnels; None: the address of the default
    /// route's interface (found only on real hypervisors, not the test driver).
    pub tunnel_address: Option<std::net::Ipv4Addr>,
    /// Where other nodes' libvirt daemons send VMs migrating here: QEMU's migration stream
    /// connects to this address, and libvirt to `migration_uri`. None: the tunnel address.
    pub migration_address: Option<std::net::IpAddr>,
    /// The libvirt URI other nodes' libvirt daemons migrate to; None:
    /// `qemu+tls://<migration address>/system` (libvirt's TLS, with its certificates).
    pub migration_uri: Option<String>,
    /// Whether VMs may migrate to this node. A node that takes none publishes no migration
    /// address and no libvirt host UUID, so it may share its libvirtd (and host UUID) with
    /// another node (e.g. two nodes on one development host).
    pub migrations: bool,
    /// The `flotilla` binary to run the fencing watchdog from (`agent-watchdog`); None: no
    /// watchdog (the agent still fences itself while it runs).
    pub watchdog: Option<PathBuf>,
    /// Whether the agent owns the node's security group rules (Flotilla's nftables tables in
    /// its network namespace). Only one agent per namespace may: tests that run several agents
    /// on one host's network turn it off for all but one.
    pub firewall: bool,
}

impl AgentConfig {
    pub fn new(servers: Vec<String>, node_name: &str, data_dir: impl Into<PathBuf>) -> Self {
        AgentConfig {
            servers,
            join_token: None,
            node_name: node_name.to_string(),
            libvirt_uri: "qemu:///system".into(),
            data_dir: data_dir.into(),
            virt_type: VirtType::Qemu,
            disk_concurrency: 2,
            heartbeat: Duration::from_secs(3),
            resync: Duration::from_secs(30),
            relist: Duration::from_secs(300),
            shutdown_timeout: Duration::from_secs(60),
            listen: "127.0.0.1:0".parse().expect("a valid address"),
            advertise: None,
            labels: Default::default(),
            capacity: None,
            cpu_overcommit: 4.0,
            memory_overcommit: 1.0,
            tunnel_address: None,
            migration_address: None,
            migration_uri: None,
            migrations: true,
            watchdog: None,
            firewall: true,
        }
    }
}

type Desired = Option<Arc<VirtualMachine>>;

struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

struct Actor {
    desired: watch::Sender<Desired>,
    kick: Arc<Notify>,
}

/// An actor that has finished, with the state it finished on.
struct Exit {
    key: String,
    last: Desired,
}

/// Runs until `stop` becomes true (or forever).
pub async fn run(config: AgentConfig, stop: watch::Receiver<bool>) -> Result<(), AgentError> {
    let libvirt = Libvirt::open(&config.libvirt_uri).await?;
    run_with(config, libvirt, stop).await
}

/// Like [`run`], on a connection the caller opened (tests look at the hypervisor through the
/// agent's own connection).
pub async fn run_with(
    config: AgentConfig,
    libvirt: Libvirt,
    mut stop: watch::Receiver<bool>,
) -> Result<(), AgentError> {
    let _lock = crate::datadir::prepare(&config.data_dir, &config.libvirt_uri)?;
    let disks = Disks::new(&config.data_dir, config.disk_concurrency);
    for leftover in disks.sweep_leftovers()? {
        tracing::info!(path = %leftover.display(), "removed what an interrupted write left behind");
    }
    // Simulated hosts (libvirt's test driver) all have the same host UUID; a node that takes
    // no migrations needs none.
    let host_uuid = match config.libvirt_uri.starts_with("test:") || !config.migrations {
        true => None,
        false => libvirt.host_uuid().await.unwrap_or(None),
    };
    let (client, ca_pem) = until_answered(&mut stop, "joining the cluster", || {
        crate::identity::load_or_join(
            &config.data_dir,
            &config.servers,
            config.join_token.as_deref(),
            &config.node_name,
            host_uuid.as_deref(),
        )
    })
    .await?;
    let client = Arc::new(client);
    let cluster_id = until_answered(&mut stop, "reading the cluster's identity", || {
        crate::identity::cluster_id(&client, &config.data_dir)
    })
    .await?;
    let lease = lease_duration(config.heartbeat);
    let fence = Arc::new(crate::fence::Fence::new(&config.data_dir, lease)?);
    if let Some(exe) = &config.watchdog {
        // Beside the agent, not under it: it fences the node when the agent hangs or dies.
        use std::os::unix::process::CommandExt;
        let spawned = std::process::Command::new(exe)
            .arg("agent-watchdog")
            .arg("--data-dir")
            .arg(&config.data_dir)
            .args(["--limit-ms", &fence.limit().as_millis().to_string()])
            .stdin(std::process::Stdio::null())
            .process_group(0)
            .spawn();
        match spawned {
            Ok(child) => tracing::info!(
                pid = child.id(),
                limit_ms = fence.limit().as_millis() as u64,
                "fencing watchdog started"
            ),
            Err(e) => {
                return Err(AgentError::Config(format!(
                    "cannot start the fencing watchdog {}: {e}",
                    exe.display()
                )))
            }
        }
    }
    let late = crate::export::Late::default();
    let logs = crate::logserver::start(
        config.listen,
        config.advertise.as_deref(),
        &ca_pem,
        config.data_dir.clone(),
        late.clone(),
    )
    .await?;
    let virt_type = if config.libvirt_uri.starts_with("test:") {
        VirtType::Test
    } else {
        config.virt_type
    };
    let recorder = Recorder::new(client.clone(), &config.node_name);
    let notices = recorder.clone();
    disks.on_notice(move |notice| {
        let recorder = notices.clone();
        let image = |project: &str, name: &str| ObjectReference {
            kind: "Image".into(),
            api_version: Some(flotilla_types::API_VERSION.into()),
            namespace: Some(project.to_string()),
            name: name.to_string(),
            ..Default::default()
        };
        let (regarding, type_, reason, message) = match notice {
            CacheNotice::Discarded {
                project,
                image: name,
                reason,
            } => (
                image(&project, &name),
                EventType::Warning,
                "ImageCacheCorrupt",
                format!("the cached copy was discarded and is fetched again: {reason}"),
            ),
            CacheNotice::Cached {
                project,
                image: name,
                bytes,
                took,
            } => (
                image(&project, &name),
                EventType::Normal,
                "ImageCached",
                format!(
                    "cached ({} MiB) in {:.1} s",
                    bytes >> 20,
                    took.as_secs_f64()
                ),
            ),
        };
        tokio::spawn(async move { recorder.record(&regarding, type_, reason, &message).await });
    });
    let overlays = crate::overlays::Overlays::start(config.tunnel_address, virt_type)
        .await
        .map(Arc::new);
    let (dhcp, mut leased) = match &overlays {
        Some(o) => {
            let (servers, leased) = crate::dhcp::DhcpServers::new(
                &config.data_dir,
                o.netlink().clone(),
                crate::dhcp::NAMESPACE_PREFIX,
            );
            (Some(servers), Some(leased))
        }
        None => (None, None),
    };
    let unused_overlays = Arc::new(tokio::sync::Notify::new());
    let firewall = (config.firewall && virt_type != VirtType::Test).then(|| {
        Arc::new(crate::firewall::Firewall::new(std::path::Path::new(
            "/proc/self/ns/net",
        )))
    });
    let metadata = dhcp.as_ref().map(|_| {
        Arc::new(crate::metadata::MetadataServers::new(Arc::new(
            crate::metadata::VmIndex::default(),
        )))
    });
    // A volume changed: the VMs it is attached to look again (it became available, or grew);
    // a VM snapshot changed: its VM looks again.
    let (volume_changed, mut attached_vms) = mpsc::unbounded_channel::<String>();
    disks.fetch_uploads_with(client.clone());
    let ctx = Arc::new(Context {
        metadata: metadata.clone(),
        firewall: firewall.clone(),
        overlays: overlays.clone(),
        dhcp: dhcp.clone(),
        unused_overlays: unused_overlays.clone(),
        client: client.clone(),
        libvirt: libvirt.clone(),
        disks,
        node: config.node_name.clone(),
        cluster_id,
        recorder,
        virt_type,
        data_dir: config.data_dir.clone(),
        shutdown_timeout: config.shutdown_timeout,
        defined: Default::default(),
        migrations: Default::default(),
        migrating: Default::default(),
        fence: fence.clone(),
        vm_snapshots: Arc::new(crate::vmsnapshots::NodeSnapshots::new(
            volume_changed.clone(),
        )),
        volumes: Arc::new(crate::attach::NodeVolumes::new(volume_changed.clone())),
    });
    let _ = late.set(ctx.clone());
    if !config.labels.is_empty() {
        let patch = json!({"metadata": {"labels": config.labels}});
        let node = lookup("node").expect("registered");
        until_answered(&mut stop, "labelling the node", || async {
            Ok(client
                .patch(node, None, &config.node_name, &patch, false)
                .await?)
        })
        .await?;
    }
    let endpoint = (logs.endpoint.clone(), logs.cert_sha256.clone());
    let none_adopted = HashSet::new();
    until_answered(&mut stop, "reporting the node", || {
        report_node(&ctx, &config, &endpoint, &none_adopted)
    })
    .await?;
    tracing::info!(node = %config.node_name, uri = %config.libvirt_uri, "agent started");
    let heartbeat = tokio::spawn(heartbeat(
        client.clone(),
        config.node_name.clone(),
        config.heartbeat,
        fence.clone(),
    ));
    // Fences the node when no renewal has been acknowledged for most of the lease.
    let fencer = {
        let (fence, libvirt) = (fence.clone(), libvirt.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                if fence.due() {
                    fence.fence(&libvirt).await;
                }
            }
        })
    };
    // Overlays no domain uses any more go (also those a crash left behind), every resync and
    // whenever a VM's domain was removed, and with them their DHCP servers.
    let collector = overlays.zip(dhcp.clone()).map(|(overlays, dhcp)| {
        let (libvirt, every, wake) = (libvirt.clone(), config.resync, unused_overlays.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = wake.notified() => {}
                }
                match overlays.collect(&libvirt).await {
                    Ok(removed) if !removed.is_empty() => {
                        tracing::info!(?removed, "overlay networks no VM here uses were removed")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot remove unused overlay networks"),
                }
                match overlays.present().await {
                    Ok(present) => {
                        if let Some(metadata) = &metadata {
                            metadata.remove_all_but(&present);
                        }
                        let removed = dhcp.remove_all_but(&present).await;
                        if !removed.is_empty() {
                            tracing::info!(
                                ?removed,
                                "DHCP servers of networks gone from this node were removed"
                            );
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot list overlay networks"),
                }
            }
        })
    });
    // Flood lists, DHCP servers and security group rules follow their networks and groups as
    // soon as they change.
    let follower = (ctx.overlays.is_some() || ctx.firewall.is_some())
        .then(|| tokio::spawn(crate::networks::follow_networks(ctx.clone())));
    let group_follower = ctx
        .firewall
        .is_some()
        .then(|| tokio::spawn(crate::networks::follow_security_groups(ctx.clone())));
    // The storage pools this node serves, and their space.
    let pools = tokio::spawn(crate::pools::run(ctx.clone(), config.resync));
    // The volumes placed on this node.
    let volumes = tokio::spawn(crate::volumes::run(ctx.clone(), config.resync));
    let vm_snapshots = tokio::spawn(crate::vmsnapshots::follow(ctx.clone()));
    // Migrations from and to this node.
    let migrations = tokio::spawn(crate::migrate::follow(ctx.clone(), volume_changed));
    // The routers placed on this node (with overlays: a router joins overlay networks).
    let routers = ctx.overlays.is_some().then(|| {
        tokio::spawn(crate::routers::run(
            ctx.clone(),
            config.resync.min(Duration::from_secs(5)),
        ))
    });
    let firewall_task = firewall.map(|firewall| {
        let (recorder, node, every) = (
            ctx.recorder.clone(),
            config.node_name.clone(),
            config.resync,
        );
        tokio::spawn(async move {
            firewall
                .run(every, |message| {
                    let (recorder, node) = (recorder.clone(), node.clone());
                    tokio::spawn(async move {
                        let regarding = ObjectReference {
                            kind: "Node".into(),
                            api_version: Some(flotilla_types::API_VERSION.into()),
                            name: node,
                            ..Default::default()
                        };
                        let message =
                            format!("the security group rules cannot be applied: {message}");
                        recorder
                            .record(&regarding, EventType::Warning, "FirewallFailed", &message)
                            .await
                    });
                })
                .await
        })
    });
    // The lease files say which guests took their address (their VMs report it).
    let lease_reader = dhcp.clone().map(|dhcp| {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                dhcp.read_leases().await;
            }
        })
    });
    // The agent's tasks end with it: at a stop, and when its future is dropped (a test's
    // stand-in for kill -9: nothing of the old agent may act beside the next one).
    let _tasks = AbortOnDrop(
        [
            Some(heartbeat),
            Some(fencer),
            collector,
            lease_reader,
            follower,
            group_follower,
            firewall_task,
            routers,
            Some(pools),
            Some(volumes),
            Some(vm_snapshots),
            Some(migrations),
        ]
        .into_iter()
        .flatten()
        .collect(),
    );
    let mut actors: HashMap<String, Actor> = HashMap::new();
    let (exits_tx, mut exits) = mpsc::unbounded_channel::<Exit>();
    // Domain lifecycle events (start, stop, crash) wake the VM's actor at once.
    let mut domain_events = libvirt.domain_events();
    let mut resync = tokio::time::interval(config.resync);
    resync.tick().await;
    let vms = lookup("vm").expect("registered");
    let params = ListParams {
        field_selector: Some(format!("spec.nodeName={}", config.node_name)),
        ..Default::default()
    };
    'relist: loop {
        let list = match client.list(vms, None, &params).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list VMs; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'relist,
                    _ = stop.changed() => break 'relist,
                }
            }
        };
        let mut seen = HashSet::new();
        for item in list["items"].as_array().cloned().unwrap_or_default() {
            seen.insert(key(&item));
            deliver(&ctx, &mut actors, &exits_tx, item);
        }
        // VMs that vanished while we were not watching.
        for (k, a) in actors.iter() {
            if !seen.contains(k) {
                a.desired.send_replace(None);
            }
        }
        ctx.fence.set_fenceable(fenceable(&actors));
        if let Some(firewall) = &ctx.firewall {
            // VMs coming here in a migration keep the rules their preparation set.
            let uids = list["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|vm| vm["metadata"]["uid"].as_str().map(str::to_string))
                .chain(ctx.migrations.incoming_vms())
                .collect();
            firewall.retain_vms(&uids);
            firewall.listed(crate::firewall::Listed::Vms);
        }
        if let Some(metadata) = &ctx.metadata {
            let uids = list["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|vm| vm["metadata"]["uid"].as_str().map(str::to_string))
                .collect();
            metadata.vms.retain(&uids);
        }
        cleanup_orphans(&ctx, &actors).await;
        let mut rv = list["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        tracing::debug!(rv, vms = seen.len(), "listed the VMs bound to this node");
        let mut events = match client.watch(vms, None, &params, Some(&rv)).await {
            Ok(s) => Box::pin(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch VMs; relisting");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue 'relist;
            }
        };
        let relist_at = tokio::time::sleep(config.relist);
        tokio::pin!(relist_at);
        loop {
            tokio::select! {
                _ = stop.changed() => break 'relist,
                _ = &mut relist_at => {
                    tracing::debug!("periodic relist");
                    continue 'relist;
                }
                Some(exit) = exits.recv() => finished(&ctx, &mut actors, &exits_tx, exit),
                _ = ctx.fence.lifted.notified() => {
                    for a in actors.values() {
                        a.kick.notify_one();
                    }
                }
                Some(uid) = attached_vms.recv() => {
                    for a in actors.values() {
                        if a.desired.borrow().as_ref().and_then(|vm| vm.metadata.uid.as_deref()) == Some(uid.as_str()) {
                            a.kick.notify_one();
                        }
                    }
                }
                Some(uid) = async { match leased.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } } => {
                    for a in actors.values() {
                        if a.desired.borrow().as_ref().and_then(|vm| vm.metadata.uid.as_deref()) == Some(uid.as_str()) {
                            a.kick.notify_one();
                        }
                    }
                }
                Some(uuid) = async { match domain_events.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } } => {
                    for a in actors.values() {
                        let desired = a.desired.borrow();
                        let vm = desired.as_ref();
                        let domain = vm.and_then(|vm| vm.spec.adopted_domain.as_deref().or(vm.metadata.uid.as_deref()));
                        if domain == Some(uuid.as_str()) {
                            a.kick.notify_one();
                        }
                    }
                }
                _ = resync.tick() => {
                    for a in actors.values() {
                        a.kick.notify_one();
                    }
                    cleanup_orphans(&ctx, &actors).await;
                    if let Err(e) = report_node(&ctx, &config, &endpoint, &adopted_domains(&actors)).await {
                        tracing::warn!(error = %e, "cannot update node status");
                    }
                }
                ev = events.next() => match ev {
                    Some(Ok(ev)) => match ev.type_.as_str() {
                        "ADDED" | "MODIFIED" => {
                            rv = ev.object["metadata"]["resourceVersion"].as_str().unwrap_or(&rv).to_string();
                            deliver(&ctx, &mut actors, &exits_tx, ev.object);
                            ctx.fence.set_fenceable(fenceable(&actors));
                        }
                        "DELETED" => {
                            if let Some(a) = actors.get(&key(&ev.object)) {
                                a.desired.send_replace(None);
                            }
                            if let (Some(firewall), Some(uid)) = (&ctx.firewall, ev.object["metadata"]["uid"].as_str()) {
                                firewall.remove_vm(uid);
                            }
                            if let (Some(metadata), Some(uid)) = (&ctx.metadata, ev.object["metadata"]["uid"].as_str()) {
                                metadata.vms.remove(uid);
                            }
                        }
                        "BOOKMARK" => rv = ev.object["metadata"]["resourceVersion"].as_str().unwrap_or(&rv).to_string(),
                        _ => {
                            tracing::info!(event = %ev.object, "watch ended with an error; relisting");
                            continue 'relist;
                        }
                    },
                    Some(Err(e)) => {
                        tracing::info!(error = %e, "watch broke; relisting");
                        continue 'relist;
                    }
                    None => {
                        tracing::debug!(rv, "watch ended; relisting");
                        continue 'relist;
                    }
                }
            }
        }
    }
    drop(_tasks);
    Ok(())
}

/// Runs `call` until the server answers it (transport errors and 5xx are retried with backoff,
/// logged now and then); other errors are returned.
async fn until_answered<T, F, Fut>(
    stop: &mut watch::Receiver<bool>,
    what: &str,
    mut call: F,
) -> Result<T, AgentError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, AgentError>>,
{
    let mut wait = Duration::from_millis(250);
    let mut attempts = 0u32;
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(AgentError::Api(e)) if retryable(&e) => {
                attempts += 1;
                if attempts == 1 || attempts.is_multiple_of(20) {
                    tracing::warn!(error = %e, attempts, "{what}: the API server does not answer yet; retrying");
                }
            }
            Err(e) => return Err(e),
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return Err(AgentError::Config("stopped while waiting for the API server".into())),
        }
        wait = (wait * 2).min(Duration::from_secs(3));
    }
}

fn retryable(e: &ClientError) -> bool {
    matches!(e, ClientError::Transport { .. }) || e.code().is_some_and(|c| c >= 500)
}

fn key(object: &Value) -> String {
    format!(
        "{}/{}",
        object["metadata"]["namespace"].as_str().unwrap_or_default(),
        object["metadata"]["name"].as_str().unwrap_or_default()
    )
}

/// Hands the latest version of a VM to its actor, starting one if needed.
fn deliver(
    ctx: &Arc<Context>,
    actors: &mut HashMap<String, Actor>,
    exits: &mpsc::UnboundedSender<Exit>,
    object: Value,
) {
    let vm: VirtualMachine = match serde_json::from_value(object.clone()) {
        Ok(vm) => vm,
        Err(e) => {
            tracing::warn!(vm = %key(&object), error = %e, "cannot read a VM");
            return;
        }
    };
    if let Some(firewall) = &ctx.firewall {
        firewall.set_vm(vm.clone());
    }
    if let Some(metadata) = &ctx.metadata {
        metadata.vms.set(Arc::new(vm.clone()));
    }
    let k = key(&object);
    match actors.get(&k) {
        // Stored even if the actor is just finishing: its exit report then starts a new one.
        Some(a) => {
            a.desired.send_replace(Some(Arc::new(vm)));
        }
        None => spawn_actor(ctx, actors, exits, k, Some(Arc::new(vm))),
    }
}

fn spawn_actor(
    ctx: &Arc<Context>,
    actors: &mut HashMap<String, Actor>,
    exits: &mpsc::UnboundedSender<Exit>,
    key: String,
    desired: Desired,
) {
    let (tx, rx) = watch::channel(desired);
    let kick = Arc::new(Notify::new());
    let (ctx2, kick2, exits2, key2) = (ctx.clone(), kick.clone(), exits.clone(), key.clone());
    tokio::spawn(async move {
        let last = actor(ctx2, rx, kick2).await;
        let _ = exits2.send(Exit { key: key2, last });
    });
    actors.insert(key, Actor { desired: tx, kick });
}

/// An actor finished. If its VM's newest state is not the one it finished on, a new actor
/// takes it over; otherwise the actor is forgotten.
fn finished(
    ctx: &Arc<Context>,
    actors: &mut HashMap<String, Actor>,
    exits: &mpsc::UnboundedSender<Exit>,
    exit: Exit,
) {
    let Some(a) = actors.get(&exit.key) else {
        return;
    };
    let newest = a.desired.borrow().clone();
    let same = match (&newest, &exit.last) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    };
    actors.remove(&exit.key);
    if !same && newest.is_some() {
        tracing::debug!(vm = %exit.key, "a newer state arrived as its actor finished; starting another");
        spawn_actor(ctx, actors, exits, exit.key, newest);
    }
}

/// How many failures in a row with the same error make a VM "stuck": its Warning event is
/// recorded then, once.
const STUCK_AFTER: u32 = 5;
/// A stuck VM's failure is logged at most this often.
const STUCK_LOG_EVERY: Duration = Duration::from_secs(600);

/// Consecutive failures of one VM's reconcile with the same error.
#[derive(Default)]
struct Failures {
    message: String,
    count: u32,
    logged: Option<tokio::time::Instant>,
}

impl Failures {
    /// Counts `message`; returns whether to log it now (the first, the one that makes the VM
    /// stuck, and then once per [`STUCK_LOG_EVERY`]).
    fn count(&mut self, message: &str) -> bool {
        if self.message != message {
            *self = Failures {
                message: message.to_string(),
                ..Default::default()
            };
        }
        self.count += 1;
        let due = match self.logged {
            None => true,
            Some(at) => self.count == STUCK_AFTER || at.elapsed() >= STUCK_LOG_EVERY,
        };
        if due {
            self.logged = Some(tokio::time::Instant::now());
        }
        due
    }
}

/// One VM's actor: reconciles the latest desired state whenever it changes, on resync, and after
/// failures with exponential backoff. Returns the state it finished on.
async fn actor(
    ctx: Arc<Context>,
    mut desired: watch::Receiver<Desired>,
    kick: Arc<Notify>,
) -> Desired {
    let mut backoff = Duration::from_millis(500);
    let mut last_uid: Option<String> = None;
    let mut failures = Failures::default();
    loop {
        let current = desired.borrow_and_update().clone();
        let Some(vm) = current else {
            // The object is gone (e.g. its finalizer was removed by hand): leave nothing behind.
            if let Some(uid) = last_uid {
                if let Err(e) = vm::remove_everything(&ctx, &uid).await {
                    tracing::warn!(uid, error = %e, "cleanup after deletion failed; the orphan sweep will retry");
                }
            }
            return None;
        };
        if last_uid.is_some() && last_uid != vm.metadata.uid {
            failures = Failures::default();
        }
        last_uid = vm.metadata.uid.clone();
        // A deletion that arrives while a reconcile waits (a guest taking its time to shut
        // down, a slow download), or a deletion made more urgent (a shorter grace period), does
        // not wait behind it: the reconcile is dropped, which is safe at any point (as a crash
        // is), and the newest state is taken up at once.
        // A clone of the receiver: looking at states here must not mark them seen for the
        // `changed()` below, or a state delivered during the reconcile would be skipped.
        let mut overtaker = desired.clone();
        let reconciled = tokio::select! {
            r = vm::reconcile(&ctx, &vm).instrument(request_span(&vm.metadata)) => Some(r),
            r = overtaker.wait_for(|newest| more_urgent(newest, &vm)) => {
                if r.is_err() {
                    return Some(vm);
                }
                None
            }
        };
        let Some(reconciled) = reconciled else {
            tracing::info!(vm = %vm.metadata.name, "a deletion overtook the work under way");
            continue;
        };
        let retry_in = match reconciled {
            Ok(Outcome::Gone) => return Some(vm),
            Ok(Outcome::Done) => {
                if failures.count > 0 {
                    tracing::info!(vm = %vm.metadata.name, failures = failures.count, "reconciled after failures");
                }
                failures = Failures::default();
                backoff = Duration::from_millis(500);
                None
            }
            Err(e) => {
                let message = e.to_string();
                if failures.count(&message) {
                    tracing::warn!(vm = %vm.metadata.name, error = %message, failures = failures.count, "reconcile failed; will retry");
                    if failures.count == 1 {
                        ctx.recorder
                            .record(&vm::reference(&vm), EventType::Warning, "Failed", &message)
                            .await;
                    }
                } else {
                    tracing::debug!(vm = %vm.metadata.name, error = %message, failures = failures.count, "reconcile failed again");
                }
                vm::report_error(&ctx, &vm, &e).await;
                if failures.count == STUCK_AFTER {
                    let note = format!(
                        "{message} (failed {STUCK_AFTER} times in a row; still retrying, at most every minute)"
                    );
                    ctx.recorder
                        .record(
                            &vm::reference(&vm),
                            EventType::Warning,
                            "ReconcileFailing",
                            &note,
                        )
                        .await;
                }
                let wait = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(60));
                Some(wait)
            }
        };
        tokio::select! {
            changed = desired.changed() => if changed.is_err() { return desired.borrow().clone() },
            _ = kick.notified() => {}
            _ = async { match retry_in { Some(d) => tokio::time::sleep(d).await, None => std::future::pending().await } } => {}
        }
    }
}

/// Whether `newest` asks for a deletion that should not wait for work on `current`: the VM is
/// gone, or being deleted when `current` was not, or with a shorter grace period. A VM that
/// disappears while `current` deletes it does not overtake: that is most often the deletion's
/// own finalizer removal coming back, and dropping the work then would lose its last steps (the
/// log line and the Deleted event).
fn more_urgent(newest: &Desired, current: &VirtualMachine) -> bool {
    let grace = |vm: &VirtualMachine| {
        vm.metadata
            .deletion_timestamp
            .map(|_| vm.metadata.deletion_grace_period_seconds.unwrap_or(0))
    };
    match newest {
        None => current.metadata.deletion_timestamp.is_none(),
        Some(newest) => match (grace(newest), grace(current)) {
            (Some(_), None) => true,
            (Some(new), Some(old)) => new < old,
            _ => false,
        },
    }
}

/// Whether a Flotilla domain was made by this agent: its cluster and node say so, or (domains
/// made before Flotilla recorded them) its files live in this agent's data directory.
fn is_ours(ctx: &Context, owner: &Owner) -> bool {
    match (&owner.cluster, &owner.node) {
        (Some(cluster), Some(node)) => *cluster == ctx.cluster_id && *node == ctx.node,
        _ => ctx.vm_dir(&owner.uid).is_dir(),
    }
}

/// Domains this agent created whose VM no longer exists here are removed with their files.
/// Domains of other clusters or nodes are never touched (they are reported as unmanaged).
async fn cleanup_orphans(ctx: &Context, actors: &HashMap<String, Actor>) {
    // Until the migrations to this node are known, a prepared VM looks like an orphan.
    if !ctx.migrations.listed() {
        return;
    }
    let known: HashSet<String> = actors
        .values()
        .filter_map(|a| {
            a.desired
                .borrow()
                .as_ref()
                .and_then(|vm| vm.metadata.uid.clone())
        })
        .chain(ctx.migrations.incoming_vms())
        .collect();
    let Ok(domains) = ctx.libvirt.list().await else {
        return;
    };
    let mut foreign = HashSet::new();
    for d in domains {
        let Some(owner) = d.owner else { continue };
        if known.contains(&owner.uid) {
            continue;
        }
        if !is_ours(ctx, &owner) {
            foreign.insert(owner.uid);
            continue;
        }
        tracing::info!(domain = %d.name, "removing a domain whose VM is gone");
        if let Err(e) = vm::remove_everything(ctx, &owner.uid).await {
            tracing::warn!(domain = %d.name, error = %e, "cannot remove an orphaned domain");
        }
    }
    // Files of VMs without a domain (a crash between creating files and defining).
    if let Ok(mut dir) = tokio::fs::read_dir(ctx.data_dir.join("vms")).await {
        while let Ok(Some(entry)) = dir.next_entry().await {
            let uid = entry.file_name().to_string_lossy().into_owned();
            if !known.contains(&uid) && !foreign.contains(&uid) {
                let _ = vm::remove_everything(ctx, &uid).await;
            }
        }
    }
}

fn disk_bytes(path: &std::path::Path) -> Option<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `s` a valid out-pointer for the call.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    Some(s.f_blocks as u64 * s.f_frsize as u64)
}

/// The domains fencing destroys: those of VMs that restart elsewhere when this node fails.
fn fenceable(actors: &HashMap<String, Actor>) -> Vec<String> {
    actors
        .values()
        .filter_map(|a| {
            let vm = a.desired.borrow();
            let vm = vm.as_ref()?;
            (vm.spec.evacuation == flotilla_types::Evacuation::Restart
                && vm.spec.adopted_domain.is_none())
            .then(|| vm.metadata.uid.clone())
            .flatten()
        })
        .collect()
}

/// Domains that VMs adopted: no longer "unmanaged".
fn adopted_domains(actors: &HashMap<String, Actor>) -> HashSet<String> {
    actors
        .values()
        .filter_map(|a| {
            a.desired
                .borrow()
                .as_ref()
                .and_then(|vm| vm.spec.adopted_domain.clone())
        })
        .collect()
}

/// Capacity, versions and unmanaged domains into the Node's status.
async fn report_node(
    ctx: &Context,
    config: &AgentConfig,
    endpoint: &(String, String),
    adopted: &HashSet<String>,
) -> Result<(), AgentError> {
    let mut host = ctx.libvirt.host_info().await?;
    if let Some((cpus, memory)) = config.capacity {
        (host.cpus, host.memory_bytes) = (cpus, memory);
    }
    let disk = disk_bytes(&config.data_dir).unwrap_or(0);

    let domains = ctx.libvirt.list().await?;
    let unmanaged: Vec<Value> = domains
        .iter()
        .filter(|d| !adopted.contains(&d.uuid))
        .filter(|d| d.owner.as_ref().is_none_or(|o| !is_ours(ctx, o)))
        .map(|d| {
            let mut entry = json!({"name": d.name, "uuid": d.uuid, "cpus": d.cpus,
                   "memory": flotilla_types::Quantity::from_bytes(d.memory_kib as u128 * 1024),
                   "running": d.state == crate::libvirt::DomainState::Running});
            if let Some(cluster) = d.owner.as_ref().and_then(|o| o.cluster.clone()) {
                entry["flotillaCluster"] = json!(cluster);
            }
            entry
        })
        .collect();
    let resources = json!({
        "cpus": host.cpus,
        "memory": flotilla_types::Quantity::from_bytes(host.memory_bytes as u128),
        "disk": flotilla_types::Quantity::from_bytes(disk as u128),
    });
    let allocatable = json!({
        "cpus": (host.cpus as f64 * config.cpu_overcommit).floor() as u64,
        "memory": flotilla_types::Quantity::from_bytes((host.memory_bytes as f64 * config.memory_overcommit) as u128 / 1024 * 1024),
        "disk": flotilla_types::Quantity::from_bytes(disk as u128),
    });
    let mut addresses = serde_json::Map::new();
    let tunnel = ctx
        .overlays
        .as_ref()
        .map(|o| o.tunnel_address())
        .or(config.tunnel_address);
    if let Some(tunnel) = tunnel {
        addresses.insert("tunnel".into(), json!(tunnel.to_string()));
    }
    let migration = config
        .migration_address
        .or(tunnel.map(std::net::IpAddr::V4))
        .filter(|_| ctx.virt_type != VirtType::Test && config.migrations);
    let migration_uri = migration.map(|address| {
        addresses.insert("migration".into(), json!(address.to_string()));
        config
            .migration_uri
            .clone()
            .unwrap_or_else(|| match address {
                std::net::IpAddr::V6(a) => format!("qemu+tls://[{a}]/system"),
                std::net::IpAddr::V4(a) => format!("qemu+tls://{a}/system"),
            })
    });
    let host_uuid = match config.migrations {
        true => ctx.libvirt.host_uuid().await.unwrap_or(None),
        false => None,
    };
    let status = json!({"status": {
        "capacity": resources, "allocatable": allocatable, "addresses": addresses,
        "nodeInfo": {"hostname": host.hostname, "agentVersion": env!("CARGO_PKG_VERSION"), "libvirtVersion": host.libvirt_version,
                     "qemuVersion": host.hypervisor_version, "virtType": if ctx.virt_type == VirtType::Kvm { "kvm" } else { "qemu" },
                     "agentEndpoint": endpoint.0, "agentCertSha256": endpoint.1,
                     "migrationUri": migration_uri, "hostUuid": host_uuid},
        "unmanagedDomains": unmanaged,
        "dhcpServerRestarts": ctx.dhcp.as_ref().map(|d| d.restarts()),
    }});
    ctx.client
        .patch(
            lookup("node").expect("registered"),
            None,
            &config.node_name,
            &status,
            true,
        )
        .await?;
    Ok(())
}

/// The node lease's duration (T) for a heartbeat every `every`: three renewals, at least 10 s.
pub fn lease_duration(every: Duration) -> Duration {
    (every * 3).max(Duration::from_secs(10))
}

async fn heartbeat(
    client: Arc<Client>,
    node: String,
    every: Duration,
    fence: Arc<crate::fence::Fence>,
) {
    let leases = lookup("lease").expect("registered");
    let duration = lease_duration(every).as_secs();
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let (sent, sent_nanos) = (std::time::Instant::now(), crate::fence::monotonic_nanos());
        let renew = json!({"spec": {"holderIdentity": node, "leaseDurationSeconds": duration, "renewTime": chrono::Utc::now()}});
        let result = match client.patch(leases, None, &node, &renew, false).await {
            Err(e) if e.code() == Some(404) => {
                let mut lease = renew.clone();
                lease["metadata"] = json!({"name": node});
                client.create(leases, None, &lease).await.map(|_| ())
            }
            other => other.map(|_| ()),
        };
        match result {
            Ok(()) => {
                if let Some(fenced) = fence.renewed(sent, sent_nanos) {
                    let message = format!(
                        "the node was fenced for {:.1} s: no lease renewal was acknowledged for {} s, so its VMs with evacuation: Restart were destroyed (the control plane restarts them elsewhere)",
                        fenced.as_secs_f64(),
                        fence.limit().as_secs()
                    );
                    let regarding = ObjectReference {
                        kind: "Node".into(),
                        api_version: Some(flotilla_types::API_VERSION.into()),
                        name: node.clone(),
                        ..Default::default()
                    };
                    crate::recorder::Recorder::new(client.clone(), &node)
                        .record(&regarding, EventType::Warning, "Fenced", &message)
                        .await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
    }
}

/// A span naming the request that last changed the object's spec (stamped by the API server),
/// so that the agent's log lines about it can be found from the server's audit log.
pub(crate) fn request_span(meta: &flotilla_types::meta::ObjectMeta) -> tracing::Span {
    match meta.annotations.get("flotilla.dev/request-id") {
        Some(id) => tracing::info_span!("request", id = %id),
        None => tracing::Span::none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_repeating_failure_is_logged_first_when_stuck_then_rarely() {
        let mut f = Failures::default();
        let logged: Vec<bool> = (0..8).map(|_| f.count("disk full")).collect();
        assert_eq!(
            logged,
            [true, false, false, false, true, false, false, false]
        );
        tokio::time::advance(STUCK_LOG_EVERY).await;
        assert!(f.count("disk full"), "again after the interval");
        assert!(!f.count("disk full"));
        assert!(f.count("another error"), "a new error is logged at once");
        assert_eq!(f.count, 1);
    }
}
