//! StoragePool: where volumes live. Cluster-scoped. A `dir` pool is a directory on each node its
//! `nodeSelector` picks (made there if missing); every node also serves the `default` pool, a
//! directory in its data directory. An `rbd` pool is a Ceph pool every selected node reaches.
//! Each node's agent reports its own entry of `status.nodes`: whether the pool is usable there
//! and its space.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::resource::Validate;
use crate::validation::{self, FieldErrors};

/// The pool every node serves from its data directory, made by the server at start.
pub const DEFAULT_POOL: &str = "default";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PoolType {
    /// A directory on each selected node.
    #[default]
    Dir,
    /// An LVM volume group on each selected node. Its nodes report the group's size and free
    /// space; making volumes in it is not done yet (the development machines have no
    /// device-mapper to test it on), so its volumes are refused with that reason.
    Lvm,
    /// A pool of a Ceph cluster (RBD images) that every selected node reaches: shared, so a
    /// volume in it is not tied to a node. QEMU opens the images itself (librbd); each node
    /// authenticates with its own keyring file, so the key never passes through the API.
    Rbd,
    /// The LUNs of an iSCSI target that every selected node reaches: shared. QEMU opens the
    /// LUNs itself (libiscsi); a volume in it is one LUN the administrator made on the target
    /// (`spec.lun`), sized there, zeroed when the volume is deleted.
    Iscsi,
    /// An NFS export that every selected node reaches: shared. QEMU opens the volume files
    /// itself (libnfs), no mount needed; the files belong to QEMU's user (`uid`, `gid`).
    Nfs,
}

/// An NFS export and the owner of the volume files on it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NfsPoolSpec {
    /// The server's host name or address.
    #[schemars(regex(pattern = r"^[A-Za-z0-9.:\[\]][A-Za-z0-9.:\[\]-]{0,252}$"))]
    pub server: String,
    /// The export's path (NFSv3; absolute, plain characters).
    #[schemars(regex(pattern = r"^/[A-Za-z0-9/._-]{0,1023}$"))]
    pub export: String,
    /// The user the volume files are made as and QEMU opens them as: QEMU's user on the nodes
    /// (default 64055, Debian's libvirt-qemu; the export must not squash it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// The group (default 64055).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
}

impl NfsPoolSpec {
    fn validate(&self, path: &str, errs: &mut FieldErrors) {
        let host_ok = !self.server.is_empty()
            && self.server.len() <= 253
            && !self.server.starts_with('-')
            && self
                .server
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
        if !host_ok {
            errs.push(
                format!("{path}.server"),
                format!("{:?} is not a host name or address", self.server),
            );
        }
        let export_ok = self.export.starts_with('/')
            && self.export.len() <= 1024
            && !self.export.split('/').any(|p| p == "..")
            && self
                .export
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b));
        if !export_ok {
            errs.push(
                format!("{path}.export"),
                format!(
                    "{:?} is not an absolute export path of letters, digits and / . _ -",
                    self.export
                ),
            );
        }
    }
}

/// An iSCSI target and the initiator name the nodes use with it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IscsiPoolSpec {
    /// The target's portal, `host` or `host:port` (default port 3260).
    #[schemars(regex(pattern = r"^[A-Za-z0-9.:\[\]][A-Za-z0-9.:\[\]-]{0,254}$"))]
    pub portal: String,
    /// The target's name (`iqn.YYYY-MM.reversed.domain[:name]`).
    #[schemars(regex = "IQN_PATTERN")]
    pub target: String,
    /// The initiator name every node (and its QEMU) logs in as, for the target's ACL; absent:
    /// the tools' own defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "IQN_PATTERN")]
    pub initiator: Option<String>,
}

/// An iSCSI qualified name as Flotilla takes it (RFC 3720's `iqn.` form, plain characters).
pub const IQN_PATTERN: &str =
    r"^iqn\.[0-9]{4}-[0-9]{2}\.[a-z0-9][a-z0-9.-]{0,200}(:[A-Za-z0-9.:_-]{1,200})?$";

