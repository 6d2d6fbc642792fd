//! Volumes in an NFS pool, on a real NFS server (nfs-ganesha and rpcbind in a network
//! namespace joined to the host by a veth pair: scripts/nfs-server-up.sh) and a real guest
//! (libvirtd, QEMU TCG with libnfs, the tiny guest), on a VM of the other of two nodes: no
//! kernel NFS client anywhere. The files belong to QEMU's user; the guest sees a qcow2 volume
//! plugged with its serial and the bytes the host put there, grown at once, and unplugged; its
//! writes are in the file; a full copy (to raw) and a volume from an image are made on the
//! export; linked clones and snapshots are refused, saying why; nothing is left on the export.
//!
//! One server per run: everything that needs it is in this one test. Needs nfs-ganesha,
//! nfs-ganesha-vfs, rpcbind, qemu-block-extra, libvirtd and the tiny guest; `make test`
//! provides all of them.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use flotilla_agent::domain::VirtType;
use flotilla_agent::libvirt::Libvirt;
use flotilla_agent::AgentConfig;
use flotilla_controllers::testkit::{eventually, TestCluster};
use flotilla_types::registry::lookup;
use serde_json::json;

const SERVER: &str = "198.18.253.2";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tiny_guest() -> PathBuf {
    let status = Command::new(repo().join("scripts/build-tiny-guest.sh"))
        .status()
        .unwrap();
    assert!(status.success(), "building the tiny guest failed");
    repo().join("target/guests/tiny").canonicalize().unwrap()
}

/// A throwaway NFS server, stopped (its namespace and directory removed) when dropped.
struct Server(PathBuf);

impl Server {
    fn start(dir: &Path) -> Server {
        let out = Command::new(repo().join("scripts/nfs-server-up.sh"))
            .arg(dir)
            .output()
            .expect("scripts/nfs-server-up.sh runs");
        let server = Server(dir.to_path_buf());
        assert!(
            out.status.success(),
            "the NFS server did not start (are nfs-ganesha and nfs-ganesha-vfs installed? make test installs them): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        server
    }

    fn export(&self) -> PathBuf {
        self.0.join("export")
    }

    fn files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.export())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// QEMU's URL of `file` on the export, as QEMU's user.
    fn url(&self, file: &str) -> String {
        format!("nfs://{SERVER}/export/{file}?uid=64055&gid=64055")
    }

