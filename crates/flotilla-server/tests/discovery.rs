//! Discovery documents, the OpenAPI document (and its checked-in copy), metrics.

mod common;

use common::start;
use serde_json::Value;

async fn get(t: &common::TestServer, path: &str) -> Value {
    let resp = t
        .http()
        .get(t.url(path))
        .bearer_auth(t.token())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{path}");
    resp.json().await.unwrap()
}

#[tokio::test]
async fn discovery_lists_every_kind_for_kubernetes_tooling() {
    let t = start().await;
    let groups = get(&t, "/apis").await;
    assert_eq!(groups["kind"], "APIGroupList");
    assert_eq!(
        groups["groups"][0]["preferredVersion"]["groupVersion"],
        "flotilla.dev/v1alpha1"
    );
    let resources = get(&t, "/apis/flotilla.dev/v1alpha1").await;
    let names: Vec<&str> = resources["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    for n in [
        "projects",
        "nodes",
        "virtualmachines",
        "virtualmachines/status",
        "vmclasses",
        "images",
    ] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    assert!(!names.contains(&"events"), "Event lives in the core group");
    // Kubernetes' core group, where kubectl and the Python client look for events.
    let core = get(&t, "/api").await;
    assert_eq!(
        (core["kind"].as_str(), core["versions"][0].as_str()),
        (Some("APIVersions"), Some("v1"))
    );
    let v1 = get(&t, "/api/v1").await;
    let events = &v1["resources"][0];
    assert_eq!(
        (events["name"].as_str(), events["kind"].as_str()),
        (Some("events"), Some("Event"))
    );
    let core_names: Vec<&str> = v1["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        core_names,
        [
            "events",
            "serviceaccounts",
            "serviceaccounts/token",
            "serviceaccounts/status"
        ],
        "no events/status: {v1}"
    );
    // Kubernetes' RBAC and access-review groups, where kubectl looks for them.
    let groups = get(&t, "/apis").await;
    let group_names: Vec<&str> = groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        group_names,
        [
            "flotilla.dev",
            "rbac.authorization.k8s.io",
            "authorization.k8s.io"
        ]
    );
    let rbac = get(&t, "/apis/rbac.authorization.k8s.io/v1").await;
    let rbac_names: Vec<&str> = rbac["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        rbac_names,
        [
            "roles",
            "clusterroles",
            "rolebindings",
            "clusterrolebindings"
        ]
    );
    let review = get(&t, "/apis/authorization.k8s.io/v1").await;
    assert_eq!(review["resources"][0]["name"], "selfsubjectaccessreviews");
    let list = get(&t, "/api/v1/namespaces/default/events").await;
    assert_eq!(
        (list["apiVersion"].as_str(), list["kind"].as_str()),
        (Some("v1"), Some("EventList"))
    );
    let wrong = t
        .http()
        .get(t.url("/apis/flotilla.dev/v1alpha1/namespaces/default/events"))
        .bearer_auth(t.token())
        .send()
        .await
        .unwrap();
    assert_eq!(
        wrong.status(),
        404,
        "events are not served in Flotilla's group"
    );
    let vm = resources["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "virtualmachines")
        .unwrap();
    assert_eq!(vm["namespaced"], true);
    assert_eq!(vm["shortNames"][0], "vm");
    assert!(vm["verbs"].as_array().unwrap().iter().any(|v| v == "watch"));
}

/// The OpenAPI documents as Kubernetes serves them: an index whose URLs carry each document's
/// hash, group-version documents, Swagger 2; each with an ETag that makes a repeat 304. The
/// served documents match the copies checked in under openapi/.
#[tokio::test]
async fn the_openapi_documents_are_served_as_kubernetes_serves_them_and_match_the_checked_in_copies(
) {
    let t = start().await;
    let index = get(&t, "/openapi/v3").await;
    let mut served = vec![("openapi/v2.json".to_string(), get(&t, "/openapi/v2").await)];
    for gv in [
        "apis/flotilla.dev/v1alpha1",
        "api/v1",
        "apis/rbac.authorization.k8s.io/v1",
    ] {
        let url = index["paths"][gv]["serverRelativeURL"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(url.starts_with(&format!("/openapi/v3/{gv}?hash=")), "{url}");
        let doc = get(&t, &url).await;
        // A client that has it already gets 304.
        let first = t
            .http()
            .get(t.url(&url))
            .bearer_auth(t.token())
            .send()
            .await
            .unwrap();
        let etag = first.headers()["etag"].clone();
        let again = t
            .http()
            .get(t.url(&url))
            .bearer_auth(t.token())
            .header("if-none-match", etag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 304);
        served.push((format!("openapi/v3/{gv}.json"), doc));
    }
    for (file, doc) in &served {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(file);
        let rendered = serde_json::to_string_pretty(doc).unwrap() + "\n";
        if std::env::var_os("FLOTILLA_UPDATE_OPENAPI").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &rendered).unwrap();
        }
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == rendered,
            "{file} is out of date: run `make openapi` and commit it"
        );
    }
    let flotilla = &served[1].1;
    assert!(flotilla["paths"]
        ["/apis/flotilla.dev/v1alpha1/namespaces/{namespace}/virtualmachines/{name}/status"]
        .is_object());
    assert_eq!(
        flotilla["components"]["schemas"]["VirtualMachine"]["x-kubernetes-group-version-kind"][0]
            ["kind"],
        "VirtualMachine"
    );
    assert_eq!(
        served[2].1["components"]["schemas"]["Event"]["x-kubernetes-group-version-kind"][0]
            ["version"],
        "v1"
    );
    assert!(
        served[0].1["definitions"]["VirtualMachine"]["x-kubernetes-group-version-kind"].is_array()
    );
}

