//! Role-based access control for people and service accounts, as Kubernetes evaluates it: a
//! request is allowed when a rule of a role bound to the caller allows its verb on its resource.
//! ClusterRoleBindings grant everywhere; RoleBindings grant within their project only, and only
//! on project-scoped kinds. Bindings and roles are read from the store on every decision, so a
//! new binding works at once on every replica (a handful of key reads per request).
//!
//! The built-in ClusterRoles (`cluster-admin`, `admin`, `member`, `viewer`, `basic-user`) are
//! written at every start, so an upgrade brings their new rules.

use std::sync::Arc;

use flotilla_store::{RangeRequest, Store};
use flotilla_types::kinds::rbac::{PolicyRule, RoleRef, Subject, RBAC_GROUP};
use flotilla_types::registry::{self, KindInfo};
use serde_json::{json, Value};

use crate::auth::Principal;
use crate::error::ApiError;
use crate::objects::{list_prefix, object_key, Objects};

/// Every authenticated caller is in this group.
pub const AUTHENTICATED: &str = "system:authenticated";

/// What a request does, in RBAC's terms.
#[derive(Clone, Debug)]
pub struct Attributes<'a> {
    pub verb: &'a str,
    /// `flotilla.dev`, `""` (core) or `rbac.authorization.k8s.io`.
    pub group: &'a str,
    /// The plural, with `/subresource` when there is one.
    pub resource: String,
    pub project: Option<&'a str>,
    pub name: Option<&'a str>,
    /// Whether the kind lives in projects (RoleBindings grant only those).
    pub namespaced: bool,
}

impl<'a> Attributes<'a> {
    pub fn of(
        verb: &'a str,
        kind: &KindInfo,
        subresource: Option<&str>,
        project: Option<&'a str>,
        name: Option<&'a str>,
    ) -> Self {
        let resource = match subresource {
            Some(sub) => format!("{}/{sub}", kind.plural),
            None => kind.plural.to_string(),
        };
        Attributes {
            verb,
            group: group_of(kind),
            resource,
            project: if kind.namespaced { project } else { None },
            name,
            namespaced: kind.namespaced,
        }
    }
}

/// The API group a kind is served in.
pub fn group_of(kind: &KindInfo) -> &'static str {
    kind.api_version
        .rsplit_once('/')
        .map(|(g, _)| g)
        .unwrap_or("")
}

fn matches(list: &[String], value: &str) -> bool {
    list.iter().any(|v| v == "*" || v == value)
}

/// Whether `rule` allows the request.
pub fn rule_allows(rule: &PolicyRule, a: &Attributes<'_>) -> bool {
    if !matches(&rule.verbs, a.verb) || !matches(&rule.api_groups, a.group) {
        return false;
    }
    let resource_ok = rule.resources.iter().any(|r| {
        r == "*"
            || *r == a.resource
            // `*/status`: that subresource of every resource.
            || r.strip_prefix("*/").is_some_and(|sub| {
                a.resource.split_once('/').is_some_and(|(_, s)| s == sub)
            })
    });
    if !resource_ok {
        return false;
    }
    rule.resource_names.is_empty()
        || a.name
            .is_some_and(|n| rule.resource_names.iter().any(|r| r == n))
}

/// Whether a subject of a binding in `binding_project` (None: a ClusterRoleBinding) is `p`.
fn subject_is(s: &Subject, binding_project: Option<&str>, p: &Principal) -> bool {
    match s.kind.as_str() {
        "User" => s.name == p.user,
        "Group" => s.name == AUTHENTICATED || p.groups.contains(&s.name),
        "ServiceAccount" => {
            let Some(ns) = s.namespace.as_deref().or(binding_project) else {
                return false;
            };
            p.user == service_account_user(ns, &s.name)
        }
        _ => false,
    }
}

/// The user name a service account authenticates as (Kubernetes' form).
pub fn service_account_user(project: &str, name: &str) -> String {
    format!("system:serviceaccount:{project}:{name}")
}

/// The rules that apply to `p`: those granted cluster-wide, and those granted in `project`.
#[derive(Debug, Default)]
pub struct Grants {
    pub cluster: Vec<PolicyRule>,
    pub project: Vec<PolicyRule>,
}

