//! `flotilla server`: the API server and its controllers in one process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

#[derive(Args)]
pub struct ServerArgs {
    /// Where the store, certificates and admin.yaml live (default: /var/lib/flotilla as root).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Address to listen on. Loopback by default; use 0.0.0.0:7443 to serve other hosts.
    #[arg(long, default_value_t = flotilla_server::DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Extra DNS name or IP for the server certificate (repeatable).
    #[arg(long = "tls-san")]
    pub tls_sans: Vec<String>,
    /// Keep at least this much store history for watch resumption (e.g. 5m, 1h; 0 = never compact).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub compaction_interval: Duration,
    /// Delete Events last seen longer ago than this (e.g. 30m, 1h, 24h; 0 = keep them).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub event_ttl: Duration,
    /// Where the scheduler puts VMs: spread (least allocated node first) or pack (most allocated).
    #[arg(long, value_enum, default_value_t = Placement::Spread)]
    pub placement: Placement,
    /// The store: `sqlite` (a file in the data directory, one server) or
    /// `etcd://HOST:PORT[,HOST:PORT...]` (an etcd 3.4+ cluster shared by several servers).
    #[arg(long, default_value = "sqlite")]
    pub store: String,
    /// Client connections held at once; at the limit the longest-idle one is closed to make room
    /// (default: the open-file limit, raised to its maximum at start, less 128).
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// PEM CA of etcd's client certificates; makes the etcd connection TLS.
    #[arg(long)]
    pub etcd_ca: Option<PathBuf>,
    /// PEM client certificate for etcd (with --etcd-key), when etcd requires one.
    #[arg(long, requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    #[arg(long, requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    #[command(flatten)]
    pub oidc: OidcArgs,
    #[command(flatten)]
    pub audit: AuditArgs,
    /// Serve the web UI from this directory instead of the one built in (UI development:
    /// point it at ui/dist and rebuild the UI while the server runs).
    #[arg(long)]
    pub ui_dir: Option<PathBuf>,
}

/// The web UI's source for `--ui-dir`.
pub fn ui_source(dir: &Option<PathBuf>) -> flotilla_server::ui::UiSource {
    match dir {
        Some(d) => flotilla_server::ui::UiSource::Dir(d.clone()),
        None => flotilla_server::ui::UiSource::Embedded,
    }
}

/// The audit log: a JSON line per request that changed something or was refused.
#[derive(Args, Clone, Default)]
pub struct AuditArgs {
    /// The audit log file (default: <data-dir>/audit.log).
    #[arg(long)]
    pub audit_log: Option<PathBuf>,
    /// Write no audit log file.
    #[arg(long, conflicts_with = "audit_log")]
    pub no_audit_log: bool,
    /// Also print each audit line on stdout.
    #[arg(long)]
    pub audit_stdout: bool,
    /// Rotate the file when it reaches this many MiB.
    #[arg(long, default_value_t = 100)]
    pub audit_log_max_size: u64,
    /// Rotated files to keep.
    #[arg(long, default_value_t = 5)]
    pub audit_log_max_files: u32,
}

impl AuditArgs {
    pub fn config(
        &self,
        data_dir: &std::path::Path,
    ) -> Option<flotilla_server::audit::AuditConfig> {
        let path = match (self.no_audit_log, &self.audit_log) {
            (true, _) => None,
            (false, Some(p)) => Some(p.clone()),
            (false, None) => Some(data_dir.join("audit.log")),
        };
        if path.is_none() && !self.audit_stdout {
            return None;
        }
        Some(flotilla_server::audit::AuditConfig {
            path,
            stdout: self.audit_stdout,
            max_bytes: self.audit_log_max_size.max(1) * 1024 * 1024,
            max_files: self.audit_log_max_files,
        })
    }
}

/// People sign in through an OpenID Connect issuer (Keycloak, Dex, Authentik, Google...).
#[derive(Args, Clone, Default)]
pub struct OidcArgs {
    /// The issuer's URL (https; http only on loopback), as its tokens carry it in `iss`.
    #[arg(long, requires = "oidc_client_id")]
    pub oidc_issuer: Option<String>,
    /// This API's client ID at the issuer: tokens must be issued for it (`aud`).
    #[arg(long, requires = "oidc_issuer")]
    pub oidc_client_id: Option<String>,
    /// The claim that names the user in RBAC bindings.
    #[arg(long, default_value = "email")]
    pub oidc_username_claim: String,
    /// The claim that lists the user's groups.
    #[arg(long, default_value = "groups")]
    pub oidc_groups_claim: String,
    /// PEM CA for the issuer's certificate, when the system's CAs do not cover it.
    #[arg(long)]
    pub oidc_ca_file: Option<PathBuf>,
}