#[tokio::test]
async fn metrics_count_requests_with_latency() {
    let t = start().await;
    for _ in 0..3 {
        get(
            &t,
            "/apis/flotilla.dev/v1alpha1/namespaces/default/virtualmachines",
        )
        .await;
    }
    let resp = t
        .http()
        .get(t.url("/metrics"))
        .bearer_auth(t.token())
        .send()
        .await
        .unwrap();
    let text = resp.text().await.unwrap();
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("flotilla_http_requests_total")
                && l.contains("namespaces/{ns}/{plural}")
                && l.contains("code=\"200\"")
        })
        .unwrap_or_else(|| panic!("no request counter in:\n{text}"));
    assert!(line.ends_with(" 3"), "{line}");
    assert!(text.contains("flotilla_http_request_duration_seconds_bucket"));
}

/// The web UI at /ui/: public pages with a strict content policy, the SPA's routes answered with
/// its index, missing files 404, and `/` sending browsers there while API clients still need a
/// token. `--ui-dir` serves a directory (UI development).
#[tokio::test]
async fn the_web_ui_is_served_at_ui_and_browsers_are_sent_there() {
    let ui = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(ui.path().join("assets")).unwrap();
    std::fs::write(
        ui.path().join("index.html"),
        "<!doctype html><p>flotilla ui</p>",
    )
    .unwrap();
    std::fs::write(ui.path().join("assets/app-1a2b.js"), "console.log(1)").unwrap();
    let dir = ui.path().to_path_buf();
    let t = common::start_with(move |c| c.ui = flotilla_server::ui::UiSource::Dir(dir)).await;
    let http = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(t.server.ca_pem.as_bytes()).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let get = |path: &str| http.get(t.url(path));
    let page = get("/ui/").send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("default-src 'self'"));
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    assert!(page.text().await.unwrap().contains("flotilla ui"));
    // A route of the SPA (a deep link) is its index; a file that is not there is a 404.
    let deep = get("/ui/projects/default/virtualmachines/web/console")
        .send()
        .await
        .unwrap();
    assert_eq!(deep.status(), 200);
    assert!(deep.text().await.unwrap().contains("flotilla ui"));
    assert_eq!(
        get("/ui/assets/missing.js").send().await.unwrap().status(),
        404
    );
    let js = get("/ui/assets/app-1a2b.js").send().await.unwrap();
    assert_eq!(
        js.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    assert!(js.headers()["cache-control"]
        .to_str()
        .unwrap()
        .contains("immutable"));
    // Nothing outside the UI's directory, however the path is spelled.
    assert_eq!(
        get("/ui/..%2Fadmin.yaml").send().await.unwrap().status(),
        404
    );
    assert_eq!(
        get("/ui/..%2F..%2Fetc%2Fpasswd")
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    // Browsers asking for / go to the UI; API clients without a token still get 401.
    let root = get("/")
        .header("accept", "text/html,application/xhtml+xml")
        .send()
        .await
        .unwrap();
    assert_eq!(
        (
            root.status().as_u16(),
            root.headers()["location"].to_str().unwrap()
        ),
        (303, "/ui/")
    );
    assert_eq!(get("/").send().await.unwrap().status(), 401);
    assert_eq!(get("/ui").send().await.unwrap().status(), 308);
    // Built in: the UI, or (a binary built without ui/dist) a page that says how to get it.
    let built_in = start().await;
    let page = built_in
        .http()
        .get(built_in.url("/ui/"))
        .send()
        .await
        .unwrap();
    let page = page.text().await.unwrap();
    if flotilla_server::ui::UI_FILES.is_empty() {
        assert!(page.contains("built without its web UI"), "{page}");
    } else {
        assert!(page.to_lowercase().starts_with("<!doctype html"), "{page}");
    }
}
