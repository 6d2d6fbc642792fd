//! The `flotilla` binary end to end: a real server process and the CLI verbs against it.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_flotilla");

struct ServerProcess {
    child: Child,
    config: PathBuf,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_server(data_dir: &Path) -> ServerProcess {
    let port = free_port();
    let child = Command::new(BIN)
        .args([
            "server",
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = ServerProcess {
        child,
        config: data_dir.join("admin.yaml"),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = std::fs::read_to_string(&server.config)
            .is_ok_and(|c| c.contains(&format!(":{port}")))
            && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        if ready {
            return server;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not start within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn cli(server: &ServerProcess, args: &[&str]) -> Output {
    cli_stdin(server, args, "")
}

fn cli_stdin(server: &ServerProcess, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env("FLOTILLA_CONFIG", &server.config)
        .env("HOME", "/nonexistent")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "command failed: {}{}",
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

const OBJECTS: &str = r#"
apiVersion: flotilla.dev/v1alpha1
kind: Project
metadata: {name: team-a}
---
apiVersion: flotilla.dev/v1alpha1
kind: VMClass
metadata: {name: small}
spec: {cpus: 1, memory: 1Gi}
---
apiVersion: flotilla.dev/v1alpha1
kind: VirtualMachine
metadata: {name: web, labels: {app: web}}
spec: {class: small, image: debian-12}
---
apiVersion: flotilla.dev/v1alpha1
kind: VirtualMachine
metadata: {name: db, namespace: team-a, labels: {app: db}}
spec: {resources: {cpus: 2, memory: 4Gi}, image: debian-12, nodeName: node-1}
"#;

#[test]
fn apply_get_describe_delete() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_server(dir.path());
    let out = ok(cli_stdin(&s, &["apply", "-f", "-"], OBJECTS));
    assert_eq!(out, "project/team-a created\nvmclass/small created\nvirtualmachine/web created\nvirtualmachine/db created\n");
    let out = ok(cli_stdin(&s, &["apply", "-f", "-"], OBJECTS));
    assert!(
        out.lines().all(|l| l.ends_with("unchanged")),
        "re-applying the same file changes nothing:\n{out}"
    );
    let changed = OBJECTS.replace("cpus: 2", "cpus: 4");
    assert!(
        ok(cli_stdin(&s, &["apply", "-f", "-"], &changed)).contains("virtualmachine/db configured")
    );

    let table = ok(cli(&s, &["get", "vms"]));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["NAME", "PHASE", "NODE", "IP", "AGE"],
        "{table}"
    );
    assert!(lines[1].starts_with("web "), "{table}");
    assert_eq!(lines.len(), 2, "only the default project's VM: {table}");
    let all = ok(cli(&s, &["get", "vm", "-A", "-o", "wide"]));
    assert!(
        all.contains("PROJECT") && all.contains("team-a") && all.contains("default"),
        "{all}"
    );
    let json: serde_json::Value = serde_json::from_str(&ok(cli(
        &s,
        &["get", "virtualmachine", "db", "-p", "team-a", "-o", "json"],
    )))
    .unwrap();
    assert_eq!(json["spec"]["resources"]["cpus"], 4);
    let selected = ok(cli(&s, &["get", "vms", "-A", "-l", "app=db", "-o", "name"]));
    assert_eq!(selected, "virtualmachine/db\n");
    let fields = ok(cli(
        &s,
        &[
            "get",
            "vms",
            "-A",
            "--field-selector",
            "spec.nodeName=node-1",
            "-o",
            "name",
        ],
    ));
    assert_eq!(fields, "virtualmachine/db\n");
    let yaml = ok(cli(&s, &["get", "vmclass", "-o", "yaml"]));
    assert!(
        yaml.contains("kind: VMClassList") && yaml.contains("memory: 1Gi"),
        "{yaml}"
    );
    let described = ok(cli(&s, &["describe", "vm", "web"]));
    assert!(
        described.contains("Name:         web")
            && described.contains("app=web")
            && described.contains("class: small"),
        "{described}"
    );

    assert_eq!(
        ok(cli(&s, &["delete", "vm", "db", "-p", "team-a"])),
        "virtualmachine/db deleted\n"
    );
    let empty = cli(&s, &["get", "vms", "-p", "team-a"]);
    assert!(empty.status.success());
    assert!(stderr(&empty).contains("No virtualmachines found in project team-a"));
}

#[test]
fn errors_print_the_servers_message_and_exit_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_server(dir.path());
    let bad = "apiVersion: flotilla.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {name: web}\nspec: {resources: {cpus: 1, memory: 2GB}, image: x}\n";
    let out = cli_stdin(&s, &["apply", "-f", "-"], bad);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("spec.resources.memory: invalid quantity \"2GB\""),
        "{}",
        stderr(&out)
    );
    for (args, needle) in [
        (vec!["get", "pods"], "unknown kind \"pods\""),
        (
            vec!["get", "vm", "nope"],
            "VirtualMachine \"nope\" not found",
        ),
        (vec!["delete", "vm", "nope"], "not found"),
        (vec!["get", "vms", "-l", "a in b"], "invalid selector"),
    ] {
        let out = cli(&s, &args);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
    }
    let no_config = Command::new(BIN)
        .args(["get", "vms"])
        .env_remove("FLOTILLA_CONFIG")
        .env("HOME", "/nonexistent")
        .output()
        .unwrap();
    assert!(!no_config.status.success());
    assert!(
        stderr(&no_config).contains("no server configured"),
        "{}",
        stderr(&no_config)
    );
    let wrong_token = Command::new(BIN)
        .args(["get", "vms", "--token", "flt.admin.bad"])
        .env("FLOTILLA_CONFIG", &s.config)
        .output()
        .unwrap();
    assert!(
        stderr(&wrong_token).contains("bearer token is not valid"),
        "{}",
        stderr(&wrong_token)
    );
}

#[test]
fn watch_prints_changes_and_delete_waits_for_finalizers() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_server(dir.path());
    let vm = "apiVersion: flotilla.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {name: web, finalizers: [flotilla.dev/test]}\nspec: {resources: {cpus: 1, memory: 1Gi}, image: x}\n";
    ok(cli_stdin(&s, &["apply", "-f", "-"], vm));
    let mut watch = Command::new(BIN)
        .args(["get", "vms", "-w", "-o", "name"])
        .env("FLOTILLA_CONFIG", &s.config)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "virtualmachine/web");
    let mut waiter = Command::new(BIN)
        .args(["delete", "vm", "web", "--wait", "--timeout", "60s"])
        .env("FLOTILLA_CONFIG", &s.config)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        waiter.try_wait().unwrap().is_none(),
        "delete --wait waits while a finalizer remains"
    );
    // Removing the finalizer is what an agent does when cleanup is complete.
    let config: flotilla_types::clientconfig::ClientConfig =
        serde_yaml::from_str(&std::fs::read_to_string(&s.config).unwrap()).unwrap();
    let ctx = config.context(None).unwrap();
    let code = admin::merge_patch(
        ctx,
        "/apis/flotilla.dev/v1alpha1/namespaces/default/virtualmachines/web",
        r#"{"metadata":{"finalizers":null}}"#,
    );
    assert_eq!(code, 200);
    let out = waiter.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(stdout(&out), "virtualmachine/web deleted\n");
    assert_eq!(
        lines.next().unwrap().unwrap(),
        "virtualmachine/web",
        "the watch printed the deletion mark"
    );
    let _ = watch.kill();
    let _ = watch.wait();
}

