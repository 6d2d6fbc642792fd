//! Test support (feature `conformance`): loopback ports, processes killed on drop, and a real etcd
//! cluster: `members` etcd processes on loopback
//! ports in a temporary directory, killed when dropped. Needs the `etcd` binary (Debian's
//! etcd-server).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct EtcdCluster {
    pub endpoints: Vec<String>,
    members: Vec<Option<Child>>,
    args: Vec<Vec<String>>,
    _dir: tempfile::TempDir,
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .expect("an address")
        .port()
}

impl EtcdCluster {
    /// Starts the members and waits until the cluster answers.
    pub async fn start(members: usize) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let ports: Vec<(u16, u16)> = (0..members).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let token = format!("flotilla-test-{}", std::process::id());
        let mut args = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            args.push(vec![
                format!("--name=m{i}"),
                format!("--data-dir={}", dir.path().join(format!("m{i}")).display()),
                format!("--listen-client-urls=http://127.0.0.1:{client}"),
                format!("--advertise-client-urls=http://127.0.0.1:{client}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
                format!("--initial-cluster={}", initial.join(",")),
                "--initial-cluster-state=new".to_string(),
                format!("--initial-cluster-token={token}"),
                "--log-level=error".to_string(),
            ]);
        }
        let mut cluster = EtcdCluster {
            endpoints: ports
                .iter()
                .map(|(c, _)| format!("http://127.0.0.1:{c}"))
                .collect(),
            members: Vec::new(),
            args,
            _dir: dir,
        };
        for i in 0..members {
            let child = cluster.spawn(i);
            cluster.members.push(Some(child));
        }
        cluster.wait_healthy().await;
        cluster
    }

    fn spawn(&self, i: usize) -> Child {
        Command::new("etcd")
            .args(&self.args[i])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd runs (Debian package etcd-server; make test installs it)")
    }

    /// Waits until a write through every member's endpoint succeeds.
    pub async fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        for endpoint in &self.endpoints {
            loop {
                let ok = async {
                    let mut c = etcd_client::Client::connect([endpoint], None).await.ok()?;
                    c.put("/health-probe", "ok", None).await.ok()
                };
                if tokio::time::timeout(Duration::from_secs(2), ok)
                    .await
                    .ok()
                    .flatten()
                    .is_some()
                {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "etcd at {endpoint} did not come up"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Stops member `i` hard (kill -9).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again with its data.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.members[i] = Some(self.spawn(i));
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// A child process killed (and reaped) when dropped, also when a test panics.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