impl Grants {
    pub fn allows(&self, a: &Attributes<'_>) -> bool {
        self.cluster.iter().any(|r| rule_allows(r, a))
            || (a.namespaced
                && a.project.is_some()
                && self.project.iter().any(|r| rule_allows(r, a)))
    }

    /// Whether these grants hold every permission of `rule` (in the project, or cluster-wide
    /// with `project` None): nobody can give a role more than they have.
    pub fn cover(&self, rule: &PolicyRule, project: Option<&str>) -> bool {
        let held: Vec<&PolicyRule> = match project {
            Some(_) => self.cluster.iter().chain(&self.project).collect(),
            None => self.cluster.iter().collect(),
        };
        let names: Vec<Option<&str>> = if rule.resource_names.is_empty() {
            vec![None]
        } else {
            rule.resource_names
                .iter()
                .map(|n| Some(n.as_str()))
                .collect()
        };
        rule.verbs.iter().all(|verb| {
            rule.api_groups.iter().all(|group| {
                rule.resources.iter().all(|resource| {
                    names.iter().all(|name| {
                        held.iter().any(|h| {
                            // A wildcard asked for is covered only by the same wildcard held.
                            let lit =
                                |list: &[String], v: &str| list.iter().any(|x| x == "*" || x == v);
                            lit(&h.verbs, verb)
                                && lit(&h.api_groups, group)
                                && (h.resources.iter().any(|r| r == "*" || r == resource))
                                && (h.resource_names.is_empty()
                                    || name
                                        .is_some_and(|n| h.resource_names.iter().any(|r| r == n)))
                        })
                    })
                })
            })
        })
    }
}

async fn objects_under(store: &dyn Store, prefix: &str) -> Result<Vec<Value>, ApiError> {
    let kvs = store.range(RangeRequest::prefix(prefix)).await?.kvs;
    Ok(kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
        .collect())
}

fn kind(name: &str) -> &'static KindInfo {
    registry::by_kind(name).expect("registered")
}

async fn role_rules(
    store: &dyn Store,
    role_ref: &RoleRef,
    project: Option<&str>,
) -> Result<Vec<PolicyRule>, ApiError> {
    let key = match (role_ref.kind.as_str(), project) {
        ("ClusterRole", _) => object_key(kind("ClusterRole"), None, &role_ref.name),
        ("Role", Some(ns)) => object_key(kind("Role"), Some(ns), &role_ref.name),
        _ => return Ok(Vec::new()),
    };
    // A binding to a role that does not exist (yet) grants nothing.
    let Some(kv) = store.get(&key).await? else {
        return Ok(Vec::new());
    };
    let role: Value = serde_json::from_slice(&kv.value).unwrap_or_default();
    Ok(serde_json::from_value(role["rules"].clone()).unwrap_or_default())
}

fn binding_parts(b: &Value) -> Option<(Vec<Subject>, RoleRef)> {
    let subjects = serde_json::from_value(b["subjects"].clone()).unwrap_or_default();
    let role_ref = serde_json::from_value(b["roleRef"].clone()).ok()?;
    Some((subjects, role_ref))
}

/// How long a caller's grants are reused without reading the bindings again. Writes of roles
/// and bindings through this server forget them at once; other replicas follow within this
/// time (verified tokens are trusted for 5 s, so revocation was never instant either).
pub const GRANTS_CACHE_FOR: std::time::Duration = std::time::Duration::from_secs(1);

type GrantsKey = (String, Vec<String>, Option<String>);

/// Recently read grants, per caller and project.
#[derive(Default)]
pub struct GrantsCache(
    std::sync::Mutex<std::collections::HashMap<GrantsKey, (Arc<Grants>, std::time::Instant)>>,
);

