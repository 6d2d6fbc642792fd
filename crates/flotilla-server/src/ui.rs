//! The web UI's files at `/ui/`: embedded at build time from `ui/dist` (see `build.rs`), or read
//! from a directory (`--ui-dir`, for UI development). A path that names no file is the SPA's
//! own route and gets `index.html`. The files are public, like any login page: the UI holds the
//! caller's token and every API request it makes is authenticated. `/` sends browsers here.

use std::path::{Component, Path, PathBuf};

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::http::AppState;

include!(concat!(env!("OUT_DIR"), "/ui_files.rs"));

/// Where the UI's files come from.
#[derive(Clone, Debug, Default)]
pub enum UiSource {
    /// Built into this binary (a placeholder page when it was built without `ui/dist`).
    #[default]
    Embedded,
    /// Read from this directory on every request.
    Dir(PathBuf),
}

/// Shown when the binary was built without the UI.
const PLACEHOLDER: &str = "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Flotilla</title></head>\
<body><h1>Flotilla</h1><p>This server was built without its web UI. Build it with <code>make ui</code> \
(or <code>npm ci &amp;&amp; npm run build</code> in <code>ui/</code>) and build the server again, or serve a \
directory with <code>--ui-dir</code>. The API is at <code>/apis</code>.</p></body></html>";

/// What a browser may do with the UI's pages: only this server's scripts, styles and API.
/// The UI talks to this server only, and to the OIDC issuer (discovery and the token
/// exchange of the PKCE sign-in) when there is one.
fn csp(issuer: Option<&str>) -> String {
    let issuer = issuer
        .and_then(|i| url::Url::parse(i).ok())
        .map(|u| format!(" {}", u.origin().ascii_serialization()))
        .unwrap_or_default();
    format!(
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
img-src 'self' data:; connect-src 'self'{issuer}; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    )
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit('.').next().unwrap_or_default() {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// The bytes of `path` (below the UI's root), if there is such a file.
fn read(source: &UiSource, path: &str) -> Option<Vec<u8>> {
    match source {
        UiSource::Embedded => {
            if UI_FILES.is_empty() && path == "index.html" {
                return Some(PLACEHOLDER.as_bytes().to_vec());
            }
            UI_FILES
                .iter()
                .find(|(p, _)| *p == path)
                .map(|(_, b)| b.to_vec())
        }
        UiSource::Dir(dir) => {
            // Plain names only: nothing outside the directory, however the path is spelled.
            let rel = Path::new(path);
            if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
                return None;
            }
            std::fs::read(dir.join(rel)).ok()
        }
    }
}

fn respond(path: &str, bytes: Vec<u8>, issuer: Option<&str>) -> Response {
    let mut response = (StatusCode::OK, bytes).into_response();
    let h = response.headers_mut();
    let value = |v: &str| HeaderValue::from_str(v).expect("a valid header");
    h.insert(header::CONTENT_TYPE, value(content_type(path)));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, value("nosniff"));
    h.insert(header::REFERRER_POLICY, value("no-referrer"));
    h.insert(header::CONTENT_SECURITY_POLICY, value(&csp(issuer)));
    // Bundles carry their hash in their names; the page that names them must be asked for again.
    let cache = if path.starts_with("assets/") {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    h.insert(header::CACHE_CONTROL, value(cache));
    response
}

/// `GET /ui/...`.
pub async fn serve(State(state): State<AppState>, req: Request) -> Response {
    let path = req
        .uri()
        .path()
        .strip_prefix("/ui/")
        .unwrap_or_default()
        .to_string();
    let path = if path.is_empty() {
        "index.html".to_string()
    } else {
        path
    };
    let issuer = state
        .login
        .as_ref()
        .as_ref()
        .map(|(issuer, _)| issuer.as_str());
    if let Some(bytes) = read(&state.ui, &path) {
        return respond(&path, bytes, issuer);
    }
    // A missing file (a name with an extension) is a 404; anything else is a route of the SPA.
    let last = path.rsplit('/').next().unwrap_or_default();
    if last.contains('.') {
        return (StatusCode::NOT_FOUND, "no such file in the web UI").into_response();
    }
    match read(&state.ui, "index.html") {
        Some(bytes) => respond("index.html", bytes, issuer),
        None => (
            StatusCode::NOT_FOUND,
            "the web UI directory has no index.html",
        )
            .into_response(),
    }
}

/// Whether a request comes from a browser navigating (not an API client).
pub fn wants_html(req: &Request) -> bool {
    req.headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim().starts_with("text/html")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_serves_only_what_is_inside_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("index.html"), "<p>ui</p>").unwrap();
        std::fs::write(dir.path().parent().unwrap().join("secret.txt"), "no").ok();
        let source = UiSource::Dir(dir.path().to_path_buf());
        assert_eq!(read(&source, "index.html").unwrap(), b"<p>ui</p>");
        for sneaky in [
            "../secret.txt",
            "/etc/passwd",
            "a/../../secret.txt",
            "./index.html",
        ] {
            assert!(read(&source, sneaky).is_none(), "{sneaky}");
        }
    }

    #[test]
    fn types_and_caching_follow_the_file() {
        assert_eq!(
            content_type("assets/index-abc.js"),
            "text/javascript; charset=utf-8"
        );
        let r = respond("assets/index-abc.js", Vec::new(), None);
        assert!(r.headers()[header::CACHE_CONTROL]
            .to_str()
            .unwrap()
            .contains("immutable"));
        let r = respond("index.html", Vec::new(), None);
        assert_eq!(r.headers()[header::CACHE_CONTROL], "no-cache");
        let csp = r.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap();
        assert!(csp.contains("frame-ancestors 'none'"));
        assert!(csp.contains("connect-src 'self';"), "{csp}");
    }

    /// The browser trades the sign-in code for a token at the issuer: only that origin is
    /// added to where the page may connect.
    #[test]
    fn the_issuer_is_the_only_other_origin_the_page_reaches() {
        let r = respond(
            "index.html",
            Vec::new(),
            Some("https://login.example.com/realms/x"),
        );
        let csp = r.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap();
        assert!(
            csp.contains("connect-src 'self' https://login.example.com;"),
            "{csp}"
        );
    }
}
