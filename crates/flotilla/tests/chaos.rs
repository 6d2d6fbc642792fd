//! The chaos suite: rounds of bursts against a real server and a real agent on the real
//! libvirtd, with `kill -9` of the server or the agent at random moments, and invariants checked
//! after every round.
//!
//! A round: an Image nobody has cached, N tiny VMs from it created at once (random power
//! states), some power states flipped, every VM deleted; meanwhile one or two kills of the
//! server or the agent (which, when, and for how long drawn from the round's seed) and restarts.
//! After each round:
//! - every VM reached what its spec asks (phase = powerState, observedGeneration current) within
//!   [`CONVERGE`] of the last restart, and every acknowledged create and power change is there;
//! - after deletion every VM is gone within [`CONVERGE`], and so is every domain, disk, seed
//!   and VM directory;
//! - the image cache holds only complete, verified images (a manifest each, `qemu-img check`
//!   clean) and no temporary file;
//! - every VM has a NIC on one overlay network: no two VMs share an address, and once they are
//!   deleted the network holds none; at the end the network goes, and with it its bridge, VXLAN
//!   device, DHCP namespace and dnsmasq on the host;
//! - each round's router (the overlay network to an external LAN, a bridge the test makes) is
//!   placed and running in its namespace on the host, and its floating IP is bound to the first
//!   VM; once both are deleted, the namespace is gone and neither network holds their
//!   addresses;
//! - each round's volume (in the default pool, made during the kills, attached to the first VM)
//!   becomes Available with its file there, its snapshot (also taken during the kills) Ready
//!   on the file the volume had, and a running first VM has the volume's current file; once
//!   all are deleted, the pool directory holds nothing — no volume, overlay or temporary;
//! - each round's VM snapshot of its second VM (taken during the kills, as soon as the VM has a
//!   node; with memory if it runs) becomes Ready with its frozen root file there, a running VM
//!   writes the overlay on it, and once deleted (merged) the VM is back on one root file.
//!
//! `CHAOS_ROUNDS` (3 in `make test`, hundreds in `make chaos`), `CHAOS_SEED` (random unless
//! given; printed, so a failing run can be repeated) and `CHAOS_VMS` (4) shape the run;
//! `CHAOS_KEEP=1` keeps its logs and data. Each round prints a JSON line; the run ends with a
//! summary line.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use flotilla_controllers::testkit::ImageServer;
use std::time::{Duration, Instant};

use flotilla_client::{ClientError, ListParams};
use flotilla_types::registry::lookup;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use support::{
    agent_dir, agent_with, join_token, tiny_guest, traversable_tempdir, DomainSweeper, Process,
    Server,
};

/// How long after the last restart every VM must have converged (and, after deletion, be gone).
const CONVERGE: Duration = Duration::from_secs(60);

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A client call, repeated while the server is down (it may be killed at any moment).
async fn persist<T, F, Fut>(what: &str, mut call: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let deadline = Instant::now() + CONVERGE;
    loop {
        match call().await {
            Err(ClientError::Transport { .. } | ClientError::Decode(_))
                if Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) if e.code().is_some_and(|c| c >= 500) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => {
                return other.map_err(|e| {
                    eprintln!("{what}: {e}");
                    e
                })
            }
        }
    }
}

/// Ok also when the server answers `code`: 409 to a create, 404 to a delete whose first
/// answer a kill lost.
fn done_before<T>(code: u16, result: Result<T, ClientError>) -> Result<(), ClientError> {
    match result {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some(code) => Ok(()),
        Err(e) => Err(e),
    }
}

#[derive(Clone, Copy, Debug)]
enum Target {
    Server,
    Agent,
}

/// One kill: `at` after the round starts, `target` down for `down`.
#[derive(Clone, Copy, Debug)]
struct Kill {
    at: Duration,
    target: Target,
    down: Duration,
}

struct Fleet {
    server: Server,
    agent: Process,
}

impl Fleet {
    fn process(&mut self, target: Target) -> &mut Process {
        match target {
            Target::Server => &mut self.server.process,
            Target::Agent => &mut self.agent,
        }
    }
}