impl GrantsCache {
    pub fn forget(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// [`grants`], reused for [`GRANTS_CACHE_FOR`].
pub async fn grants_cached(
    objects: &Objects,
    p: &Principal,
    project: Option<&str>,
) -> Result<Arc<Grants>, ApiError> {
    let key = (
        p.user.clone(),
        p.groups.clone(),
        project.map(str::to_string),
    );
    let cache = objects.grants_cache();
    if let Some((g, at)) = cache.0.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        if at.elapsed() < GRANTS_CACHE_FOR {
            return Ok(g.clone());
        }
    }
    let fresh = Arc::new(grants(objects.store().as_ref(), p, project).await?);
    let mut map = cache.0.lock().unwrap_or_else(|e| e.into_inner());
    if map.len() > 10_000 {
        map.retain(|_, (_, at)| at.elapsed() < GRANTS_CACHE_FOR);
    }
    map.insert(key, (fresh.clone(), std::time::Instant::now()));
    Ok(fresh)
}

/// Reads what `p` is granted, cluster-wide and in `project`.
pub async fn grants(
    store: &dyn Store,
    p: &Principal,
    project: Option<&str>,
) -> Result<Grants, ApiError> {
    let mut g = Grants::default();
    for b in objects_under(store, &list_prefix(kind("ClusterRoleBinding"), None)).await? {
        let Some((subjects, role_ref)) = binding_parts(&b) else {
            continue;
        };
        if subjects.iter().any(|s| subject_is(s, None, p)) && role_ref.kind == "ClusterRole" {
            g.cluster.extend(role_rules(store, &role_ref, None).await?);
        }
    }
    if let Some(ns) = project {
        for b in objects_under(store, &list_prefix(kind("RoleBinding"), Some(ns))).await? {
            let Some((subjects, role_ref)) = binding_parts(&b) else {
                continue;
            };
            if subjects.iter().any(|s| subject_is(s, Some(ns), p)) {
                g.project
                    .extend(role_rules(store, &role_ref, Some(ns)).await?);
            }
        }
    }
    Ok(g)
}

/// The projects in which `p` is bound to some role (what `list projects` shows a person who
/// may not list every project).
pub async fn bound_projects(store: &dyn Store, p: &Principal) -> Result<Vec<String>, ApiError> {
    let prefix = list_prefix(kind("RoleBinding"), None);
    let mut out = Vec::new();
    for b in objects_under(store, &prefix).await? {
        let ns = b["metadata"]["namespace"].as_str().unwrap_or_default();
        let Some((subjects, _)) = binding_parts(&b) else {
            continue;
        };
        if subjects.iter().any(|s| subject_is(s, Some(ns), p)) && !out.iter().any(|o| o == ns) {
            out.push(ns.to_string());
        }
    }
    Ok(out)
}

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> PolicyRule {
    let own = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
    PolicyRule {
        api_groups: own(groups),
        resources: own(resources),
        verbs: own(verbs),
        resource_names: Vec::new(),
    }
}

const READ: &[&str] = &["get", "list", "watch"];
const WRITE: &[&str] = flotilla_types::kinds::rbac::VERBS;
const FLOTILLA: &[&str] = &["flotilla.dev"];

/// What a project's members make and run.
const WORKLOADS: &[&str] = &[
    "virtualmachines",
    "volumes",
    "volumesnapshots",
    "vmsnapshots",
    "networks",
    "securitygroups",
    "routers",
    "floatingips",
    "placementpolicies",
    "images",
];

/// Status subresources a viewer may read.
const STATUSES: &[&str] = &[
    "virtualmachines/status",
    "volumes/status",
    "volumesnapshots/status",
    "vmsnapshots/status",
    "networks/status",
    "securitygroups/status",
    "routers/status",
    "floatingips/status",
    "images/status",
];

/// The built-in ClusterRoles and their rules.
pub fn builtin_cluster_roles() -> Vec<(&'static str, &'static str, Vec<PolicyRule>)> {
    let viewer = vec![
        rule(FLOTILLA, WORKLOADS, READ),
        rule(FLOTILLA, STATUSES, &["get"]),
        rule(
            FLOTILLA,
            &["virtualmachines/log", "networks/addresses"],
            &["get"],
        ),
        rule(&[""], &["events", "serviceaccounts"], READ),
    ];
    let member = vec![
        rule(FLOTILLA, WORKLOADS, WRITE),
        rule(FLOTILLA, STATUSES, &["get"]),
        rule(
            FLOTILLA,
            &[
                "virtualmachines/log",
                "virtualmachines/console",
                "virtualmachines/vnc",
                "networks/addresses",
                "volumes/data",
                "images/data",
            ],
            &["get", "create", "update"],
        ),
        rule(&[""], &["events", "serviceaccounts"], READ),
    ];
    let mut admin = member.clone();
    admin.push(rule(
        &[""],
        &["serviceaccounts", "serviceaccounts/token"],
        WRITE,
    ));
    admin.push(rule(&[RBAC_GROUP], &["roles", "rolebindings"], WRITE));
    vec![
        (
            "cluster-admin",
            "Everything, everywhere (bound in a project: everything in that project).",
            vec![rule(&["*"], &["*"], &["*"])],
        ),
        (
            "admin",
            "Everything in a project, including who may use it (roles, bindings, service accounts).",
            admin,
        ),
        (
            "member",
            "Makes and runs VMs, volumes, networks and the rest of a project's workloads.",
            member,
        ),
        ("viewer", "Reads a project's workloads, their logs and events.", viewer),
        (
            "basic-user",
            "What every signed-in caller may do: read the catalog (classes, storage pools) and ask what it may do.",
            vec![
                rule(FLOTILLA, &["vmclasses", "storagepools"], READ),
                rule(&["authorization.k8s.io"], &["selfsubjectaccessreviews"], &["create"]),
            ],
        ),
    ]
}

/// Writes the built-in ClusterRoles (and binds `basic-user` to every signed-in caller).
pub async fn ensure_builtin(objects: &Objects) -> Result<(), ApiError> {
    let roles = kind("ClusterRole");
    for (name, description, rules) in builtin_cluster_roles() {
        let body = json!({
            "apiVersion": roles.api_version, "kind": "ClusterRole",
            "metadata": {"name": name, "labels": {"flotilla.dev/bootstrapping": "default"},
                         "annotations": {"flotilla.dev/description": description}},
            "rules": rules,
        });
        put_if_changed(objects, roles, name, body, "rules").await?;
    }
    let bindings = kind("ClusterRoleBinding");
    let body = json!({
        "apiVersion": bindings.api_version, "kind": "ClusterRoleBinding",
        "metadata": {"name": "basic-user", "labels": {"flotilla.dev/bootstrapping": "default"}},
        "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": "basic-user"},
        "subjects": [{"kind": "Group", "apiGroup": RBAC_GROUP, "name": AUTHENTICATED}],
    });
    put_if_changed(objects, bindings, "basic-user", body, "subjects").await
}