impl IscsiPoolSpec {
    fn validate(&self, path: &str, errs: &mut FieldErrors) {
        let portal_ok = !self.portal.is_empty()
            && self.portal.len() <= 255
            && !self.portal.starts_with('-')
            && self
                .portal
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
        if !portal_ok {
            errs.push(
                format!("{path}.portal"),
                format!("{:?} is not a portal (host or host:port)", self.portal),
            );
        }
        let iqn = regex_lite_iqn;
        if !iqn(&self.target) {
            errs.push(
                format!("{path}.target"),
                format!(
                    "{:?} is not an iSCSI name (iqn.YYYY-MM.domain[:name])",
                    self.target
                ),
            );
        }
        if let Some(initiator) = self.initiator.as_deref().filter(|i| !iqn(i)) {
            errs.push(
                format!("{path}.initiator"),
                format!("{initiator:?} is not an iSCSI name (iqn.YYYY-MM.domain[:name])"),
            );
        }
    }
}

/// Whether `s` matches [`IQN_PATTERN`] (checked by hand: the pattern is for the schema).
fn regex_lite_iqn(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("iqn.") else {
        return false;
    };
    let b = rest.as_bytes();
    if b.len() < 8 || !b[..4].iter().all(u8::is_ascii_digit) || b[4] != b'-' {
        return false;
    }
    if !b[5..7].iter().all(u8::is_ascii_digit) || b[7] != b'.' {
        return false;
    }
    let (domain, name) = match rest[8..].split_once(':') {
        Some((d, n)) => (d, Some(n)),
        None => (&rest[8..], None),
    };
    let domain_ok = (1..=201).contains(&domain.len())
        && domain.as_bytes()[0].is_ascii_alphanumeric()
        && domain
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-');
    let name_ok = name.is_none_or(|n| {
        (1..=200).contains(&n.len())
            && n.bytes()
                .all(|c| c.is_ascii_alphanumeric() || b".:_-".contains(&c))
    });
    domain_ok && name_ok
}

/// Where a Ceph pool is and who the nodes are to it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RbdPoolSpec {
    /// The cluster's monitors, `host` or `host:port` (`[v6]:port`).
    #[schemars(
        length(min = 1, max = 16),
        inner(regex(pattern = r"^[A-Za-z0-9.:\[\]][A-Za-z0-9.:\[\]-]{0,254}$"))
    )]
    pub monitors: Vec<String>,
    /// The Ceph pool holding the images.
    #[schemars(regex(pattern = r"^[A-Za-z0-9_.][A-Za-z0-9_.-]{0,127}$"))]
    pub pool: String,
    /// The cephx user the nodes act as, without `client.` (default `admin`, as Ceph's tools);
    /// give it `profile rbd` on the pool only.
    #[serde(default = "default_ceph_user")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9_.][A-Za-z0-9_.-]{0,127}$"))]
    pub user: String,
    /// The keyring file holding the user's key on each node (default
    /// `/etc/ceph/ceph.client.<user>.keyring`; no `:`, `\`, `@`, `,` or `=` in it). Each node
    /// reads it and gives the key to its libvirtd as a private secret; it is never sent to the
    /// API or logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "crate::validation::HOST_PATH_PATTERN", length(max = 4096))]
    pub keyring: Option<String>,
}

fn default_ceph_user() -> String {
    "admin".into()
}

impl RbdPoolSpec {
    /// [`Self::keyring`] or its default.
    pub fn keyring_path(&self) -> String {
        self.keyring
            .clone()
            .unwrap_or_else(|| format!("/etc/ceph/ceph.client.{}.keyring", self.user))
    }

