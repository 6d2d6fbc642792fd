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

/// A client for the effective context; a login's ID token about to expire is refreshed first
/// (and the config file updated) unless a token was given on the command line.
pub async fn client(args: &ConnectionArgs) -> anyhow::Result<(Client, Context)> {
    let mut ctx = resolve(args)?;
    if args.token.is_none() {
        refresh_if_needed(args, &mut ctx).await?;
    }
    let client = Client::from_context(&ctx)?;
    Ok((client, ctx))
}

/// How long before its expiry an ID token is replaced.
const REFRESH_MARGIN: chrono::Duration = chrono::Duration::seconds(30);

/// Refreshes `ctx`'s ID token through its OIDC login when it expires within a few seconds.
pub async fn refresh_if_needed(args: &ConnectionArgs, ctx: &mut Context) -> anyhow::Result<()> {
    let Some(login) = ctx.oidc.clone() else {
        return Ok(());
    };
    let fresh = login
        .expiry
        .as_deref()
        .and_then(|e| chrono::DateTime::parse_from_rfc3339(e).ok())
        .is_some_and(|e| e.with_timezone(&chrono::Utc) - REFRESH_MARGIN > chrono::Utc::now());
    if fresh {
        return Ok(());
    }
    let Some(refresh_token) = login.refresh_token.as_deref() else {
        bail!(
            "the login of context {:?} has expired: run flotilla login",
            ctx.name
        );
    };
    let config = flotilla_oidc::LoginConfig::new(&login.issuer, &login.client_id);
    let tokens = flotilla_oidc::login::refresh(&config, refresh_token)
        .await
        .with_context(|| format!("refreshing the login of context {:?}", ctx.name))?;
    ctx.token = Some(tokens.id_token.clone());
    ctx.oidc = Some(flotilla_types::clientconfig::OidcLogin {
        refresh_token: tokens.refresh_token.clone(),
        expiry: Some(tokens.expires.to_rfc3339()),
        ..login
    });
    if let Some(path) = config_path(args) {
        save_context(&path, ctx.clone(), false)?;
    }
    Ok(())
}

/// Writes `ctx` into the config file at `path` (replacing a context of its name), as the
/// current context if `current`. The file is written whole and atomically, 0600; a symbolic
/// link (to a server's admin.yaml) is replaced by a file of its own rather than written through.
pub fn save_context(path: &Path, ctx: Context, current: bool) -> anyhow::Result<()> {
    let mut config: ClientConfig = match std::fs::read_to_string(path) {
        Ok(text) => serde_yaml::from_str(&text)
            .with_context(|| format!("{} is not a valid Flotilla client config", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => ClientConfig::default(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    if current {
        config.current_context = Some(ctx.name.clone());
    }
    match config.contexts.iter_mut().find(|c| c.name == ctx.name) {
        Some(c) => *c = ctx,
        None => config.contexts.push(ctx),
    }
    if path
        .symlink_metadata()
        .is_ok_and(|m| m.file_type().is_symlink())
    {
        std::fs::remove_file(path)
            .with_context(|| format!("cannot replace the link {}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot make {}", dir.display()))?;
    }
    let text = format!(
        "# Flotilla client configuration. It holds credentials: keep it secret.\n{}",
        serde_yaml::to_string(&config)?
    );
    flotilla_files::write_atomic(path, text.as_bytes(), 0o600)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Where `flotilla login` writes: the config file in use, else the user's.
pub fn login_config_path(args: &ConnectionArgs) -> anyhow::Result<PathBuf> {
    config_path(args)
        .or_else(user_config_path)
        .ok_or_else(|| anyhow::anyhow!("no config file: pass --config or set HOME"))
}
