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

fn forbidden(p: &Principal, verb: Verb, kind: &KindInfo, what: &str) -> ApiError {
    let verb = format!("{verb:?}").to_lowercase();
    ApiError::forbidden(format!("{} may not {verb} {}{what}", p.user, kind.plural))
}

/// Decides a request from its shape; object-level checks follow through [`guard`].
pub fn authorize(
    p: &Principal,
    verb: Verb,
    kind: &KindInfo,
    name: Option<&str>,
    field_selector: &str,
) -> Result<Scope, ApiError> {
    if p.is_admin() {
        return Ok(Scope::Unrestricted);
    }
    let Some(node) = p.node_name() else {
        return Err(ApiError::forbidden(format!(
            "{} may not use the resource API",
            p.user
        )));
    };
    let selects = |field: &str| {
        field_selector
            .split(',')
            .any(|r| r.trim() == format!("{field}={node}"))
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
        _ => Err(forbidden(
            p,
            verb,
            kind,
            match name {
                Some(n) => format!(" {n:?}"),
                None => " (nodes list only with fieldSelector=spec.nodeName=<node>)".into(),
            }
            .as_str(),
        )),
    }
}

/// The object-level check for a create of `object` under `scope`.
pub fn guard_create(scope: &Scope, object: &Value) -> Result<(), ApiError> {
    match scope {
        Scope::Unrestricted | Scope::OwnObject => Ok(()),
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
            let bound = match current["kind"].as_str() {
                Some("Volume" | "VolumeSnapshot" | "VMSnapshot") => &current["status"]["node"],
                _ => &current["spec"]["nodeName"],
            };
            if bound.as_str() != Some(node.as_str()) {
                return Err(ApiError::forbidden(format!(
                    "{} is not bound to node {node:?}",
                    current["metadata"]["name"].as_str().unwrap_or_default()
                )));
            }
            if let Some(next) = next {
                let mut a = current.clone();
                let mut b = next.clone();
                for v in [&mut a, &mut b] {
                    v.as_object_mut().map(|o| o.remove("status"));
                    v["metadata"]
                        .as_object_mut()
                        .map(|m| m.remove("finalizers"));
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
