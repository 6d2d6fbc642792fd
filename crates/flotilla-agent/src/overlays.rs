//! The overlay networks on this node: each made (bridge and VXLAN device, through
//! [`flotilla_dataplane`]) before a VM that needs it is defined, flooding to where the network's
//! tunnels end on its other nodes (`status.endpoints`, kept by the controllers), and removed once
//! no domain on this host uses its bridge. Every VM reconcile ensures its networks again, so a
//! device someone deleted comes back and new nodes of a network are reached within a resync.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use flotilla_dataplane::{bridge_name, Netlink, Overlay};
use flotilla_types::Network;

use crate::domain::VirtType;
use crate::error::AgentError;
use crate::libvirt::Libvirt;

/// This node's overlays: netlink in the agent's (libvirt's) namespace and the tunnel's end.
pub struct Overlays {
    netlink: Netlink,
    /// The underlay interface and this node's tunnel address on it.
    tunnel: (String, Ipv4Addr),
    /// The underlay's MTU: overlay frames carry 50 bytes of VXLAN headers on top.
    underlay_mtu: u32,
    /// One change of the host's devices at a time.
    lock: tokio::sync::Mutex<()>,
    /// When each overlay was last ensured for a VM that has no domain yet: the collector leaves
    /// it alone for a while, since no domain plugs into its bridge so far.
    ensured: std::sync::Mutex<std::collections::HashMap<u32, std::time::Instant>>,
    /// The overlays this node's routers use: kept although no domain uses them.
    for_routers: std::sync::Mutex<BTreeSet<u32>>,
    /// Bridges of VMs prepared for incoming migrations, by VM uid.
    for_migrations: std::sync::Mutex<std::collections::BTreeMap<String, BTreeSet<String>>>,
}

/// How long an overlay ensured for a VM without a domain is kept although no domain uses it
/// (the VM is between its overlay and its domain: its seed is being written).
const GRACE: std::time::Duration = std::time::Duration::from_secs(10);

