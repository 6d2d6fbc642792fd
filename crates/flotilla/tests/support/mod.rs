//! Real processes for end-to-end tests: the `flotilla` server and agent binaries, started,
//! killed with SIGKILL and restarted on the same port and data directory, with their logs kept
//! for failure messages; and the libvirt domains a test made, removed however it ends.
#![allow(dead_code)]

pub mod guests;
pub mod hosts;
pub mod nfs;
pub mod oidc;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use flotilla_client::Client;
use flotilla_types::clientconfig::ClientConfig;

pub const BIN: &str = env!("CARGO_BIN_EXE_flotilla");

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// The tiny guest's kernel and initramfs (built once by the script; `make test` runs it too).
pub fn tiny_guest() -> PathBuf {
    let status = Command::new(repo().join("scripts/build-tiny-guest.sh"))
        .status()
        .unwrap();
    assert!(status.success(), "the tiny guest builds");
    repo().join("target/guests/tiny")
}

/// A temporary directory QEMU (another user) can traverse.
pub fn traversable_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    dir
}

/// One `flotilla` process that can be killed and started again with the same arguments.
pub struct Process {
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    /// A hard open-file limit to run it under.
    open_files: Option<u64>,
}

impl Process {
    pub fn new(args: Vec<String>, log: PathBuf) -> Self {
        Self::with_open_files(args, log, None)
    }

