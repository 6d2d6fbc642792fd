//! The placement engine: filter, then score, over the fleet. Pure (no I/O), so the rules are
//! tested directly; the scheduler keeps the [`Fleet`] and the [`PlacedIndex`] up to date from a
//! watch and writes the result.
//!
//! Filters: the node is Ready and schedulable (not cordoned); the VM's CPUs and memory fit in what
//! is left of the node's allocatable; the node's labels match the VM's `nodeSelector`.
//! Required VM affinity / anti-affinity terms filter too: a node is out when it would put the VM
//! apart from (or next to) VMs of the same project matching a term's selector, per value of the
//! term's topology key (a node label, or `flotilla.dev/node` for the node itself). A topology
//! spread term with `maxSkew` filters out domains that would get more than `maxSkew` VMs above
//! the emptiest one.
//! Score: free capacity after placing (spread) or used capacity (pack), 0..100; plus each
//! preferred affinity term's weight when it is met, minus each preferred anti-affinity term's
//! weight when it is broken; minus up to 100 per spread term, in proportion to how crowded the
//! node's domain is compared with the emptiest and fullest domains.

use std::collections::{BTreeMap, HashMap, HashSet};

use flotilla_types::kinds::placement::NODE_TOPOLOGY_KEY;
use flotilla_types::selector::{LabelSelector, Requirement};

/// A term: VMs matching `selector`, grouped by the node label `key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Term {
    pub selector: LabelSelector,
    pub key: String,
}

/// Spread VMs matching a term evenly over the values of its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spread {
    pub term: Term,
    /// A hard limit on (VMs in the node's domain after placing) - (VMs in the emptiest domain).
    pub max_skew: Option<u32>,
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
    pub spread: Vec<Spread>,
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
    /// The only node it may go to (where its volumes live).
    pub node: Option<String>,
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

/// The nodes and what is claimed on each, kept up to date one change at a time.
#[derive(Clone, Debug, Default)]
pub struct Fleet {
    nodes: Vec<(Candidate, Used)>,
    index: HashMap<String, usize>,
}

impl Fleet {
    pub fn new(nodes: impl IntoIterator<Item = Candidate>) -> Self {
        let mut fleet = Fleet::default();
        for n in nodes {
            fleet.upsert(n);
        }
        fleet
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&Candidate> {
        self.index.get(name).map(|i| &self.nodes[*i].0)
    }

    pub fn used(&self, name: &str) -> Used {
        self.index
            .get(name)
            .map(|i| self.nodes[*i].1)
            .unwrap_or_default()
    }

    /// Adds a node or replaces what is known of it, keeping what is claimed on it.
    pub fn upsert(&mut self, node: Candidate) {
        match self.index.get(&node.name) {
            Some(i) => self.nodes[*i].0 = node,
            None => {
                self.index.insert(node.name.clone(), self.nodes.len());
                self.nodes.push((node, Used::default()));
            }
        }
    }

    pub fn remove(&mut self, name: &str) {
        if let Some(i) = self.index.remove(name) {
            self.nodes.swap_remove(i);
            if let Some((moved, _)) = self.nodes.get(i) {
                self.index.insert(moved.name.clone(), i);
            }
        }
    }

    /// Adds (`sign` +1) or takes back (-1) a claim on a node. Claims on nodes not (yet) known
    /// are kept: a VM's binding can be seen before its node.
    pub fn charge(&mut self, node: &str, cpus: u64, memory: u128, sign: i8) {
        if !self.index.contains_key(node) {
            self.upsert(Candidate {
                name: node.to_string(),
                ready: false,
                schedulable: false,
                labels: BTreeMap::new(),
                cpus: 0,
                memory: 0,
            });
        }
        let used = &mut self.nodes[self.index[node]].1;
        if sign >= 0 {
            used.cpus += cpus;
            used.memory += memory;
        } else {
            used.cpus = used.cpus.saturating_sub(cpus);
            used.memory = used.memory.saturating_sub(memory);
        }
    }

    fn iter(&self) -> impl Iterator<Item = &(Candidate, Used)> {
        self.nodes.iter()
    }
}

/// Where the VMs matching a selector are: the engine asks, per term.
pub trait Placements {
    /// Calls `found` with the node of every placed VM of `project` that `selector` matches.
    fn nodes_of(&self, project: &str, selector: &LabelSelector, found: &mut dyn FnMut(&str));
}

/// The naive answer: a scan. Used by tests as the reference for [`PlacedIndex`].
impl Placements for [Placed] {
    fn nodes_of(&self, project: &str, selector: &LabelSelector, found: &mut dyn FnMut(&str)) {
        for p in self {
            if p.project == project && selector.matches(&p.labels) {
                found(&p.node);
            }
        }
    }
}

/// Placed VMs indexed by project and by each label, so a term costs what it matches, not the
/// size of the fleet.
#[derive(Debug, Default)]
pub struct PlacedIndex {
    vms: HashMap<String, Placed>,
    by_project: HashMap<String, HashSet<String>>,
    by_label: HashMap<(String, String, String), HashSet<String>>,
}

impl PlacedIndex {
    pub fn len(&self) -> usize {
        self.vms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vms.is_empty()
    }

