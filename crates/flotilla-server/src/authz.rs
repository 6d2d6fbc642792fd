//! Authorization: who may do what. Admins (group `system:masters`) may do anything. A node agent
//! (user `system:node:<name>`, group `system:nodes`) may read and write its own Node and Lease,
//! read images, classes, networks, security groups, routers, floating IPs and storage pools
//! (and write its own entry of an image's or a pool's `status.nodes`), and see and update only
//! the VMs bound to it (`spec.nodeName`) and the volumes and snapshots on it (`status.node`): their status
//! and finalizers, never their spec; it may
//! record Events that name it as their reporting instance. Bootstrap tokens may only join.

use flotilla_types::registry::KindInfo;
use serde_json::Value;

use crate::auth::Principal;
use crate::error::ApiError;

pub const ADMINS: &str = "system:masters";
pub const NODES: &str = "system:nodes";
pub const BOOTSTRAPPERS: &str = "system:bootstrappers";
pub const NODE_USER_PREFIX: &str = "system:node:";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch,
    Delete,
    DeleteCollection,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.groups.iter().any(|g| g == ADMINS)
    }

    pub fn node_name(&self) -> Option<&str> {
        if self.groups.iter().any(|g| g == NODES) {
            self.user.strip_prefix(NODE_USER_PREFIX)
        } else {
            None
        }
    }

    pub fn is_bootstrapper(&self) -> bool {
        self.groups.iter().any(|g| g == BOOTSTRAPPERS)
    }
}

/// What a permitted request may touch, checked again on the object itself.
pub enum Scope {
    Unrestricted,
    /// Only these projects (listing projects as someone bound in a few of them).
    BoundProjects(Vec<String>),
    /// Only objects whose `spec.nodeName` (VMs) or `status.node` (volumes) is this node, and
    /// only their status and finalizers.
    BoundTo(String),
    /// Only the named object, and not its `spec` (a node's own Node or Lease).
    OwnObject,
    /// Only this node's entry in `status.nodes` (of an Image or a StoragePool).
    NodeEntry(String),
    /// Only Events whose `reportingInstance` is this node.
    ReportedBy(String),
}

/// What is asked of the API, as [`authorize`] decides on it.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    pub verb: Verb,
    pub kind: &'static KindInfo,
    /// `status`, `log`, `data`, `addresses`, `token`, `console`.
    pub sub: Option<&'a str>,
    pub project: Option<&'a str>,
    pub name: Option<&'a str>,
    pub field_selector: &'a str,
}

impl<'a> Request<'a> {
    pub fn new(
        verb: Verb,
        kind: &'static KindInfo,
        project: Option<&'a str>,
        name: Option<&'a str>,
    ) -> Self {
        Request {
            verb,
            kind,
            sub: None,
            project,
            name,
            field_selector: "",
        }
    }

    pub fn on(mut self, sub: &'a str) -> Self {
        self.sub = Some(sub);
        self
    }

    /// The resource as RBAC names it: `virtualmachines` or `virtualmachines/log`.
    pub fn resource(&self) -> String {
        match self.sub {
            Some(s) => format!("{}/{s}", self.kind.plural),
            None => self.kind.plural.to_string(),
        }
    }
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
            Verb::DeleteCollection => "deletecollection",
        }
    }
}

/// The refusal of `r`: the same words whether or not the object (or its project) exists, so
/// that a refusal tells nothing about another project.
pub fn forbidden(p: &Principal, r: &Request<'_>) -> ApiError {
    let name = r.name.map(|n| format!(" {n:?}")).unwrap_or_default();
    let place = match r.project {
        Some(ns) if r.kind.namespaced => format!(" in project {ns:?}"),
        None if r.kind.namespaced => " in every project".to_string(),
        _ => String::new(),
    };
    ApiError::forbidden(format!(
        "{} may not {} {}{name}{place}",
        p.user,
        r.verb.as_str(),
        r.resource()
    ))
}

/// Decides a request from its shape; object-level checks follow through [`guard`]. Admins may
/// do anything; node agents have their narrow rules; everyone else is asked of RBAC.
pub async fn authorize(
    objects: &crate::objects::Objects,
    p: &Principal,
    r: &Request<'_>,
) -> Result<Scope, ApiError> {
    if p.is_admin() {
        return Ok(Scope::Unrestricted);
    }
    if let Some(node) = p.node_name() {
        return node_scope(p, node, r);
    }
    if p.is_bootstrapper() {
        return Err(ApiError::forbidden(format!(
            "{} is a join token: it may only join a node",
            p.user
        )));
    }
    let attributes = crate::rbac::Attributes::of(r.verb.as_str(), r.kind, r.sub, r.project, r.name);
    let grants = crate::rbac::grants_cached(objects, p, attributes.project).await?;
    let store = objects.store().as_ref();
    if grants.allows(&attributes) {
        return Ok(Scope::Unrestricted);
    }
    // Anyone bound to a role in a project may read that project itself.
    if r.kind.kind == "Project" && r.sub.is_none() && r.verb == Verb::Get {
        if let Some(name) = r.name {
            if crate::rbac::bound_projects(store, p)
                .await?
                .iter()
                .any(|ns| ns == name)
            {
                return Ok(Scope::Unrestricted);
            }
        }
    }
    if r.kind.kind == "Project" && r.sub.is_none() && r.verb == Verb::List {
        return Ok(Scope::BoundProjects(
            crate::rbac::bound_projects(store, p).await?,
        ));
    }
    Err(forbidden(p, r))
}

