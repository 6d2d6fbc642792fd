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
    /// Where the scheduler puts VMs: spread (least allocated node first) or pack (most allocated).
    #[arg(long, value_enum, default_value_t = Placement::Spread)]
    pub placement: Placement,
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
    let data_dir = args.data_dir.unwrap_or_else(crate::default_data_dir);
    let mut config = flotilla_server::ServerConfig::new(&data_dir);
    config.listen = args.listen;
    config.tls_names = args.tls_sans;
    let server = flotilla_server::start(config).await?;
    let placement = match args.placement {
        Placement::Spread => flotilla_controllers::placement::Strategy::Spread,
        Placement::Pack => flotilla_controllers::placement::Strategy::Pack,
    };
    let controllers = flotilla_controllers::ControllerConfig {
        compaction_interval: args.compaction_interval,
        placement,
        ..Default::default()
    };
    flotilla_controllers::spawn_all(server.objects.clone(), controllers);
    eprintln!("Flotilla API server listening on {}", server.url);
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
