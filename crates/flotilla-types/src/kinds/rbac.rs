//! Role-based access control as Kubernetes writes it (`rbac.authorization.k8s.io/v1`): Roles
//! (in a project) and ClusterRoles hold rules; RoleBindings and ClusterRoleBindings grant a role
//! to users, groups and service accounts. Served in Kubernetes' group, so `kubectl create
//! rolebinding` and `kubectl auth can-i` work unchanged. ServiceAccount (core `v1`) is the
//! identity automation uses; its tokens are made through `serviceaccounts/NAME/token`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::meta::{ObjectMeta, Time};
use crate::resource::{Column, Resource};
use crate::validation::{self, FieldErrors};

pub const RBAC_GROUP: &str = "rbac.authorization.k8s.io";
pub const RBAC_API_VERSION: &str = "rbac.authorization.k8s.io/v1";

/// The verbs a rule may name (`*` is every one of them).
pub const VERBS: &[&str] = &[
    "get",
    "list",
    "watch",
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
];

/// One permission: these verbs on these resources of these API groups (and, when given, only
/// the objects of these names).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyRule {
    /// API groups: `flotilla.dev`, `""` (core: events, serviceaccounts),
    /// `rbac.authorization.k8s.io`, or `*`.
    #[serde(default)]
    pub api_groups: Vec<String>,
    /// Plural resource names, with `/subresource` for a subresource (`virtualmachines/console`),
    /// or `*`.
    #[serde(default)]
    pub resources: Vec<String>,
    /// get, list, watch, create, update, patch, delete, deletecollection, or `*`.
    pub verbs: Vec<String>,
    /// When not empty, only objects of these names (never list, watch or create).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resource_names: Vec<String>,
}

impl PolicyRule {
    fn validate(&self, path: &str, errs: &mut FieldErrors) {
        if self.verbs.is_empty() {
            errs.push(format!("{path}.verbs"), "must name at least one verb");
        }
        for (i, v) in self.verbs.iter().enumerate() {
            if v != "*" && !VERBS.contains(&v.as_str()) {
                errs.push(
                    format!("{path}.verbs[{i}]"),
                    format!("{v:?} is not a verb; use one of {} or *", VERBS.join(", ")),
                );
            }
        }
        if self.resources.is_empty() {
            errs.push(
                format!("{path}.resources"),
                "must name at least one resource",
            );
        }
        if self.api_groups.is_empty() {
            errs.push(
                format!("{path}.apiGroups"),
                "must name at least one API group (\"\" is the core group)",
            );
        }
        for (i, r) in self.resources.iter().enumerate() {
            let ok = r == "*"
                || r.split('/').count() <= 2
                    && r.split('/').all(|p| {
                        p == "*" || (!p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
                    });
            if !ok {
                errs.push(
                    format!("{path}.resources[{i}]"),
                    "must be a plural resource name in lowercase, optionally with /subresource, or *",
                );
            }
        }
        for (i, n) in self.resource_names.iter().enumerate() {
            if !validation::is_dns_subdomain(n) {
                errs.push(
                    format!("{path}.resourceNames[{i}]"),
                    "must be an object name",
                );
            }
        }
    }
}

/// Who a binding grants its role to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subject {
    /// `User`, `Group` or `ServiceAccount`.
    pub kind: String,
    /// The user's name (the OIDC username claim), the group's name, or the service account's.
    pub name: String,
    /// A service account's project (default: the binding's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// `rbac.authorization.k8s.io` for users and groups, empty for service accounts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_group: Option<String>,
}

/// The role a binding grants.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoleRef {
    /// `rbac.authorization.k8s.io`.
    #[serde(default)]
    pub api_group: String,
    /// `Role` (of the binding's project) or `ClusterRole`.
    pub kind: String,
    /// The role's name.
    pub name: String,
}

fn validate_rules(rules: &[PolicyRule], errs: &mut FieldErrors) {
    for (i, r) in rules.iter().enumerate() {
        r.validate(&format!("rules[{i}]"), errs);
    }
}

