//! `flotilla agent` (a node agent) and `flotilla up` (server, controllers and a local agent in
//! one process: the all-in-one).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use flotilla_agent::domain::VirtType;
use flotilla_agent::AgentConfig;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum VirtTypeArg {
    /// Hardware virtualisation (/dev/kvm).
    Kvm,
    /// Software emulation (TCG): slower, works without /dev/kvm or under nested virtualisation.
    Qemu,
}

impl From<VirtTypeArg> for VirtType {
    fn from(v: VirtTypeArg) -> Self {
        match v {
            VirtTypeArg::Kvm => VirtType::Kvm,
            VirtTypeArg::Qemu => VirtType::Qemu,
        }
    }
}

#[derive(Args, Clone)]
pub struct NodeArgs {
    /// This node's name (default: the host name).
    #[arg(long)]
    pub node_name: Option<String>,
    #[arg(long, default_value = "qemu:///system")]
    pub libvirt_uri: String,
    /// kvm or qemu. Default: kvm when /dev/kvm exists, else qemu.
    #[arg(long, value_enum, env = "FLOTILLA_VIRT_TYPE")]
    pub virt_type: Option<VirtTypeArg>,
    /// Concurrent disk-heavy operations (image downloads, conversions, disk creation).
    #[arg(long, default_value_t = 2)]
    pub disk_concurrency: usize,
    /// vCPUs the scheduler may place per host CPU (allocatable = capacity x ratio).
    #[arg(long, default_value_t = 4.0)]
    pub cpu_overcommit: f64,
    /// Memory overcommit ratio (1.0: none).
    #[arg(long, default_value_t = 1.0)]
    pub memory_overcommit: f64,
    /// A label for this node, KEY=VALUE (repeatable), e.g. topology.flotilla.dev/zone=a.
    #[arg(long = "node-label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// How long a guest asked to shut down (ACPI) gets before it is powered off (e.g. 30s, 2m).
    #[arg(long, default_value = "60s", value_parser = crate::server_cmd::parse_duration)]
    pub shutdown_timeout: Duration,
    /// This node's end of the overlay networks' VXLAN tunnels (default: the address of the
    /// default route's interface).
    #[arg(long)]
    pub tunnel_address: Option<std::net::Ipv4Addr>,
    /// Where VMs migrating to this node arrive: QEMU's migration stream connects to this
    /// address (default: the tunnel address).
    #[arg(long)]
    pub migration_address: Option<std::net::IpAddr>,
    /// The libvirt URI other nodes' libvirt daemons migrate VMs to (default:
    /// qemu+tls://<migration address>/system, libvirt's own TLS and certificates).
    #[arg(long)]
    pub migration_uri: Option<String>,
    /// Take no migrations: the node publishes no migration address and no libvirt host UUID,
    /// so no VM migrates to it (drains and moves pick other nodes), and it may share its
    /// libvirtd with another node (join otherwise refuses a host UUID a node has already).
    #[arg(long)]
    pub no_migrations: bool,
    /// Where the agent serves its VMs' serial logs to the API server (HTTPS, only the server's
    /// client certificate is let in). Loopback by default: on a host other than the server's,
    /// give an address the server reaches, e.g. 10.0.0.5:0.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub log_listen: std::net::SocketAddr,
    /// The host name or address the API server should use for the log endpoint (default: the
    /// address it listens on).
    #[arg(long)]
    pub log_advertise: Option<String>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} must be KEY=VALUE"))?;
    if !flotilla_types::validation::is_qualified_name(k)
        || !flotilla_types::validation::is_label_value(v)
    {
        return Err(format!(
            "{s:?} is not a valid label: keys are [prefix/]name, values at most 63 characters"
        ));
    }
    Ok((k.to_string(), v.to_string()))
}

#[derive(Args)]
pub struct AgentArgs {
    /// API server URL; repeat or separate with commas for replicas.
    #[arg(long, required = true, value_delimiter = ',')]
    pub server: Vec<String>,
    /// Join token from `flotilla node token create` (needed only on first start).
    #[arg(long, env = "FLOTILLA_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// Where credentials, images and VM disks live (default: /var/lib/flotilla/agent as root).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[command(flatten)]
    pub node: NodeArgs,
    #[command(flatten)]
    pub simulate: SimulateArgs,
    /// Run without the fencing watchdog (a process beside the agent that kills the VMs with
    /// `evacuation: Restart` when the agent hangs or dies and stops renewing its lease). The
    /// agent still fences itself while it runs.
    #[arg(long)]
    pub no_watchdog: bool,
}