    /// Like [`Process::new`], with the open-file limit (soft and hard) set to `open_files`.
    pub fn with_open_files(args: Vec<String>, log: PathBuf, open_files: Option<u64>) -> Self {
        let mut p = Process {
            args,
            log,
            child: None,
            open_files,
        };
        p.start();
        p
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_lines(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut command = Command::new(BIN);
        if let Some(n) = self.open_files {
            use std::os::unix::process::CommandExt;
            // SAFETY: only setrlimit, which is async-signal-safe, runs in the child.
            unsafe {
                command.pre_exec(move || {
                    let l = libc::rlimit {
                        rlim_cur: n as libc::rlim_t,
                        rlim_max: n as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = command
            .args(&self.args)
            .env("FLOTILLA_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// SIGKILL: no chance to clean up, as in a crash or an OOM kill.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// The last `n` lines of its log.
    pub fn tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
        // A failing test's processes say what they saw: their logs go with the temporary
        // directory, and CI keeps only the test's own output.
        if std::thread::panicking() {
            eprintln!(
                "--- the last lines of {} ---\n{}",
                self.log.display(),
                self.tail(40)
            );
        }
    }
}

/// A `flotilla server` on a fixed loopback port and data directory.
pub struct Server {
    pub process: Process,
    pub port: u16,
    pub address: String,
    pub data_dir: PathBuf,
}

impl Server {
    pub fn start(dir: &Path) -> Self {
        Self::start_with_open_files(dir, None)
    }

    /// A server whose process may hold at most `open_files` descriptors (hard limit).
    pub fn start_with_open_files(dir: &Path, open_files: Option<u64>) -> Self {
        Self::start_on(dir, "127.0.0.1", open_files)
    }

    /// A server listening on `address` (e.g. one hosts in other namespaces reach).
    pub fn start_on(dir: &Path, address: &str, open_files: Option<u64>) -> Self {
        let port = flotilla_store::etcd_cluster::free_port();
        let data_dir = dir.join("server");
        let args = vec![
            "server".into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--listen".into(),
            format!("{address}:{port}"),
        ];
        Server {
            process: Process::with_open_files(args, dir.join("server.log"), open_files),
            port,
            address: address.to_string(),
            data_dir,
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}:{}", self.address, self.port)
    }

    /// An admin client, once the server has written its credentials and answers.
    pub async fn admin(&self) -> Client {
        let path = self.data_dir.join("admin.yaml");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(text) = std::fs::read_to_string(&path) {
                let config: ClientConfig = serde_yaml::from_str(&text).unwrap();
                let client = Client::from_context(config.context(None).unwrap()).unwrap();
                if client
                    .request_json(reqwest::Method::GET, "/version", &[], None)
                    .await
                    .is_ok()
                {
                    return client;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the server did not come up:\n{}",
                self.process.tail(20)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The admin token the server wrote into admin.yaml.
    pub fn admin_token(&self) -> String {
        let text = std::fs::read_to_string(self.data_dir.join("admin.yaml")).unwrap();
        let config: ClientConfig = serde_yaml::from_str(&text).unwrap();
        config.context(None).unwrap().token.clone().unwrap()
    }

    /// A raw HTTP client trusting the server's CA, for requests the typed client does not make.
    pub fn http(&self) -> reqwest::Client {
        let ca = std::fs::read(self.data_dir.join("pki/ca.crt")).unwrap();
        reqwest::Client::builder()
            .use_rustls_tls()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .build()
            .unwrap()
    }

    /// Waits until the (restarted) server answers.
    pub async fn wait_serving(&self) {
        self.admin().await;
    }
}

/// A join token from the server.
pub async fn join_token(admin: &Client) -> String {
    let resp = admin
        .request_json(
            reqwest::Method::POST,
            "/flotilla/v1/join-tokens",
            &[],
            Some(("application/json", br#"{"ttlSeconds": 3600}"#.to_vec())),
        )
        .await
        .unwrap();
    resp["token"].as_str().unwrap().to_string()
}

/// A `flotilla agent` on `qemu:///system` (TCG) for `node`, with its data directory in `dir`.
/// Its CPUs are overcommitted 32 times: tests place more small VMs than this host has CPUs.
pub fn agent(server_url: &str, token: &str, node: &str, dir: &Path) -> Process {
    agent_with(server_url, token, node, dir, &[])
}

/// [`agent`] with more arguments.
pub fn agent_with(
    server_url: &str,
    token: &str,
    node: &str,
    dir: &Path,
    extra: &[&str],
) -> Process {
    let mut args: Vec<String> = vec![
        "agent".into(),
        "--server".into(),
        server_url.into(),
        "--join-token".into(),
        token.into(),
        "--node-name".into(),
        node.into(),
        "--libvirt-uri".into(),
        "qemu:///system".into(),
        "--virt-type".into(),
        "qemu".into(),
        "--cpu-overcommit".into(),
        "32".into(),
        "--data-dir".into(),
        agent_dir(dir, node).display().to_string(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    Process::new(args, dir.join(format!("agent-{node}.log")))
}

/// Where [`agent`] keeps the data of `node`.
pub fn agent_dir(dir: &Path, node: &str) -> PathBuf {
    dir.join(format!("agent-{node}"))
}

/// The UUIDs of every domain on qemu:///system.
pub fn domain_uuids() -> Vec<String> {
    let out = Command::new("virsh")
        .args(["-c", "qemu:///system", "list", "--all", "--uuid"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// The live XML of a domain on qemu:///system (empty when it has none).
pub fn domain_xml(uuid: &str) -> String {
    Command::new("virsh")
        .args(["-c", "qemu:///system", "dumpxml", uuid])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Removes, when dropped, every domain on qemu:///system whose name contains `tag`: a failed
/// test leaves no guests running for the next one.
pub struct DomainSweeper(pub String);

impl Drop for DomainSweeper {
    fn drop(&mut self) {
        let out = Command::new("virsh")
            .args(["-c", "qemu:///system", "list", "--all", "--name"])
            .output();
        let Ok(out) = out else { return };
        for name in String::from_utf8_lossy(&out.stdout).lines() {
            let name = name.trim();
            if !name.is_empty() && name.contains(&self.0) {
                for verb in ["destroy", "undefine"] {
                    let _ = Command::new("virsh")
                        .args(["-c", "qemu:///system", verb, name])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                }
            }
        }
    }
}

/// The dnsmasq processes serving the overlay network `vni` on this host (a killed agent's may be
/// left running until the next one replaces it).
pub fn dnsmasq_serving(vni: u64) -> usize {
    let wanted = format!("--interface=fdn-{vni}\0");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .filter(|c| String::from_utf8_lossy(c).contains(&wanted))
        .count()
}

/// `flotilla up`, killed when dropped.
pub struct Up(pub Child);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The CLI with the client configuration `config` (and no user configuration).
pub fn cli(config: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("FLOTILLA_CONFIG", config)
        .env("HOME", "/nonexistent")
        .output()
        .unwrap()
}

/// The stdout of a CLI run that must succeed.
pub fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `check` until it gives a value, at most `secs` seconds (for tests without a runtime).
pub fn eventually<T>(what: &str, secs: u64, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs}s waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Reads a console WebSocket until `needle` shows up (within `secs`); returns what it read.
pub async fn read_until(
    socket: &mut flotilla_client::ConsoleSocket,
    needle: &str,
    secs: u64,
) -> String {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !seen.contains(needle) {
        let message = tokio::time::timeout_at(deadline, socket.next())
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} within {secs}s; the console said:\n{seen}"));
        match message {
            Some(Ok(Message::Binary(b))) => seen.push_str(&String::from_utf8_lossy(&b)),
            Some(Ok(Message::Text(t))) => seen.push_str(t.as_str()),
            Some(Ok(_)) => {}
            other => panic!("the console closed ({other:?}) before {needle:?}:\n{seen}"),
        }
    }
    seen
}

/// Disk files each QEMU process has open for writing, sampled until `stop`; returns the
/// number of samples and the first path ever seen open for writing by two processes.
pub fn sample_writers(
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(usize, Option<String>)> {
    std::thread::spawn(move || {
        let mut samples = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let mut writers: std::collections::HashMap<String, Vec<u32>> = Default::default();
            for entry in std::fs::read_dir("/proc").unwrap().flatten() {
                let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if !String::from_utf8_lossy(&cmdline).starts_with("/usr/bin/qemu-system") {
                    continue;
                }
                let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
                    continue;
                };
                for fd in fds.flatten() {
                    let Ok(target) = std::fs::read_link(fd.path()) else {
                        continue;
                    };
                    let target = target.to_string_lossy().into_owned();
                    if !target.ends_with(".qcow2") && !target.ends_with(".raw") {
                        continue;
                    }
                    let info = std::fs::read_to_string(format!(
                        "/proc/{pid}/fdinfo/{}",
                        fd.file_name().to_string_lossy()
                    ))
                    .unwrap_or_default();
                    let flags = info
                        .lines()
                        .find_map(|l| l.strip_prefix("flags:"))
                        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                        .unwrap_or(0);
                    if flags & 0o3 != 0 {
                        let pids = writers.entry(target).or_default();
                        if !pids.contains(&pid) {
                            pids.push(pid);
                        }
                    }
                }
            }
            samples += 1;
            if let Some((path, pids)) = writers.into_iter().find(|(_, p)| p.len() > 1) {
                return (samples, Some(format!("{path} by {pids:?}")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        (samples, None)
    })
}