fn validate_binding(
    subjects: &[Subject],
    role_ref: &RoleRef,
    cluster: bool,
    errs: &mut FieldErrors,
) {
    for (i, s) in subjects.iter().enumerate() {
        let path = format!("subjects[{i}]");
        match s.kind.as_str() {
            "User" | "Group" => {
                if s.name.is_empty() || s.name.len() > 256 || s.name.chars().any(char::is_control) {
                    errs.push(
                        format!("{path}.name"),
                        "must be 1 to 256 printable characters",
                    );
                }
                if s.namespace.is_some() {
                    errs.push(
                        format!("{path}.namespace"),
                        "only a ServiceAccount subject has a namespace",
                    );
                }
            }
            "ServiceAccount" => {
                validation::dns_label(errs, &format!("{path}.name"), &s.name);
                match &s.namespace {
                    Some(ns) => validation::dns_label(errs, &format!("{path}.namespace"), ns),
                    None if cluster => errs.push(
                        format!("{path}.namespace"),
                        "is required for a ServiceAccount in a ClusterRoleBinding",
                    ),
                    None => {}
                }
            }
            other => errs.push(
                format!("{path}.kind"),
                format!("{other:?} is not one of User, Group, ServiceAccount"),
            ),
        }
    }
    if !role_ref.api_group.is_empty() && role_ref.api_group != RBAC_GROUP {
        errs.push("roleRef.apiGroup", format!("must be {RBAC_GROUP}"));
    }
    match role_ref.kind.as_str() {
        "ClusterRole" => {}
        "Role" if !cluster => {}
        "Role" => errs.push(
            "roleRef.kind",
            "a ClusterRoleBinding can only grant a ClusterRole",
        ),
        other => errs.push(
            "roleRef.kind",
            format!("{other:?} is not one of Role, ClusterRole"),
        ),
    }
    validation::dns_label(errs, "roleRef.name", &role_ref.name);
}

macro_rules! flat_kind {
    (
        $(#[$doc:meta])* $kind:ident ($api:expr, $plural:literal, $singular:literal, [$($short:literal),*], namespaced: $ns:literal, status: $hs:literal)
        { $($(#[$fdoc:meta])* $field:ident : $ty:ty),* $(,)? }
        columns: [$($col:literal => $path:literal),*],
        validate($this:ident, $errs:ident) $body:block
    ) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        pub struct $kind {
            /// The kind's group and version.
            #[serde(default)]
            pub api_version: String,
            /// The object's kind.
            #[serde(default)]
            pub kind: String,
            /// Name, project, labels and what the server keeps about the object.
            pub metadata: ObjectMeta,
            $($(#[$fdoc])* pub $field: $ty,)*
        }

        impl Resource for $kind {
            const KIND: &'static str = stringify!($kind);
            const PLURAL: &'static str = $plural;
            const SINGULAR: &'static str = $singular;
            const SHORT_NAMES: &'static [&'static str] = &[$($short),*];
            const NAMESPACED: bool = $ns;
            const API_VERSION: &'static str = $api;
            const HAS_STATUS: bool = $hs;
            const FIELD_SELECTORS: &'static [&'static str] = &[];
            const COLUMNS: &'static [Column] = &[$(Column { name: $col, path: $path, wide: false, age: false }),*];

            fn metadata(&self) -> &ObjectMeta {
                &self.metadata
            }

            fn metadata_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }

            fn validate(&self, errs: &mut FieldErrors) {
                let ($this, $errs) = (self, errs);
                $body
            }
        }
    };
}

flat_kind! {
    /// Permissions inside one project.
    Role(RBAC_API_VERSION, "roles", "role", [], namespaced: true, status: false) {
        /// What the role allows.
        #[serde(default)]
        rules: Vec<PolicyRule>,
    }
    columns: [],
    validate(this, errs) { validate_rules(&this.rules, errs) }
}

flat_kind! {
    /// Permissions usable in every project (through a RoleBinding) or cluster-wide (through a
    /// ClusterRoleBinding). `cluster-admin`, `admin`, `member` and `viewer` are built in.
    ClusterRole(RBAC_API_VERSION, "clusterroles", "clusterrole", [], namespaced: false, status: false) {
        /// What the role allows.
        #[serde(default)]
        rules: Vec<PolicyRule>,
    }
    columns: [],
    validate(this, errs) { validate_rules(&this.rules, errs) }
}

flat_kind! {
    /// Grants a Role of its project, or a ClusterRole within its project, to subjects.
    RoleBinding(RBAC_API_VERSION, "rolebindings", "rolebinding", [], namespaced: true, status: false) {
        /// Users, groups and service accounts given the role.
        #[serde(default)]
        subjects: Vec<Subject>,
        /// The role granted.
        role_ref: RoleRef,
    }
    columns: ["ROLE" => "roleRef.name"],
    validate(this, errs) { validate_binding(&this.subjects, &this.role_ref, false, errs) }
}

flat_kind! {
    /// Grants a ClusterRole in every project and on cluster-scoped objects.
    ClusterRoleBinding(RBAC_API_VERSION, "clusterrolebindings", "clusterrolebinding", [], namespaced: false, status: false) {
        /// Users, groups and service accounts given the role.
        #[serde(default)]
        subjects: Vec<Subject>,
        /// The role granted (a ClusterRole).
        role_ref: RoleRef,
    }
    columns: ["ROLE" => "roleRef.name"],
    validate(this, errs) { validate_binding(&this.subjects, &this.role_ref, true, errs) }
}

/// A token of a service account, as its ServiceAccount lists it (never the secret).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IssuedToken {
    /// The token's id: the part of `flt.<id>.<secret>` that names it, for revocation.
    pub id: String,
    /// When it was made.
    pub creation_timestamp: Time,
    /// When it stops working.
    pub expiration_timestamp: Time,
}

/// What the server keeps about a service account.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceAccountStatus {
    /// The tokens issued and not yet revoked (their ids and lifetimes, never their secrets).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<IssuedToken>,
}