/// `flotilla agent-watchdog` (started by the agent; not for people).
#[derive(Args)]
pub struct WatchdogArgs {
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Fence when the last acknowledged lease renewal is older than this (milliseconds).
    #[arg(long)]
    pub limit_ms: u64,
}

pub fn watchdog(args: WatchdogArgs) -> ! {
    flotilla_agent::fence::watchdog(
        &args.data_dir,
        std::time::Duration::from_millis(args.limit_ms),
    )
}

/// A simulated fleet (like Kubernetes' hollow nodes): N copies of the real agent in this process,
/// each on its own libvirt test-driver hypervisor (`test:///<data-dir>/<node>/hypervisor.xml`, an
/// independent in-memory hypervisor with the configured CPUs and memory; `test:///default` would
/// not do: libvirt shares that one between all connections of a process). Only the hypervisor
/// is simulated.
#[derive(Args)]
pub struct SimulateArgs {
    /// Run this many simulated nodes instead of one real one.
    #[arg(long, default_value_t = 0)]
    pub simulate: usize,
    /// Name prefix of simulated nodes (`<prefix>-0000`, ...).
    #[arg(long, default_value = "sim")]
    pub simulate_prefix: String,
    /// CPUs each simulated node reports.
    #[arg(long, default_value_t = 32)]
    pub simulate_cpus: u32,
    /// Memory each simulated node reports (a quantity such as 128Gi).
    #[arg(long, default_value = "128Gi")]
    pub simulate_memory: String,
    /// Spread simulated nodes over this many zones (label topology.flotilla.dev/zone=zone-N).
    #[arg(long, default_value_t = 0)]
    pub simulate_zones: usize,
}

#[derive(Args)]
pub struct UpArgs {
    /// Where everything lives (default: /var/lib/flotilla as root).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long, default_value_t = flotilla_server::DEFAULT_LISTEN)]
    pub listen: std::net::SocketAddr,
    #[command(flatten)]
    pub node: NodeArgs,
    #[command(flatten)]
    pub oidc: crate::server_cmd::OidcArgs,
    #[command(flatten)]
    pub audit: crate::server_cmd::AuditArgs,
    /// Serve the web UI from this directory instead of the one built in.
    #[arg(long)]
    pub ui_dir: Option<PathBuf>,
}

pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "node".into())
}

fn agent_config(servers: Vec<String>, data_dir: PathBuf, node: &NodeArgs) -> AgentConfig {
    let name = node
        .node_name
        .clone()
        .unwrap_or_else(|| flotilla_agent::identity::node_name_from_hostname(&hostname()));
    let mut config = AgentConfig::new(servers, &name, data_dir);
    config.libvirt_uri = node.libvirt_uri.clone();
    config.virt_type = match node.virt_type {
        Some(v) => v.into(),
        None if std::path::Path::new("/dev/kvm").exists() => VirtType::Kvm,
        None => VirtType::Qemu,
    };
    config.disk_concurrency = node.disk_concurrency;
    config.labels = node.labels.iter().cloned().collect();
    config.cpu_overcommit = node.cpu_overcommit;
    config.memory_overcommit = node.memory_overcommit;
    config.shutdown_timeout = node.shutdown_timeout;
    config.tunnel_address = node.tunnel_address;
    config.migration_address = node.migration_address;
    config.migration_uri = node.migration_uri.clone();
    config.migrations = !node.no_migrations;
    config.listen = node.log_listen;
    config.advertise = node.log_advertise.clone();
    config
}

async fn until_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

pub async fn agent(args: AgentArgs) -> anyhow::Result<()> {
    let data_dir = args
        .data_dir
        .unwrap_or_else(|| crate::default_data_dir().join("agent"));
    if args.simulate.simulate > 0 {
        return simulate(args.server, args.join_token, data_dir, &args.simulate).await;
    }
    let mut config = agent_config(args.server, data_dir, &args.node);
    config.join_token = args.join_token;
    if !args.no_watchdog {
        config.watchdog = Some(std::env::current_exe()?);
    }
    let (stop, rx) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(flotilla_agent::run(config, rx));
    tokio::select! {
        r = run => return r.context("the agent stopped")?.map_err(Into::into),
        _ = until_signal() => {}
    }
    let _ = stop.send(true);
    Ok(())
}

pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    let data_dir = args.data_dir.unwrap_or_else(crate::default_data_dir);
    let mut config = flotilla_server::ServerConfig::new(&data_dir);
    config.listen = args.listen;
    config.oidc = args.oidc.verifier_config()?;
    config.audit = args.audit.config(&data_dir);
    config.ui = crate::server_cmd::ui_source(&args.ui_dir);
    let server = flotilla_server::start(config).await?;
    flotilla_controllers::spawn_all(server.objects.clone(), Default::default());
    let admin = flotilla_client::Client::new(
        vec![server.url.clone()],
        Some(&server.ca_pem),
        Some(server.admin_token.clone()),
    )?;
    let agent_dir = data_dir.join("agent");
    let mut agent = agent_config(vec![server.url.clone()], agent_dir.clone(), &args.node);
    if !agent_dir.join("agent.yaml").exists() {
        let resp = admin
            .request_json(
                reqwest::Method::POST,
                "/flotilla/v1/join-tokens",
                &[],
                Some(("application/json", br#"{"ttlSeconds": 600}"#.to_vec())),
            )
            .await?;
        agent.join_token = resp["token"].as_str().map(str::to_string);
    }
    let node = agent.node_name.clone();
    let virt = agent.virt_type.as_str();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(flotilla_agent::run(agent, rx));
    eprintln!(
        "Flotilla is up: API at {}, node {node} ({virt}) on {}",
        server.url, args.node.libvirt_uri
    );
    let admin_config = std::path::absolute(&server.admin_config_path)?;
    eprintln!("{}", crate::config::link_user_config(&admin_config));
    eprintln!(
        "Next: flotilla get nodes; flotilla apply -f examples/tiny-vm.yaml; flotilla vm log tiny"
    );
    tokio::select! {
        r = run => {
            r.context("the agent stopped")?.context("the local agent failed")?;
        }
        _ = until_signal() => {}
    }
    let _ = stop.send(true);
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.shutdown().await;
    Ok(())
}

/// Writes the test driver's description of one simulated host; returns its connection URI.
fn simulated_hypervisor(dir: &std::path::Path, cpus: u32, memory: u128) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = std::path::absolute(dir.join("hypervisor.xml"))?;
    let xml = format!(
        "<node>\n  <cpu><mhz>2000</mhz><model>x86_64</model><active>{cpus}</active><max>{cpus}</max>\
         <nodes>1</nodes><sockets>1</sockets><cores>{cpus}</cores><threads>1</threads></cpu>\n  \
         <memory>{}</memory>\n</node>\n",
        memory / 1024
    );
    flotilla_files::write_atomic(&path, xml.as_bytes(), 0o644)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(format!("test://{}", path.display()))
}

async fn simulate(
    servers: Vec<String>,
    join_token: Option<String>,
    data_dir: PathBuf,
    sim: &SimulateArgs,
) -> anyhow::Result<()> {
    let memory = flotilla_types::Quantity::parse(&sim.simulate_memory)
        .map_err(|e| anyhow::anyhow!("--simulate-memory: {e}"))?;
    let (stop, rx) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..sim.simulate {
        let name = format!("{}-{i:04}", sim.simulate_prefix);
        let mut config = AgentConfig::new(servers.clone(), &name, data_dir.join(&name));
        config.join_token = join_token.clone();
        config.libvirt_uri =
            simulated_hypervisor(&config.data_dir, sim.simulate_cpus, memory.value())?;
        config.resync = Duration::from_secs(60);
        if sim.simulate_zones > 0 {
            config.labels.insert(
                "topology.flotilla.dev/zone".into(),
                format!("zone-{}", i % sim.simulate_zones),
            );
        }
        let rx = rx.clone();
        tasks.spawn(async move { (name, flotilla_agent::run(config, rx).await) });
    }
    eprintln!(
        "running {} simulated nodes ({} CPUs, {} each)",
        sim.simulate, sim.simulate_cpus, sim.simulate_memory
    );
    tokio::select! {
        Some(done) = tasks.join_next() => {
            let (name, result) = done.context("a simulated node panicked")?;
            result.with_context(|| format!("simulated node {name} failed"))?;
        }
        _ = until_signal() => {}
    }
    let _ = stop.send(true);
    Ok(())
}
