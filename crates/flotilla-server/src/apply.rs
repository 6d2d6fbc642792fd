//! Server-side apply, as Kubernetes does it: each writer (a "field manager") owns the fields it
//! set, recorded in `metadata.managedFields` (`FieldsV1`: `f:<field>` for fields,
//! `k:{"name":"x"}` for items of lists keyed by a field, `v:<value>` for items of sets, `.` for
//! an item itself). An apply sets the fields of its configuration, removes the fields its manager
//! set before and no longer does (unless another manager owns them too), and is refused with 409
//! when it would change a field another manager owns (naming the fields and their managers)
//! unless it forces. Lists whose items have a natural key (networks by network, conditions by type,
//! owner references by uid) merge item by item; sets of strings (finalizers) merge by value;
//! other lists are owned whole.
//!
//! Objects nobody has applied carry no managedFields and cost nothing; the first apply gives
//! the fields already there to the manager `before-first-apply`, and from then on every write
//! records who changed what (operation `Update`).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Map, Value};

/// One step of a field path.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    /// A field of an object.
    Field(String),
    /// An item of a keyed list, by its key fields (canonical JSON).
    Key(String),
    /// An item of a set, by its value (canonical JSON).
    Value(String),
    /// The item itself (`.`): whoever owns it keeps it in the list.
    Itself,
}

pub type Path = Vec<Step>;
pub type FieldSet = BTreeSet<Path>;

/// How a list merges, by its path (field names only, list items skipped).
enum ListKind {
    Atomic,
    Set,
    Keyed(&'static [&'static str]),
}

fn list_kind(names: &[&str]) -> ListKind {
    match names {
        [.., "conditions"] => ListKind::Keyed(&["type"]),
        ["spec", "networks"] => ListKind::Keyed(&["network"]),
        ["metadata", "ownerReferences"] => ListKind::Keyed(&["uid"]),
        ["metadata", "finalizers"] => ListKind::Set,
        ["status", "unmanagedDomains"] => ListKind::Keyed(&["uuid"]),
        _ => ListKind::Atomic,
    }
}

/// Fields that are the server's, never owned by a manager.
fn ignored(path: &[&str]) -> bool {
    matches!(
        path,
        ["apiVersion"]
            | ["kind"]
            | ["metadata", "name"]
            | ["metadata", "namespace"]
            | ["metadata", "uid"]
            | ["metadata", "resourceVersion"]
            | ["metadata", "generation"]
            | ["metadata", "creationTimestamp"]
            | ["metadata", "deletionTimestamp"]
            | ["metadata", "deletionGracePeriodSeconds"]
            | ["metadata", "managedFields"]
            | ["metadata", "generateName"]
    )
}

fn canonical(v: &Value) -> String {
    serde_json::to_string(v).expect("JSON values serialise")
}

fn key_of(item: &Value, keys: &[&str]) -> Option<String> {
    let mut m = Map::new();
    for k in keys {
        m.insert((*k).to_string(), item.get(*k)?.clone());
    }
    Some(canonical(&Value::Object(m)))
}

/// The leaf fields (and list items) `v` sets; `subresource` picks spec-and-metadata or status.
pub fn fields(v: &Value, status: bool) -> FieldSet {
    let mut out = FieldSet::new();
    if let Some(obj) = v.as_object() {
        for (k, child) in obj {
            if (k == "status") != status {
                continue;
            }
            let mut names = vec![k.as_str()];
            let mut path = vec![Step::Field(k.clone())];
            walk(child, &mut names, &mut path, &mut out);
        }
    }
    out
}

fn walk<'a>(v: &'a Value, names: &mut Vec<&'a str>, path: &mut Path, out: &mut FieldSet) {
    if ignored(names) {
        return;
    }
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                names.push(k);
                path.push(Step::Field(k.clone()));
                walk(child, names, path, out);
                path.pop();
                names.pop();
            }
        }
        Value::Array(items) => match list_kind(names) {
            ListKind::Atomic => {
                out.insert(path.clone());
            }
            ListKind::Set => {
                for item in items {
                    let mut p = path.clone();
                    p.push(Step::Value(canonical(item)));
                    out.insert(p);
                }
            }
            ListKind::Keyed(keys) => {
                for item in items {
                    let Some(key) = key_of(item, keys) else {
                        // An item without its key: the list cannot be merged; own it whole.
                        out.insert(path.clone());
                        continue;
                    };
                    path.push(Step::Key(key));
                    let mut item_path = path.clone();
                    item_path.push(Step::Itself);
                    out.insert(item_path);
                    if let Some(m) = item.as_object() {
                        for (k, child) in m {
                            names.push(k);
                            path.push(Step::Field(k.clone()));
                            walk(child, names, path, out);
                            path.pop();
                            names.pop();
                        }
                    }
                    path.pop();
                }
            }
        },
        _ => {
            out.insert(path.clone());
        }
    }
}

