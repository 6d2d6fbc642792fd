//! For tests that build nodes and guests out of network namespaces (feature `testkit`): the
//! namespaces a test makes, removed however it ends, guests on veths into bridges, and pings.
//! Needs root; touches nothing outside the namespaces it makes.

use std::path::PathBuf;
use std::process::Command;

/// Runs a command that must succeed; returns its stdout.
pub fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Namespaces named with one prefix (the test's tag and process id), deleted on drop — also
/// those made under the prefix by the code under test (DHCP servers, routers).
pub struct Namespaces {
    pub prefix: String,
    made: Vec<String>,
}

/// A guest's `eth0`: what to set on it besides bringing it up.
#[derive(Clone, Copy, Debug, Default)]
pub struct Eth0<'a> {
    pub mac: Option<&'a str>,
    pub mtu: Option<u32>,
    /// An address with its prefix length, e.g. 10.0.0.11/24.
    pub address: Option<&'a str>,
    /// The default route's next hop.
    pub via: Option<&'a str>,
}

impl Namespaces {
    pub fn new(tag: &str) -> Self {
        Namespaces {
            prefix: format!("flt{tag}{}", std::process::id()),
            made: Vec::new(),
        }
    }

    /// Makes `<prefix>-<short>` with `lo` up.
    pub fn add(&mut self, short: &str) -> String {
        let name = format!("{}-{short}", self.prefix);
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        self.made.push(name.clone());
        name
    }

    pub fn path(name: &str) -> PathBuf {
        crate::namespace::namespace_path(name)
    }

    /// A node namespace `<prefix>-<short>` with an underlay for overlays: a veth `ul` (its
    /// peer `ul2` stays inside) holding 198.51.100.1/24.
    pub fn node(&mut self, short: &str) -> String {
        let node = self.add(short);
        run(&[
            "ip", "-n", &node, "link", "add", "ul", "type", "veth", "peer", "name", "ul2",
        ]);
        run(&[
            "ip",
            "-n",
            &node,
            "addr",
            "add",
            "198.51.100.1/24",
            "dev",
            "ul",
        ]);
        run(&["ip", "-n", &node, "link", "set", "ul", "up"]);
        node
    }

    /// Two node namespaces joined by a veth `ul`, with 198.51.100.1 and .2.
    pub fn two_nodes(&mut self) -> (String, String) {
        let (h1, h2) = (self.add("h1"), self.add("h2"));
        run(&[
            "ip", "-n", &h1, "link", "add", "ul", "type", "veth", "peer", "name", "ul", "netns",
            &h2,
        ]);
        for (node, ip) in [(&h1, "198.51.100.1/24"), (&h2, "198.51.100.2/24")] {
            run(&["ip", "-n", node, "addr", "add", ip, "dev", "ul"]);
            run(&["ip", "-n", node, "link", "set", "ul", "up"]);
        }
        (h1, h2)
    }

    /// A guest `<prefix>-<short>` whose `eth0` is on a veth (`p<short>` on the node's side)
    /// into `bridge` of `node`.
    pub fn guest(&mut self, node: &str, bridge: &str, short: &str, eth0: Eth0<'_>) -> String {
        let name = self.add(short);
        let port = format!("p{short}");
        run(&[
            "ip", "-n", node, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
            "netns", &name,
        ]);
        let mtu = eth0.mtu.map(|m| m.to_string());
        let mut node_side = vec![
            "ip", "-n", node, "link", "set", &port, "master", bridge, "up",
        ];
        let mut guest_side = vec!["ip", "-n", &name, "link", "set", "eth0", "up"];
        if let Some(mtu) = &mtu {
            node_side.extend(["mtu", mtu.as_str()]);
            guest_side.extend(["mtu", mtu.as_str()]);
        }
        if let Some(mac) = eth0.mac {
            guest_side.extend(["address", mac]);
        }
        run(&node_side);
        run(&guest_side);
        if let Some(address) = eth0.address {
            run(&["ip", "-n", &name, "addr", "add", address, "dev", "eth0"]);
        }
        if let Some(via) = eth0.via {
            run(&["ip", "-n", &name, "route", "add", "default", "via", via]);
        }
        name
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.made {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
        for name in crate::namespace::namespaces_with_prefix(&self.prefix) {
            let _ = crate::namespace::remove_namespace(&name);
        }
    }
}

/// Whether `from` gets an answer from `to` (two pings, from `source` when given).
pub fn pings(from: &str, to: &str, source: Option<&str>) -> bool {
    let mut args = vec![
        "netns", "exec", from, "busybox", "ping", "-c", "2", "-W", "2",
    ];
    if let Some(s) = source {
        args.extend(["-I", s]);
    }
    args.push(to);
    Command::new("ip")
        .args(&args)
        .output()
        .unwrap()
        .status
        .success()
}