#[test]
fn completion_scripts() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(BIN)
            .args(["completion", shell])
            .output()
            .unwrap();
        assert!(out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("flotilla"),
            "{shell}"
        );
    }
}

/// Objects acknowledged with 2xx survive `kill -9` of the server.
#[test]
fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_server(dir.path());
    let mut docs = String::new();
    for i in 0..50 {
        docs.push_str(&format!(
            "---\napiVersion: flotilla.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: vm-{i}}}\nspec: {{resources: {{cpus: 1, memory: 1Gi}}, image: x}}\n"
        ));
    }
    let out = ok(cli_stdin(&s, &["apply", "-f", "-"], &docs));
    assert_eq!(out.lines().filter(|l| l.ends_with("created")).count(), 50);
    let mut s = s;
    // SIGKILL: no shutdown path runs.
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    let restarted = start_server(dir.path());
    let names = ok(cli(&restarted, &["get", "vms", "-o", "name"]));
    assert_eq!(
        names.lines().count(),
        50,
        "every acknowledged object survived:\n{names}"
    );
}

mod admin {
    use flotilla_types::clientconfig::Context;

    /// A merge patch with the admin credentials, from a plain thread.
    pub fn merge_patch(ctx: &Context, path: &str, body: &'static str) -> u16 {
        let ctx = ctx.clone();
        let path = path.to_string();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let client = flotilla_client::Client::from_context(&ctx).unwrap();
                let resp = client
                    .send(
                        reqwest::Method::PATCH,
                        &path,
                        &[],
                        Some(("application/merge-patch+json", body.as_bytes().to_vec())),
                    )
                    .await
                    .unwrap();
                resp.status().as_u16()
            })
        })
        .join()
        .unwrap()
    }
}