/// The value at `path`, if `v` has one.
pub fn get<'a>(v: &'a Value, path: &[Step]) -> Option<&'a Value> {
    let mut here = v;
    let mut names: Vec<&str> = Vec::new();
    for step in path {
        here = match step {
            Step::Field(f) => {
                names.push(f);
                here.get(f)?
            }
            Step::Key(k) => {
                let ListKind::Keyed(keys) = list_kind(&names) else {
                    return None;
                };
                here.as_array()?
                    .iter()
                    .find(|i| key_of(i, keys).as_deref() == Some(k.as_str()))?
            }
            Step::Value(val) => here.as_array()?.iter().find(|i| canonical(i) == *val)?,
            Step::Itself => here,
        };
    }
    Some(here)
}

/// Removes what `path` names from `v` (a field, a list item, a set value).
fn remove(v: &mut Value, path: &[Step]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    // `k:.../.` names the item: remove it from its list.
    if *last == Step::Itself {
        remove(v, parents);
        return;
    }
    let mut names: Vec<String> = parents
        .iter()
        .filter_map(|s| match s {
            Step::Field(f) => Some(f.clone()),
            _ => None,
        })
        .collect();
    let Some(parent) = get_mut(v, parents) else {
        return;
    };
    match last {
        Step::Field(f) => {
            if let Some(m) = parent.as_object_mut() {
                m.remove(f);
            }
        }
        Step::Key(k) => {
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            if let (ListKind::Keyed(keys), Some(items)) = (list_kind(&refs), parent.as_array_mut())
            {
                items.retain(|i| key_of(i, keys).as_deref() != Some(k.as_str()));
            }
        }
        Step::Value(val) => {
            if let Some(items) = parent.as_array_mut() {
                items.retain(|i| canonical(i) != *val);
            }
        }
        Step::Itself => {}
    }
    names.clear();
}

fn get_mut<'a>(v: &'a mut Value, path: &[Step]) -> Option<&'a mut Value> {
    let mut here = v;
    let mut names: Vec<String> = Vec::new();
    for step in path {
        here = match step {
            Step::Field(f) => {
                names.push(f.clone());
                here.get_mut(f.as_str())?
            }
            Step::Key(k) => {
                let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                let ListKind::Keyed(keys) = list_kind(&refs) else {
                    return None;
                };
                here.as_array_mut()?
                    .iter_mut()
                    .find(|i| key_of(i, keys).as_deref() == Some(k.as_str()))?
            }
            Step::Value(val) => here
                .as_array_mut()?
                .iter_mut()
                .find(|i| canonical(i) == *val)?,
            Step::Itself => here,
        };
    }
    Some(here)
}

/// Merges `applied` into `live`: objects field by field, keyed lists item by item, sets by value,
/// anything else replaced.
fn merge(live: &mut Value, applied: &Value, names: &mut Vec<String>) {
    match (live, applied) {
        (Value::Object(l), Value::Object(a)) => {
            for (k, av) in a {
                names.push(k.clone());
                match l.get_mut(k) {
                    Some(lv) if !av.is_null() => merge(lv, av, names),
                    _ => {
                        l.insert(k.clone(), av.clone());
                    }
                }
                names.pop();
            }
        }
        (Value::Array(l), Value::Array(a)) => {
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            match list_kind(&refs) {
                ListKind::Atomic => *l = a.clone(),
                ListKind::Set => {
                    for item in a {
                        if !l.contains(item) {
                            l.push(item.clone());
                        }
                    }
                }
                ListKind::Keyed(keys) => {
                    for item in a {
                        let key = key_of(item, keys);
                        match l
                            .iter_mut()
                            .find(|i| key.is_some() && key_of(i, keys) == key)
                        {
                            Some(existing) => merge(existing, item, names),
                            None => l.push(item.clone()),
                        }
                    }
                }
            }
        }
        (l, a) => *l = a.clone(),
    }
}

