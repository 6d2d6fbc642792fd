//! A VM's consoles as WebSockets (`.../virtualmachines/NAME/console` and `/vnc`), opened with
//! the client's token and checked against the client's CA like every other request.

use std::sync::Arc;

use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::{path, Client, ClientError};

/// Which console: the serial console (bytes both ways) or VNC (RFB).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsoleKind {
    Serial,
    Vnc,
}

pub type ConsoleSocket = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

impl Client {
    /// Opens a console of VM `name`, trying each server URL in turn.
    pub async fn console(
        &self,
        namespace: &str,
        name: &str,
        kind: ConsoleKind,
    ) -> Result<ConsoleSocket, ClientError> {
        let vms = flotilla_types::registry::by_kind("VirtualMachine").expect("registered");
        let sub = match kind {
            ConsoleKind::Serial => "console",
            ConsoleKind::Vnc => "vnc",
        };
        let p = format!("{}/{sub}", path(vms, Some(namespace), Some(name), false));
        let tls = Arc::new(self.tls_config()?);
        let mut last_error = None;
        for base in &self.urls {
            let url = format!("{base}{p}")
                .replacen("https://", "wss://", 1)
                .replacen("http://", "ws://", 1);
            let mut request = url
                .clone()
                .into_client_request()
                .map_err(|e| ClientError::Config(format!("{url}: {e}")))?;
            if let Some(token) = &self.token {
                let value = HeaderValue::from_str(&format!("Bearer {token}"))
                    .map_err(|_| ClientError::Config("the token is not a valid header".into()))?;
                request.headers_mut().insert("authorization", value);
            }
            let connector = tokio_tungstenite::Connector::Rustls(tls.clone());
            match tokio_tungstenite::connect_async_tls_with_config(
                request,
                None,
                true,
                Some(connector),
            )
            .await
            {
                Ok((socket, _)) => return Ok(socket),
                Err(tokio_tungstenite::tungstenite::Error::Http(answer)) => {
                    let code = answer.status().as_u16();
                    let body = answer.into_body().unwrap_or_default();
                    return Err(crate::status_error(code, &body));
                }
                Err(e) => {
                    last_error = Some(ClientError::Transport {
                        url: base.clone(),
                        message: e.to_string(),
                    })
                }
            }
        }
        Err(last_error.unwrap_or_else(|| ClientError::Config("no server URL".into())))
    }

    fn tls_config(&self) -> Result<rustls::ClientConfig, ClientError> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_pem {
            Some(pem) => {
                for cert in rustls_pemfile::certs(&mut pem.as_bytes()) {
                    let cert = cert.map_err(|e| {
                        ClientError::Config(format!("the CA certificate is not valid PEM: {e}"))
                    })?;
                    roots.add(cert).map_err(|e| {
                        ClientError::Config(format!("the CA certificate is not usable: {e}"))
                    })?;
                }
            }
            None => {
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
            }
        }
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Config(e.to_string()))
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
    }
}