#[test]
fn apply_reads_every_yaml_file_of_a_directory_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_server(&dir.path().join("data"));
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    std::fs::write(manifests.join("10-class.yaml"), "apiVersion: flotilla.dev/v1alpha1\nkind: VMClass\nmetadata: {name: tiny}\nspec: {cpus: 1, memory: 256Mi}\n").unwrap();
    std::fs::write(
        manifests.join("20-vm.yml"),
        "apiVersion: flotilla.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {name: a}\nspec: {class: tiny, boot: {kernel: /boot/vmlinuz}}\n",
    )
    .unwrap();
    std::fs::write(manifests.join("notes.txt"), "not a manifest").unwrap();
    let out = ok(cli(&s, &["apply", "-f", manifests.to_str().unwrap()]));
    assert_eq!(out, "vmclass/tiny created\nvirtualmachine/a created\n");
}

/// The daemons' help lists their own flags; the connection flags belong to the client commands.
#[test]
fn daemons_do_not_offer_client_flags() {
    let help = |args: &[&str]| {
        let out = Command::new(BIN).args(args).arg("--help").output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    for daemon in ["server", "up"] {
        let text = help(&[daemon]);
        for flag in [
            "--token",
            "--context",
            "--config",
            "--certificate-authority",
        ] {
            assert!(
                !text.contains(flag),
                "flotilla {daemon} --help offers {flag}:\n{text}"
            );
        }
        assert!(text.contains("--data-dir"), "{text}");
    }
    for client in [
        &["get"][..],
        &["node", "cordon"],
        &["vm", "start"],
        &["apply"],
    ] {
        let text = help(client);
        assert!(
            text.contains("--token") && text.contains("--context"),
            "{client:?}: {text}"
        );
    }
}

/// `flotilla image upload`: makes the Image and streams the file; the server checks it (a
/// checksum that differs is refused, saying which field) and reports it Ready.
#[test]
fn image_upload() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_server(dir.path());
    let file = dir.path().join("disk.raw");
    std::fs::write(&file, vec![7u8; 3 << 20]).unwrap();
    let path = file.display().to_string();
    let wrong = "0".repeat(64);
    let refused = cli(
        &s,
        &[
            "image", "upload", "bad", &path, "--format", "raw", "--sha256", &wrong,
        ],
    );
    assert!(
        !refused.status.success() && stderr(&refused).contains("spec.sha256"),
        "{}",
        stderr(&refused)
    );
    let out = ok(cli(
        &s,
        &["image", "upload", "disk", &path, "--format", "raw"],
    ));
    assert!(out.contains("image/disk uploaded: 3145728 bytes"), "{out}");
    let image = ok(cli(&s, &["get", "image", "disk", "-o", "json"]));
    assert!(image.contains("\"phase\": \"Ready\""), "{image}");
}