/// `FieldsV1` JSON of a field set.
pub fn to_fields_v1(set: &FieldSet) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut here = &mut root;
        for step in path {
            let key = match step {
                Step::Field(f) => format!("f:{f}"),
                Step::Key(k) => format!("k:{k}"),
                Step::Value(v) => format!("v:{v}"),
                Step::Itself => ".".to_string(),
            };
            here = here
                .entry(key)
                .or_insert_with(|| Value::Object(Map::new()))
                .as_object_mut()
                .expect("built as objects");
        }
    }
    Value::Object(root)
}

/// The field set a `FieldsV1` JSON names (its leaves).
pub fn from_fields_v1(v: &Value) -> FieldSet {
    fn go(v: &Value, path: &mut Path, out: &mut FieldSet) {
        let Some(m) = v.as_object() else { return };
        if m.is_empty() && !path.is_empty() {
            out.insert(path.clone());
            return;
        }
        for (k, child) in m {
            let step = if let Some(f) = k.strip_prefix("f:") {
                Step::Field(f.to_string())
            } else if let Some(key) = k.strip_prefix("k:") {
                Step::Key(key.to_string())
            } else if let Some(val) = k.strip_prefix("v:") {
                Step::Value(val.to_string())
            } else if k == "." {
                Step::Itself
            } else {
                continue;
            };
            path.push(step);
            go(child, path, out);
            path.pop();
        }
    }
    let mut out = FieldSet::new();
    go(v, &mut Vec::new(), &mut out);
    out
}

/// A path as Kubernetes prints it in conflicts: `.spec.resources.cpus`, `.spec.networks[name="a"]`.
pub fn describe(path: &[Step]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Field(f) => {
                out.push('.');
                out.push_str(f);
            }
            Step::Key(k) => {
                let pairs: Vec<String> = serde_json::from_str::<Map<String, Value>>(k)
                    .map(|m| m.iter().map(|(k, v)| format!("{k}={v}")).collect())
                    .unwrap_or_default();
                out.push_str(&format!("[{}]", pairs.join(",")));
            }
            Step::Value(v) => out.push_str(&format!("[={v}]")),
            Step::Itself => {}
        }
    }
    out
}

/// One entry of `metadata.managedFields`.
#[derive(Clone, Debug)]
pub struct Managed {
    pub manager: String,
    pub operation: String,
    pub subresource: Option<String>,
    pub fields: FieldSet,
    pub time: String,
    pub api_version: String,
}

impl Managed {
    fn to_json(&self) -> Value {
        let mut v = json!({"manager": self.manager, "operation": self.operation,
            "apiVersion": self.api_version, "time": self.time,
            "fieldsType": "FieldsV1", "fieldsV1": to_fields_v1(&self.fields)});
        if let Some(s) = &self.subresource {
            v["subresource"] = json!(s);
        }
        v
    }

    /// Whose entry this is: the same manager, operation and subresource share one.
    fn same_writer(&self, manager: &str, operation: &str, subresource: Option<&str>) -> bool {
        self.manager == manager
            && self.operation == operation
            && self.subresource.as_deref() == subresource
    }
}

