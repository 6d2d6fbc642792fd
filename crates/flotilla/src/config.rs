//! Where the CLI finds its server and credentials: flags, then `FLOTILLA_CONFIG`, then
//! `~/.config/flotilla/config.yaml` (kubeconfig-style contexts).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::Args;
use flotilla_client::Client;
use flotilla_types::clientconfig::{ClientConfig, Context};

#[derive(Args, Clone, Debug, Default)]
pub struct ConnectionArgs {
    /// API server URL; repeat (or separate with commas) to list replicas.
    #[arg(long, global = true, value_delimiter = ',')]
    pub server: Vec<String>,
    /// Bearer token (default: from the config file).
    #[arg(long, global = true, env = "FLOTILLA_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM file of the CA that signed the server certificate.
    #[arg(long, global = true)]
    pub certificate_authority: Option<PathBuf>,
    /// Client config file (default: $FLOTILLA_CONFIG, then ~/.config/flotilla/config.yaml).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Context in the config file (default: its currentContext).
    #[arg(long, global = true)]
    pub context: Option<String>,
}

fn config_path(args: &ConnectionArgs) -> Option<PathBuf> {
    if let Some(p) = &args.config {
        return Some(p.clone());
    }
    if let Some(p) = std::env::var_os("FLOTILLA_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let p = user_config_path()?;
    p.exists().then_some(p)
}

/// `$XDG_CONFIG_HOME/flotilla/config.yaml`, else `~/.config/flotilla/config.yaml`.
fn user_config_path() -> Option<PathBuf> {
    let home = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(home.join("flotilla/config.yaml"))
}

/// Points the user's CLI config at `admin_config` (a symbolic link, so that a renewed admin
/// config is followed) unless they have one; says what it did, for the start-up message.
pub fn link_user_config(admin_config: &Path) -> String {
    let Some(path) = user_config_path() else {
        return format!(
            "Client configuration: export FLOTILLA_CONFIG={}",
            admin_config.display()
        );
    };
    if path.symlink_metadata().is_ok() {
        let same = std::fs::canonicalize(&path).ok() == std::fs::canonicalize(admin_config).ok();
        return if same {
            format!("Client configuration: {} (this server)", path.display())
        } else {
            format!(
                "Client configuration: {} is kept as it is; for this server, export FLOTILLA_CONFIG={}",
                path.display(),
                admin_config.display()
            )
        };
    }
    let linked = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::os::unix::fs::symlink(admin_config, &path));
    match linked {
        Ok(()) => format!(
            "Client configuration: {} -> {} (the flotilla CLI uses it)",
            path.display(),
            admin_config.display()
        ),
        Err(e) => format!(
            "Client configuration: could not link {} ({e}); export FLOTILLA_CONFIG={}",
            path.display(),
            admin_config.display()
        ),
    }
}

/// The effective context: the config file's, overridden by flags.
pub fn resolve(args: &ConnectionArgs) -> anyhow::Result<Context> {
    let mut ctx = match config_path(args) {
        Some(path) => {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read the client config {}", path.display()))?;
            let config: ClientConfig = serde_yaml::from_str(&text).with_context(|| {
                format!("{} is not a valid Flotilla client config", path.display())
            })?;
            match config.context(args.context.as_deref()) {
                Some(c) => c.clone(),
                None if args.context.is_some() => {
                    bail!(
                        "{} has no context {:?}",
                        path.display(),
                        args.context.as_deref().unwrap_or_default()
                    )
                }
                None => bail!(
                    "{} has several contexts and no currentContext; pick one with --context",
                    path.display()
                ),
            }
        }
        None => Context::default(),
    };
    if !args.server.is_empty() {
        ctx.server = None;
        ctx.servers = args.server.clone();
    }
    if let Some(t) = &args.token {
        ctx.token = Some(t.clone());
    }
    if let Some(ca) = &args.certificate_authority {
        ctx.certificate_authority_data = Some(
            std::fs::read_to_string(ca)
                .with_context(|| format!("cannot read the CA file {}", ca.display()))?,
        );
    }
    if ctx.urls().is_empty() {
        bail!(
            "no server configured: pass --server and --token, set FLOTILLA_CONFIG to a config file \
             (the server writes one to <data-dir>/admin.yaml), or copy it to ~/.config/flotilla/config.yaml"
        );
    }
    Ok(ctx)
}

pub fn client(args: &ConnectionArgs) -> anyhow::Result<(Client, Context)> {
    let ctx = resolve(args)?;
    let client = Client::from_context(&ctx)?;
    Ok((client, ctx))
}