/// A node agent's narrow rights.
fn node_scope(p: &Principal, node: &str, r: &Request<'_>) -> Result<Scope, ApiError> {
    let (verb, kind, name) = (r.verb, r.kind, r.name);
    // What a VM's owner reads through the server (logs, consoles, volume content, tokens) is
    // not for nodes; an uploaded image's file is (the node caches it), and so are a network's
    // addresses (the node builds DHCP and routes from them).
    match (r.sub, kind.kind, verb) {
        (Some("data"), "Image", Verb::Get) | (Some("addresses"), "Network", Verb::Get) => {
            return Ok(Scope::Unrestricted)
        }
        _ => {}
    }
    if r.sub.is_some_and(|s| s != "status") {
        return Err(forbidden(p, r));
    }
    let selects = |field: &str| {
        r.field_selector
            .split(',')
            .any(|s| s.trim() == format!("{field}={node}"))
    };
    match (kind.kind, verb) {
        (
            "Image" | "VMClass" | "Network" | "SecurityGroup" | "Router" | "FloatingIP"
            | "StoragePool",
            Verb::Get | Verb::List | Verb::Watch,
        ) => Ok(Scope::Unrestricted),
        ("Image" | "StoragePool", Verb::Patch | Verb::Update) => {
            Ok(Scope::NodeEntry(node.to_string()))
        }
        ("Node" | "Lease", Verb::Get | Verb::Update | Verb::Patch | Verb::Create)
            if name == Some(node) =>
        {
            Ok(Scope::OwnObject)
        }
        ("Node" | "Lease", Verb::List | Verb::Watch) if selects("metadata.name") => {
            Ok(Scope::Unrestricted)
        }
        ("VirtualMachine", Verb::List | Verb::Watch) if selects("spec.nodeName") => {
            Ok(Scope::Unrestricted)
        }
        ("VirtualMachine", Verb::Get | Verb::Update | Verb::Patch) => {
            Ok(Scope::BoundTo(node.to_string()))
        }
        // The two ends of a migration follow it and report on it.
        ("Migration", Verb::List | Verb::Watch)
            if selects("status.sourceNode") || selects("status.targetNode") =>
        {
            Ok(Scope::Unrestricted)
        }
        ("Migration", Verb::Get | Verb::Update | Verb::Patch) => {
            Ok(Scope::BoundTo(node.to_string()))
        }
        ("Volume" | "VolumeSnapshot" | "VMSnapshot", Verb::List | Verb::Watch)
            if selects("status.node") =>
        {
            Ok(Scope::Unrestricted)
        }
        ("Volume" | "VolumeSnapshot" | "VMSnapshot", Verb::Get | Verb::Update | Verb::Patch) => {
            Ok(Scope::BoundTo(node.to_string()))
        }
        ("Event", Verb::Create | Verb::Get | Verb::Update | Verb::Patch) => {
            Ok(Scope::ReportedBy(node.to_string()))
        }
        _ => Err(match name {
            Some(_) => forbidden(p, r),
            None => ApiError::forbidden(format!(
                "{} may not {} {} (nodes list only what is theirs, with a fieldSelector naming the node)",
                p.user,
                verb.as_str(),
                kind.plural
            )),
        }),
    }
}

/// The object-level check for a create of `object` under `scope`.
pub fn guard_create(scope: &Scope, object: &Value) -> Result<(), ApiError> {
    match scope {
        Scope::Unrestricted | Scope::OwnObject => Ok(()),
        Scope::BoundProjects(_) => Err(ApiError::forbidden("listing projects allows no create")),
        Scope::ReportedBy(node) => reported_by(node, object),
        Scope::BoundTo(_) | Scope::NodeEntry(_) => {
            Err(ApiError::forbidden("a node may not create these objects"))
        }
    }
}

fn reported_by(node: &str, event: &Value) -> Result<(), ApiError> {
    let host = event["source"]["host"].as_str();
    if event["reportingInstance"].as_str() == Some(node) && host.is_none_or(|h| h == node) {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "node {node:?} may write only Events with reportingInstance (and source.host) {node:?}"
        )))
    }
}