pub fn read_managed(object: &Value) -> Vec<Managed> {
    object["metadata"]["managedFields"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .map(|e| Managed {
                    manager: e["manager"].as_str().unwrap_or_default().to_string(),
                    operation: e["operation"].as_str().unwrap_or("Update").to_string(),
                    subresource: e["subresource"].as_str().map(str::to_string),
                    fields: from_fields_v1(&e["fieldsV1"]),
                    time: e["time"].as_str().unwrap_or_default().to_string(),
                    api_version: e["apiVersion"].as_str().unwrap_or_default().to_string(),
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn write_managed(object: &mut Value, managed: &[Managed]) {
    let entries: Vec<Value> = managed
        .iter()
        .filter(|m| !m.fields.is_empty())
        .map(Managed::to_json)
        .collect();
    if let Some(meta) = object["metadata"].as_object_mut() {
        if entries.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(entries));
        }
    }
}

/// A field another manager owns that an apply would change.
#[derive(Debug)]
pub struct Conflict {
    pub path: Path,
    pub manager: String,
}

/// What an apply comes to.
pub struct Applied {
    pub object: Value,
    pub conflicts: Vec<Conflict>,
}

/// Applies `config` as `manager` to `live` (None: the object does not exist yet). `status`
/// selects the status subresource. With `force`, fields of other managers are taken over.
pub fn apply(
    live: Option<&Value>,
    config: &Value,
    manager: &str,
    force: bool,
    status: bool,
    api_version: &str,
) -> Applied {
    let subresource = status.then_some("status");
    let mut object = live.cloned().unwrap_or_else(|| json!({}));
    let mut managed = read_managed(&object);
    if managed.is_empty() {
        if let Some(live) = live {
            // First apply: what is there was set by someone before; they keep it.
            for (st, sub) in [(false, None), (true, Some("status"))] {
                let existing = fields(live, st);
                if !existing.is_empty() {
                    managed.push(Managed {
                        manager: "before-first-apply".into(),
                        operation: "Update".into(),
                        subresource: sub.map(str::to_string),
                        fields: existing,
                        time: flotilla_types::meta::now()
                            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        api_version: api_version.to_string(),
                    });
                }
            }
        }
    }
    let new = fields(config, status);
    let old = managed
        .iter()
        .find(|m| m.same_writer(manager, "Apply", subresource))
        .map(|m| m.fields.clone())
        .unwrap_or_default();
    // Conflicts: fields of others whose value this apply would change.
    let mut conflicts = Vec::new();
    for path in &new {
        let (want, have) = (get(config, path), live.and_then(|l| get(l, path)));
        if have.is_none() || have == want {
            continue;
        }
        for m in &managed {
            if !m.same_writer(manager, "Apply", subresource) && m.fields.contains(path) {
                conflicts.push(Conflict {
                    path: path.clone(),
                    manager: m.manager.clone(),
                });
            }
        }
    }
    // Moving from client-side to server-side apply (`kubectl apply --server-side` on an object
    // `kubectl apply` made): fields the last client-side apply set, still as it set them, pass
    // to this apply without a conflict, as Kubernetes does.
    let last_applied = (!status)
        .then(|| live.and_then(last_applied_configuration))
        .flatten();
    let (taken, refused): (Vec<Conflict>, Vec<Conflict>) = conflicts.into_iter().partition(|c| {
        last_applied.as_ref().is_some_and(|last| {
            let live_value = live.and_then(|l| get(l, &c.path));
            live_value.is_some() && get(last, &c.path) == live_value
        })
    });
    if !refused.is_empty() && !force {
        return Applied {
            object,
            conflicts: refused,
        };
    }
    let conflicts: Vec<Conflict> = taken.into_iter().chain(refused).collect();
    // Merge the configuration in, then drop what this manager stopped setting and nobody else
    // owns.
    let mut part = config.clone();
    if let Some(obj) = part.as_object_mut() {
        obj.retain(|k, _| (k == "status") == status || k == "metadata" && !status);
    }
    merge(&mut object, &part, &mut Vec::new());
    // Whole items first: removing an item's key field first would lose track of the item.
    let mut dropped: Vec<&Path> = old.difference(&new).collect();
    dropped.sort_by_key(|p| p.last() != Some(&Step::Itself));
    for path in dropped {
        let owned_elsewhere = managed
            .iter()
            .any(|m| !m.same_writer(manager, "Apply", subresource) && m.fields.contains(path));
        if !owned_elsewhere {
            remove(&mut object, path);
        }
    }
    // Ownership: this manager owns what it applied; what it took by force leaves the others.
    for m in managed.iter_mut() {
        if m.same_writer(manager, "Apply", subresource) {
            continue;
        }
        for c in &conflicts {
            if c.manager == m.manager {
                m.fields.remove(&c.path);
            }
        }
    }
    managed.retain(|m| !m.same_writer(manager, "Apply", subresource));
    managed.push(Managed {
        manager: manager.to_string(),
        operation: "Apply".into(),
        subresource: subresource.map(str::to_string),
        fields: new,
        time: flotilla_types::meta::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        api_version: api_version.to_string(),
    });
    write_managed(&mut object, &managed);
    if last_applied.is_some() {
        // Kept current, so that a later client-side apply diffs against this configuration.
        let mut config = part.clone();
        if let Some(annotations) = config
            .pointer_mut("/metadata/annotations")
            .and_then(Value::as_object_mut)
        {
            annotations.remove(LAST_APPLIED);
        }
        if let Some(annotations) = object
            .pointer_mut("/metadata/annotations")
            .and_then(Value::as_object_mut)
        {
            annotations.insert(LAST_APPLIED.into(), Value::String(config.to_string()));
        }
    }
    Applied {
        object,
        conflicts: Vec::new(),
    }
}

/// The annotation `kubectl apply` (client-side) keeps its last configuration in.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

fn last_applied_configuration(live: &Value) -> Option<Value> {
    let text = live
        .pointer("/metadata/annotations")?
        .get(LAST_APPLIED)?
        .as_str()?;
    serde_json::from_str(text).ok()
}

/// Records a non-apply write (`Update`) by `manager` on an object that has managedFields: it
/// owns what it changed or added; what it removed is nobody's any more.
pub fn record_update(
    before: &Value,
    after: &mut Value,
    manager: &str,
    status: bool,
    api_version: &str,
) {
    let mut managed = read_managed(before);
    if managed.is_empty() {
        // Nobody applies this object: ownership is not tracked.
        if let Some(meta) = after["metadata"].as_object_mut() {
            meta.remove("managedFields");
        }
        return;
    }
    let subresource = status.then_some("status");
    let (old, new) = (fields(before, status), fields(after, status));
    let changed: BTreeSet<Path> = new
        .iter()
        .filter(|p| get(before, p) != get(after, p))
        .cloned()
        .collect();
    let gone: BTreeSet<Path> = old.difference(&new).cloned().collect();
    if changed.is_empty() && gone.is_empty() {
        write_managed(after, &managed);
        return;
    }
    for m in managed.iter_mut() {
        m.fields
            .retain(|p| !changed.contains(p) && !gone.contains(p));
    }
    match managed
        .iter_mut()
        .find(|m| m.same_writer(manager, "Update", subresource))
    {
        Some(m) => {
            m.fields.extend(changed);
            m.time = flotilla_types::meta::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        }
        None => managed.push(Managed {
            manager: manager.to_string(),
            operation: "Update".into(),
            subresource: subresource.map(str::to_string),
            fields: changed,
            time: flotilla_types::meta::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            api_version: api_version.to_string(),
        }),
    }
    write_managed(after, &managed);
}

/// The 409 of a refused apply, as Kubernetes words it.
pub fn conflict_message(conflicts: &[Conflict]) -> (String, Vec<(String, String)>) {
    let mut by: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for c in conflicts {
        by.entry(c.manager.clone())
            .or_default()
            .push(describe(&c.path));
    }
    let lines: Vec<String> = by
        .iter()
        .flat_map(|(m, paths)| {
            paths
                .iter()
                .map(move |p| format!("conflict with \"{m}\": {p}"))
        })
        .collect();
    let causes = conflicts
        .iter()
        .map(|c| {
            (
                describe(&c.path),
                format!("conflict with \"{}\"", c.manager),
            )
        })
        .collect();
    (
        format!(
            "Apply failed with {} conflict{}: {}",
            conflicts.len(),
            if conflicts.len() == 1 { "" } else { "s" },
            lines.join("; ")
        ),
        causes,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(cpus: u32, nets: &[&str]) -> Value {
        let networks: Vec<Value> = nets.iter().map(|n| json!({"network": n})).collect();
        json!({"apiVersion": "flotilla.dev/v1alpha1", "kind": "VirtualMachine",
               "metadata": {"name": "web", "labels": {"app": "web"}},
               "spec": {"resources": {"cpus": cpus, "memory": "1Gi"}, "networks": networks}})
    }

    #[test]
    fn field_sets_round_trip_through_fields_v1() {
        let set = fields(&vm(2, &["a", "b"]), false);
        assert!(set.contains(&vec![
            Step::Field("spec".into()),
            Step::Field("resources".into()),
            Step::Field("cpus".into())
        ]));
        assert!(set.contains(&vec![
            Step::Field("spec".into()),
            Step::Field("networks".into()),
            Step::Key("{\"network\":\"a\"}".into()),
            Step::Itself
        ]));
        assert!(!set.iter().any(|p| p[0] == Step::Field("apiVersion".into())));
        let v1 = to_fields_v1(&set);
        assert!(v1["f:spec"]["f:networks"]["k:{\"network\":\"a\"}"]["."].is_object());
        assert_eq!(from_fields_v1(&v1), set);
    }

    #[test]
    fn apply_merges_owns_conflicts_and_removes_what_it_stopped_setting() {
        // A creates with two networks.
        let a1 = apply(None, &vm(2, &["a", "b"]), "alice", false, false, "v");
        assert!(a1.conflicts.is_empty());
        let live = a1.object;
        assert_eq!(live["spec"]["networks"].as_array().unwrap().len(), 2);
        // B applies a different cpus: conflict with alice, unless forced.
        let mut bob = json!({"apiVersion": "flotilla.dev/v1alpha1", "kind": "VirtualMachine",
            "metadata": {"name": "web"}, "spec": {"resources": {"cpus": 4}, "networks": [{"network": "c"}]}});
        let refused = apply(Some(&live), &bob, "bob", false, false, "v");
        assert_eq!(refused.conflicts.len(), 1);
        assert_eq!(describe(&refused.conflicts[0].path), ".spec.resources.cpus");
        assert!(conflict_message(&refused.conflicts)
            .0
            .contains("conflict with \"alice\""));
        let forced = apply(Some(&live), &bob, "bob", true, false, "v").object;
        assert_eq!(forced["spec"]["resources"]["cpus"], 4);
        assert_eq!(
            forced["spec"]["resources"]["memory"], "1Gi",
            "alice's other fields stay"
        );
        let names: Vec<&str> = forced["spec"]["networks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["network"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["a", "b", "c"], "keyed lists merge item by item");
        // Alice applies again without network b and without the label: both go (nobody else
        // owns them); cpus is bob's now, so her old value does not come back.
        let mut alice = vm(2, &["a"]);
        alice["metadata"].as_object_mut().unwrap().remove("labels");
        alice["spec"]["resources"]
            .as_object_mut()
            .unwrap()
            .remove("cpus");
        let again = apply(Some(&forced), &alice, "alice", false, false, "v").object;
        let names: Vec<&str> = again["spec"]["networks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["network"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["a", "c"]);
        assert!(
            again["metadata"].get("labels").is_none()
                || again["metadata"]["labels"].get("app").is_none()
        );
        assert_eq!(again["spec"]["resources"]["cpus"], 4);
        // Bob re-applying the same value conflicts with nobody.
        bob["spec"]["resources"]["cpus"] = json!(4);
        assert!(apply(Some(&again), &bob, "bob", false, false, "v")
            .conflicts
            .is_empty());
    }

    #[test]
    fn updates_take_over_what_they_change() {
        let live = apply(None, &vm(2, &["a"]), "alice", false, false, "v").object;
        let mut after = live.clone();
        after["spec"]["resources"]["cpus"] = json!(8);
        record_update(&live, &mut after, "kubectl-edit", false, "v");
        let managed = read_managed(&after);
        let editor = managed
            .iter()
            .find(|m| m.manager == "kubectl-edit")
            .unwrap();
        assert_eq!(editor.fields.len(), 1);
        // Alice applying cpus 2 again now conflicts with the editor.
        let refused = apply(Some(&after), &vm(2, &["a"]), "alice", false, false, "v");
        assert_eq!(refused.conflicts[0].manager, "kubectl-edit");
        // Objects nobody applies keep no managedFields.
        let plain = vm(1, &[]);
        let mut changed = plain.clone();
        changed["spec"]["resources"]["cpus"] = json!(3);
        record_update(&plain, &mut changed, "x", false, "v");
        assert!(changed["metadata"].get("managedFields").is_none());
    }

    #[test]
    fn server_side_apply_takes_over_from_client_side_apply_as_kubernetes_does() {
        // `kubectl apply` (client-side) made the object with cpus 2 and kept its configuration.
        let mut live = vm(2, &["a"]);
        live["metadata"]["annotations"] = json!({LAST_APPLIED: vm(2, &["a"]).to_string()});
        // Server-side apply of cpus 4: the fields of the last configuration pass without conflict.
        let applied = apply(Some(&live), &vm(4, &["a"]), "kubectl", false, false, "v");
        assert!(applied.conflicts.is_empty());
        let object = applied.object;
        assert_eq!(object["spec"]["resources"]["cpus"], 4);
        let kept: Value = serde_json::from_str(
            object["metadata"]["annotations"][LAST_APPLIED]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            kept["spec"]["resources"]["cpus"], 4,
            "the last configuration follows"
        );
        assert!(kept["metadata"]["annotations"].get(LAST_APPLIED).is_none());
        // A field someone changed after the last client-side apply still conflicts.
        live["spec"]["resources"]["cpus"] = json!(3);
        let refused = apply(Some(&live), &vm(4, &["a"]), "kubectl", false, false, "v");
        assert_eq!(refused.conflicts.len(), 1);
        assert_eq!(describe(&refused.conflicts[0].path), ".spec.resources.cpus");
    }
}