impl OidcArgs {
    pub fn verifier_config(&self) -> anyhow::Result<Option<flotilla_oidc::VerifierConfig>> {
        let (Some(issuer), Some(client_id)) = (&self.oidc_issuer, &self.oidc_client_id) else {
            return Ok(None);
        };
        let mut config = flotilla_oidc::VerifierConfig::new(issuer, client_id);
        config.username_claim = self.oidc_username_claim.clone();
        config.groups_claim = self.oidc_groups_claim.clone();
        if let Some(ca) = &self.oidc_ca_file {
            config.ca_pem = Some(
                std::fs::read_to_string(ca)
                    .map_err(|e| anyhow::anyhow!("--oidc-ca-file {}: {e}", ca.display()))?,
            );
        }
        flotilla_oidc::check_issuer_url(&config.issuer)?;
        Ok(Some(config))
    }
}

/// The etcd options for `--store etcd://a:2379,b:2379`, or None for SQLite.
pub fn etcd_options(args: &ServerArgs) -> anyhow::Result<Option<flotilla_store::EtcdOptions>> {
    use anyhow::Context as _;
    if args.store == "sqlite" {
        return Ok(None);
    }
    let Some(hosts) = args.store.strip_prefix("etcd://") else {
        anyhow::bail!(
            "--store {:?}: use sqlite or etcd://HOST:PORT[,HOST:PORT...]",
            args.store
        );
    };
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
    };
    let tls = match &args.etcd_ca {
        None => None,
        Some(ca) => Some(flotilla_store::EtcdTls {
            ca_pem: read(ca)?,
            client: match (&args.etcd_cert, &args.etcd_key) {
                (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
                _ => None,
            },
        }),
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoints = Vec::new();
    for host in hosts.split(',').map(str::trim) {
        let valid = host
            .rsplit_once(':')
            .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok());
        if !valid {
            anyhow::bail!("--store: {host:?} is not HOST:PORT (for example 10.0.0.1:2379)");
        }
        endpoints.push(format!("{scheme}://{host}"));
    }
    Ok(Some(flotilla_store::EtcdOptions { endpoints, tls }))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Placement {
    Spread,
    Pack,
}

/// `90s`, `5m`, `1h`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 30s, 5m or 1h"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{s:?} is not a duration such as 30s, 5m or 1h")),
    };
    Ok(Duration::from_secs(secs))
}

pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(crate::default_data_dir);
    let mut config = flotilla_server::ServerConfig::new(&data_dir);
    config.listen = args.listen;
    config.tls_names = args.tls_sans.clone();
    config.max_connections = args.max_connections;
    config.oidc = args.oidc.verifier_config()?;
    config.audit = args.audit.config(&data_dir);
    config.ui = ui_source(&args.ui_dir);
    if let Some(etcd) = etcd_options(&args)? {
        let endpoints = etcd.endpoints.join(",");
        let store = flotilla_store::EtcdStore::connect(etcd)
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach etcd at {endpoints}: {e}"))?;
        config.store = Some(std::sync::Arc::new(store));
    }
    let server = flotilla_server::start(config).await?;
    let placement = match args.placement {
        Placement::Spread => flotilla_controllers::placement::Strategy::Spread,
        Placement::Pack => flotilla_controllers::placement::Strategy::Pack,
    };
    let controllers = flotilla_controllers::ControllerConfig {
        compaction_interval: args.compaction_interval,
        placement,
        event_ttl: args.event_ttl,
        ..Default::default()
    };
    if args.store == "sqlite" {
        // One server, one set of controllers: nothing to elect.
        flotilla_controllers::spawn_all(server.objects.clone(), controllers);
    } else {
        let identity = format!("{}@{}", crate::agent_cmd::hostname(), server.url);
        tokio::spawn(flotilla_controllers::leader::run_elected(
            server.objects.clone(),
            controllers,
            identity,
            Duration::from_secs(3),
        ));
    }
    eprintln!("Flotilla API server listening on {}", server.url);
    eprintln!(
        "Web UI: {}/ui/ (sign in with the token in {})",
        server.url,
        server.admin_config_path.display()
    );
    eprintln!(
        "Client configuration (admin): {}",
        server.admin_config_path.display()
    );
    eprintln!(
        "  export FLOTILLA_CONFIG={}",
        server.admin_config_path.display()
    );
    let signal = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    signal.await;
    eprintln!("shutting down");
    server.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("5 minutes").is_err());
    }
}