async fn put_if_changed(
    objects: &Objects,
    kind: &'static KindInfo,
    name: &str,
    body: Value,
    field: &str,
) -> Result<(), ApiError> {
    match objects.get(kind, None, name).await {
        Ok(stored) => {
            let current = stored.to_value();
            if current[field] != body[field] {
                let mut next = current.clone();
                next[field] = body[field].clone();
                objects
                    .update(kind, None, name, next, crate::Subresource::Main)
                    .await?;
            }
            Ok(())
        }
        Err(e) if e.code() == 404 => match objects.create(kind, None, body).await {
            Ok(_) => Ok(()),
            // Another replica made it first.
            Err(e) if e.code() == 409 => Ok(()),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    }
}

pub(crate) fn is_rbac_kind(kind: Option<&str>) -> bool {
    matches!(
        kind,
        Some("Role" | "ClusterRole" | "RoleBinding" | "ClusterRoleBinding")
    )
}

fn refuse_beyond(
    p: &Principal,
    held: &Grants,
    rules: &[PolicyRule],
    what: &str,
    project: Option<&str>,
) -> Result<(), ApiError> {
    for (i, rule) in rules.iter().enumerate() {
        if !held.cover(rule, project) {
            return Err(ApiError::forbidden(format!(
                "{} may not grant {what}: its rule {i} ({} {} in {}) allows more than {} holds{}",
                p.user,
                rule.verbs.join(","),
                rule.resources.join(","),
                rule.api_groups
                    .iter()
                    .map(|g| if g.is_empty() { "core" } else { g.as_str() })
                    .collect::<Vec<_>>()
                    .join(","),
                p.user,
                project
                    .map(|ns| format!(" in project {ns:?}"))
                    .unwrap_or_default(),
            )));
        }
    }
    Ok(())
}

/// Refuses a new Role, ClusterRole or binding that would give more than its author holds.
pub async fn check_escalation(
    store: &Arc<dyn Store>,
    p: &Principal,
    object: &Value,
) -> Result<(), ApiError> {
    if p.is_admin() || !is_rbac_kind(object["kind"].as_str()) {
        return Ok(());
    }
    let project = object["metadata"]["namespace"].as_str();
    let (rules, what) = match binding_parts(object) {
        Some((_, role_ref))
            if object["kind"]
                .as_str()
                .is_some_and(|k| k.ends_with("Binding")) =>
        {
            (
                role_rules(store.as_ref(), &role_ref, project).await?,
                format!("{} {:?}", role_ref.kind, role_ref.name),
            )
        }
        _ => (
            serde_json::from_value(object["rules"].clone()).unwrap_or_default(),
            "this role".to_string(),
        ),
    };
    let held = grants(store.as_ref(), p, project).await?;
    refuse_beyond(p, &held, &rules, &what, project)
}

/// The checks on an update of a role or binding, gathered before the update (whose result is
/// known only inside the store's compare-and-swap loop): a binding's `roleRef` never changes
/// (as in Kubernetes), and nobody but an admin grants more than they hold.
pub struct UpdateCheck {
    principal: Principal,
    project: Option<String>,
    /// Absent for admins.
    held: Option<Grants>,
    /// The rules of the role the binding grants.
    bound: Vec<PolicyRule>,
}

impl UpdateCheck {
    /// None for kinds other than roles and bindings.
    pub async fn prepare(
        objects: &Objects,
        p: &Principal,
        kind: &'static KindInfo,
        project: Option<&str>,
        name: &str,
    ) -> Result<Option<UpdateCheck>, ApiError> {
        if !is_rbac_kind(Some(kind.kind)) {
            return Ok(None);
        }
        let held = match p.is_admin() {
            true => None,
            false => Some(grants(objects.store().as_ref(), p, project).await?),
        };
        let mut bound = Vec::new();
        if held.is_some() && kind.kind.ends_with("Binding") {
            if let Ok(current) = objects.get(kind, project, name).await {
                if let Some((_, role_ref)) = binding_parts(&current.to_value()) {
                    bound = role_rules(objects.store().as_ref(), &role_ref, project).await?;
                }
            }
        }
        Ok(Some(UpdateCheck {
            principal: p.clone(),
            project: project.map(str::to_string),
            held,
            bound,
        }))
    }

    pub fn check(&self, current: &Value, next: &Value) -> Result<(), ApiError> {
        let binding = current["kind"]
            .as_str()
            .is_some_and(|k| k.ends_with("Binding"));
        if binding && current["roleRef"] != next["roleRef"] {
            let mut errs = flotilla_types::validation::FieldErrors::default();
            errs.push(
                "roleRef",
                "cannot be changed; delete the binding and make a new one",
            );
            return Err(ApiError::invalid(
                current["kind"].as_str().unwrap_or_default(),
                current["metadata"]["name"].as_str().unwrap_or_default(),
                &errs,
            ));
        }
        let Some(held) = &self.held else {
            return Ok(());
        };
        let project = self.project.as_deref();
        if binding {
            if current["subjects"] == next["subjects"] {
                return Ok(());
            }
            let role = &next["roleRef"]["name"];
            let what = format!(
                "{} {role}",
                next["roleRef"]["kind"].as_str().unwrap_or_default()
            );
            return refuse_beyond(&self.principal, held, &self.bound, &what, project);
        }
        let rules: Vec<PolicyRule> =
            serde_json::from_value(next["rules"].clone()).unwrap_or_default();
        refuse_beyond(&self.principal, held, &rules, "this role", project)
    }
}