flat_kind! {
    /// An identity for automation (CI, the BOSH CPI) in one project, bound to roles like a user.
    /// Its bearer tokens are made with `POST .../serviceaccounts/NAME/token` (shown once, stored
    /// hashed, expiring) and revoked one by one or all together by deleting the account.
    ServiceAccount("v1", "serviceaccounts", "serviceaccount", ["sa"], namespaced: true, status: true) {
        /// The tokens issued and not yet revoked (kept by the server).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status: Option<ServiceAccountStatus>,
    }
    columns: [],
    validate(_this, _errs) {}
}

/// The body of `POST .../serviceaccounts/NAME/token` (Kubernetes' TokenRequest).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenRequestSpec {
    /// How long the token works (default 30 days, at most a year, at least 10 minutes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiration_seconds: Option<i64>,
    /// Accepted for kubectl's sake; Flotilla tokens have one audience, this API.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
}

/// Default and bounds of a service-account token's life.
pub const TOKEN_TTL_DEFAULT_SECONDS: i64 = 30 * 24 * 3600;
pub const TOKEN_TTL_MIN_SECONDS: i64 = 600;
pub const TOKEN_TTL_MAX_SECONDS: i64 = 366 * 24 * 3600;

/// `serviceaccounts/NAME/token` answers with the token in `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenRequestStatus {
    /// The bearer token; it is shown only this once.
    pub token: String,
    pub expiration_timestamp: Time,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::decode;
    use serde_json::json;

    #[test]
    fn rules_name_their_mistakes() {
        let role = json!({"metadata": {"name": "r", "namespace": "a"}, "rules": [
            {"apiGroups": ["flotilla.dev"], "resources": ["VirtualMachines"], "verbs": ["get", "frobnicate"]},
            {"resources": ["volumes"], "verbs": []}
        ]});
        let err = decode::<Role>(&role).unwrap_err().to_string();
        for path in [
            "rules[0].resources[0]",
            "rules[0].verbs[1]",
            "rules[1].verbs",
            "rules[1].apiGroups",
        ] {
            assert!(err.contains(path), "{path} in {err}");
        }
    }

    #[test]
    fn a_cluster_binding_grants_only_cluster_roles() {
        let b = json!({"metadata": {"name": "b"}, "roleRef": {"apiGroup": RBAC_GROUP, "kind": "Role", "name": "x"},
                       "subjects": [{"kind": "ServiceAccount", "name": "ci"}, {"kind": "Robot", "name": "r"}]});
        let err = decode::<ClusterRoleBinding>(&b).unwrap_err().to_string();
        for path in ["roleRef.kind", "subjects[0].namespace", "subjects[1].kind"] {
            assert!(err.contains(path), "{path} in {err}");
        }
        let ok = json!({"metadata": {"name": "b", "namespace": "a"}, "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": "member"},
                        "subjects": [{"kind": "Group", "name": "dev@example.com", "apiGroup": RBAC_GROUP}, {"kind": "ServiceAccount", "name": "ci"}]});
        decode::<RoleBinding>(&ok).unwrap();
    }
}
