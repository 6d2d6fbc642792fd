//! The agent's main loop: node status, heartbeat, and one actor per VM bound to this node.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flotilla_client::{Client, ListParams};
use flotilla_types::registry::lookup;
use flotilla_types::VirtualMachine;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};

use crate::disks::Disks;
use crate::domain::VirtType;
use crate::error::AgentError;
use crate::libvirt::Libvirt;
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
            shutdown_timeout: Duration::from_secs(60),
            listen: "127.0.0.1:0".parse().expect("a valid address"),
            advertise: None,
            labels: Default::default(),
            capacity: None,
            cpu_overcommit: 4.0,
            memory_overcommit: 1.0,
        }
    }
}

struct Actor {
    desired: watch::Sender<Option<Arc<VirtualMachine>>>,
    kick: Arc<Notify>,
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
    let (client, ca_pem) = crate::identity::load_or_join(
        &config.data_dir,
        &config.servers,
        config.join_token.as_deref(),
        &config.node_name,
    )
    .await?;
    let client = Arc::new(client);
    let logs = crate::logserver::start(
        config.listen,
        config.advertise.as_deref(),
        &ca_pem,
        config.data_dir.clone(),
    )
    .await?;
    let virt_type = if config.libvirt_uri.starts_with("test:") {
        VirtType::Test
    } else {
        config.virt_type
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        libvirt: libvirt.clone(),
        disks: Disks::new(&config.data_dir, config.disk_concurrency),
        node: config.node_name.clone(),
        virt_type,
        data_dir: config.data_dir.clone(),
        shutdown_timeout: config.shutdown_timeout,
        defined: Default::default(),
    });
    if !config.labels.is_empty() {
        let patch = json!({"metadata": {"labels": config.labels}});
        client
            .patch(
                lookup("node").expect("registered"),
                None,
                &config.node_name,
                &patch,
                false,
            )
            .await?;
    }
    let endpoint = (logs.endpoint.clone(), logs.cert_sha256.clone());
    report_node(&ctx, &config, &endpoint, &Default::default()).await?;
    tracing::info!(node = %config.node_name, uri = %config.libvirt_uri, "agent started");
    let heartbeat = tokio::spawn(heartbeat(
        client.clone(),
        config.node_name.clone(),
        config.heartbeat,
    ));
    let mut actors: HashMap<String, Actor> = HashMap::new();
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
                    _ = tokio::time::sleep(Duration::from_secs(2)) => continue 'relist,
                    _ = stop.changed() => break 'relist,
                }
            }
        };
        let mut seen = std::collections::HashSet::new();
        for item in list["items"].as_array().cloned().unwrap_or_default() {
            seen.insert(key(&item));
            deliver(&ctx, &mut actors, item);
        }
        // VMs that vanished while we were not watching.
        for (k, a) in actors.iter() {
            if !seen.contains(k) {
                let _ = a.desired.send(None);
            }
        }
        actors.retain(|_, a| !a.desired.is_closed());
        cleanup_orphans(&ctx, &actors).await;
        let mut rv = list["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let mut events = match client.watch(vms, None, &params, Some(&rv)).await {
            Ok(s) => Box::pin(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch VMs; relisting");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue 'relist;
            }
        };
        loop {
            tokio::select! {
                                _ = stop.changed() => break 'relist,
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
                    actors.retain(|_, a| !a.desired.is_closed());
                    cleanup_orphans(&ctx, &actors).await;
                                        if let Err(e) = report_node(&ctx, &config, &endpoint, &adopted_domains(&actors)).await {
                        tracing::warn!(error = %e, "cannot update node status");
                    }
                }
                ev = events.next() => match ev {
                    Some(Ok(ev)) => match ev.type_.as_str() {
                        "ADDED" | "MODIFIED" => {
                            rv = ev.object["metadata"]["resourceVersion"].as_str().unwrap_or(&rv).to_string();
                            deliver(&ctx, &mut actors, ev.object);
                        }
                        "DELETED" => {
                            if let Some(a) = actors.get(&key(&ev.object)) {
                                let _ = a.desired.send(None);
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
                    None => continue 'relist,
                }
            }
        }
    }
    heartbeat.abort();
    Ok(())
}

fn key(object: &Value) -> String {
    format!(
        "{}/{}",
        object["metadata"]["namespace"].as_str().unwrap_or_default(),
        object["metadata"]["name"].as_str().unwrap_or_default()
    )
}

/// Hands the latest version of a VM to its actor, starting one if needed.
fn deliver(ctx: &Arc<Context>, actors: &mut HashMap<String, Actor>, object: Value) {
    let vm: VirtualMachine = match serde_json::from_value(object.clone()) {
        Ok(vm) => vm,
        Err(e) => {
            tracing::warn!(vm = %key(&object), error = %e, "cannot read a VM");
            return;
        }
    };
    let k = key(&object);
    if let Some(a) = actors.get(&k) {
        if !a.desired.is_closed() {
            let _ = a.desired.send(Some(Arc::new(vm)));
            return;
        }
    }
    let (tx, rx) = watch::channel(Some(Arc::new(vm)));
    let kick = Arc::new(Notify::new());
    tokio::spawn(actor(ctx.clone(), rx, kick.clone()));
    actors.insert(k, Actor { desired: tx, kick });
}

