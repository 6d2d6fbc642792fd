//! The kinds. To add one: a file here with its spec, status and `define_kind!`, then one line in
//! [`crate::registry::KINDS`].

pub mod event;
pub mod floating_ip;
pub mod image;
pub mod lease;
pub mod migration;
pub mod network;
pub mod node;
pub mod placement;
pub mod project;
pub mod rbac;
pub mod router;
pub mod security_group;
pub mod storage_pool;
pub mod vm;
pub mod vm_snapshot;
pub mod vmclass;
pub mod volume;
pub mod volume_snapshot;

pub use event::{Event, EventSource, EventType, ObjectReference};
pub use floating_ip::{FloatingIP, FloatingIPSpec, FloatingIPStatus};
pub use image::{
    Image, ImageFormat, ImageNodeStatus, ImageSource, ImageSpec, ImageStatus, ImageUpload,
    UploadStatus,
};
pub use lease::{Lease, LeaseSpec, LeaseStatus};
pub use migration::{
    Migration, MigrationMode, MigrationProgress, MigrationSpec, MigrationStatus,
    MIGRATION_FINALIZER,
};
pub use network::{
    Network, NetworkAddress, NetworkAddressList, NetworkDns, NetworkSpec, NetworkStatus,
    NetworkType,
};
pub use node::{Node, NodeInfo, NodeResources, NodeSpec, NodeStatus};
pub use placement::{
    Affinity, AffinityRules, AffinityTerm, PlacementPolicy, PlacementPolicySpec,
    WeightedAffinityTerm,
};
pub use project::{Project, ProjectQuota, ProjectSpec, ProjectStatus};
pub use rbac::{
    ClusterRole, ClusterRoleBinding, IssuedToken, PolicyRule, Role, RoleBinding, RoleRef,
    ServiceAccount, ServiceAccountStatus, Subject,
};
pub use router::{FloatingMapping, Router, RouterExternal, RouterSpec, RouterStatus, StaticRoute};
pub use security_group::{
    Direction, RuleProtocol, RuleRemote, SecurityGroup, SecurityGroupMember, SecurityGroupRule,
    SecurityGroupSpec, SecurityGroupStatus,
};
pub use storage_pool::{
    IscsiPoolSpec, NfsPoolSpec, PoolNodeStatus, PoolType, RbdPoolSpec, StoragePool,
    StoragePoolSpec, StoragePoolStatus,
};
pub use vm::{
    disk_serial, CloudInit, DiskAttachment, DiskBus, DiskStatus, Evacuation, InterfaceStatus,
    KernelBoot, NetworkAttachment, Phase, PowerState, Resources, RootDisk, RootDiskSource,
    VirtualMachine, VirtualMachineSpec, VirtualMachineStatus, VmMigration,
};
pub use vm_snapshot::{VMSnapshot, VMSnapshotDisk, VMSnapshotSpec, VMSnapshotStatus};
pub use vmclass::{VMClass, VMClassSpec, VMClassStatus};
pub use volume::{Attachment, CloneMode, Volume, VolumeSource, VolumeSpec, VolumeStatus};
pub use volume_snapshot::{VolumeSnapshot, VolumeSnapshotSpec, VolumeSnapshotStatus};
