//! The server's certificates: a CA generated on first start (10 years) and a server certificate
//! it signs (1 year, renewed on start when it expires within 90 days or its names change).
//! Files live in `<data-dir>/pki/`; private keys are mode 0600.

use std::fs;
use std::path::{Path, PathBuf};

use chrono::{Datelike, Duration, Utc};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path} is not a valid PEM key or certificate")]
    Pem { path: PathBuf },
}

/// What the server needs to serve TLS and what clients need to trust it.
pub struct Pki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// A client certificate (issued anew on every start, never written to disk) with which the
    /// server authenticates to node agents, e.g. to fetch VM logs.
    pub client_cert_pem: String,
    pub client_key_pem: String,
}

#[derive(serde::Serialize, serde::Deserialize, PartialEq)]
struct ServerCertInfo {
    names: Vec<String>,
    not_after: chrono::DateTime<Utc>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), PkiError> {
    flotilla_files::write_atomic(
        path,
        contents.as_bytes(),
        if private { 0o600 } else { 0o644 },
    )
    .map_err(io(path))
}

fn ca_params() -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Flotilla CA");
    dn.push(DnType::OrganizationName, "Flotilla");
    params.distinguished_name = dn;
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = Utc::now();
    params.not_before = rcgen::date_time_ymd(now.year() - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(now.year() + 10, now.month() as u8, 1);
    Ok(params)
}

/// Loads the CA and server certificate from `dir`, creating or renewing what is missing.
/// `names` are the DNS names and IP addresses the server certificate must cover.
pub fn load_or_create(dir: &Path, names: &[String]) -> Result<Pki, PkiError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let (ca_crt, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
    if !ca_crt.exists() || !ca_key.exists() {
        let key = KeyPair::generate()?;
        let cert = ca_params()?.self_signed(&key)?;
        write_file(&ca_key, &key.serialize_pem(), true)?;
        write_file(&ca_crt, &cert.pem(), false)?;
        tracing::info!(path = %ca_crt.display(), "generated a new certificate authority");
    }
    let ca_pem = fs::read_to_string(&ca_crt).map_err(io(&ca_crt))?;
    let ca_key_pem = fs::read_to_string(&ca_key).map_err(io(&ca_key))?;
    let ca_keypair = KeyPair::from_pem(&ca_key_pem).map_err(|_| PkiError::Pem {
        path: ca_key.clone(),
    })?;

    let (crt, key, info_path) = (
        dir.join("server.crt"),
        dir.join("server.key"),
        dir.join("server.json"),
    );
    let mut wanted: Vec<String> = names.to_vec();
    wanted.sort();
    wanted.dedup();
    let current: Option<ServerCertInfo> = fs::read(&info_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let fresh = current
        .as_ref()
        .is_some_and(|c| c.names == wanted && c.not_after > Utc::now() + Duration::days(90));
    if !fresh || !crt.exists() || !key.exists() {
        // The CA certificate object is rebuilt from its key and name: same subject and key, so
        // what it signs chains to the ca.crt clients already trust.
        let issuer = ca_params()?.self_signed(&ca_keypair)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "flotilla-server");
        for n in &wanted {
            params
                .subject_alt_names
                .push(match n.parse::<std::net::IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName(n.clone().try_into()?),
                });
        }
        let not_after = Utc::now() + Duration::days(365);
        let now = Utc::now() - Duration::days(1);
        params.not_before = rcgen::date_time_ymd(now.year(), now.month() as u8, now.day() as u8);
        params.not_after = rcgen::date_time_ymd(
            not_after.year(),
            not_after.month() as u8,
            not_after.day() as u8,
        );
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate()?;
        let cert = params.signed_by(&server_key, &issuer, &ca_keypair)?;
        write_file(&key, &server_key.serialize_pem(), true)?;
        write_file(&crt, &cert.pem(), false)?;
        let info = ServerCertInfo {
            names: wanted.clone(),
            not_after,
        };
        write_file(
            &info_path,
            &serde_json::to_string_pretty(&info).expect("serialises"),
            false,
        )?;
        tracing::info!(names = ?wanted, "issued a server certificate");
    }
    let issuer = ca_params()?.self_signed(&ca_keypair)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "flotilla-apiserver");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let client_key = KeyPair::generate()?;
    let client_cert = params.signed_by(&client_key, &issuer, &ca_keypair)?;
    Ok(Pki {
        ca_pem,
        cert_pem: fs::read_to_string(&crt).map_err(io(&crt))?,
        key_pem: fs::read_to_string(&key).map_err(io(&key))?,
        client_cert_pem: client_cert.pem(),
        client_key_pem: client_key.serialize_pem(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_once_then_reuses_and_reissues_when_names_change() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let first = load_or_create(dir.path(), &names).unwrap();
        let again = load_or_create(dir.path(), &names).unwrap();
        assert_eq!(first.ca_pem, again.ca_pem);
        assert_eq!(
            first.cert_pem, again.cert_pem,
            "a fresh certificate is reused"
        );
        let more = vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "flotilla.example".to_string(),
        ];
        let third = load_or_create(dir.path(), &more).unwrap();
        assert_eq!(first.ca_pem, third.ca_pem, "the CA never changes");
        assert_ne!(
            first.cert_pem, third.cert_pem,
            "new names need a new certificate"
        );
        let mode = std::fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }
}
