//! Networks and IPAM through a real server: VNIs and addresses are handed out once, reserved
//! addresses never, static addresses checked, errors name the field; addresses and VNIs come
//! back when their VM or network is gone; a network in use cannot be deleted; many concurrent
//! creates on one network never share an address.

use std::collections::HashSet;

use flotilla_client::Client;
use flotilla_server::ServerConfig;
use flotilla_types::registry::lookup;
use serde_json::{json, Value};

struct Fixture {
    _dir: tempfile::TempDir,
    server: flotilla_server::RunningServer,
    client: Client,
}

async fn start() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::new(dir.path());
    config.listen = "127.0.0.1:0".parse().unwrap();
    let server = flotilla_server::start(config).await.unwrap();
    let client = Client::new(
        vec![server.url.clone()],
        Some(&server.ca_pem),
        Some(server.admin_token.clone()),
    )
    .unwrap();
    Fixture {
        _dir: dir,
        server,
        client,
    }
}

fn network(name: &str, spec: Value) -> Value {
    json!({"metadata": {"name": name}, "spec": spec})
}

fn vm(name: &str, nics: Value) -> Value {
    json!({"metadata": {"name": name}, "spec": {
        "resources": {"cpus": 1, "memory": "64Mi"}, "image": "x", "networks": nics}})
}