/// The object-level check for a write (or, with `next = None`, a read) under `scope`.
pub fn guard(scope: &Scope, current: &Value, next: Option<&Value>) -> Result<(), ApiError> {
    match scope {
        Scope::Unrestricted => Ok(()),
        Scope::BoundProjects(names) => {
            let name = current["metadata"]["name"].as_str().unwrap_or_default();
            match next.is_none() && names.iter().any(|n| n == name) {
                true => Ok(()),
                false => Err(ApiError::forbidden(format!(
                    "project {name:?} is not yours to see"
                ))),
            }
        }
        Scope::ReportedBy(node) => {
            reported_by(node, current)?;
            next.map_or(Ok(()), |next| reported_by(node, next))
        }
        // A node renews its Lease through the spec, but cordoning its Node is an admin's call.
        Scope::OwnObject => match next {
            Some(next) if current["kind"] == "Node" && next.get("spec") != current.get("spec") => {
                Err(ApiError::forbidden(
                    "a node may not change its own Node's spec (cordoning is an admin's call)",
                ))
            }
            _ => Ok(()),
        },
        Scope::NodeEntry(node) => match next {
            None => Ok(()),
            Some(next) => {
                let mut a = current.clone();
                let mut b = next.clone();
                // `get_mut`, never indexing: `v["x"]` on a missing key would insert it.
                for v in [&mut a, &mut b] {
                    let Some(obj) = v.as_object_mut() else {
                        continue;
                    };
                    if let Some(status) = obj.get_mut("status").and_then(Value::as_object_mut) {
                        if let Some(nodes) = status.get_mut("nodes").and_then(Value::as_object_mut)
                        {
                            nodes.remove(node);
                            if nodes.is_empty() {
                                status.remove("nodes");
                            }
                        }
                        if status.is_empty() {
                            obj.remove("status");
                        }
                    }
                }
                if a != b {
                    return Err(ApiError::forbidden(format!(
                        "node {node:?} may change only its own entry in the {}'s status.nodes",
                        current["kind"].as_str().unwrap_or("object")
                    )));
                }
                Ok(())
            }
        },
        Scope::BoundTo(node) => {
            let is = |v: &Value| v.as_str() == Some(node.as_str());
            let bound = match current["kind"].as_str() {
                Some("Volume" | "VolumeSnapshot" | "VMSnapshot") => is(&current["status"]["node"]),
                Some("Migration") => {
                    is(&current["status"]["sourceNode"]) || is(&current["status"]["targetNode"])
                }
                // The target of a migration under way reads the VM to prepare it.
                _ => {
                    is(&current["spec"]["nodeName"])
                        || (next.is_none() && is(&current["status"]["migration"]["targetNode"]))
                }
            };
            if !bound {
                return Err(ApiError::forbidden(format!(
                    "{} is not bound to node {node:?}",
                    current["metadata"]["name"].as_str().unwrap_or_default()
                )));
            }
            if let Some(next) = next {
                let mut a = current.clone();
                let mut b = next.clone();
                let migration = current["kind"] == "Migration";
                for v in [&mut a, &mut b] {
                    v.as_object_mut().map(|o| o.remove("status"));
                    if !migration {
                        v["metadata"]
                            .as_object_mut()
                            .map(|m| m.remove("finalizers"));
                    }
                }
                if a != b {
                    return Err(ApiError::forbidden(
                        "a node may change only the status and finalizers of its VMs and volumes",
                    ));
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_types::registry::by_kind;

    /// Nodes read what they serve (image files, network addresses) and nothing their users own.
    #[tokio::test]
    async fn nodes_reach_only_the_subresources_they_serve() {
        let dir = tempfile::tempdir().unwrap();
        let store = flotilla_store::SqliteStore::open(dir.path().join("s.db"))
            .await
            .unwrap();
        let store = crate::objects::Objects::new(std::sync::Arc::new(store));
        let node = Principal {
            user: format!("{NODE_USER_PREFIX}n1"),
            groups: vec![NODES.to_string()],
        };
        let ask = |kind: &str, verb: Verb, sub: &'static str| {
            Request::new(verb, by_kind(kind).unwrap(), Some("p"), Some("x")).on(sub)
        };
        for allowed in [
            ask("Image", Verb::Get, "data"),
            ask("Network", Verb::Get, "addresses"),
        ] {
            assert!(
                authorize(&store, &node, &allowed).await.is_ok(),
                "{}",
                allowed.resource()
            );
        }
        for refused in [
            ask("Image", Verb::Update, "data"),
            ask("VirtualMachine", Verb::Get, "log"),
            ask("Volume", Verb::Get, "data"),
            ask("ServiceAccount", Verb::Create, "token"),
            ask("VirtualMachine", Verb::Get, "console"),
        ] {
            let e = authorize(&store, &node, &refused)
                .await
                .err()
                .expect("refused");
            assert_eq!(e.code(), 403, "{}", refused.resource());
        }
    }
}