    /// `len` bytes at `offset` of volume file `file` (of `format`), read through libnfs.
    fn read(&self, file: &str, format: &str, offset: u64, len: usize) -> Vec<u8> {
        let out_file = self.0.join("read.bin");
        let _ = std::fs::remove_file(&out_file);
        let out = Command::new("qemu-img")
            .args(["dd", "-f", format, "-O", "raw", "bs=512"])
            .arg(format!("count={}", (offset as usize + len).div_ceil(512)))
            .arg(format!("if={}", self.url(file)))
            .arg(format!("of={}", out_file.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read(&out_file).unwrap()[offset as usize..offset as usize + len].to_vec()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/nfs-server-down.sh"))
            .arg(&self.0)
            .status();
    }
}

/// The serial log of `name` through the API once `done` holds for it (or a panic showing it).
async fn log_until(
    admin: &flotilla_client::Client,
    name: &str,
    what: &str,
    seconds: u64,
    done: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut text = String::new();
    while Instant::now() < deadline {
        if let Ok(stream) = admin.vm_log("default", name, false).await {
            let mut stream = Box::pin(stream);
            let mut bytes = Vec::new();
            while let Some(Ok(chunk)) = futures::StreamExt::next(&mut stream).await {
                bytes.extend_from_slice(&chunk);
            }
            text = String::from_utf8_lossy(&bytes).into_owned();
            if done(&text) {
                return text;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("timed out after {seconds} s waiting until {what}; the guest printed:\n{text}");
}

/// Agent `node` of the cluster on the host's libvirtd, its data in the cluster's directory; it
/// runs until the returned sender is dropped.
async fn start_agent(cluster: &TestCluster, node: &str) -> tokio::sync::watch::Sender<bool> {
    let mut agent = AgentConfig::new(
        vec![cluster.server.url.clone()],
        node,
        cluster.dir.path().join(node),
    );
    agent.join_token = Some(cluster.join_token().await);
    agent.libvirt_uri = "qemu:///system".into();
    agent.virt_type = VirtType::Qemu;
    agent.shutdown_timeout = Duration::from_secs(2);
    agent.resync = Duration::from_secs(3);
    let libvirt = Libvirt::open("qemu:///system")
        .await
        .expect("libvirtd is running (make test starts it)");
    let (stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(flotilla_agent::run_with(agent, libvirt, rx));
    stop
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nfs_volumes_are_shared_plugged_grown_copied_and_removed() {
    let guest = tiny_guest();
    let cluster = TestCluster::start().await;
    std::fs::set_permissions(cluster.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let server = Server::start(&cluster.dir.path().join("nfs"));
    let admin = &cluster.admin;
    let _a = start_agent(&cluster, "nfs-a").await;
    let _b = start_agent(&cluster, "nfs-b").await;
    let (pools, vms, volumes, images, snapshots) = (
        lookup("storagepool").unwrap(),
        lookup("vm").unwrap(),
        lookup("volume").unwrap(),
        lookup("image").unwrap(),
        lookup("volumesnapshot").unwrap(),
    );

    admin
        .create(
            pools,
            None,
            &json!({"metadata": {"name": "shared"}, "spec": {"type": "nfs",
                    "nfs": {"server": SERVER, "export": "/export"}}}),
        )
        .await
        .unwrap();
    let pool = eventually("both nodes serve the nfs pool", 60, async || {
        let p = admin.get(pools, None, "shared").await.ok()?;
        let ready = |n: &str| p["status"]["nodes"][n]["phase"] == "Ready";
        (ready("nfs-a") && ready("nfs-b")).then_some(p)
    })
    .await;
    assert!(
        pool["status"]["nodes"]["nfs-a"]["capacity"]
            .as_u64()
            .unwrap()
            > 0,
        "{pool}"
    );

    let made = Instant::now();
    admin
        .create(
            volumes,
            Some("default"),
            &json!({"metadata": {"name": "data"}, "spec": {"pool": "shared", "size": "64Mi"}}),
        )
        .await
        .unwrap();
    let volume = eventually("the volume is Available", 60, async || {
        let v = admin.get(volumes, Some("default"), "data").await.ok()?;
        (v["status"]["phase"] == "Available").then_some(v)
    })
    .await;
    let create_s = made.elapsed().as_secs_f64();
    let uid = volume["metadata"]["uid"].as_str().unwrap().to_string();
    let file = format!("{uid}.qcow2");
    assert_eq!(volume["status"]["shared"], true, "{volume}");
    assert_eq!(
        volume["status"]["path"],
        format!("nfs://{SERVER}/export/{file}"),
        "{volume}"
    );
    assert_eq!(server.files(), vec![file.clone()]);
    let meta = std::fs::metadata(server.export().join(&file)).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (64055, 64055),
        "QEMU's user owns it"
    );

    // Refused, saying why: linked clones and snapshots of volumes in an nfs pool.
    let linked = json!({"metadata": {"name": "l"}, "spec": {"pool": "shared", "size": "64Mi",
        "source": {"volume": "data", "mode": "linked"}}});
    let refused = admin
        .create(volumes, Some("default"), &linked)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(422), "{refused}");
    assert!(
        refused.to_string().contains("spec.source.mode"),
        "{refused}"
    );
    let snapshot = json!({"metadata": {"name": "s"}, "spec": {"volume": "data"}});
    let refused = admin
        .create(snapshots, Some("default"), &snapshot)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(422), "{refused}");
    assert!(refused.to_string().contains("nfs pool"), "{refused}");

    // The host's bytes at the volume's start, written through libnfs as QEMU's user.
    let suffix: u32 = rand::random::<u32>() % 100_000;
    let hello = cluster.dir.path().join("hello.bin");
    let mut bytes = format!("hello-{suffix}").into_bytes();
    bytes.resize(512, 0);
    std::fs::write(&hello, &bytes).unwrap();
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c"])
        .arg(format!("write -s {} 0 512", hello.display()))
        .arg(server.url(&file))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A VM on the other node: the volume follows it, and the guest sees it.
    let name = format!("nfs-{suffix}");
    let vm = json!({"metadata": {"name": name}, "spec": {
        "nodeName": "nfs-b",
        "resources": {"cpus": 1, "memory": "256Mi"},
        "boot": {"kernel": guest.join("vmlinuz"), "initrd": guest.join("initramfs.gz"), "cmdline": "console=ttyS0 panic=-1"},
        "rootDisk": {"size": "32Mi"},
    }});
    admin.create(vms, Some("default"), &vm).await.unwrap();
    log_until(admin, &name, "the guest has booted", 180, |t| {
        t.contains("FLOTILLA-DISK vda serial=- sectors=65536")
    })
    .await;
    let plugged = Instant::now();
    admin
        .patch(
            vms,
            Some("default"),
            &name,
            &json!({"spec": {"disks": [{"name": "data", "volume": "data"}]}}),
            false,
        )
        .await
        .unwrap();
    let serial: String = uid.chars().take(20).collect();
    let seen = format!("serial={serial} sectors=131072 head=hello-{suffix}");
    let log = log_until(admin, &name, "the guest sees the NFS volume", 120, |t| {
        t.contains(&seen)
    })
    .await;
    let attach_s = plugged.elapsed().as_secs_f64();
    let device = log
        .lines()
        .find(|l| l.contains(&seen))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    let volume = admin.get(volumes, Some("default"), "data").await.unwrap();
    assert_eq!(volume["status"]["node"], "nfs-b", "{volume}");

    // Grown online through the guest's QEMU.
    let grown = Instant::now();
    admin
        .patch(
            volumes,
            Some("default"),
            "data",
            &json!({"spec": {"size": "128Mi"}}),
            false,
        )
        .await
        .unwrap();
    let bigger = format!("FLOTILLA-DISK {device} serial={serial} sectors=262144");
    log_until(admin, &name, "the guest sees the volume grow", 120, |t| {
        t.contains(&bigger)
    })
    .await;
    let resize_s = grown.elapsed().as_secs_f64();
    eventually("the volume reports its new size", 30, async || {
        let v = admin.get(volumes, Some("default"), "data").await.ok()?;
        (v["status"]["capacity"] == 128u64 << 20).then_some(())
    })
    .await;
    let wanted = format!("guest-wrote-{device}");
    eventually("the guest's write is in the file", 30, async || {
        (server.read(&file, "qcow2", 4096, wanted.len()) == wanted.as_bytes()).then_some(())
    })
    .await;

    let unplugged = Instant::now();
    admin
        .patch(
            vms,
            Some("default"),
            &name,
            &json!({"spec": {"disks": []}}),
            false,
        )
        .await
        .unwrap();
    log_until(admin, &name, "the guest sees the volume go", 120, |t| {
        t.contains(&format!("FLOTILLA-DISK-GONE {device}"))
    })
    .await;
    let detach_s = unplugged.elapsed().as_secs_f64();
    println!(
        "nfs volume: made {create_s:.1} s; on a running guest: plugged and seen {attach_s:.1} s, grown and seen {resize_s:.1} s, unplugged and gone {detach_s:.1} s"
    );

    // A full copy, to raw, holds the volume's bytes; a volume from an image holds the image's.
    admin
        .create(
            volumes,
            Some("default"),
            &json!({"metadata": {"name": "copy"}, "spec": {"pool": "shared", "size": "128Mi",
                    "format": "raw", "source": {"volume": "data"}}}),
        )
        .await
        .unwrap();
    let copy = eventually("the copy is Available", 60, async || {
        let v = admin.get(volumes, Some("default"), "copy").await.ok()?;
        (v["status"]["phase"] == "Available").then_some(v)
    })
    .await;
    let copy_file = format!("{}.raw", copy["metadata"]["uid"].as_str().unwrap());
    let head = format!("hello-{suffix}");
    assert_eq!(
        server.read(&copy_file, "raw", 0, head.len()),
        head.as_bytes()
    );
    let qcow2 = cluster.dir.path().join("seedling.qcow2");
    for args in [
        vec![
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            qcow2.to_str().unwrap(),
            "16M",
        ],
        vec![
            "qemu-io",
            "-c",
            "write -P 0x5a 0 1M",
            qcow2.to_str().unwrap(),
        ],
    ] {
        let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    admin
        .create(
            images,
            Some("default"),
            &json!({"metadata": {"name": "seedling"}, "spec": {"source": {"path": qcow2}}}),
        )
        .await
        .unwrap();
    admin
        .create(
            volumes,
            Some("default"),
            &json!({"metadata": {"name": "from-image"}, "spec": {"pool": "shared", "size": "32Mi",
                    "source": {"image": "seedling"}}}),
        )
        .await
        .unwrap();
    let from_image = eventually("the volume from the image is Available", 90, async || {
        let v = admin
            .get(volumes, Some("default"), "from-image")
            .await
            .ok()?;
        (v["status"]["phase"] == "Available").then_some(v)
    })
    .await;
    let image_file = format!("{}.qcow2", from_image["metadata"]["uid"].as_str().unwrap());
    assert_eq!(server.read(&image_file, "qcow2", 0, 4096), vec![0x5a; 4096]);
    assert_eq!(from_image["status"]["capacity"], 32u64 << 20);

    // Deleting everything leaves nothing on the export.
    admin.delete(vms, Some("default"), &name).await.unwrap();
    for v in ["data", "copy", "from-image"] {
        admin.delete(volumes, Some("default"), v).await.unwrap();
    }
    eventually("every volume is gone", 60, async || {
        let left = admin
            .list(volumes, Some("default"), &Default::default())
            .await
            .ok()?;
        left["items"].as_array()?.is_empty().then_some(())
    })
    .await;
    assert_eq!(server.files(), Vec::<String>::new());
    eventually("the VM is gone", 60, async || {
        admin
            .get(vms, Some("default"), &name)
            .await
            .is_err()
            .then_some(())
    })
    .await;
}