impl Overlays {
    /// None on the test driver (no host devices), or when no tunnel address is known (then VMs
    /// on overlay networks fail, saying so).
    pub async fn start(tunnel_address: Option<Ipv4Addr>, virt_type: VirtType) -> Option<Self> {
        if virt_type == VirtType::Test {
            return None;
        }
        let netlink = match Netlink::current() {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "no netlink: overlay networks are unavailable");
                return None;
            }
        };
        let tunnel = match tunnel_address {
            Some(address) => match netlink.interface_with(address).await {
                Ok(Some(interface)) => Some((interface, address)),
                _ => {
                    tracing::warn!(%address, "no interface holds the tunnel address: overlay networks are unavailable");
                    None
                }
            },
            None => netlink.default_route().await.ok().flatten(),
        }?;
        let underlay_mtu = std::fs::read_to_string(format!("/sys/class/net/{}/mtu", tunnel.0))
            .ok()
            .and_then(|m| m.trim().parse().ok())
            .unwrap_or(1500);
        Some(Overlays {
            netlink,
            tunnel,
            underlay_mtu,
            lock: Default::default(),
            ensured: Default::default(),
            for_routers: Default::default(),
            for_migrations: Default::default(),
        })
    }

    /// The overlays this node's routers use now (the collector keeps them).
    /// Keeps the bridges a VM prepared for an incoming migration needs until
    /// [`Self::release_migrations`] lets go of them (the VM has no domain here yet).
    pub fn keep_for_migration(&self, vm_uid: &str, bridges: BTreeSet<String>) {
        self.for_migrations
            .lock()
            .expect("migrations lock")
            .insert(vm_uid.to_string(), bridges);
    }

    /// Lets go of the bridges kept for incoming migrations of VMs other than `incoming`.
    pub fn release_migrations(&self, incoming: &std::collections::HashSet<String>) {
        self.for_migrations
            .lock()
            .expect("migrations lock")
            .retain(|uid, _| incoming.contains(uid));
    }

    pub fn keep_for_routers(&self, vnis: BTreeSet<u32>) {
        *self.for_routers.lock().expect("routers lock") = vnis;
    }

    /// Netlink in the agent's namespace.
    pub fn netlink(&self) -> &Netlink {
        &self.netlink
    }

    /// The VNIs of the overlays this node carries.
    pub async fn present(&self) -> Result<BTreeSet<u32>, AgentError> {
        self.netlink
            .overlays()
            .await
            .map_err(|e| AgentError::Config(e.to_string()))
    }

    pub fn tunnel_address(&self) -> Ipv4Addr {
        self.tunnel.1
    }

    /// The MTU of `network`'s NICs and devices on this node: its own `spec.mtu` (refused when the
    /// underlay cannot carry it), else its default capped at the underlay's MTU less 50.
    pub fn mtu_for(&self, network: &Network) -> Result<u32, AgentError> {
        let fits = self
            .underlay_mtu
            .saturating_sub(flotilla_dataplane::VXLAN_OVERHEAD);
        match network.spec.mtu {
            Some(mtu) if mtu > fits => Err(AgentError::Config(format!(
                "network {:?} asks for MTU {mtu}, but this node's underlay ({}, MTU {}) carries at most {fits}",
                network.metadata.name, self.tunnel.0, self.underlay_mtu
            ))),
            Some(mtu) => Ok(mtu),
            None => Ok(network.nic_mtu().min(fits)),
        }
    }

    /// Makes `network` (an overlay network with a VNI) present on this node; `for_new_domain`:
    /// a VM whose domain does not exist yet is about to use it.
    pub async fn ensure(
        &self,
        node: &str,
        network: &Network,
        for_new_domain: bool,
    ) -> Result<(), AgentError> {
        let status = network.status.clone().unwrap_or_default();
        let Some(vni) = status.vni else {
            return Err(AgentError::Config(format!(
                "network {:?} has no VNI yet",
                network.metadata.name
            )));
        };
        let remotes: BTreeSet<Ipv4Addr> = status
            .endpoints
            .iter()
            .filter(|e| e.node != node)
            .filter_map(|e| e.address.parse().ok())
            .filter(|a| *a != self.tunnel.1)
            .collect();
        let overlay = Overlay {
            vni,
            mtu: self.mtu_for(network)?,
            local: self.tunnel.1,
            underlay: self.tunnel.0.clone(),
            remotes,
        };
        let _one = self.lock.lock().await;
        if for_new_domain {
            self.ensured
                .lock()
                .expect("ensured lock")
                .insert(vni, std::time::Instant::now());
        }
        self.netlink
            .ensure_overlay(&overlay)
            .await
            .map_err(|e| AgentError::Config(format!("network {:?}: {e}", network.metadata.name)))
    }

    /// Removes the overlays whose bridge no domain on this host uses; returns their VNIs.
    pub async fn collect(&self, libvirt: &Libvirt) -> Result<Vec<u32>, AgentError> {
        let _one = self.lock.lock().await;
        let in_use: BTreeSet<String> = libvirt
            .list()
            .await?
            .into_iter()
            .flat_map(|d| d.bridges)
            .collect();
        let mut removed = Vec::new();
        let present = self
            .netlink
            .overlays()
            .await
            .map_err(|e| AgentError::Config(e.to_string()))?;
        for vni in present {
            let recent = self
                .ensured
                .lock()
                .expect("ensured lock")
                .get(&vni)
                .is_some_and(|at| at.elapsed() < GRACE);
            let routed = self
                .for_routers
                .lock()
                .expect("routers lock")
                .contains(&vni);
            let migrating = self
                .for_migrations
                .lock()
                .expect("migrations lock")
                .values()
                .any(|bridges| bridges.contains(&bridge_name(vni)));
            if in_use.contains(&bridge_name(vni)) || recent || routed || migrating {
                continue;
            }
            self.ensured.lock().expect("ensured lock").remove(&vni);
            self.netlink
                .remove_overlay(vni)
                .await
                .map_err(|e| AgentError::Config(e.to_string()))?;
            removed.push(vni);
        }
        Ok(removed)
    }
}