    fn validate(&self, path: &str, errs: &mut FieldErrors) {
        let plain = |s: &str| {
            !s.is_empty()
                && s.len() <= 128
                && !s.starts_with('-')
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        };
        if self.monitors.is_empty() || self.monitors.len() > 16 {
            errs.push(
                format!("{path}.monitors"),
                "name 1 to 16 monitors (host or host:port)",
            );
        }
        for (i, m) in self.monitors.iter().enumerate() {
            let ok = !m.is_empty()
                && m.len() <= 255
                && !m.starts_with('-')
                && m.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
            if !ok {
                errs.push(
                    format!("{path}.monitors[{i}]"),
                    format!("{m:?} is not a monitor address (host or host:port)"),
                );
            }
        }
        if !plain(&self.pool) {
            errs.push(
                format!("{path}.pool"),
                format!(
                    "{:?} is not a Ceph pool name (letters, digits, _ . -)",
                    self.pool
                ),
            );
        }
        if !plain(&self.user) {
            errs.push(
                format!("{path}.user"),
                format!(
                    "{:?} is not a cephx user name (letters, digits, _ . -)",
                    self.user
                ),
            );
        }
        if let Some(keyring) = &self.keyring {
            validation::host_path(errs, &format!("{path}.keyring"), keyring);
            if keyring.contains([':', '\\', '@', ',', '=']) {
                errs.push(
                    format!("{path}.keyring"),
                    "must not contain : \\ @ , or = (QEMU's option syntax)",
                );
            }
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StoragePoolSpec {
    /// The backend: `dir`, `lvm`, `nfs`, `rbd` or `iscsi`.
    #[serde(rename = "type", default)]
    pub pool_type: PoolType,
    /// For `dir`: an absolute directory on each node (made if missing; every directory above it
    /// must let QEMU through). Absent: `pools/<name>` in each node's data directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "crate::validation::HOST_PATH_PATTERN", length(max = 4096))]
    pub path: Option<String>,
    /// For `lvm`: the volume group on each node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}$"))]
    pub volume_group: Option<String>,
    /// For `rbd`: the Ceph cluster and pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbd: Option<RbdPoolSpec>,
    /// For `iscsi`: the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iscsi: Option<IscsiPoolSpec>,
    /// For `nfs`: the export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nfs: Option<NfsPoolSpec>,
    /// Labels a node must have to serve the pool; empty: every node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "crate::validation::labels_schema")]
    pub node_selector: BTreeMap<String, String>,
    /// How far the sizes of the volumes on a node may add up, in percent of the pool's capacity
    /// there (and a new volume's size of its free space). 100 (the default): never more than
    /// the disk holds; more over-commits thin volumes, as Cinder's
    /// `max_over_subscription_ratio` does (2000 is its 20.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub allocation_limit_percent: Option<u32>,
}

impl StoragePoolSpec {
    /// Whether every node it selects reaches the same volumes (no volume is tied to a node).
    pub fn shared(&self) -> bool {
        matches!(
            self.pool_type,
            PoolType::Rbd | PoolType::Iscsi | PoolType::Nfs
        )
    }

    /// [`Self::allocation_limit_percent`] or its default.
    pub fn allocation_limit(&self) -> u32 {
        self.allocation_limit_percent.unwrap_or(100)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StoragePoolStatus {
    /// Per node (by name), as its agent last saw the pool; a map, so that each agent writes
    /// only its own entry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub nodes: BTreeMap<String, PoolNodeStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolNodeStatus {
    /// `Ready` (usable) or `Failed` (see `message`).
    pub phase: String,
    /// The directory on this node.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    /// Bytes of the filesystem holding it.
    #[serde(default)]
    pub capacity: u64,
    /// Bytes its volumes take.
    #[serde(default)]
    pub allocation: u64,
    /// Bytes free for new data.
    #[serde(default)]
    pub available: u64,
    /// How many volumes it holds.
    #[serde(default)]
    pub volumes: u32,
    /// Why it is not usable, and what to do.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

impl Validate for StoragePoolSpec {
    fn validate(&self, path: &str, errs: &mut FieldErrors) {
        if let Some(dir) = &self.path {
            validation::host_path(errs, &format!("{path}.path"), dir);
        }
        match (self.pool_type, &self.volume_group) {
            (PoolType::Lvm, None) => errs.push(
                format!("{path}.volumeGroup"),
                "is required for an lvm pool: the volume group on each node",
            ),
            (PoolType::Lvm, Some(vg)) => {
                let ok = vg.len() <= 127
                    && !vg.starts_with('-')
                    && vg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"+_.-".contains(&b));
                if !ok {
                    errs.push(
                        format!("{path}.volumeGroup"),
                        format!("{vg:?} is not a volume group name (letters, digits, + _ . -)"),
                    );
                }
                if self.path.is_some() {
                    errs.push(format!("{path}.path"), "is for dir pools, not lvm ones");
                }
            }
            (_, Some(_)) => errs.push(format!("{path}.volumeGroup"), "is for lvm pools only"),
            (_, None) => {}
        }
        match (self.pool_type, &self.rbd) {
            (PoolType::Rbd, None) => errs.push(
                format!("{path}.rbd"),
                "is required for an rbd pool: its monitors and Ceph pool",
            ),
            (PoolType::Rbd, Some(rbd)) => {
                rbd.validate(&format!("{path}.rbd"), errs);
                if self.path.is_some() {
                    errs.push(format!("{path}.path"), "is for dir pools, not rbd ones");
                }
            }
            (_, Some(_)) => errs.push(format!("{path}.rbd"), "is for rbd pools only"),
            (_, None) => {}
        }
        match (self.pool_type, &self.iscsi) {
            (PoolType::Iscsi, None) => errs.push(
                format!("{path}.iscsi"),
                "is required for an iscsi pool: its target's portal and name",
            ),
            (PoolType::Iscsi, Some(iscsi)) => {
                iscsi.validate(&format!("{path}.iscsi"), errs);
                if self.path.is_some() {
                    errs.push(format!("{path}.path"), "is for dir pools, not iscsi ones");
                }
            }
            (_, Some(_)) => errs.push(format!("{path}.iscsi"), "is for iscsi pools only"),
            (_, None) => {}
        }
        match (self.pool_type, &self.nfs) {
            (PoolType::Nfs, None) => errs.push(
                format!("{path}.nfs"),
                "is required for an nfs pool: its server and export",
            ),
            (PoolType::Nfs, Some(nfs)) => {
                nfs.validate(&format!("{path}.nfs"), errs);
                if self.path.is_some() {
                    errs.push(format!("{path}.path"), "is for dir pools, not nfs ones");
                }
            }
            (_, Some(_)) => errs.push(format!("{path}.nfs"), "is for nfs pools only"),
            (_, None) => {}
        }
        validation::labels(errs, &format!("{path}.nodeSelector"), &self.node_selector);
        if let Some(pct) = self.allocation_limit_percent {
            if !(1..=100_000).contains(&pct) {
                errs.push(
                    format!("{path}.allocationLimitPercent"),
                    format!("{pct} is not between 1 and 100000"),
                );
            }
        }
    }
}

impl Validate for StoragePoolStatus {
    fn validate(&self, _: &str, _: &mut FieldErrors) {}
}

crate::define_kind! {
    /// Where volumes live: a directory on each selected node, or a Ceph pool they all reach.
    StoragePool {
        spec: StoragePoolSpec, spec_default: true,
        status: StoragePoolStatus,
        plural: "storagepools",
        singular: "storagepool",
        short_names: ["pool", "pools", "sp"],
        namespaced: false,
        field_selectors: [],
        columns: ["TYPE" => "spec.type", "PATH" => "spec.path", "VG" => "spec.volumeGroup"],
        set_once: ["spec.type", "spec.path", "spec.volumeGroup", "spec.rbd.pool", "spec.iscsi.target", "spec.nfs.export", "spec.nfs.server"],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The check by hand and the schema's pattern agree: what the pattern draws passes,
        /// and near misses are judged alike.
        #[test]
        fn iqn_check_and_pattern_agree(
            drawn in IQN_PATTERN.trim_matches(['^', '$']),
            near in "(iqn\\.)?[0-9]{0,5}-?[0-9]{0,3}\\.?[a-zA-Z0-9.:_ ,=-]{0,20}",
        ) {
            let pattern = regex::Regex::new(IQN_PATTERN).unwrap();
            prop_assert!(regex_lite_iqn(&drawn), "{drawn:?}");
            prop_assert_eq!(regex_lite_iqn(&near), pattern.is_match(&near), "{:?}", near);
        }
    }

    #[test]
    fn iqns() {
        assert!(regex_lite_iqn("iqn.2026-12.dev.flotilla:array-1"));
        assert!(regex_lite_iqn("iqn.2008-11.org.linux-kvm"));
        for bad in [
            "iqn.26-12.dev:x",
            "eui.02004567A425678D",
            "iqn.2026-12.Dev:x",
            "iqn.2026-12.dev:",
            "iqn.2026-12.dev:a,b",
        ] {
            assert!(!regex_lite_iqn(bad), "{bad}");
        }
    }
}
