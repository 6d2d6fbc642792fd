//! Identity on the command line: `flotilla login` (a person, through the server's OIDC
//! issuer), `flotilla auth` (kubectl's credential plugin; "may I?"), and `flotilla token`
//! (service-account tokens for automation).

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};
use flotilla_client::Client;
use flotilla_types::clientconfig::{Context, OidcLogin};
use reqwest::Method;
use serde_json::{json, Value};

use crate::config::{self, ConnectionArgs};

#[derive(Args)]
pub struct LoginArgs {
    /// Use the device flow (a code to enter on another device) instead of a browser.
    #[arg(long)]
    pub device: bool,
    /// Only print the URL to open; do not start a browser.
    #[arg(long)]
    pub no_browser: bool,
    /// The issuer (default: the one the server names at /flotilla/v1/login).
    #[arg(long, requires = "client_id")]
    pub issuer: Option<String>,
    /// The client ID at the issuer (default: the server's).
    #[arg(long, requires = "issuer")]
    pub client_id: Option<String>,
    /// Scopes to ask for (space-separated).
    #[arg(long, default_value = "openid email groups offline_access")]
    pub scopes: String,
    /// Name of the context to write (default: <user>@<server host>).
    #[arg(long)]
    pub context_name: Option<String>,
}

/// Logs a person in and writes a context that uses (and silently refreshes) their token.
pub async fn login(conn: &ConnectionArgs, args: LoginArgs) -> anyhow::Result<()> {
    let mut base = config::resolve(conn)?;
    base.token = None;
    let (issuer, client_id) = match (&args.issuer, &args.client_id) {
        (Some(i), Some(c)) => (i.clone(), c.clone()),
        _ => {
            let anonymous = Client::from_context(&base)?;
            let answer = anonymous
                .request_json(Method::GET, "/flotilla/v1/login", &[], None)
                .await
                .context("asking the server where to sign in")?;
            (
                answer["issuer"].as_str().unwrap_or_default().to_string(),
                answer["clientID"].as_str().unwrap_or_default().to_string(),
            )
        }
    };
    let mut login = flotilla_oidc::LoginConfig::new(&issuer, &client_id);
    login.scopes = args.scopes.split_whitespace().map(str::to_string).collect();
    let tokens = if args.device {
        flotilla_oidc::login::device(&login, |d| {
            eprintln!(
                "To sign in, open {} and enter the code {}",
                d.verification_uri, d.user_code
            );
            if let Some(complete) = &d.verification_uri_complete {
                eprintln!("(or open {complete})");
            }
        })
        .await?
    } else {
        let open_browser = !args.no_browser
            && (std::env::var_os("DISPLAY").is_some()
                || std::env::var_os("WAYLAND_DISPLAY").is_some());
        flotilla_oidc::login::authorization_code(&login, |url| {
            eprintln!("To sign in, open this URL in a browser:\n{url}");
            if open_browser {
                let _ = std::process::Command::new("xdg-open")
                    .arg(url)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn();
            }
        })
        .await?
    };
    let claims = flotilla_oidc::login::unverified_claims(&tokens.id_token).unwrap_or_default();
    let user = claims["email"]
        .as_str()
        .or(claims["sub"].as_str())
        .unwrap_or("user")
        .to_string();
    let host = base
        .urls()
        .first()
        .and_then(|u| url::Url::parse(u).ok())
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_else(|| "flotilla".into());
    let ctx = Context {
        name: args.context_name.unwrap_or(format!("{user}@{host}")),
        token: Some(tokens.id_token.clone()),
        oidc: Some(OidcLogin {
            issuer,
            client_id,
            refresh_token: tokens.refresh_token.clone(),
            expiry: Some(tokens.expires.to_rfc3339()),
        }),
        ..base
    };
    let path = config::login_config_path(conn)?;
    config::save_context(&path, ctx.clone(), true)?;
    let groups: Vec<&str> = claims["groups"]
        .as_array()
        .map(|g| g.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    eprintln!(
        "Logged in as {user}{} (context {:?} in {})",
        if groups.is_empty() {
            String::new()
        } else {
            format!(", groups {}", groups.join(", "))
        },
        ctx.name,
        path.display()
    );
    if tokens.refresh_token.is_none() {
        eprintln!(
            "The issuer gave no refresh token: run flotilla login again when the token expires."
        );
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum AuthCommand {
    /// Print the context's token as a kubectl ExecCredential (refreshing it first): use
    /// `flotilla auth exec-credential` as kubectl's `exec` credential plugin.
    ExecCredential,
    /// Whether you may do something: `flotilla auth can-i create virtualmachines -p web`.
    CanI {
        verb: String,
        /// A resource (plural), optionally with /subresource: virtualmachines/console.
        resource: String,
        /// An object's name.
        name: Option<String>,
        /// The project (default: the context's).
        #[arg(short, long)]
        project: Option<String>,
    },
}

pub async fn auth(conn: &ConnectionArgs, cmd: AuthCommand) -> anyhow::Result<()> {
    match cmd {
        AuthCommand::ExecCredential => {
            let (_, ctx) = config::client(conn).await?;
            let token = ctx
                .token
                .clone()
                .ok_or_else(|| anyhow::anyhow!("context {:?} has no token", ctx.name))?;
            let mut status = json!({"token": token});
            if let Some(e) = ctx.oidc.as_ref().and_then(|o| o.expiry.clone()) {
                status["expirationTimestamp"] = json!(e);
            }
            let credential = json!({"apiVersion": "client.authentication.k8s.io/v1",
                                    "kind": "ExecCredential", "status": status});
            println!("{credential}");
            Ok(())
        }
        AuthCommand::CanI {
            verb,
            resource,
            name,
            project,
        } => {
            let (client, ctx) = config::client(conn).await?;
            let (resource, sub) = resource.split_once('/').unwrap_or((&resource, ""));
            let kind = flotilla_types::registry::lookup(resource);
            let plural = kind.map_or(resource, |k| k.plural);
            let group = kind.map_or("flotilla.dev", |k| {
                k.api_version.rsplit_once('/').map_or("", |(g, _)| g)
            });
            let namespaced = kind.is_none_or(|k| k.namespaced);
            let namespace = match namespaced {
                true => project.or(ctx.project).unwrap_or_else(|| "default".into()),
                false => String::new(),
            };
            let review = json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                "spec": {"resourceAttributes": {"namespace": namespace, "verb": verb, "group": group,
                         "resource": plural, "subresource": sub, "name": name.unwrap_or_default()}}});
            let answer = client
                .request_json(
                    Method::POST,
                    "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                    &[],
                    Some(("application/json", serde_json::to_vec(&review)?)),
                )
                .await?;
            if answer["status"]["allowed"] == true {
                println!("yes");
                Ok(())
            } else {
                println!("no");
                bail!(
                    "{}",
                    answer["status"]["reason"].as_str().unwrap_or("not allowed")
                )
            }
        }
    }
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Make a token for a service account; it is printed once and cannot be shown again.
    Create {
        #[arg(long)]
        service_account: String,
        /// How long it works: e.g. 12h, 30d (from 10m to 366d).
        #[arg(long, default_value = "30d", value_parser = parse_ttl)]
        ttl: u64,
        #[arg(short, long)]
        project: Option<String>,
    },
    /// List a service account's tokens (ids and lifetimes; never the tokens).
    List {
        #[arg(long)]
        service_account: String,
        #[arg(short, long)]
        project: Option<String>,
    },
    /// Revoke one token of a service account by its id.
    Revoke {
        #[arg(long)]
        service_account: String,
        id: String,
        #[arg(short, long)]
        project: Option<String>,
    },
}

/// `30d`, `12h`, `90m`, `600s`, or seconds.
fn parse_ttl(s: &str) -> Result<u64, String> {
    if let Some(days) = s.strip_suffix('d') {
        let d: u64 = days
            .parse()
            .map_err(|_| format!("{s:?} is not a duration such as 12h or 30d"))?;
        return Ok(d * 86400);
    }
    crate::server_cmd::parse_duration(s).map(|d| d.as_secs())
}

pub async fn token(conn: &ConnectionArgs, cmd: TokenCommand) -> anyhow::Result<()> {
    let (client, ctx) = config::client(conn).await?;
    let project = |p: Option<String>| {
        p.or(ctx.project.clone())
            .unwrap_or_else(|| "default".into())
    };
    let account = |p: &str, sa: &str| format!("/api/v1/namespaces/{p}/serviceaccounts/{sa}");
    match cmd {
        TokenCommand::Create {
            service_account,
            ttl,
            project: p,
        } => {
            let p = project(p);
            let body = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                              "spec": {"expirationSeconds": ttl}});
            let answer = client
                .request_json(
                    Method::POST,
                    &format!("{}/token", account(&p, &service_account)),
                    &[],
                    Some(("application/json", serde_json::to_vec(&body)?)),
                )
                .await?;
            println!("{}", answer["status"]["token"].as_str().unwrap_or_default());
            eprintln!(
                "Token {} of service account {p}/{service_account}, valid until {}. It is shown only now.",
                answer["metadata"]["annotations"]["flotilla.dev/token-id"]
                    .as_str()
                    .unwrap_or_default(),
                answer["status"]["expirationTimestamp"]
                    .as_str()
                    .unwrap_or_default()
            );
        }
        TokenCommand::List {
            service_account,
            project: p,
        } => {
            let sa = client
                .request_json(
                    Method::GET,
                    &account(&project(p), &service_account),
                    &[],
                    None,
                )
                .await?;
            println!("{:<20} {:<22} EXPIRES", "ID", "CREATED");
            for t in sa["status"]["tokens"].as_array().into_iter().flatten() {
                println!(
                    "{:<20} {:<22} {}",
                    t["id"].as_str().unwrap_or_default(),
                    t["creationTimestamp"].as_str().unwrap_or_default(),
                    t["expirationTimestamp"].as_str().unwrap_or_default()
                );
            }
        }
        TokenCommand::Revoke {
            service_account,
            id,
            project: p,
        } => {
            client
                .request_json(
                    Method::DELETE,
                    &format!("{}/token", account(&project(p), &service_account)),
                    &[("id", id.clone())],
                    None,
                )
                .await?;
            eprintln!("Token {id} revoked.");
        }
    }
    Ok(())
}
