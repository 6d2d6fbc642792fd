//! The placement engine: filter, then score, over a snapshot of the fleet. Pure (no I/O), so the
//! rules are tested directly and the controller only gathers the snapshot and writes the result.
//!
//! Filters: the node is Ready and schedulable (not cordoned); the VM's CPUs and memory fit in what
//! is left of the node's allocatable; the node's labels match the VM's `nodeSelector`.
//! Required VM affinity / anti-affinity terms filter too: a node is out when it would put the VM
//! apart from (or next to) VMs of the same project matching a term's selector, per value of the
//! term's topology key (a node label, or `flotilla.dev/node` for the node itself).
//! Score: least allocated (spread), 0..100, plus each preferred affinity term's weight when it is
//! met, minus each preferred anti-affinity term's weight when it is broken.

use std::collections::{BTreeMap, HashMap, HashSet};

use flotilla_types::kinds::placement::NODE_TOPOLOGY_KEY;
use flotilla_types::selector::LabelSelector;

/// A term: VMs matching `selector`, grouped by the node label `key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Term {
    pub selector: LabelSelector,
    pub key: String,
}

/// A VM already placed.
#[derive(Clone, Debug)]
pub struct Placed {
    pub project: String,
    pub labels: BTreeMap<String, String>,
    pub node: String,
}

/// Affinity rules of a request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    pub required_affinity: Vec<Term>,
    pub required_anti_affinity: Vec<Term>,
    pub preferred_affinity: Vec<(u32, Term)>,
    pub preferred_anti_affinity: Vec<(u32, Term)>,
}

/// How free capacity counts: `Spread` prefers the least allocated node (fewer noisy
/// neighbours, faster recovery); `Pack` the most allocated (fewer hosts busy, more room for big VMs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Strategy {
    #[default]
    Spread,
    Pack,
}

/// What a VM asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub cpus: u64,
    pub memory: u128,
    pub node_selector: BTreeMap<String, String>,
    pub project: String,
    pub labels: BTreeMap<String, String>,
    pub rules: Rules,
    pub strategy: Strategy,
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
    Affinity,
    AntiAffinity,
    InsufficientCpu,
    InsufficientMemory,
}

impl Reason {
    fn describe(self) -> &'static str {
        match self {
            Reason::NotReady => "not ready",
            Reason::Cordoned => "cordoned",
            Reason::NodeSelector => "not matching the node selector",
            Reason::Affinity => "not matching VM affinity",
            Reason::AntiAffinity => "breaking VM anti-affinity",
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

fn topology<'a>(node: &'a Candidate, key: &str) -> Option<&'a str> {
    if key == NODE_TOPOLOGY_KEY {
        Some(&node.name)
    } else {
        node.labels.get(key).map(String::as_str)
    }
}

/// For one term: the topology values that hold a matching VM of the request's project.
struct Occupied<'a> {
    term: &'a Term,
    values: HashSet<&'a str>,
}

fn occupied<'a>(
    req: &Request,
    term: &'a Term,
    nodes: &HashMap<&'a str, &'a Candidate>,
    placed: &'a [Placed],
) -> Occupied<'a> {
    let values = placed
        .iter()
        .filter(|p| p.project == req.project && term.selector.matches(&p.labels))
        .filter_map(|p| {
            nodes
                .get(p.node.as_str())
                .and_then(|n| topology(n, &term.key))
        })
        .collect();
    Occupied { term, values }
}

impl Occupied<'_> {
    fn hit(&self, node: &Candidate) -> bool {
        topology(node, &self.term.key).is_some_and(|v| self.values.contains(v))
    }
}