/// Carries out a round's kills, then makes sure both processes run.
async fn monkey(fleet: Arc<Mutex<Fleet>>, kills: Vec<Kill>) {
    let start = Instant::now();
    for k in kills {
        tokio::time::sleep(k.at.saturating_sub(start.elapsed())).await;
        fleet.lock().unwrap().process(k.target).kill9();
        tokio::time::sleep(k.down).await;
        fleet.lock().unwrap().process(k.target).start();
    }
}

fn phase_wanted(vm: &Value) -> &str {
    vm["spec"]["powerState"].as_str().unwrap_or("Running")
}

fn converged(vm: &Value) -> bool {
    vm["status"]["phase"] == phase_wanted(vm)
        && vm["status"]["observedGeneration"] == vm["metadata"]["generation"]
}

/// Files of the image cache that should not be there, and entries that fail verification.
fn cache_problems(images: &std::path::Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(images) else {
        return Vec::new();
    };
    let mut problems = Vec::new();
    for e in entries.map(Result::unwrap) {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".json") {
            continue;
        }
        if !name.ends_with(".qcow2") {
            problems.push(format!("unexpected file {name}"));
            continue;
        }
        if !images.join(name.replace(".qcow2", ".json")).exists() {
            problems.push(format!("{name} has no manifest"));
        }
        let ok = std::process::Command::new("qemu-img")
            .args(["check", "-U", "-q"])
            .arg(e.path())
            .status()
            .unwrap()
            .success();
        if !ok {
            problems.push(format!("{name} fails qemu-img check"));
        }
    }
    problems
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos() {
    let rounds = env_or("CHAOS_ROUNDS", 3);
    let per_round = env_or("CHAOS_VMS", 4) as usize;
    let seed = env_or("CHAOS_SEED", rand::random::<u32>() as u64);
    println!(
        "chaos: seed {seed} ({rounds} rounds of {per_round} VMs); repeat with CHAOS_SEED={seed}"
    );
    let guest = tiny_guest();
    let tempdir = traversable_tempdir();
    // CHAOS_KEEP=1 keeps the logs and data directories for a look afterwards.
    let (dir, _remove_on_drop) = if std::env::var_os("CHAOS_KEEP").is_some() {
        let kept = tempdir.keep();
        println!("chaos: keeping {}", kept.display());
        (kept, None)
    } else {
        (tempdir.path().to_path_buf(), Some(tempdir))
    };
    let tag = format!("x{:04x}", seed % 0xffff);
    let _sweeper = DomainSweeper(format!("_{tag}-"));
    let server = Server::start(dir.as_path());
    let admin = server.admin().await;
    let token = join_token(&admin).await;
    let node = format!("chaos-{tag}");
    let agent = agent_with(
        &server.url(),
        &token,
        &node,
        dir.as_path(),
        &["--shutdown-timeout", "2s"],
    );
    let data = agent_dir(dir.as_path(), &node);
    let fleet = Arc::new(Mutex::new(Fleet { server, agent }));
    let images_served = ImageServer::start(dir.as_path(), Duration::from_millis(100)).await;
    let url = &images_served.url;
    let (vms, images) = (lookup("vm").unwrap(), lookup("image").unwrap());
    let nets = lookup("network").unwrap();
    let net = json!({"metadata": {"name": "chaos"}, "spec": {"cidr": "10.44.0.0/24"}});
    let net = persist("create network", || {
        admin.create(nets, Some("default"), &net)
    })
    .await
    .unwrap();
    let vni = net["status"]["vni"].as_u64().unwrap();
    // The external LAN: a bridge on the host (gone with the test) and a network on it.
    let lan = format!("fltch{}", std::process::id() % 100_000);
    struct Bridge(String);
    impl Drop for Bridge {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", &self.0])
                .status();
        }
    }
    let _bridge = Bridge(lan.clone());
    for args in [
        vec!["link", "add", lan.as_str(), "type", "bridge"],
        vec!["link", "set", lan.as_str(), "up"],
    ] {
        assert!(std::process::Command::new("ip")
            .args(&args)
            .status()
            .unwrap()
            .success());
    }
    let (routers, fips) = (lookup("router").unwrap(), lookup("floatingip").unwrap());
    let (volume_kind, snapshot_kind) =
        (lookup("volume").unwrap(), lookup("volumesnapshot").unwrap());
    let vm_snapshot_kind = lookup("vmsnapshot").unwrap();
    let ext = json!({"metadata": {"name": "chaos-ext"}, "spec": {"type": "bridged", "bridge": lan,
        "cidr": "203.0.113.0/24", "gateway": "203.0.113.1"}});
    persist("create external network", || {
        admin.create(nets, Some("default"), &ext)
    })
    .await
    .unwrap();
    let (mut server_kills, mut agent_kills, mut slowest) = (0usize, 0usize, Duration::ZERO);
    let started = Instant::now();

    for round in 0..rounds {
        let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(round));
        let kills: Vec<Kill> = (0..rng.gen_range(1..=2))
            .map(|_| {
                // Half of them in the burst itself, the rest while the VMs are being made.
                let window = if rng.gen_bool(0.5) { 400 } else { 4000 };
                Kill {
                    at: Duration::from_millis(rng.gen_range(0..window)),
                    target: if rng.gen_bool(0.5) {
                        Target::Server
                    } else {
                        Target::Agent
                    },
                    down: Duration::from_millis(rng.gen_range(100..1500)),
                }
            })
            .collect();
        let mut kills = kills;
        kills.sort_by_key(|k| k.at);
        let powers: Vec<&str> = (0..per_round)
            .map(|_| {
                if rng.gen_bool(0.5) {
                    "Running"
                } else {
                    "Stopped"
                }
            })
            .collect();
        let flips: Vec<usize> = (0..per_round).filter(|_| rng.gen_bool(0.5)).collect();
        let flip_after = Duration::from_millis(rng.gen_range(0..2000));
        let delete_kill = rng.gen_bool(0.3).then(|| Kill {
            at: Duration::from_millis(rng.gen_range(0..500)),
            target: if rng.gen_bool(0.5) {
                Target::Server
            } else {
                Target::Agent
            },
            down: Duration::from_millis(rng.gen_range(100..1000)),
        });
        for k in kills.iter().chain(delete_kill.iter()) {
            match k.target {
                Target::Server => server_kills += 1,
                Target::Agent => agent_kills += 1,
            }
        }
        let round_start = Instant::now();
        let chaos = tokio::spawn(monkey(fleet.clone(), kills.clone()));

        // An image nobody has cached yet, and the burst of VMs from it.
        let image = format!("r{round}");
        let image_object = json!({"metadata": {"name": image}, "spec": {"source": {"url": format!("{url}/{tag}-{round}.qcow2")}}});
        let created = persist("create image", || {
            admin.create(images, Some("default"), &image_object)
        })
        .await;
        done_before(409, created).unwrap();
        // The round's volume, attached to its first VM, and a snapshot of it, made during the
        // kills too.
        let volume = format!("vol-{round}");
        let volume_object = json!({"metadata": {"name": volume}, "spec": {"size": "64Mi"}});
        let created = persist("create volume", || {
            admin.create(volume_kind, Some("default"), &volume_object)
        })
        .await;
        done_before(409, created).unwrap();
        let snapshot = format!("snap-{round}");
        let snapshot_object = json!({"metadata": {"name": snapshot}, "spec": {"volume": volume}});
        let names: Vec<String> = (0..per_round)
            .map(|i| format!("{tag}-{round}-{i}"))
            .collect();
        let creates = names.iter().zip(&powers).enumerate().map(|(i, (name, power))| {
            let mut vm = json!({"metadata": {"name": name}, "spec": {
                "image": image, "powerState": power, "resources": {"cpus": 1, "memory": "96Mi"},
                "networks": [{"network": "chaos"}],
                "boot": {"kernel": guest.join("vmlinuz"), "initrd": guest.join("initramfs.gz"), "cmdline": "console=ttyS0"}}});
            if i == 0 {
                vm["spec"]["disks"] = json!([{"name": "data", "volume": volume}]);
            }
            let admin = &admin;
            async move {
                let created = persist("create vm", || admin.create(vms, Some("default"), &vm)).await;
                done_before(409, created).unwrap();
            }
        });
        futures::future::join_all(creates).await;
        let created = persist("create snapshot", || {
            admin.create(snapshot_kind, Some("default"), &snapshot_object)
        })
        .await;
        done_before(409, created).unwrap();
        // A VM snapshot of the second VM, as soon as it has a node (refused until then).
        let vm_snapshot = format!("vmsnap-{round}");
        let vm_snapshot_object =
            json!({"metadata": {"name": vm_snapshot}, "spec": {"vm": names[1]}});
        let asked = Instant::now();
        loop {
            let created = persist("create VM snapshot", || {
                admin.create(vm_snapshot_kind, Some("default"), &vm_snapshot_object)
            })
            .await;
            match done_before(409, created) {
                Ok(()) => break,
                Err(e) if e.code() == Some(422) && asked.elapsed() < CONVERGE => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => panic!("round {round} (seed {seed}): the VM snapshot is refused: {e}"),
            }
        }
        let acked = names.clone();
        // The round's router and a floating IP for its first VM, made during the kills too.
        let router = format!("rt-{round}");
        let router_object = json!({"metadata": {"name": router}, "spec": {
            "external": {"network": "chaos-ext"}, "networks": ["chaos"]}});
        let created = persist("create router", || {
            admin.create(routers, Some("default"), &router_object)
        })
        .await;
        done_before(409, created).unwrap();
        let fip = format!("fip-{round}");
        let fip_object =
            json!({"metadata": {"name": fip}, "spec": {"network": "chaos-ext", "vm": names[0]}});
        let created = persist("create floating IP", || {
            admin.create(fips, Some("default"), &fip_object)
        })
        .await;
        done_before(409, created).unwrap();

        // Some power states change while the VMs are being made.
        tokio::time::sleep(flip_after).await;
        let mut wanted: BTreeMap<String, &str> =
            names.iter().cloned().zip(powers.iter().copied()).collect();
        for &i in &flips {
            let to = if powers[i] == "Running" {
                "Stopped"
            } else {
                "Running"
            };
            let patch = json!({"spec": {"powerState": to}});
            persist("flip", || {
                admin.patch(vms, Some("default"), &names[i], &patch, false)
            })
            .await
            .unwrap();
            wanted.insert(names[i].clone(), to);
        }
        chaos.await.unwrap();
        let last_restart = Instant::now();

        // Invariant: every acknowledged VM is there, with the last acknowledged power state,
        // and reaches it.
        loop {
            let mut behind = Vec::new();
            for name in &acked {
                let vm = persist("get", || admin.get(vms, Some("default"), name))
                    .await
                    .unwrap_or_else(|e| {
                        panic!("round {round}: acknowledged VM {name} is lost: {e}")
                    });
                assert_eq!(
                    phase_wanted(&vm),
                    wanted[name],
                    "round {round}: {name} lost an acknowledged power change"
                );
                if !converged(&vm) {
                    behind.push((name.clone(), vm["status"].clone()));
                }
            }
            if behind.is_empty() {
                break;
            }
            let fleet = fleet.lock().unwrap();
            assert!(
                last_restart.elapsed() < CONVERGE,
                "round {round} (seed {seed}): {} VMs did not converge within {CONVERGE:?} of the last restart (kills {kills:?}): {behind:?}\nserver log:\n{}\nagent log:\n{}",
                behind.len(),
                fleet.server.process.tail(20),
                fleet.agent.tail(40)
            );
            drop(fleet);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let converged_in = last_restart.elapsed();
        // Invariant: every VM holds its own address.
        let mut holders: BTreeMap<String, String> = BTreeMap::new();
        for name in &acked {
            let vm = persist("get", || admin.get(vms, Some("default"), name))
                .await
                .unwrap();
            let ip = vm["status"]["ips"][0].as_str().unwrap_or_else(|| {
                panic!(
                    "round {round} (seed {seed}): {name} has no address: {}",
                    vm["status"]
                )
            });
            if let Some(other) = holders.insert(ip.to_string(), name.clone()) {
                panic!("round {round} (seed {seed}): {name} and {other} both hold {ip}");
            }
        }
        // Invariant: the volume is made, its file in the node's default pool.
        loop {
            let v = persist("get volume", || {
                admin.get(volume_kind, Some("default"), &volume)
            })
            .await
            .unwrap();
            let path = v["status"]["path"].as_str().unwrap_or_default();
            let snap = persist("get snapshot", || {
                admin.get(snapshot_kind, Some("default"), &snapshot)
            })
            .await
            .unwrap();
            let frozen = snap["status"]["path"].as_str().unwrap_or_default();
            // A running first VM writes the volume's current file (the overlay on the snapshot).
            let first = persist("get", || admin.get(vms, Some("default"), &names[0]))
                .await
                .unwrap();
            let uid = first["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let live = if first["status"]["phase"] == "Running" {
                support::domain_xml(&uid).contains(&format!("'{path}'"))
            } else {
                true
            };
            let made = v["status"]["phase"] == "Available"
                && std::path::Path::new(path).exists()
                && snap["status"]["phase"] == "Ready"
                && std::path::Path::new(frozen).exists()
                && frozen != path
                && live;
            if made {
                break;
            }
            let fleet = fleet.lock().unwrap();
            assert!(
                last_restart.elapsed() < CONVERGE,
                "round {round} (seed {seed}): the volume is not made, its snapshot not taken or the running VM not on it (live {live}): {} / {}\nagent log:\n{}",
                v["status"],
                snap["status"],
                fleet.agent.tail(40)
            );
            drop(fleet);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Invariant: the VM snapshot is taken, its frozen root file there, and a running VM on
        // the overlay above it.
        let second_uid = persist("get", || admin.get(vms, Some("default"), &names[1]))
            .await
            .unwrap()["metadata"]["uid"]
            .as_str()
            .unwrap()
            .to_string();
        loop {
            let snap = persist("get VM snapshot", || {
                admin.get(vm_snapshot_kind, Some("default"), &vm_snapshot)
            })
            .await
            .unwrap();
            let frozen = snap["status"]["disks"][0]["path"]
                .as_str()
                .unwrap_or_default();
            let second = persist("get", || admin.get(vms, Some("default"), &names[1]))
                .await
                .unwrap();
            let suid = snap["metadata"]["uid"].as_str().unwrap_or_default();
            let live = second["status"]["phase"] != "Running"
                || support::domain_xml(&second_uid).contains(&format!("root.{suid}.qcow2"));
            if snap["status"]["phase"] == "Ready" && std::path::Path::new(frozen).exists() && live {
                break;
            }
            let fleet = fleet.lock().unwrap();
            assert!(
                last_restart.elapsed() < CONVERGE,
                "round {round} (seed {seed}): the VM snapshot is not taken or the running VM not on its overlay (live {live}): {}\nagent log:\n{}",
                snap["status"],
                fleet.agent.tail(40)
            );
            drop(fleet);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Invariant: the router runs on the host, and the floating IP forwards to the first VM.
        let router_uid = persist("get router", || {
            admin.get(routers, Some("default"), &router)
        })
        .await
        .unwrap()["metadata"]["uid"]
            .as_str()
            .unwrap()
            .to_string();
        let router_ns = std::path::Path::new("/run/netns").join(format!(
            "{}{}",
            flotilla_agent::routers::NAMESPACE_PREFIX,
            flotilla_agent::routers::router_id(&router_uid)
        ));
        let first_ip = holders
            .iter()
            .find(|(_, n)| **n == names[0])
            .map(|(ip, _)| ip.split('/').next().unwrap().to_string())
            .unwrap();
        loop {
            let f = persist("get floating IP", || admin.get(fips, Some("default"), &fip))
                .await
                .unwrap();
            if router_ns.exists() && f["status"]["fixedAddress"] == first_ip.as_str() {
                break;
            }
            let fleet = fleet.lock().unwrap();
            assert!(
                last_restart.elapsed() < CONVERGE,
                "round {round} (seed {seed}): the router is not running ({}) or the floating IP not bound to {first_ip}: {}\nagent log:\n{}",
                router_ns.display(),
                f["status"],
                fleet.agent.tail(40)
            );
            drop(fleet);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        slowest = slowest.max(converged_in);
        let uids: Vec<String> = futures::future::join_all(acked.iter().map(|n| {
            let admin = &admin;
            async move {
                persist("get", || admin.get(vms, Some("default"), n))
                    .await
                    .unwrap()["metadata"]["uid"]
                    .as_str()
                    .unwrap()
                    .to_string()
            }
        }))
        .await;

        // Delete everything (perhaps with one more kill), then nothing may be left.
        let chaos = tokio::spawn(monkey(fleet.clone(), delete_kill.into_iter().collect()));
        for (kind, name) in [(fips, &fip), (routers, &router), (snapshot_kind, &snapshot)] {
            let deleted = persist("delete", || admin.delete(kind, Some("default"), name)).await;
            done_before(404, deleted).unwrap();
        }
        // The VM snapshot is merged away before its VM can go (409 until then).
        let deleted = persist("delete VM snapshot", || {
            admin.delete(vm_snapshot_kind, Some("default"), &vm_snapshot)
        })
        .await;
        done_before(404, deleted).unwrap();
        let asked = Instant::now();
        while let Ok(snap) = persist("get VM snapshot", || {
            admin.get(vm_snapshot_kind, Some("default"), &vm_snapshot)
        })
        .await
        {
            let vm = persist("get", || admin.get(vms, Some("default"), &names[1])).await;
            let fleet = fleet.lock().unwrap();
            assert!(
                asked.elapsed() < CONVERGE,
                "round {round} (seed {seed}): the VM snapshot is not merged away: {}\nits VM: {:?}\nagent log:\n{}",
                snap,
                vm.map(|v| v["status"].clone()),
                fleet.agent.tail(60)
            );
            drop(fleet);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let roots: Vec<String> = std::fs::read_dir(data.join("vms").join(&second_uid))
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| {
                        n.starts_with("root") && n.ends_with(".qcow2") || n.ends_with(".mem")
                    })
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(
            roots,
            ["root.qcow2"],
            "round {round} (seed {seed}): the merged VM is not back on one root file"
        );
        for name in &acked {
            let deleted = persist("delete", || admin.delete(vms, Some("default"), name)).await;
            done_before(404, deleted).unwrap();
        }
        let deleted = persist("delete image", || {
            admin.delete(images, Some("default"), &image)
        })
        .await;
        done_before(404, deleted).unwrap();
        chaos.await.unwrap();
        let deleted_at = Instant::now();
        let all = ListParams::default();
        loop {
            let list = persist("list", || admin.list(vms, Some("default"), &all))
                .await
                .unwrap();
            if list["items"].as_array().unwrap().is_empty() {
                break;
            }
            let fleet = fleet.lock().unwrap();
            assert!(
                deleted_at.elapsed() < CONVERGE,
                "round {round} (seed {seed}): VMs not deleted within {CONVERGE:?}: {}\nagent log:\n{}",
                list["items"],
                fleet.agent.tail(40)
            );
            drop(fleet);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Invariant: the deleted VMs', router's and floating IP's addresses are free, and the
        // router's namespace is gone.
        for network in ["chaos", "chaos-ext"] {
            loop {
                let held = persist("addresses", || admin.network_addresses("default", network))
                    .await
                    .unwrap();
                if held["items"].as_array().unwrap().is_empty() {
                    break;
                }
                assert!(
                    deleted_at.elapsed() < CONVERGE,
                    "round {round} (seed {seed}): addresses of deleted objects are still held on {network}: {}",
                    held["items"]
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        // The volume goes once its snapshot is gone and its VM has let go (409 until then).
        loop {
            let deleted = persist("delete volume", || {
                admin.delete(volume_kind, Some("default"), &volume)
            })
            .await;
            match deleted {
                Ok(_) => break,
                Err(e) if e.code() == Some(404) => break,
                Err(e) if e.code() == Some(409) && deleted_at.elapsed() < CONVERGE => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => panic!("round {round} (seed {seed}): the volume cannot be deleted: {e}"),
            }
        }
        let pool_dir = data.join("pools/default");
        loop {
            let left: Vec<String> = std::fs::read_dir(&pool_dir)
                .map(|d| {
                    d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            let gone = persist("get volume", || {
                admin.get(volume_kind, Some("default"), &volume)
            })
            .await
            .is_err();
            if left.is_empty() && gone {
                break;
            }
            let fleet = fleet.lock().unwrap();
            assert!(
                deleted_at.elapsed() < CONVERGE,
                "round {round} (seed {seed}): the deleted volume left {left:?} (object gone: {gone})\nagent log:\n{}",
                fleet.agent.tail(40)
            );
            drop(fleet);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        while router_ns.exists() {
            let fleet = fleet.lock().unwrap();
            assert!(
                deleted_at.elapsed() < CONVERGE,
                "round {round} (seed {seed}): the deleted router's namespace stays\nagent log:\n{}",
                fleet.agent.tail(40)
            );
            drop(fleet);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let domains = support::domain_uuids();
        let left: Vec<&String> = uids.iter().filter(|u| domains.contains(u)).collect();
        assert!(
            left.is_empty(),
            "round {round} (seed {seed}): domains of deleted VMs remain: {left:?}"
        );
        let files: Vec<String> = std::fs::read_dir(data.join("vms"))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            files.is_empty(),
            "round {round} (seed {seed}): VM files remain: {files:?}"
        );
        let problems = cache_problems(&data.join("images"));
        assert!(
            problems.is_empty(),
            "round {round} (seed {seed}): the image cache is unsound: {problems:?}"
        );
        let fetches = images_served.hits(&format!("{tag}-{round}.qcow2"));
        println!(
            "{{\"round\":{round},\"kills\":\"{}\",\"vms\":{per_round},\"image_fetches\":{fetches},\"converged_ms\":{},\"round_ms\":{}}}",
            kills
                .iter()
                .chain(delete_kill.iter())
                .map(|k| format!("{:?}@{}ms/{}ms", k.target, k.at.as_millis(), k.down.as_millis()))
                .collect::<Vec<_>>()
                .join(" "),
            converged_in.as_millis(),
            round_start.elapsed().as_millis()
        );
    }
    // The networks go, and nothing of them stays on the host.
    for name in ["chaos", "chaos-ext"] {
        let deleted = persist("delete network", || {
            admin.delete(nets, Some("default"), name)
        })
        .await;
        done_before(404, deleted).unwrap();
    }
    let gone_by = Instant::now() + CONVERGE;
    let leftovers = || {
        let mut left: Vec<String> = ["fb", "fx", "fd"]
            .iter()
            .map(|p| format!("/sys/class/net/{p}-{vni}"))
            .chain([format!("/run/netns/flotilla-dhcp-{vni}")])
            .filter(|p| std::path::Path::new(p).exists())
            .collect();
        if support::dnsmasq_serving(vni) > 0 {
            left.push("dnsmasq".into());
        }
        left
    };
    while !leftovers().is_empty() {
        assert!(
            Instant::now() < gone_by,
            "(seed {seed}): the network's dataplane is left on the host: {:?}",
            leftovers()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let total = images_served.total();
    println!(
        "{{\"chaos_summary\":true,\"seed\":{seed},\"rounds\":{rounds},\"vms\":{},\"server_kills\":{server_kills},\"agent_kills\":{agent_kills},\"image_fetches\":{total},\"slowest_convergence_ms\":{},\"wall_s\":{},\"violations\":0}}",
        rounds as usize * per_round,
        slowest.as_millis(),
        started.elapsed().as_secs()
    );
}