/// One VM's actor: reconciles the latest desired state whenever it changes, on resync, and after
/// failures with exponential backoff.
async fn actor(
    ctx: Arc<Context>,
    mut desired: watch::Receiver<Option<Arc<VirtualMachine>>>,
    kick: Arc<Notify>,
) {
    let mut backoff = Duration::from_millis(500);
    let mut last_uid: Option<String> = None;
    loop {
        let current = desired.borrow_and_update().clone();
        let Some(vm) = current else {
            // The object is gone (e.g. its finalizer was removed by hand): leave nothing behind.
            if let Some(uid) = last_uid {
                if let Err(e) = vm::remove_everything(&ctx, &uid).await {
                    tracing::warn!(uid, error = %e, "cleanup after deletion failed; the orphan sweep will retry");
                }
            }
            return;
        };
        last_uid = vm.metadata.uid.clone();
        let retry_in = match vm::reconcile(&ctx, &vm).await {
            Ok(Outcome::Gone) => return,
            Ok(Outcome::Done) => {
                backoff = Duration::from_millis(500);
                None
            }
            Err(e) => {
                tracing::warn!(vm = %vm.metadata.name, error = %e, "reconcile failed; will retry");
                vm::report_error(&ctx, &vm, &e).await;
                let wait = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(60));
                Some(wait)
            }
        };
        tokio::select! {
            changed = desired.changed() => if changed.is_err() { return },
            _ = kick.notified() => {}
            _ = async { match retry_in { Some(d) => tokio::time::sleep(d).await, None => std::future::pending().await } } => {}
        }
    }
}

/// Domains Flotilla created whose VM no longer exists here are removed with their files.
async fn cleanup_orphans(ctx: &Context, actors: &HashMap<String, Actor>) {
    let known: std::collections::HashSet<String> = actors
        .values()
        .filter_map(|a| {
            a.desired
                .borrow()
                .as_ref()
                .and_then(|vm| vm.metadata.uid.clone())
        })
        .collect();
    let Ok(domains) = ctx.libvirt.list().await else {
        return;
    };
    for d in domains {
        if let Some(uid) = d.flotilla_uid {
            if !known.contains(&uid) {
                tracing::info!(domain = %d.name, "removing a domain whose VM is gone");
                if let Err(e) = vm::remove_everything(ctx, &uid).await {
                    tracing::warn!(domain = %d.name, error = %e, "cannot remove an orphaned domain");
                }
            }
        }
    }
    // Files of VMs without a domain (a crash between creating files and defining).
    if let Ok(mut dir) = tokio::fs::read_dir(ctx.data_dir.join("vms")).await {
        while let Ok(Some(entry)) = dir.next_entry().await {
            let uid = entry.file_name().to_string_lossy().into_owned();
            if !known.contains(&uid) {
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

/// Capacity, versions and unmanaged domains into the Node's status.
/// Domains that VMs adopted: no longer "unmanaged".
fn adopted_domains(actors: &HashMap<String, Actor>) -> std::collections::HashSet<String> {
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

async fn report_node(
    ctx: &Context,
    config: &AgentConfig,
    endpoint: &(String, String),
    adopted: &std::collections::HashSet<String>,
) -> Result<(), AgentError> {
    let mut host = ctx.libvirt.host_info().await?;
    if let Some((cpus, memory)) = config.capacity {
        (host.cpus, host.memory_bytes) = (cpus, memory);
    }
    tokio::fs::create_dir_all(&config.data_dir)
        .await
        .map_err(crate::error::io(&config.data_dir))?;
    let disk = disk_bytes(&config.data_dir).unwrap_or(0);

    let domains = ctx.libvirt.list().await?;
    let unmanaged: Vec<Value> = domains
        .iter()
        .filter(|d| d.flotilla_uid.is_none() && !adopted.contains(&d.uuid))
        .map(|d| {
            json!({"name": d.name, "uuid": d.uuid, "cpus": d.cpus,
                   "memory": flotilla_types::Quantity::from_bytes(d.memory_kib as u128 * 1024),
                   "running": d.state == crate::libvirt::DomainState::Running})
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
    let status = json!({"status": {
                "capacity": resources, "allocatable": allocatable,
        "nodeInfo": {"hostname": host.hostname, "agentVersion": env!("CARGO_PKG_VERSION"), "libvirtVersion": host.libvirt_version,
                     "qemuVersion": host.hypervisor_version, "virtType": if ctx.virt_type == VirtType::Kvm { "kvm" } else { "qemu" },
                     "agentEndpoint": endpoint.0, "agentCertSha256": endpoint.1},
        "unmanagedDomains": unmanaged,
    }});
    ctx.client
        .patch(
            lookup("node").unwrap(),
            None,
            &config.node_name,
            &status,
            true,
        )
        .await?;
    Ok(())
}

async fn heartbeat(client: Arc<Client>, node: String, every: Duration) {
    let leases = lookup("lease").expect("registered");
    let duration = (every.as_secs() * 3).max(10);
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let renew = json!({"spec": {"holderIdentity": node, "leaseDurationSeconds": duration, "renewTime": chrono::Utc::now()}});
        let result = match client.patch(leases, None, &node, &renew, false).await {
            Err(e) if e.code() == Some(404) => {
                let mut lease = renew.clone();
                lease["metadata"] = json!({"name": node});
                client.create(leases, None, &lease).await.map(|_| ())
            }
            other => other.map(|_| ()),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "heartbeat failed");
        }
    }
}