/// `flotilla vm snapshot|revert`: a snapshot is placed on its VM's node (one on no node is
/// refused, saying so), a revert is a request on the VM, and the VM stays while it has one.
#[test]
fn vm_snapshot_verbs() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_server(dir.path());
    let vms = "apiVersion: flotilla.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {name: web}\nspec: {resources: {cpus: 1, memory: 1Gi}, boot: {kernel: /k}, nodeName: n1}\n---\napiVersion: flotilla.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {name: db}\nspec: {resources: {cpus: 1, memory: 1Gi}, boot: {kernel: /k}}\n";
    ok(cli_stdin(&s, &["apply", "-f", "-"], vms));
    let out = ok(cli(&s, &["vm", "snapshot", "web", "before"]));
    assert!(
        out.contains("vmsnapshot/before of virtualmachine/web created"),
        "{out}"
    );
    let listed = ok(cli(&s, &["get", "vmsnap", "-o", "wide"]));
    assert!(
        listed.contains("before") && listed.contains("web") && listed.contains("n1"),
        "placed on the VM's node: {listed}"
    );
    let unplaced = cli(&s, &["vm", "snapshot", "db", "x", "--no-memory"]);
    assert!(
        !unplaced.status.success() && stderr(&unplaced).contains("not on a node yet"),
        "{}",
        stderr(&unplaced)
    );
    ok(cli(&s, &["vm", "revert", "web", "before"]));
    let web = ok(cli(&s, &["get", "vm", "web", "-o", "json"]));
    assert!(
        web.contains("\"flotilla.dev/revert-to\": \"before "),
        "{web}"
    );
    let held = cli(&s, &["delete", "vm", "web"]);
    assert!(
        !held.status.success() && stderr(&held).contains("VM snapshot"),
        "{}",
        stderr(&held)
    );
}

/// `flotilla volume`: made, attached (once; a second VM gets the holder's name), detached (a
/// VM on no node lets go at once), grown but not shrunk, snapshotted and reverted.
#[test]
fn volume_verbs() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_server(dir.path());
    let vms = "apiVersion: flotilla.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {name: web}\nspec: {resources: {cpus: 1, memory: 1Gi}, boot: {kernel: /k}}\n---\napiVersion: flotilla.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {name: db}\nspec: {resources: {cpus: 1, memory: 1Gi}, boot: {kernel: /k}}\n";
    ok(cli_stdin(&s, &["apply", "-f", "-"], vms));
    let out = ok(cli(&s, &["volume", "create", "data", "--size", "1Gi"]));
    assert!(out.contains("volume/data created"), "{out}");
    let out = ok(cli(&s, &["volume", "attach", "data", "--to", "web"]));
    assert!(out.contains("attached to virtualmachine/web"), "{out}");
    let web = ok(cli(&s, &["get", "vm", "web", "-o", "json"]));
    assert!(web.contains("\"volume\": \"data\""), "{web}");
    let again = cli(&s, &["volume", "attach", "data", "--to", "web"]);
    assert!(
        !again.status.success() && stderr(&again).contains("already"),
        "{}",
        stderr(&again)
    );
    let other = cli(&s, &["volume", "attach", "data", "--to", "db"]);
    assert!(!other.status.success(), "a second VM cannot attach it");
    assert!(
        stderr(&other).contains("attached to VM \"web\""),
        "{}",
        stderr(&other)
    );
    ok(cli(&s, &["volume", "detach", "data", "--from", "web"]));
    let data = ok(cli(&s, &["get", "volume", "data", "-o", "json"]));
    assert!(
        !data.contains("attachedTo"),
        "web never ran, so it let go at once: {data}"
    );
    ok(cli(
        &s,
        &["volume", "attach", "data", "--to", "db", "--read-only"],
    ));
    ok(cli(&s, &["volume", "resize", "data", "2Gi"]));
    let shrink = cli(&s, &["volume", "resize", "data", "1Gi"]);
    assert!(
        !shrink.status.success() && stderr(&shrink).contains("shrink"),
        "{}",
        stderr(&shrink)
    );
    let out = ok(cli(&s, &["volume", "snapshot", "data", "before"]));
    assert!(
        out.contains("volumesnapshot/before of volume/data created"),
        "{out}"
    );
    let listed = ok(cli(&s, &["get", "snapshots"]));
    assert!(
        listed.contains("before") && listed.contains("data"),
        "{listed}"
    );
    ok(cli(&s, &["volume", "revert", "data", "before"]));
    let data = ok(cli(&s, &["get", "volume", "data", "-o", "json"]));
    assert!(
        data.contains("\"flotilla.dev/revert-to\": \"before "),
        "{data}"
    );
    let linked = cli(
        &s,
        &["volume", "create", "copy", "--size", "1Gi", "--linked"],
    );
    assert!(
        !linked.status.success() && stderr(&linked).contains("--from"),
        "{}",
        stderr(&linked)
    );
    ok(cli(
        &s,
        &[
            "volume",
            "create",
            "copy",
            "--size",
            "2Gi",
            "--from-snapshot",
            "before",
            "--linked",
        ],
    ));
}