/// The status and message of a failed call, or a panic if it succeeded.
fn refused(result: Result<Value, flotilla_client::ClientError>) -> (u16, String, Value) {
    match result {
        Err(flotilla_client::ClientError::Api(status)) => (
            status.code,
            status.message.clone(),
            serde_json::to_value(&status.details).unwrap(),
        ),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn networks_hand_out_vnis_and_addresses_once_and_take_them_back() {
    let f = start().await;
    let (nets, vms, projects) = (
        lookup("network").unwrap(),
        lookup("vm").unwrap(),
        lookup("project").unwrap(),
    );
    let c = &f.client;
    // Overlay networks get the lowest free VNIs; a bridged one none.
    let a = c
        .create(
            nets,
            Some("default"),
            &network("a", json!({"cidr": "10.0.0.0/24"})),
        )
        .await
        .unwrap();
    let b = c
        .create(
            nets,
            Some("default"),
            &network("b", json!({"cidr": "10.0.1.0/29"})),
        )
        .await
        .unwrap();
    assert_eq!(
        (a["status"]["vni"].clone(), b["status"]["vni"].clone()),
        (json!(4096), json!(4097))
    );
    assert_eq!(a["spec"]["type"], "overlay");
    assert_eq!(a["metadata"]["finalizers"], json!(["flotilla.dev/ipam"]));
    let lan = c
        .create(
            nets,
            Some("default"),
            &network(
                "lan",
                json!({"type": "bridged", "bridge": "br0", "vlan": 10}),
            ),
        )
        .await
        .unwrap();
    assert!(lan["status"].get("vni").is_none(), "{lan}");
    // A LAN whose own DHCP server keeps .2-.199: Flotilla picks from .200-.202 only, unless a
    // NIC asks for an address; the network counts the range as its total.
    c.create(
        nets,
        Some("default"),
        &network(
            "office",
            json!({"type": "bridged", "bridge": "br0", "cidr": "192.168.1.0/24",
                   "ranges": [{"start": "192.168.1.200", "end": "192.168.1.202"}],
                   "dns": {"nameservers": ["192.168.1.1"]}}),
        ),
    )
    .await
    .unwrap();
    let picked = c
        .create(
            vms,
            Some("default"),
            &vm(
                "desk",
                json!([{"network": "office"}, {"network": "office", "ip": "192.168.1.20"}]),
            ),
        )
        .await
        .unwrap();
    assert_eq!(
        picked["status"]["ips"],
        json!(["192.168.1.200", "192.168.1.20"])
    );
    c.delete(vms, Some("default"), "desk").await.unwrap();
    // With an IPv6 prefix each NIC also gets the address SLAAC makes of its MAC.
    c.create(
        nets,
        Some("default"),
        &network(
            "dual",
            json!({"cidr": "10.5.0.0/24", "cidr6": "fd00:5::/64"}),
        ),
    )
    .await
    .unwrap();
    let dual = c
        .create(
            vms,
            Some("default"),
            &vm(
                "dual",
                json!([{"network": "dual", "macAddress": "02:46:4c:00:00:03"}]),
            ),
        )
        .await
        .unwrap();
    assert_eq!(
        dual["status"]["interfaces"][0]["ips"],
        json!(["10.5.0.3/24", "fd00:5::46:4cff:fe00:3/64"])
    );
    assert_eq!(
        dual["status"]["ips"],
        json!(["10.5.0.3", "fd00:5::46:4cff:fe00:3"])
    );
    c.delete(vms, Some("default"), "dual").await.unwrap();
    // Invalid networks name their field.
    for (spec, field) in [
        (json!({}), "spec.cidr"),
        (json!({"cidr": "10.0.0.5/24"}), "spec.cidr"),
        (json!({"cidr": "10.0.0.0/8"}), "spec.cidr"),
        (
            json!({"cidr": "10.0.0.0/24", "gateway": "10.0.1.1"}),
            "spec.gateway",
        ),
        (json!({"cidr": "10.0.0.0/24", "vlan": 5}), "spec.vlan"),
        (json!({"type": "bridged"}), "spec.bridge"),
        (
            json!({"cidr": "10.0.0.0/24", "cidr6": "fd00:1::/48"}),
            "spec.cidr6",
        ),
        (
            json!({"type": "bridged", "bridge": "br0", "cidr6": "fd00:1::/64"}),
            "spec.cidr6",
        ),
        (
            json!({"cidr": "10.0.0.0/24", "ranges": [{"start": "10.0.0.9", "end": "10.0.1.9"}]}),
            "spec.ranges[0]",
        ),
        (
            json!({"type": "bridged", "bridge": "br0", "ranges": [{"start": "10.0.0.9", "end": "10.0.0.10"}]}),
            "spec.ranges",
        ),
        (
            json!({"cidr": "10.0.0.0/24", "dns": {"nameservers": ["1.1.1.1", "dns.example"]}}),
            "spec.dns.nameservers[1]",
        ),
        (
            json!({"type": "bridged", "bridge": "a-name-far-too-long"}),
            "spec.bridge",
        ),
    ] {
        let (code, message, _) = refused(
            c.create(nets, Some("default"), &network("bad", spec.clone()))
                .await,
        );
        assert_eq!(code, 422, "{spec}: {message}");
        assert!(message.contains(field), "{spec}: {message}");
    }

    // NICs: stable generated MACs, the lowest free address past the gateway (.1) and the DHCP
    // server (.2), static addresses checked.
    let web = c
        .create(
            vms,
            Some("default"),
            &vm(
                "web",
                json!([{"network": "a"}, {"network": "b", "name": "back"}]),
            ),
        )
        .await
        .unwrap();
    let nics = &web["status"]["interfaces"];
    assert_eq!(nics[0]["name"], "nic0");
    assert_eq!(nics[0]["ips"], json!(["10.0.0.3/24"]));
    assert_eq!(nics[0]["source"], "ipam");
    assert_eq!(nics[1]["name"], "back");
    assert_eq!(nics[1]["ips"], json!(["10.0.1.3/29"]));
    assert!(
        nics[0]["macAddress"]
            .as_str()
            .unwrap()
            .starts_with("02:46:4c:"),
        "{nics}"
    );
    assert_eq!(web["status"]["ips"], json!(["10.0.0.3", "10.0.1.3"]));
    let db = c
        .create(
            vms,
            Some("default"),
            &vm("db", json!([{"network": "a", "ip": "10.0.0.50"}])),
        )
        .await
        .unwrap();
    assert_eq!(db["status"]["ips"], json!(["10.0.0.50"]));
    // What the nodes' DHCP servers serve: every address of the network, its VM and MAC, in
    // address order; a network that does not exist is 404, and only GET is allowed.
    // The inventory in /metrics: networks a, b, lan, office and dual; web's two NICs and db's one; a node's
    // DHCP-server restarts as its agent reports them.
    let nodes = lookup("node").unwrap();
    c.create(nodes, None, &json!({"metadata": {"name": "n1"}}))
        .await
        .unwrap();
    c.patch(
        nodes,
        None,
        "n1",
        &json!({"status": {"dhcpServerRestarts": 2}}),
        true,
    )
    .await
    .unwrap();
    let metrics = c
        .send(reqwest::Method::GET, "/metrics", &[], None)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "flotilla_networks 5",
        "flotilla_network_interfaces 3",
        "flotilla_dhcp_server_restarts{node=\"n1\"} 2",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }
    let served = c.network_addresses("default", "a").await.unwrap();
    assert_eq!(served["kind"], "NetworkAddressList");
    let items: Vec<(Value, Value, Value)> = served["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["address"].clone(),
                i["vm"].clone(),
                i["macAddress"].clone(),
            )
        })
        .collect();
    assert_eq!(
        items,
        vec![
            (
                json!("10.0.0.3"),
                json!("web"),
                nics[0]["macAddress"].clone()
            ),
            (
                json!("10.0.0.50"),
                json!("db"),
                db["status"]["interfaces"][0]["macAddress"].clone()
            ),
        ]
    );
    assert_eq!(served["items"][1]["uid"], db["metadata"]["uid"]);
    let (code, message, _) = refused(c.network_addresses("default", "nowhere").await);
    assert_eq!(code, 404, "{message}");
    let path = "/apis/flotilla.dev/v1alpha1/namespaces/default/networks/a/addresses";
    let (code, message, _) = refused(
        c.request_json(
            reqwest::Method::POST,
            path,
            &[],
            Some(("application/json", b"{}".to_vec())),
        )
        .await,
    );
    assert_eq!(code, 405, "{message}");
    for (nic, field, says) in [
        (
            json!({"network": "a", "ip": "10.0.0.50"}),
            "spec.networks[0].ip",
            "held by db",
        ),
        (
            json!({"network": "a", "ip": "10.0.0.1"}),
            "spec.networks[0].ip",
            "gateway",
        ),
        (
            json!({"network": "a", "ip": "10.0.9.9"}),
            "spec.networks[0].ip",
            "not inside 10.0.0.0/24",
        ),
        (
            json!({"network": "nowhere"}),
            "spec.networks[0].network",
            "no network \"nowhere\"",
        ),
        (
            json!({"network": "a", "macAddress": nics[0]["macAddress"]}),
            "spec.networks[0].macAddress",
            "already used",
        ),
    ] {
        let (code, message, _) = refused(
            c.create(vms, Some("default"), &vm("late", json!([nic.clone()])))
                .await,
        );
        assert_eq!(code, 422, "{nic}: {message}");
        assert!(
            message.contains(field) && message.contains(says),
            "{nic}: {message}"
        );
    }
    // The /29 has 4 addresses for VMs (.3 to .6): web holds one, three more fit, then none.
    for i in 0..3 {
        c.create(
            vms,
            Some("default"),
            &vm(&format!("small-{i}"), json!([{"network": "b"}])),
        )
        .await
        .unwrap();
    }
    let (code, message, _) = refused(
        c.create(
            vms,
            Some("default"),
            &vm("small-3", json!([{"network": "b"}])),
        )
        .await,
    );
    assert_eq!(code, 422);
    assert!(
        message.contains("no address is free in 10.0.1.0/29"),
        "{message}"
    );
    // NICs stay as created.
    let mut changed = web.clone();
    changed["spec"]["networks"] = json!([{"network": "a"}]);
    let (code, message, _) = refused(c.replace(vms, Some("default"), "web", &changed).await);
    assert_eq!(code, 422);
    assert!(message.contains("spec.networks"), "{message}");

    // Another project may use the same CIDR: its own record, its own VNI.
    c.create(projects, None, &json!({"metadata": {"name": "other"}}))
        .await
        .unwrap();
    let other = c
        .create(
            nets,
            Some("other"),
            &network("a", json!({"cidr": "10.0.0.0/24"})),
        )
        .await
        .unwrap();
    assert_eq!(
        other["status"]["vni"],
        json!(4099),
        "after a (4096), b and dual"
    );
    let twin = c
        .create(vms, Some("other"), &vm("web", json!([{"network": "a"}])))
        .await
        .unwrap();
    assert_eq!(twin["status"]["ips"], json!(["10.0.0.3"]));

    // Network status: how many addresses are held of how many, and the nodes the network
    // spans (those its VMs are bound to).
    let mut bound = vm("bound", json!([{"network": "b"}, {"network": "a"}]));
    bound["spec"]["nodeName"] = json!("node-7");
    let (code, message, _) = refused(c.create(vms, Some("default"), &bound).await);
    assert_eq!(
        (code, message.contains("no address is free")),
        (422, true),
        "{message}"
    );
    bound["spec"]["networks"] = json!([{"network": "a"}]);
    c.create(vms, Some("default"), &bound).await.unwrap();
    // node-7 says where its tunnels end: the network's endpoints follow.
    let nodes = lookup("node").unwrap();
    c.create(nodes, None, &json!({"metadata": {"name": "node-7"}}))
        .await
        .unwrap();
    c.patch(
        nodes,
        None,
        "node-7",
        &json!({"status": {"addresses": {"tunnel": "192.0.2.7"}}}),
        true,
    )
    .await
    .unwrap();
    assert!(
        flotilla_controllers::network_status::sweep(&f.server.objects)
            .await
            .unwrap()
            >= 2
    );
    let a_now = c.get(nets, Some("default"), "a").await.unwrap();
    assert_eq!(
        a_now["status"]["addresses"],
        json!({"used": 3, "total": 252})
    );
    assert_eq!(a_now["status"]["nodes"], json!(["node-7"]));
    assert_eq!(
        a_now["status"]["endpoints"],
        json!([{"node": "node-7", "address": "192.0.2.7"}])
    );
    assert_eq!(a_now["status"]["vni"], json!(4096), "the VNI stays");
    let b_now = c.get(nets, Some("default"), "b").await.unwrap();
    assert_eq!(b_now["status"]["addresses"], json!({"used": 4, "total": 4}));
    // Conditions say what a person needs: a is Ready on its node with addresses to spare; b
    // is full; a node of the network without a tunnel address makes it not Ready, by name.
    let condition = |net: &Value, type_: &str| {
        let c = net["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == type_)
            .cloned()
            .unwrap_or_else(|| panic!("{type_} in {net}"));
        (
            c["status"].as_str().unwrap().to_string(),
            c["reason"].as_str().unwrap().to_string(),
            c["message"].as_str().unwrap().to_string(),
        )
    };
    assert_eq!(
        condition(&a_now, "Ready"),
        (
            "True".into(),
            "Ready".into(),
            "VNI 4096, spanning 1 node".into()
        )
    );
    assert_eq!(condition(&a_now, "AddressesAvailable").0, "True");
    let (status, reason, _) = condition(&b_now, "AddressesAvailable");
    assert_eq!((status.as_str(), reason.as_str()), ("False", "Exhausted"));
    let mut lost = vm("lost", json!([{"network": "a"}]));
    lost["spec"]["nodeName"] = json!("node-8");
    c.create(vms, Some("default"), &lost).await.unwrap();
    flotilla_controllers::network_status::sweep(&f.server.objects)
        .await
        .unwrap();
    let a_lost = c.get(nets, Some("default"), "a").await.unwrap();
    let (status, reason, message) = condition(&a_lost, "Ready");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "NodesWithoutTunnel")
    );
    assert!(
        message.contains("node-8") && message.contains("--tunnel-address"),
        "{message}"
    );
    c.delete(vms, Some("default"), "lost").await.unwrap();
    flotilla_controllers::network_status::sweep(&f.server.objects)
        .await
        .unwrap();
    assert_eq!(
        flotilla_controllers::network_status::sweep(&f.server.objects)
            .await
            .unwrap(),
        0,
        "nothing changed, nothing written"
    );
    c.delete(vms, Some("default"), "bound").await.unwrap();

    // A network in use cannot go; the refusal names who uses it.
    let (code, message, _) = refused(c.delete(nets, Some("default"), "a").await.map(|(v, _)| v));
    assert_eq!(code, 409);
    assert!(message.contains("db, web"), "{message}");

    // Deleting a VM frees its addresses at once (in the same transaction): db's static
    // 10.0.0.50 and web's are free again, and nothing else moved; the sweeper finds nothing.
    c.delete(vms, Some("default"), "db").await.unwrap();
    c.delete(vms, Some("default"), "web").await.unwrap();
    let served = c.network_addresses("default", "a").await.unwrap();
    assert_eq!(served["items"], json!([]), "{served}");
    // A port whose VM is gone without releasing it (a store written by an older server, a
    // hand edit) is the sweeper's to release.
    let orphan = flotilla_ipam::Port {
        uid: "gone".into(),
        vm: "ghost".into(),
        nic: "nic0".into(),
        ip: Some("10.0.0.77".parse().unwrap()),
    };
    let holder = json!({"uid": "gone", "vm": "ghost", "mac": "02:46:4c:00:00:77"});
    f.server
        .objects
        .store()
        .txn(
            flotilla_store::Txn::new()
                .and_then(flotilla_store::Op::put(
                    "/flotilla/ipam/ports/default/a/02:46:4c:00:00:77",
                    serde_json::to_vec(&orphan).unwrap(),
                ))
                .and_then(flotilla_store::Op::put(
                    "/flotilla/ipam/addresses/default/a/10.0.0.77",
                    serde_json::to_vec(&holder).unwrap(),
                )),
        )
        .await
        .unwrap();
    let (code, message, _) = refused(c.delete(nets, Some("default"), "a").await.map(|(v, _)| v));
    assert!(code == 409 && message.contains("ghost"), "{message}");
    let released = flotilla_controllers::ipam_sweeper::sweep(&f.server.objects)
        .await
        .unwrap();
    assert_eq!(released.ports, 1, "only the orphan");
    let served = c.network_addresses("default", "a").await.unwrap();
    assert_eq!(served["items"], json!([]), "{served}");
    let again = c
        .create(
            vms,
            Some("default"),
            &vm(
                "db2",
                json!([{"network": "a", "ip": "10.0.0.50"}, {"network": "a"}]),
            ),
        )
        .await
        .unwrap();
    assert_eq!(again["status"]["ips"], json!(["10.0.0.50", "10.0.0.3"]));
    c.delete(vms, Some("default"), "db2").await.unwrap();
    flotilla_controllers::ipam_sweeper::sweep(&f.server.objects)
        .await
        .unwrap();

    // Now unused, network a goes: its VNI is free for the next network.
    c.delete(nets, Some("default"), "a").await.unwrap();
    let released = flotilla_controllers::ipam_sweeper::sweep(&f.server.objects)
        .await
        .unwrap();
    assert_eq!(released.networks, 1);
    assert_eq!(
        c.get(nets, Some("default"), "a").await.unwrap_err().code(),
        Some(404)
    );
    let next = c
        .create(
            nets,
            Some("default"),
            &network("c", json!({"cidr": "192.168.0.0/16"})),
        )
        .await
        .unwrap();
    assert_eq!(next["status"]["vni"], json!(4096));
}

/// Many creates at once on one network, none sharing an address, and every address comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_never_share_an_address() {
    let f = start().await;
    let (nets, vms) = (lookup("network").unwrap(), lookup("vm").unwrap());
    f.client
        .create(
            nets,
            Some("default"),
            &network("hot", json!({"cidr": "10.7.0.0/24"})),
        )
        .await
        .unwrap();
    const N: usize = 120;
    let creates = (0..N).map(|i| {
        let client = &f.client;
        async move {
            client
                .create(
                    vms,
                    Some("default"),
                    &vm(&format!("vm-{i}"), json!([{"network": "hot"}])),
                )
                .await
        }
    });
    let made: Vec<Value> = futures::future::join_all(creates)
        .await
        .into_iter()
        .map(|r| r.expect("every create lands"))
        .collect();
    let ips: HashSet<String> = made
        .iter()
        .map(|v| v["status"]["ips"][0].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ips.len(), N, "an address was handed out twice");
    for i in 0..N {
        f.client
            .delete(vms, Some("default"), &format!("vm-{i}"))
            .await
            .unwrap();
    }
    let served = f.client.network_addresses("default", "hot").await.unwrap();
    assert_eq!(served["items"], json!([]), "every address is free at once");
}
