//! The placement engine: filter, then score, over a snapshot of the fleet. Pure (no I/O), so the
//! rules are tested directly and the controller only gathers the snapshot and writes the result.
//!
//! Filters: the node is Ready and schedulable (not cordoned); the VM's CPUs and memory fit in what
//! is left of the node's allocatable; the node's labels match the VM's `nodeSelector`.
//! Score: least allocated (spread) — the node with the most free capacity, as a fraction, wins.

use std::collections::{BTreeMap, HashMap};

/// What a VM asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub cpus: u64,
    pub memory: u128,
    pub node_selector: BTreeMap<String, String>,
}

/// A node as the engine sees it.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub name: String,
    pub ready: bool,
    pub schedulable: bool,
    pub labels: BTreeMap<String, String>,
    pub cpus: u64,
    pub memory: u128,
}

/// Resources already claimed on a node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Used {
    pub cpus: u64,
    pub memory: u128,
}

/// Why a node was filtered out; one reason per node (the first that applies).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    NotReady,
    Cordoned,
    NodeSelector,
    InsufficientCpu,
    InsufficientMemory,
}

impl Reason {
    fn describe(self) -> &'static str {
        match self {
            Reason::NotReady => "not ready",
            Reason::Cordoned => "cordoned",
            Reason::NodeSelector => "not matching the node selector",
            Reason::InsufficientCpu => "insufficient CPU",
            Reason::InsufficientMemory => "insufficient memory",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unschedulable {
    pub nodes: usize,
    pub reasons: BTreeMap<Reason, usize>,
}

impl std::fmt::Display for Unschedulable {
    /// `0/12 nodes are available: 5 insufficient memory, 7 not ready`
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .reasons
            .iter()
            .map(|(r, n)| format!("{n} {}", r.describe()))
            .collect();
        if parts.is_empty() {
            write!(f, "0/{} nodes are available", self.nodes)
        } else {
            write!(
                f,
                "0/{} nodes are available: {}",
                self.nodes,
                parts.join(", ")
            )
        }
    }
}

fn filter(req: &Request, node: &Candidate, used: Used) -> Option<Reason> {
    if !node.ready {
        return Some(Reason::NotReady);
    }
    if !node.schedulable {
        return Some(Reason::Cordoned);
    }
    if req
        .node_selector
        .iter()
        .any(|(k, v)| node.labels.get(k) != Some(v))
    {
        return Some(Reason::NodeSelector);
    }
    if used.cpus + req.cpus > node.cpus {
        return Some(Reason::InsufficientCpu);
    }
    if used.memory + req.memory > node.memory {
        return Some(Reason::InsufficientMemory);
    }
    None
}

/// Free capacity after placing `req`, as a fraction (0..=1) averaged over CPU and memory.
fn score(req: &Request, node: &Candidate, used: Used) -> f64 {
    let frac = |free: f64, total: f64| if total <= 0.0 { 0.0 } else { free / total };
    let cpu = frac(
        node.cpus as f64 - (used.cpus + req.cpus) as f64,
        node.cpus as f64,
    );
    let mem = frac(
        node.memory as f64 - (used.memory + req.memory) as f64,
        node.memory as f64,
    );
    (cpu + mem) / 2.0
}

/// Picks a node for `req`, or says why none fits. Ties go to the node whose name sorts first, so
/// placement is deterministic.
pub fn place(
    req: &Request,
    nodes: &[Candidate],
    used: &HashMap<String, Used>,
) -> Result<String, Unschedulable> {
    let mut reasons: BTreeMap<Reason, usize> = BTreeMap::new();
    let mut best: Option<(f64, &str)> = None;
    for node in nodes {
        let u = used.get(&node.name).copied().unwrap_or_default();
        match filter(req, node, u) {
            Some(reason) => *reasons.entry(reason).or_default() += 1,
            None => {
                let s = score(req, node, u);
                let better = match best {
                    None => true,
                    Some((bs, bn)) => s > bs || (s == bs && node.name.as_str() < bn),
                };
                if better {
                    best = Some((s, &node.name));
                }
            }
        }
    }
    best.map(|(_, n)| n.to_string()).ok_or(Unschedulable {
        nodes: nodes.len(),
        reasons,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(name: &str, cpus: u64, mem_gi: u128) -> Candidate {
        Candidate {
            name: name.into(),
            ready: true,
            schedulable: true,
            labels: BTreeMap::new(),
            cpus,
            memory: mem_gi << 30,
        }
    }

    fn req(cpus: u64, mem_gi: u128) -> Request {
        Request {
            cpus,
            memory: mem_gi << 30,
            node_selector: BTreeMap::new(),
        }
    }

    #[test]
    fn spreads_to_the_least_allocated_node() {
        let nodes = vec![node("a", 8, 16), node("b", 8, 16)];
        let used = HashMap::from([(
            "a".to_string(),
            Used {
                cpus: 4,
                memory: 8 << 30,
            },
        )]);
        assert_eq!(place(&req(1, 1), &nodes, &used).unwrap(), "b");
        assert_eq!(
            place(&req(1, 1), &nodes, &HashMap::new()).unwrap(),
            "a",
            "ties go to the first name"
        );
    }

    #[test]
    fn explains_every_reason() {
        let mut nodes = vec![
            node("small", 1, 1),
            node("busy", 8, 16),
            node("down", 8, 16),
            node("cordoned", 8, 16),
            node("eu", 8, 16),
        ];
        nodes[2].ready = false;
        nodes[3].schedulable = false;
        let mut r = req(2, 2);
        r.node_selector.insert("zone".into(), "us".into());
        nodes[4].labels.insert("zone".into(), "eu".into());
        nodes[1].labels.insert("zone".into(), "us".into());
        nodes[0].labels.insert("zone".into(), "us".into());
        let used = HashMap::from([("busy".to_string(), Used { cpus: 7, memory: 0 })]);
        let err = place(&r, &nodes, &used).unwrap_err();
        assert_eq!(
            err.to_string(),
            "0/5 nodes are available: 1 not ready, 1 cordoned, 1 not matching the node selector, 2 insufficient CPU"
        );
        let mut mem_only = req(1, 64);
        mem_only.node_selector.clear();
        let err = place(&mem_only, &[node("a", 8, 16)], &HashMap::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "0/1 nodes are available: 1 insufficient memory"
        );
    }

    proptest! {
        /// Placing VMs one after another, accounting each placement, never over-commits a node,
        /// never uses a node that fails a hard rule, and fails only when no node fits.
        #[test]
        fn never_overcommits_and_holds_every_hard_rule(
            caps in proptest::collection::vec((1u64..16, 1u128..32, any::<bool>(), any::<bool>(), 0usize..3), 1..12),
            vms in proptest::collection::vec((1u64..8, 1u128..16, proptest::option::of(0usize..3)), 1..60),
        ) {
            let nodes: Vec<Candidate> = caps.iter().enumerate().map(|(i, (c, m, ready, cordoned, zone))| Candidate {
                name: format!("n{i:02}"), ready: *ready || i == 0, schedulable: !*cordoned, labels: BTreeMap::from([("zone".to_string(), format!("z{zone}"))]),
                cpus: *c, memory: *m << 30,
            }).collect();
            let mut used: HashMap<String, Used> = HashMap::new();
            for (cpus, mem, zone) in vms {
                let mut r = req(cpus, mem);
                if let Some(z) = zone { r.node_selector.insert("zone".into(), format!("z{z}")); }
                match place(&r, &nodes, &used) {
                    Ok(name) => {
                        let n = nodes.iter().find(|n| n.name == name).unwrap();
                        prop_assert!(n.ready && n.schedulable);
                        prop_assert!(r.node_selector.iter().all(|(k, v)| n.labels.get(k) == Some(v)));
                        let u = used.entry(name).or_default();
                        u.cpus += r.cpus;
                        u.memory += r.memory;
                        prop_assert!(u.cpus <= n.cpus && u.memory <= n.memory, "over-committed {}", n.name);
                    }
                    Err(e) => {
                        // No node could have taken it.
                        for n in &nodes {
                            let u = used.get(&n.name).copied().unwrap_or_default();
                            prop_assert!(filter(&r, n, u).is_some(), "{} fits but was not chosen: {e}", n.name);
                        }
                        prop_assert_eq!(e.reasons.values().sum::<usize>(), nodes.len());
                    }
                }
            }
        }
    }
}
