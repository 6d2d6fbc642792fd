//! Joining nodes and what node credentials may do: their own objects and bound VMs, nothing else.

mod common;

use common::{kind, start, vm, TestServer};
use flotilla_client::{Client, ListParams};
use serde_json::{json, Value};

async fn post(t: &TestServer, path: &str, token: &str, body: Value) -> (u16, Value) {
    let resp = t
        .http()
        .post(t.url(path))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    (
        resp.status().as_u16(),
        resp.json().await.unwrap_or(Value::Null),
    )
}

/// Joins a node the way the agent does; returns its client.
async fn join(t: &TestServer, name: &str) -> Client {
    let (code, resp) = post(
        t,
        "/flotilla/v1/join-tokens",
        t.token(),
        json!({"ttlSeconds": 600}),
    )
    .await;
    assert_eq!(code, 200, "{resp}");
    let join_token = resp["token"].as_str().unwrap();
    let (bearer, ca_hash) = join_token.split_once("::sha256:").unwrap();
    // The CA fetched without verification must match the hash in the token.
    let insecure = reqwest::Client::builder()
        .use_rustls_tls()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    let ca = insecure
        .get(t.url("/cacerts"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(flotilla_server::join::ca_hash(&ca), ca_hash);
    let (code, resp) = post(t, "/flotilla/v1/join", bearer, json!({"nodeName": name})).await;
    assert_eq!(code, 200, "{resp}");
    Client::new(
        vec![t.server.url.clone()],
        Some(&ca),
        Some(resp["token"].as_str().unwrap().to_string()),
    )
    .unwrap()
}

#[tokio::test]
async fn a_joined_node_is_confined_to_its_own_objects() {
    let t = start().await;
    let (nodes, vms, leases) = (kind("node"), kind("vm"), kind("lease"));
    let a = join(&t, "node-a").await;
    join(&t, "node-b").await;
    assert!(
        t.client.get(nodes, None, "node-a").await.is_ok(),
        "joining registers the Node"
    );

    // Its own Node: read, status write; not its spec; not other nodes.
    a.get(nodes, None, "node-a").await.unwrap();
    a.patch(
        nodes,
        None,
        "node-a",
        &json!({"status": {"capacity": {"cpus": 8}}}),
        true,
    )
    .await
    .unwrap();
    let e = a
        .patch(
            nodes,
            None,
            "node-a",
            &json!({"spec": {"unschedulable": true}}),
            false,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(403), "{e}");
    assert_eq!(
        a.get(nodes, None, "node-b").await.unwrap_err().code(),
        Some(403)
    );
    assert_eq!(
        a.patch(nodes, None, "node-b", &json!({"status": {}}), true)
            .await
            .unwrap_err()
            .code(),
        Some(403)
    );
    assert_eq!(
        a.delete(nodes, None, "node-a").await.unwrap_err().code(),
        Some(403)
    );

    // Its heartbeat lease, not another's.
    a.create(leases, None, &json!({"metadata": {"name": "node-a"}, "spec": {"holderIdentity": "node-a", "leaseDurationSeconds": 10}})).await.unwrap();
    a.patch(
        leases,
        None,
        "node-a",
        &json!({"spec": {"renewTime": "2026-01-01T00:00:00Z"}}),
        false,
    )
    .await
    .unwrap();
    let e = a
        .create(leases, None, &json!({"metadata": {"name": "node-b"}}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(403));

    // VMs: only those bound to it, only through the node's field selector, only status/finalizers.
    let mut mine = vm("mine");
    mine["spec"]["nodeName"] = json!("node-a");
    let mut theirs = vm("theirs");
    theirs["spec"]["nodeName"] = json!("node-b");
    t.client.create(vms, Some("default"), &mine).await.unwrap();
    t.client
        .create(vms, Some("default"), &theirs)
        .await
        .unwrap();
    let e = a.list(vms, None, &ListParams::default()).await.unwrap_err();
    assert_eq!(e.code(), Some(403), "listing every VM is not allowed");
    let own = ListParams {
        field_selector: Some("spec.nodeName=node-a".into()),
        ..Default::default()
    };
    let listed = a.list(vms, None, &own).await.unwrap();
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
    let other = ListParams {
        field_selector: Some("spec.nodeName=node-b".into()),
        ..Default::default()
    };
    assert_eq!(
        a.list(vms, None, &other).await.unwrap_err().code(),
        Some(403)
    );
    a.patch(
        vms,
        Some("default"),
        "mine",
        &json!({"status": {"phase": "Running"}}),
        true,
    )
    .await
    .unwrap();
    a.patch(
        vms,
        Some("default"),
        "mine",
        &json!({"metadata": {"finalizers": ["flotilla.dev/agent"]}}),
        false,
    )
    .await
    .unwrap();
    let e = a
        .patch(
            vms,
            Some("default"),
            "mine",
            &json!({"spec": {"powerState": "Stopped"}}),
            false,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(403), "{e}");
    let e = a
        .patch(
            vms,
            Some("default"),
            "mine",
            &json!({"metadata": {"labels": {"x": "y"}}}),
            false,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(403));
    assert_eq!(
        a.get(vms, Some("default"), "theirs")
            .await
            .unwrap_err()
            .code(),
        Some(403)
    );
    assert_eq!(
        a.patch(
            vms,
            Some("default"),
            "theirs",
            &json!({"status": {"phase": "Failed"}}),
            true
        )
        .await
        .unwrap_err()
        .code(),
        Some(403)
    );
    assert_eq!(
        a.delete(vms, Some("default"), "mine")
            .await
            .unwrap_err()
            .code(),
        Some(403)
    );
    assert_eq!(
        a.create(vms, Some("default"), &vm("new"))
            .await
            .unwrap_err()
            .code(),
        Some(403)
    );
    assert_eq!(
        a.list(kind("project"), None, &ListParams::default())
            .await
            .unwrap_err()
            .code(),
        Some(403)
    );
    // Storage pools: the same — read, and write only its own entry in status.nodes.
    let pools = kind("storagepool");
    assert!(
        a.get(pools, None, "default").await.is_ok(),
        "the server made it"
    );
    a.patch(
        pools,
        None,
        "default",
        &json!({"status": {"nodes": {"node-a": {"phase": "Ready", "capacity": 1}}}}),
        true,
    )
    .await
    .unwrap();
    for (patch, status) in [
        (
            json!({"status": {"nodes": {"node-b": {"phase": "Failed"}}}}),
            true,
        ),
        (json!({"spec": {"nodeSelector": {"a": "b"}}}), false),
    ] {
        let e = a
            .patch(pools, None, "default", &patch, status)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(403), "{e}");
    }
    assert!(a
        .create(
            pools,
            None,
            &json!({"metadata": {"name": "mine"}, "spec": {}})
        )
        .await
        .is_err());
    // Volumes: only those on this node (status.node), listed by that selector, and only
    // their status and finalizers.
    let volumes = kind("volume");
    for (name, node) in [("here", "node-a"), ("there", "node-b")] {
        t.client
            .create(
                volumes,
                Some("default"),
                &json!({"metadata": {"name": name}, "spec": {"size": "1Gi"}}),
            )
            .await
            .unwrap();
        t.client
            .patch(
                volumes,
                Some("default"),
                name,
                &json!({"status": {"node": node}}),
                true,
            )
            .await
            .unwrap();
    }
    let mine = ListParams {
        field_selector: Some("status.node=node-a".into()),
        ..Default::default()
    };
    let listed = a.list(volumes, Some("default"), &mine).await.unwrap();
    assert_eq!(listed["items"].as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(
        a.list(volumes, Some("default"), &ListParams::default())
            .await
            .unwrap_err()
            .code(),
        Some(403)
    );
    a.patch(
        volumes,
        Some("default"),
        "here",
        &json!({"status": {"phase": "Available"}}),
        true,
    )
    .await
    .unwrap();
    for (name, patch, status) in [
        ("there", json!({"status": {"phase": "Available"}}), true),
        ("here", json!({"metadata": {"labels": {"a": "b"}}}), false),
    ] {
        let e = a
            .patch(volumes, Some("default"), name, &patch, status)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(403), "{e}");
    }
    // Images: read, and write only its own entry in status.nodes.
    let images = kind("image");
    t.client
        .create(
            images,
            Some("default"),
            &json!({"metadata": {"name": "deb"}, "spec": {"source": {"path": "/x.qcow2"}}}),
        )
        .await
        .unwrap();
    a.patch(
        images,
        Some("default"),
        "deb",
        &json!({"status": {"nodes": {"node-a": {"phase": "Ready"}}}}),
        true,
    )
    .await
    .unwrap();
    let e = a
        .patch(
            images,
            Some("default"),
            "deb",
            &json!({"status": {"nodes": {"node-b": {"phase": "Failed"}}}}),
            true,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(403), "{e}");
    let e = a
        .patch(
            images,
            Some("default"),
            "deb",
            &json!({"spec": {"format": "raw"}}),
            false,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(403));
    assert_eq!(
        a.delete(images, Some("default"), "deb")
            .await
            .unwrap_err()
            .code(),
        Some(403)
    );
    // Networks: read (an agent needs its VMs' bridges and addresses), never written.
    let nets = kind("network");
    t.client
        .create(
            nets,
            Some("default"),
            &json!({"metadata": {"name": "back"}, "spec": {"cidr": "10.0.0.0/24"}}),
        )
        .await
        .unwrap();
    let back = a.get(nets, Some("default"), "back").await.unwrap();
    assert_eq!(back["status"]["vni"], 4096);
    assert_eq!(
        a.patch(
            nets,
            Some("default"),
            "back",
            &json!({"spec": {"mtu": 1400}}),
            false
        )
        .await
        .unwrap_err()
        .code(),
        Some(403)
    );
    let theirs_now = t.client.get(vms, Some("default"), "theirs").await.unwrap();
    assert!(
        theirs_now.get("status").is_none(),
        "nothing of another node's VM changed"
    );
}

#[tokio::test]
async fn a_second_host_with_the_same_libvirt_host_uuid_is_refused_at_join() {
    let t = start().await;
    let a = join(&t, "node-a").await;
    let uuid = "5d1c0ae3-2a6f-4c39-9d5e-31b8a3e0c111";
    a.patch(
        kind("Node"),
        None,
        "node-a",
        &json!({"status": {"nodeInfo": {"hostUuid": uuid}}}),
        true,
    )
    .await
    .unwrap();
    let (code, resp) = post(
        &t,
        "/flotilla/v1/join-tokens",
        t.token(),
        json!({"ttlSeconds": 600}),
    )
    .await;
    assert_eq!(code, 200, "{resp}");
    let bearer = resp["token"]
        .as_str()
        .unwrap()
        .split_once("::sha256:")
        .unwrap()
        .0
        .to_string();
    let (code, resp) = post(
        &t,
        "/flotilla/v1/join",
        &bearer,
        json!({"nodeName": "node-b", "hostUuid": uuid}),
    )
    .await;
    assert_eq!(code, 409, "{resp}");
    let message = resp["message"].as_str().unwrap();
    assert!(
        message.contains("node-a") && message.contains("host_uuid"),
        "{message}"
    );
    // Node-a itself may join again (a re-install of the same host), and another UUID is fine.
    for (name, host_uuid) in [
        ("node-a", uuid),
        ("node-b", "5d1c0ae3-2a6f-4c39-9d5e-31b8a3e0c222"),
    ] {
        let (code, resp) = post(
            &t,
            "/flotilla/v1/join",
            &bearer,
            json!({"nodeName": name, "hostUuid": host_uuid}),
        )
        .await;
        assert_eq!(code, 200, "{name}: {resp}");
    }
}

#[tokio::test]
async fn join_tokens_only_join_and_only_admins_mint_them() {
    let t = start().await;
    let (_, resp) = post(&t, "/flotilla/v1/join-tokens", t.token(), json!({})).await;
    let bearer = resp["token"]
        .as_str()
        .unwrap()
        .split_once("::sha256:")
        .unwrap()
        .0
        .to_string();
    let http = t.http();
    let list = http
        .get(t.url("/apis/flotilla.dev/v1alpha1/nodes"))
        .bearer_auth(&bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(list.status(), 403, "a join token reads nothing");
    let node = join(&t, "node-x").await;
    let e = node
        .request_json(
            reqwest::Method::POST,
            "/flotilla/v1/join-tokens",
            &[],
            Some(("application/json", b"{}".to_vec())),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(403), "nodes cannot mint join tokens");
    let (code, body) = post(
        &t,
        "/flotilla/v1/join",
        &bearer,
        json!({"nodeName": "Bad_Name"}),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    let (code, _) = post(
        &t,
        "/flotilla/v1/join-tokens",
        t.token(),
        json!({"ttlSeconds": 0}),
    )
    .await;
    assert_eq!(code, 400);
}

fn event(name: &str, reporter: &str) -> Value {
    json!({
        "metadata": {"name": name},
        "involvedObject": {"kind": "VirtualMachine", "namespace": "default", "name": "web", "uid": "u-1"},
        "type": "Warning", "reason": "ReconcileFailing", "message": "it keeps failing",
        "source": {"component": "flotilla.dev/agent", "host": reporter},
        "reportingComponent": "flotilla.dev/agent", "reportingInstance": reporter,
        "count": 1, "firstTimestamp": "2026-01-01T00:00:00Z", "lastTimestamp": "2026-01-01T00:00:00Z"
    })
}

/// A node records Events as itself, and counts them again; it cannot write another's, nor
/// read or delete events it did not report.
#[tokio::test]
async fn nodes_record_events_only_as_themselves() {
    let t = start().await;
    let events = kind("event");
    let a = join(&t, "node-a").await;
    let b = join(&t, "node-b").await;
    a.create(events, Some("default"), &event("web-a", "node-a"))
        .await
        .unwrap();
    let forged = a
        .create(events, Some("default"), &event("web-b", "node-b"))
        .await
        .unwrap_err();
    assert_eq!(forged.code(), Some(403), "{forged}");
    let again = json!({"count": 2, "lastTimestamp": "2026-01-01T00:01:00Z"});
    a.patch(events, Some("default"), "web-a", &again, false)
        .await
        .unwrap();
    let taken = json!({"reportingInstance": "node-b"});
    assert_eq!(
        a.patch(events, Some("default"), "web-a", &taken, false)
            .await
            .unwrap_err()
            .code(),
        Some(403),
        "a node cannot hand its event to another"
    );
    assert_eq!(
        b.patch(events, Some("default"), "web-a", &again, false)
            .await
            .unwrap_err()
            .code(),
        Some(403),
        "nor write another node's"
    );
    assert_eq!(
        a.delete(events, Some("default"), "web-a")
            .await
            .unwrap_err()
            .code(),
        Some(403)
    );
    let stored = t
        .client
        .get(events, Some("default"), "web-a")
        .await
        .unwrap();
    assert_eq!(stored["count"], 2);
    assert_eq!(stored["reportingInstance"], "node-a");
    // Admins find an object's events by its uid.
    let list = t
        .client
        .list(
            events,
            Some("default"),
            &ListParams {
                field_selector: Some("involvedObject.uid=u-1".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
}