struct Prepared<'a> {
    required_affinity: Vec<Occupied<'a>>,
    required_anti_affinity: Vec<Occupied<'a>>,
    preferred_affinity: Vec<(u32, Occupied<'a>)>,
    preferred_anti_affinity: Vec<(u32, Occupied<'a>)>,
}

fn affinity_filter(req: &Request, node: &Candidate, p: &Prepared<'_>) -> Option<Reason> {
    if p.required_anti_affinity.iter().any(|o| o.hit(node)) {
        return Some(Reason::AntiAffinity);
    }
    // The first VM of a group that asks to be near its own kind may go anywhere.
    let unmet = p.required_affinity.iter().any(|o| {
        let first_of_group = o.values.is_empty() && o.term.selector.matches(&req.labels);
        !first_of_group && !o.hit(node)
    });
    unmet.then_some(Reason::Affinity)
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
    placed: &[Placed],
) -> Result<String, Unschedulable> {
    let by_name: HashMap<&str, &Candidate> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let rules = &req.rules;
    let prepared = Prepared {
        required_affinity: rules
            .required_affinity
            .iter()
            .map(|t| occupied(req, t, &by_name, placed))
            .collect(),
        required_anti_affinity: rules
            .required_anti_affinity
            .iter()
            .map(|t| occupied(req, t, &by_name, placed))
            .collect(),
        preferred_affinity: rules
            .preferred_affinity
            .iter()
            .map(|(w, t)| (*w, occupied(req, t, &by_name, placed)))
            .collect(),
        preferred_anti_affinity: rules
            .preferred_anti_affinity
            .iter()
            .map(|(w, t)| (*w, occupied(req, t, &by_name, placed)))
            .collect(),
    };
    let mut reasons: BTreeMap<Reason, usize> = BTreeMap::new();
    let mut best: Option<(f64, &str)> = None;
    for node in nodes {
        let u = used.get(&node.name).copied().unwrap_or_default();
        match filter(req, node, u).or_else(|| affinity_filter(req, node, &prepared)) {
            Some(reason) => *reasons.entry(reason).or_default() += 1,
            None => {
                let free = score(req, node, u);
                let mut s = match req.strategy {
                    Strategy::Spread => free,
                    Strategy::Pack => 1.0 - free,
                } * 100.0;
                s += prepared
                    .preferred_affinity
                    .iter()
                    .filter(|(_, o)| o.hit(node))
                    .map(|(w, _)| *w as f64)
                    .sum::<f64>();
                s -= prepared
                    .preferred_anti_affinity
                    .iter()
                    .filter(|(_, o)| o.hit(node))
                    .map(|(w, _)| *w as f64)
                    .sum::<f64>();
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
            project: "p".into(),
            labels: BTreeMap::new(),
            rules: Rules::default(),
            strategy: super::Strategy::Spread,
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
        assert_eq!(place(&req(1, 1), &nodes, &used, &[]).unwrap(), "b");
        assert_eq!(
            place(&req(1, 1), &nodes, &HashMap::new(), &[]).unwrap(),
            "a",
            "ties go to the first name"
        );
    }

    #[test]
    fn packs_onto_the_most_allocated_node_when_asked() {
        let nodes = vec![node("a", 8, 16), node("b", 8, 16)];
        let used = HashMap::from([(
            "b".to_string(),
            Used {
                cpus: 4,
                memory: 8 << 30,
            },
        )]);
        let mut r = req(1, 1);
        r.strategy = super::Strategy::Pack;
        assert_eq!(place(&r, &nodes, &used, &[]).unwrap(), "b");
        r.strategy = super::Strategy::Spread;
        assert_eq!(place(&r, &nodes, &used, &[]).unwrap(), "a");
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
        let err = place(&r, &nodes, &used, &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "0/5 nodes are available: 1 not ready, 1 cordoned, 1 not matching the node selector, 2 insufficient CPU"
        );
        let mut mem_only = req(1, 64);
        mem_only.node_selector.clear();
        let err = place(&mem_only, &[node("a", 8, 16)], &HashMap::new(), &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "0/1 nodes are available: 1 insufficient memory"
        );
    }

    fn labelled(mut r: Request, app: &str) -> Request {
        r.labels.insert("app".into(), app.into());
        r
    }

    fn term(sel: &str, key: &str) -> Term {
        Term {
            selector: LabelSelector::parse(sel).unwrap(),
            key: key.into(),
        }
    }

    fn zoned(name: &str, zone: &str) -> Candidate {
        let mut n = node(name, 64, 256);
        n.labels.insert("zone".into(), zone.into());
        n
    }

    /// Places `req` and records it, as the controller does.
    fn place_and_record(
        req: &Request,
        nodes: &[Candidate],
        placed: &mut Vec<Placed>,
    ) -> Result<String, Unschedulable> {
        let node = place(req, nodes, &HashMap::new(), placed)?;
        placed.push(Placed {
            project: req.project.clone(),
            labels: req.labels.clone(),
            node: node.clone(),
        });
        Ok(node)
    }

    #[test]
    fn required_anti_affinity_per_node() {
        let nodes = vec![node("a", 8, 16), node("b", 8, 16), node("c", 8, 16)];
        let mut web = labelled(req(1, 1), "web");
        web.rules
            .required_anti_affinity
            .push(term("app=web", NODE_TOPOLOGY_KEY));
        let mut placed = Vec::new();
        let mut used_nodes: Vec<String> = (0..3)
            .map(|_| place_and_record(&web, &nodes, &mut placed).unwrap())
            .collect();
        used_nodes.sort();
        assert_eq!(used_nodes, ["a", "b", "c"]);
        let err = place(&web, &nodes, &HashMap::new(), &placed).unwrap_err();
        assert_eq!(
            err.to_string(),
            "0/3 nodes are available: 3 breaking VM anti-affinity"
        );
        // Another project's VMs do not count.
        let mut other = web.clone();
        other.project = "other".into();
        assert!(place(&other, &nodes, &HashMap::new(), &placed).is_ok());
    }

    #[test]
    fn required_affinity_follows_the_group_by_zone() {
        let nodes = vec![
            zoned("a1", "a"),
            zoned("a2", "a"),
            zoned("b1", "b"),
            zoned("b2", "b"),
        ];
        let mut placed = vec![Placed {
            project: "p".into(),
            labels: BTreeMap::from([("app".into(), "db".into())]),
            node: "b2".into(),
        }];
        let mut web = labelled(req(1, 1), "web");
        web.rules.required_affinity.push(term("app=db", "zone"));
        for _ in 0..4 {
            let n = place_and_record(&web, &nodes, &mut placed).unwrap();
            assert!(n.starts_with('b'), "web must share the db's zone, got {n}");
        }
        // The first of a group that wants its own kind near may go anywhere.
        let mut first = labelled(req(1, 1), "cache");
        first
            .rules
            .required_affinity
            .push(term("app=cache", "zone"));
        assert!(place(&first, &nodes, &HashMap::new(), &placed).is_ok());
        // Someone else's group that does not exist yet cannot be joined.
        let mut lonely = labelled(req(1, 1), "api");
        lonely
            .rules
            .required_affinity
            .push(term("app=queue", "zone"));
        assert_eq!(
            place(&lonely, &nodes, &HashMap::new(), &placed)
                .unwrap_err()
                .reasons[&Reason::Affinity],
            4
        );
    }

    #[test]
    fn preferred_anti_affinity_spreads_across_zones() {
        let nodes = vec![
            zoned("a1", "a"),
            zoned("a2", "a"),
            zoned("a3", "a"),
            zoned("b1", "b"),
        ];
        let mut web = labelled(req(1, 1), "web");
        web.rules
            .preferred_anti_affinity
            .push((100, term("app=web", "zone")));
        let mut placed = Vec::new();
        let first = place_and_record(&web, &nodes, &mut placed).unwrap();
        let second = place_and_record(&web, &nodes, &mut placed).unwrap();
        let zone = |n: &str| n[..1].to_string();
        assert_ne!(
            zone(&first),
            zone(&second),
            "the second replica goes to the other zone"
        );
        // Preferred rules never block: a third still lands.
        assert!(place_and_record(&web, &nodes, &mut placed).is_ok());
    }

    proptest! {
        /// With required anti-affinity on the node, no two VMs of a group ever share a node.
        #[test]
        fn required_anti_affinity_always_holds(n_nodes in 1usize..8, n_vms in 1usize..20, groups in 1usize..4) {
            let nodes: Vec<Candidate> = (0..n_nodes).map(|i| node(&format!("n{i}"), 64, 256)).collect();
            let mut placed = Vec::new();
            for i in 0..n_vms {
                let g = format!("g{}", i % groups);
                let mut r = labelled(req(1, 1), &g);
                r.rules.required_anti_affinity.push(term(&format!("app={g}"), NODE_TOPOLOGY_KEY));
                let _ = place_and_record(&r, &nodes, &mut placed);
            }
            let mut seen = HashSet::new();
            for p in &placed {
                prop_assert!(seen.insert((p.labels["app"].clone(), p.node.clone())), "two of {} on {}", p.labels["app"], p.node);
            }
        }
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
                match place(&r, &nodes, &used, &[]) {
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