    /// Records (or moves) the VM with key `key`.
    pub fn insert(&mut self, key: &str, placed: Placed) {
        self.remove(key);
        for (k, v) in &placed.labels {
            self.by_label
                .entry((placed.project.clone(), k.clone(), v.clone()))
                .or_default()
                .insert(key.to_string());
        }
        self.by_project
            .entry(placed.project.clone())
            .or_default()
            .insert(key.to_string());
        self.vms.insert(key.to_string(), placed);
    }

    pub fn remove(&mut self, key: &str) {
        let Some(old) = self.vms.remove(key) else {
            return;
        };
        for (k, v) in &old.labels {
            let id = (old.project.clone(), k.clone(), v.clone());
            if let Some(set) = self.by_label.get_mut(&id) {
                set.remove(key);
                if set.is_empty() {
                    self.by_label.remove(&id);
                }
            }
        }
        if let Some(set) = self.by_project.get_mut(&old.project) {
            set.remove(key);
            if set.is_empty() {
                self.by_project.remove(&old.project);
            }
        }
    }
}

impl Placements for PlacedIndex {
    fn nodes_of(&self, project: &str, selector: &LabelSelector, found: &mut dyn FnMut(&str)) {
        // The VMs carrying one label the selector needs, else every VM of the project.
        let narrowed: Option<Vec<&HashSet<String>>> = selector.0.iter().find_map(|r| match r {
            Requirement::Equals(k, v) => Some(
                self.by_label
                    .get(&(project.to_string(), k.clone(), v.clone()))
                    .into_iter()
                    .collect(),
            ),
            Requirement::In(k, vs) => Some(
                vs.iter()
                    .filter_map(|v| {
                        self.by_label
                            .get(&(project.to_string(), k.clone(), v.clone()))
                    })
                    .collect(),
            ),
            _ => None,
        });
        let sets = narrowed.unwrap_or_else(|| self.by_project.get(project).into_iter().collect());
        for key in sets.into_iter().flatten() {
            let p = &self.vms[key];
            if selector.matches(&p.labels) {
                found(&p.node);
            }
        }
    }
}

/// Why a node was filtered out; one reason per node (the first that applies).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    NotReady,
    Cordoned,
    NodeSelector,
    VolumeElsewhere,
    Affinity,
    AntiAffinity,
    TopologySpread,
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
            Reason::TopologySpread => "breaking topology spread",
            Reason::InsufficientCpu => "insufficient CPU",
            Reason::InsufficientMemory => "insufficient memory",
            Reason::VolumeElsewhere => "not holding the VM's volumes",
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

/// For one term: how many matching VMs of the request's project each topology value holds.
struct Occupied<'a> {
    term: &'a Term,
    counts: HashMap<String, usize>,
}

fn occupied<'a>(
    req: &Request,
    term: &'a Term,
    fleet: &Fleet,
    placed: &(impl Placements + ?Sized),
) -> Occupied<'a> {
    let mut counts: HashMap<String, usize> = HashMap::new();
    placed.nodes_of(&req.project, &term.selector, &mut |node| {
        let value = match fleet.get(node) {
            Some(n) => topology(n, &term.key),
            None if term.key == NODE_TOPOLOGY_KEY => Some(node),
            None => None,
        };
        if let Some(v) = value {
            *counts.entry(v.to_string()).or_default() += 1;
        }
    });
    Occupied { term, counts }
}

impl Occupied<'_> {
    fn count(&self, node: &Candidate) -> usize {
        topology(node, &self.term.key)
            .and_then(|v| self.counts.get(v))
            .copied()
            .unwrap_or(0)
    }

    fn hit(&self, node: &Candidate) -> bool {
        self.count(node) > 0
    }
}

/// A spread term with the range of counts over the domains of the eligible nodes.
struct SpreadState<'a> {
    occupied: Occupied<'a>,
    max_skew: Option<u32>,
    min: usize,
    max: usize,
}

