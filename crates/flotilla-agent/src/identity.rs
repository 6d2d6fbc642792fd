//! The agent's identity: join once with a join token, then keep the node credentials in
//! `<data-dir>/agent.yaml` (mode 0600) and reuse them on every restart.

use std::path::Path;

use flotilla_client::Client;
use flotilla_types::clientconfig::{ClientConfig, Context};
use sha2::{Digest, Sha256};

use crate::error::{io, AgentError};

/// A client with this node's credentials: stored ones if present, else obtained by joining.
/// Also returns the CA that the agent trusts (from the join), for its own TLS endpoint.
/// `host_uuid` is libvirt's host UUID, sent with the join (the server refuses a second node
/// with the same one).
pub async fn load_or_join(
    data_dir: &Path,
    servers: &[String],
    join_token: Option<&str>,
    node: &str,
    host_uuid: Option<&str>,
) -> Result<(Client, String), AgentError> {
    let path = data_dir.join("agent.yaml");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let config: ClientConfig = serde_yaml::from_str(&text)
            .map_err(|e| AgentError::Config(format!("{} is damaged: {e}", path.display())))?;
        let mut ctx = config
            .context(None)
            .cloned()
            .ok_or_else(|| AgentError::Config(format!("{} has no context", path.display())))?;
        if ctx.name != format!("node-{node}") {
            return Err(AgentError::Config(format!(
                "{} holds credentials for {}, not node {node}; remove it to join again",
                path.display(),
                ctx.name
            )));
        }
        if !servers.is_empty() {
            ctx.server = None;
            ctx.servers = servers.to_vec();
        }
        let ca = ctx.certificate_authority_data.clone().unwrap_or_default();
        return Ok((Client::from_context(&ctx)?, ca));
    }
    let token = join_token.ok_or_else(|| {
        AgentError::Config(
            "this node has not joined yet: pass --join-token (from `flotilla node token create`)"
                .into(),
        )
    })?;
    let (bearer, ca_hash) = flotilla_types::join_token::split(token).ok_or_else(|| {
        AgentError::Config("the join token is malformed: it should end in ::sha256:<hash>".into())
    })?;
    let ca = fetch_verified_ca(servers, ca_hash).await?;
    let bootstrap = Client::new(servers.to_vec(), Some(&ca), Some(bearer.to_string()))?;
    let body = serde_json::to_vec(&serde_json::json!({"nodeName": node, "hostUuid": host_uuid}))
        .expect("serialises");
    let resp = bootstrap
        .request_json(
            reqwest::Method::POST,
            "/flotilla/v1/join",
            &[],
            Some(("application/json", body)),
        )
        .await?;
    let node_token = resp["token"]
        .as_str()
        .ok_or_else(|| AgentError::Config("the server's join answer has no token".into()))?;
    let ctx = Context {
        name: format!("node-{node}"),
        server: None,
        servers: servers.to_vec(),
        certificate_authority_data: Some(ca),
        token: Some(node_token.to_string()),
        project: None,
        oidc: None,
    };
    let config = ClientConfig {
        current_context: Some(ctx.name.clone()),
        contexts: vec![ctx.clone()],
    };
    std::fs::create_dir_all(data_dir).map_err(io(data_dir))?;
    let yaml = serde_yaml::to_string(&config).expect("serialises");
    flotilla_files::write_atomic(&path, yaml.as_bytes(), 0o600).map_err(io(&path))?;
    tracing::info!(node, "joined the cluster; credentials stored");
    Ok((
        Client::from_context(&ctx)?,
        ctx.certificate_authority_data.clone().unwrap_or_default(),
    ))
}

/// Fetches /cacerts without trusting the connection, and accepts it only if it matches the hash
/// carried by the join token.
async fn fetch_verified_ca(servers: &[String], want: &str) -> Result<String, AgentError> {
    let insecure = reqwest::Client::builder()
        .use_rustls_tls()
        .danger_accept_invalid_certs(true)
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .expect("an HTTP client");
    let mut last = None;
    for s in servers {
        match insecure
            .get(format!("{}/cacerts", s.trim_end_matches('/')))
            .send()
            .await
        {
            Ok(resp) => {
                let pem = resp.text().await.unwrap_or_default();
                if hex::encode(Sha256::digest(pem.as_bytes())) == want {
                    return Ok(pem);
                }
                return Err(AgentError::Config(format!(
                    "the CA served by {s} does not match the join token: wrong server, or someone in between"
                )));
            }
            Err(e) => {
                last = Some(flotilla_client::ClientError::Transport {
                    url: s.clone(),
                    message: format!("cannot fetch the CA: {e}"),
                })
            }
        }
    }
    // Unreachable servers are a transport error: the agent waits for them (a server
    // restarting while a node joins), as it does for every other call.
    Err(match last {
        Some(e) => AgentError::Api(e),
        None => AgentError::Config("no server given: pass --server".into()),
    })
}

/// A DNS-1123 label from a host name (its first component).
pub fn node_name_from_hostname(host: &str) -> String {
    flotilla_types::validation::to_dns_label(host.split('.').next().unwrap_or(host), "node")
}

/// The cluster's identity, from the server; recorded in `<data-dir>/cluster-id` on first start
/// and checked on every later one, so that a data directory never serves two clusters.
pub async fn cluster_id(client: &Client, data_dir: &Path) -> Result<String, AgentError> {
    let version = client
        .request_json(reqwest::Method::GET, "/version", &[], None)
        .await?;
    let id = version["clusterID"]
        .as_str()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| AgentError::Config("the server did not say which cluster it is".into()))?
        .to_string();
    let path = data_dir.join("cluster-id");
    match std::fs::read_to_string(&path) {
        Ok(recorded) if recorded.trim() == id => Ok(id),
        Ok(recorded) => Err(AgentError::Config(format!(
            "{} belongs to cluster {}, but the server is cluster {id}; give this agent another --data-dir (or remove the old one) to join this cluster",
            data_dir.display(),
            recorded.trim()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            flotilla_files::write_atomic(&path, id.as_bytes(), 0o644).map_err(io(&path))?;
            Ok(id)
        }
        Err(e) => Err(AgentError::Io { path, source: e }),
    }
}
