//! The Flotilla node agent (the kubelet pattern): it joins the cluster, renews a heartbeat
//! lease, reports its Node's capacity, watches the VMs bound to its node, and makes libvirt match
//! them, one actor per VM. It talks only to the API, never to the store, and VMs keep running
//! when it or the server is down.

pub mod agent;
pub mod attach;
pub mod cloudinit;
pub mod consoles;
pub mod datadir;
pub mod dhcp;
pub mod disks;
pub mod domain;
pub mod error;
mod events;
pub mod export;
pub mod fence;
pub mod firewall;
mod follow;
pub mod identity;
pub mod iscsi_volumes;
pub mod iso9660;
pub mod libvirt;
pub mod logserver;
pub mod metadata;
pub mod migrate;
mod networks;
pub mod overlays;
pub mod pools;
pub mod recorder;
pub mod routers;
pub mod shared_volumes;
pub mod snapshots;
mod tools;
pub mod vm;
pub mod vmsnapshots;
pub mod volumes;
pub mod xml;

pub use agent::{run, run_with, AgentConfig};
pub use error::AgentError;