struct Prepared<'a> {
    required_affinity: Vec<Occupied<'a>>,
    required_anti_affinity: Vec<Occupied<'a>>,
    preferred_affinity: Vec<(u32, Occupied<'a>)>,
    preferred_anti_affinity: Vec<(u32, Occupied<'a>)>,
    spread: Vec<SpreadState<'a>>,
}

fn affinity_filter(req: &Request, node: &Candidate, p: &Prepared<'_>) -> Option<Reason> {
    if p.required_anti_affinity.iter().any(|o| o.hit(node)) {
        return Some(Reason::AntiAffinity);
    }
    // The first VM of a group that asks to be near its own kind may go anywhere.
    let unmet = p.required_affinity.iter().any(|o| {
        let first_of_group = o.counts.is_empty() && o.term.selector.matches(&req.labels);
        !first_of_group && !o.hit(node)
    });
    if unmet {
        return Some(Reason::Affinity);
    }
    let skewed = p.spread.iter().any(|s| {
        s.max_skew.is_some_and(|skew| {
            topology(node, &s.occupied.term.key).is_none()
                || s.occupied.count(node) + 1 > s.min + skew as usize
        })
    });
    skewed.then_some(Reason::TopologySpread)
}

/// The filters that do not depend on other VMs.
fn node_filter(req: &Request, node: &Candidate) -> Option<Reason> {
    if !node.ready {
        return Some(Reason::NotReady);
    }
    if req.node.as_ref().is_some_and(|n| *n != node.name) {
        return Some(Reason::VolumeElsewhere);
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
    None
}

fn filter(req: &Request, node: &Candidate, used: Used) -> Option<Reason> {
    if let Some(reason) = node_filter(req, node) {
        return Some(reason);
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

fn prepare<'a>(
    req: &'a Request,
    fleet: &Fleet,
    placed: &(impl Placements + ?Sized),
) -> Prepared<'a> {
    let rules = &req.rules;
    let occ = |t: &'a Term| occupied(req, t, fleet, placed);
    let spread = rules
        .spread
        .iter()
        .map(|s| {
            let occupied = occ(&s.term);
            // Domains are the values of the eligible nodes (those the VM could use but for
            // capacity and other VMs), each counted even when it holds no matching VM yet.
            let mut domains: HashMap<&str, usize> = HashMap::new();
            for (n, _) in fleet.iter().filter(|(n, _)| node_filter(req, n).is_none()) {
                if let Some(v) = topology(n, &s.term.key) {
                    domains.insert(v, occupied.counts.get(v).copied().unwrap_or(0));
                }
            }
            SpreadState {
                min: domains.values().copied().min().unwrap_or(0),
                max: domains.values().copied().max().unwrap_or(0),
                occupied,
                max_skew: s.max_skew,
            }
        })
        .collect();
    Prepared {
        required_affinity: rules.required_affinity.iter().map(occ).collect(),
        required_anti_affinity: rules.required_anti_affinity.iter().map(occ).collect(),
        preferred_affinity: rules
            .preferred_affinity
            .iter()
            .map(|(w, t)| (*w, occ(t)))
            .collect(),
        preferred_anti_affinity: rules
            .preferred_anti_affinity
            .iter()
            .map(|(w, t)| (*w, occ(t)))
            .collect(),
        spread,
    }
}

/// Picks a node for `req`, or says why none fits. Ties go to the node whose name sorts first, so
/// placement is deterministic.
pub fn place(
    req: &Request,
    fleet: &Fleet,
    placed: &(impl Placements + ?Sized),
) -> Result<String, Unschedulable> {
    let prepared = prepare(req, fleet, placed);
    let mut reasons: BTreeMap<Reason, usize> = BTreeMap::new();
    let mut best: Option<(f64, &str)> = None;
    for (node, u) in fleet.iter() {
        if let Some(reason) =
            filter(req, node, *u).or_else(|| affinity_filter(req, node, &prepared))
        {
            *reasons.entry(reason).or_default() += 1;
            continue;
        }
        let free = score(req, node, *u);
        let mut s = match req.strategy {
            Strategy::Spread => free,
            Strategy::Pack => 1.0 - free,
        } * 100.0;
        for (w, o) in &prepared.preferred_affinity {
            if o.hit(node) {
                s += *w as f64;
            }
        }
        for (w, o) in &prepared.preferred_anti_affinity {
            if o.hit(node) {
                s -= *w as f64;
            }
        }
        for sp in &prepared.spread {
            if sp.max > sp.min {
                let above = sp.occupied.count(node).saturating_sub(sp.min);
                s -= 100.0 * above as f64 / (sp.max - sp.min) as f64;
            }
        }
        let better = match best {
            None => true,
            Some((bs, bn)) => s > bs || (s == bs && node.name.as_str() < bn),
        };
        if better {
            best = Some((s, &node.name));
        }
    }
    best.map(|(_, n)| n.to_string()).ok_or(Unschedulable {
        nodes: fleet.len(),
        reasons,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Places over plain lists, as the tests describe fleets.
    fn place_in(
        req: &Request,
        nodes: &[Candidate],
        used: &HashMap<String, Used>,
        placed: &[Placed],
    ) -> Result<String, Unschedulable> {
        let mut fleet = Fleet::new(nodes.iter().cloned());
        for (n, u) in used {
            fleet.charge(n, u.cpus, u.memory, 1);
        }
        place(req, &fleet, placed)
    }

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
            node: None,
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
        assert_eq!(place_in(&req(1, 1), &nodes, &used, &[]).unwrap(), "b");
        assert_eq!(
            place_in(&req(1, 1), &nodes, &HashMap::new(), &[]).unwrap(),
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
        assert_eq!(place_in(&r, &nodes, &used, &[]).unwrap(), "b");
        r.strategy = super::Strategy::Spread;
        assert_eq!(place_in(&r, &nodes, &used, &[]).unwrap(), "a");
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
        let err = place_in(&r, &nodes, &used, &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "0/5 nodes are available: 1 not ready, 1 cordoned, 1 not matching the node selector, 2 insufficient CPU"
        );
        let mut mem_only = req(1, 64);
        mem_only.node_selector.clear();
        let err = place_in(&mem_only, &[node("a", 8, 16)], &HashMap::new(), &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "0/1 nodes are available: 1 insufficient memory"
        );
    }

    #[test]
    fn a_vm_with_local_volumes_goes_only_to_their_node() {
        let nodes = vec![node("a", 8, 16), node("b", 8, 16), node("c", 1, 1)];
        let mut r = req(2, 2);
        r.node = Some("b".into());
        let used = HashMap::from([("b".to_string(), Used { cpus: 4, memory: 0 })]);
        assert_eq!(
            place_in(&r, &nodes, &used, &[]).unwrap(),
            "b",
            "not the emptier a"
        );
        r.node = Some("c".into());
        let err = place_in(&r, &nodes, &used, &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "0/3 nodes are available: 2 not holding the VM's volumes, 1 insufficient CPU"
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
        let node = place_in(req, nodes, &HashMap::new(), placed)?;
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
        let err = place_in(&web, &nodes, &HashMap::new(), &placed).unwrap_err();
        assert_eq!(
            err.to_string(),
            "0/3 nodes are available: 3 breaking VM anti-affinity"
        );
        // Another project's VMs do not count.
        let mut other = web.clone();
        other.project = "other".into();
        assert!(place_in(&other, &nodes, &HashMap::new(), &placed).is_ok());
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
        assert!(place_in(&first, &nodes, &HashMap::new(), &placed).is_ok());
        // Someone else's group that does not exist yet cannot be joined.
        let mut lonely = labelled(req(1, 1), "api");
        lonely
            .rules
            .required_affinity
            .push(term("app=queue", "zone"));
        assert_eq!(
            place_in(&lonely, &nodes, &HashMap::new(), &placed)
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
                match place_in(&r, &nodes, &used, &[]) {
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

    #[test]
    fn topology_spread_evens_out_zones_and_max_skew_is_hard() {
        let nodes = vec![
            zoned("a1", "a"),
            zoned("a2", "a"),
            zoned("b1", "b"),
            zoned("c1", "c"),
        ];
        let mut web = labelled(req(1, 1), "web");
        web.rules.spread.push(Spread {
            term: term("app=web", "zone"),
            max_skew: None,
        });
        let mut placed = Vec::new();
        let mut per_zone: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..9 {
            let n = place_and_record(&web, &nodes, &mut placed).unwrap();
            *per_zone.entry(n[..1].to_string()).or_default() += 1;
        }
        assert_eq!(
            per_zone.values().copied().collect::<Vec<_>>(),
            vec![3, 3, 3],
            "{per_zone:?}"
        );
        // maxSkew 1: zone b is full, so dbs may pile up in zone a only one ahead of b.
        let nodes = vec![zoned("a1", "a"), zoned("a2", "a"), zoned("b1", "b")];
        let mut hard = labelled(req(1, 1), "db");
        hard.rules.spread.push(Spread {
            term: term("app=db", "zone"),
            max_skew: Some(1),
        });
        let db = |node: &str| Placed {
            project: "p".into(),
            labels: BTreeMap::from([("app".to_string(), "db".to_string())]),
            node: node.into(),
        };
        let full_b = HashMap::from([(
            "b1".to_string(),
            Used {
                cpus: 64,
                memory: 0,
            },
        )]);
        let mut placed = vec![db("a1"), db("b1")];
        let third = place_in(&hard, &nodes, &full_b, &placed).unwrap();
        assert!(
            third.starts_with('a'),
            "a: 2 against b: 1 is within maxSkew"
        );
        placed.push(db(&third));
        let err = place_in(&hard, &nodes, &full_b, &placed).unwrap_err();
        assert_eq!(
            err.to_string(),
            "0/3 nodes are available: 2 breaking topology spread, 1 insufficient CPU"
        );
    }

    fn arb_labels() -> impl proptest::strategy::Strategy<Value = BTreeMap<String, String>> {
        proptest::collection::btree_map(
            prop_oneof![
                Just("app".to_string()),
                Just("tier".to_string()),
                Just("x".to_string())
            ],
            prop_oneof![
                Just("a".to_string()),
                Just("b".to_string()),
                Just("c".to_string())
            ],
            0..3,
        )
    }

    proptest! {
        /// The index answers every selector exactly as a scan of the placed VMs does, also after
        /// VMs move and leave.
        #[test]
        fn the_index_agrees_with_a_scan(
            vms in proptest::collection::vec((0usize..2, arb_labels(), 0usize..4), 0..40),
            removed in proptest::collection::vec(0usize..40, 0..10),
            selector in prop_oneof![
                Just("app=a"), Just("app in (a,b)"), Just("tier"), Just("!x"), Just("app=a,tier!=b"), Just("")],
        ) {
            let mut index = PlacedIndex::default();
            let mut scan: Vec<(String, Placed)> = Vec::new();
            for (i, (project, labels, node)) in vms.iter().enumerate() {
                let p = Placed { project: format!("p{project}"), labels: labels.clone(), node: format!("n{node}") };
                index.insert(&format!("vm{i}"), p.clone());
                scan.push((format!("vm{i}"), p));
            }
            for r in removed {
                index.remove(&format!("vm{r}"));
                scan.retain(|(k, _)| *k != format!("vm{r}"));
            }
            let sel = LabelSelector::parse(selector).unwrap();
            let plain: Vec<Placed> = scan.into_iter().map(|(_, p)| p).collect();
            for project in ["p0", "p1"] {
                let (mut a, mut b) = (Vec::new(), Vec::new());
                index.nodes_of(project, &sel, &mut |n| a.push(n.to_string()));
                plain[..].nodes_of(project, &sel, &mut |n| b.push(n.to_string()));
                a.sort();
                b.sort();
                prop_assert_eq!(a, b);
            }
        }

        /// A preferred rule of weight 100 always wins over spreading by load: the chosen node
        /// meets as many preferred terms as any feasible node does.
        #[test]
        fn preferred_rules_are_honoured_when_possible(
            zones in proptest::collection::vec(0usize..3, 2..8),
            loads in proptest::collection::vec(0u64..6, 8),
            groups in proptest::collection::vec(0usize..3, 0..12),
            anti in any::<bool>(),
        ) {
            let nodes: Vec<Candidate> = zones.iter().enumerate().map(|(i, z)| {
                let mut n = node(&format!("n{i}"), 8, 16);
                n.labels.insert("zone".into(), format!("z{z}"));
                n
            }).collect();
            let used: HashMap<String, Used> = nodes.iter().enumerate()
                .map(|(i, n)| (n.name.clone(), Used { cpus: loads[i], memory: 0 })).collect();
            let placed: Vec<Placed> = groups.iter().enumerate().map(|(i, g)| Placed {
                project: "p".into(),
                labels: BTreeMap::from([("app".to_string(), format!("g{g}"))]),
                node: format!("n{}", i % nodes.len()),
            }).collect();
            let mut r = labelled(req(1, 1), "g0");
            let t = term("app=g0", "zone");
            if anti { r.rules.preferred_anti_affinity.push((100, t.clone())); } else { r.rules.preferred_affinity.push((100, t.clone())); }
            let chosen = place_in(&r, &nodes, &used, &placed).unwrap();
            let fleet = Fleet::new(nodes.iter().cloned());
            let occ = occupied(&r, &t, &fleet, &placed[..]);
            let met = |n: &Candidate| occ.hit(n) != anti;
            let best_possible = nodes.iter().any(|n| met(n) && filter(&r, n, used[&n.name]).is_none());
            let c = nodes.iter().find(|n| n.name == chosen).unwrap();
            prop_assert!(!best_possible || met(c), "{chosen} breaks the preference although another node meets it");
        }
    }
}
