//! libvirt through the `virt` crate (libvirt's own bindings), never virsh. Every call blocks, so
//! each runs on Tokio's blocking pool; the connection is shared (libvirt connections are
//! thread-safe).

use std::sync::Arc;

use virt::connect::Connect;
use virt::domain::Domain;

use crate::error::AgentError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DomainState {
    Running,
    /// Defined but not running (shut off, crashed, or never started).
    Stopped,
    Paused,
    ShuttingDown,
}

#[derive(Clone, Debug)]
pub struct DomainSummary {
    pub name: String,
    pub uuid: String,
    pub state: DomainState,
    /// Set when Flotilla created the domain.
    pub owner: Option<crate::domain::Owner>,
    pub cpus: u32,
    pub memory_kib: u64,
    /// The bridges its NICs are plugged into.
    pub bridges: Vec<String>,
}

/// The bridge names of a domain's `<source bridge='…'/>` elements (as libvirt writes its XML).
fn bridges_of(xml: &str) -> Vec<String> {
    xml.split("<source bridge=")
        .skip(1)
        .filter_map(|rest| {
            let quote = rest.chars().next()?;
            rest[1..].split(quote).next().map(str::to_string)
        })
        .collect()
}

/// A disk of a running domain, as its live XML has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveDisk {
    /// The device name in the domain (vda, sdb, ...).
    pub target: String,
    pub bus: String,
    pub source: Option<String>,
    pub serial: Option<String>,
    /// The volume it is, for disks Flotilla attached (their alias is `ua-<volume>`).
    pub volume: Option<String>,
}

/// The prefix of the user alias Flotilla gives a volume's disk (`ua-` is libvirt's prefix for
/// aliases a user chooses).
pub const VOLUME_ALIAS: &str = "ua-";

/// The disks of a domain's XML.
pub fn disks_of(xml: &str) -> Vec<LiveDisk> {
    let Ok(doc) = roxmltree::Document::parse(xml) else {
        return Vec::new();
    };
    fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
        n.children().find(|c| c.has_tag_name(name))
    }
    doc.descendants()
        .filter(|n| n.has_tag_name("disk") && n.attribute("device") == Some("disk"))
        .filter_map(|n| {
            let target = child(n, "target")?;
            Some(LiveDisk {
                target: target.attribute("dev")?.to_string(),
                bus: target.attribute("bus").unwrap_or_default().to_string(),
                // A file, or a network disk's name (`pool/image` for RBD).
                source: child(n, "source")
                    .and_then(|s| s.attribute("file").or_else(|| s.attribute("name")))
                    .map(str::to_string),
                serial: child(n, "serial")
                    .and_then(|s| s.text())
                    .map(str::to_string),
                volume: child(n, "alias")
                    .and_then(|a| a.attribute("name"))
                    .and_then(|a| a.strip_prefix(VOLUME_ALIAS))
                    .map(str::to_string),
            })
        })
        .collect()
}

#[derive(Clone, Debug)]
pub struct HostInfo {
    pub cpus: u32,
    pub memory_bytes: u64,
    pub libvirt_version: String,
    pub hypervisor_version: String,
    pub hostname: String,
}

#[derive(Clone)]
pub struct Libvirt {
    conn: Arc<Connect>,
}

fn version(v: u32) -> String {
    format!("{}.{}.{}", v / 1_000_000, (v / 1000) % 1000, v % 1000)
}

fn state_of(raw: u32) -> DomainState {
    match raw {
        virt::sys::VIR_DOMAIN_RUNNING | virt::sys::VIR_DOMAIN_BLOCKED => DomainState::Running,
        virt::sys::VIR_DOMAIN_PAUSED | virt::sys::VIR_DOMAIN_PMSUSPENDED => DomainState::Paused,
        virt::sys::VIR_DOMAIN_SHUTDOWN => DomainState::ShuttingDown,
        _ => DomainState::Stopped,
    }
}

impl Libvirt {
    pub async fn open(uri: &str) -> Result<Self, AgentError> {
        // Errors come back as values; libvirt's default handler would also print each to stderr.
        virt::error::clear_error_callback();
        crate::events::ensure_event_loop();
        let owned = uri.to_string();
        let conn = tokio::task::spawn_blocking(move || Connect::open(Some(&owned)))
            .await
            .map_err(|e| AgentError::Libvirt(e.to_string()))?
            .map_err(|e| AgentError::Libvirt(format!("cannot connect to {uri}: {e}")))?;
        Ok(Libvirt {
            conn: Arc::new(conn),
        })
    }

    /// Lifecycle events of every domain, as domain UUIDs (None if libvirt refuses).
    pub fn domain_events(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<String>> {
        crate::events::subscribe(&self.conn)
    }

    pub(crate) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connect) -> Result<T, AgentError> + Send + 'static,
    ) -> Result<T, AgentError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || f(&conn))
            .await
            .map_err(|e| AgentError::Libvirt(e.to_string()))?
    }

    pub async fn host_info(&self) -> Result<HostInfo, AgentError> {
        self.run(|c| {
            let info = c.get_node_info()?;
            Ok(HostInfo {
                cpus: info.cpus,
                memory_bytes: info.memory * 1024,
                libvirt_version: version(c.get_lib_version()?),
                hypervisor_version: version(c.get_hyp_version()?),
                hostname: c.get_hostname().unwrap_or_default(),
            })
        })
        .await
    }

    /// Defines (or redefines) a domain from XML; idempotent.
    pub async fn define(&self, xml: String) -> Result<(), AgentError> {
        self.run(move |c| {
            Domain::define_xml(c, &xml)?;
            Ok(())
        })
        .await
    }

    pub(crate) fn lookup(c: &Connect, uuid: &str) -> Option<Domain> {
        Domain::lookup_by_uuid_string(c, uuid).ok()
    }

    pub async fn state(&self, uuid: &str) -> Result<Option<DomainState>, AgentError> {
        let uuid = uuid.to_string();
        self.run(move |c| match Self::lookup(c, &uuid) {
            None => Ok(None),
            Some(d) => match d.get_state() {
                Ok((state, _)) => Ok(Some(state_of(state))),
                // Undefined between the lookup and the question: gone, not an error.
                Err(e) if e.code() == virt::error::ErrorNumber::NoDomain => Ok(None),
                Err(e) => Err(e.into()),
            },
        })
        .await
    }

    pub async fn start(&self, uuid: &str) -> Result<(), AgentError> {
        let uuid = uuid.to_string();
        self.run(move |c| {
            let d = Self::lookup(c, &uuid)
                .ok_or_else(|| AgentError::Libvirt(format!("domain {uuid} is not defined")))?;
            if !d.is_active()? {
                d.create()?;
            }
            Ok(())
        })
        .await
    }

    /// Asks the guest to shut down (ACPI); returns at once.
    pub async fn shutdown(&self, uuid: &str) -> Result<(), AgentError> {
        let uuid = uuid.to_string();
        self.run(move |c| {
            if let Some(d) = Self::lookup(c, &uuid) {
                if d.is_active()? {
                    d.shutdown()?;
                }
            }
            Ok(())
        })
        .await
    }

    /// Pulls the plug.
    pub async fn destroy(&self, uuid: &str) -> Result<(), AgentError> {
        let uuid = uuid.to_string();
        self.run(move |c| {
            if let Some(d) = Self::lookup(c, &uuid) {
                if d.is_active()? {
                    d.destroy()?;
                }
            }
            Ok(())
        })
        .await
    }

    /// Stops (if running) and undefines; succeeds if the domain does not exist.
    pub async fn remove(&self, uuid: &str) -> Result<(), AgentError> {
        let uuid = uuid.to_string();
        self.run(move |c| {
            if let Some(d) = Self::lookup(c, &uuid) {
                if d.is_active()? {
                    d.destroy()?;
                }
                // Also drops managed-save images and snapshot metadata, if any.
                let flags = virt::sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                    | virt::sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA;
                if d.undefine_flags(flags).is_err() {
                    d.undefine()?;
                }
            }
            Ok(())
        })
        .await
    }

    pub async fn list(&self) -> Result<Vec<DomainSummary>, AgentError> {
        self.run(|c| {
            let mut out = Vec::new();
            for d in c.list_all_domains(0)? {
                let info = d.get_info()?;
                let xml = d.get_xml_desc(0).unwrap_or_default();
                out.push(DomainSummary {
                    name: d.get_name()?,
                    uuid: d.get_uuid_string()?,
                    state: state_of(info.state),
                    owner: crate::domain::owner(&xml),
                    cpus: info.nr_virt_cpu,
                    memory_kib: info.max_mem,
                    bridges: bridges_of(&xml),
                });
            }
            Ok(out)
        })
        .await
    }

    pub async fn xml(&self, uuid: &str) -> Result<Option<String>, AgentError> {
        let uuid = uuid.to_string();
        self.run(move |c| match Self::lookup(c, &uuid) {
            None => Ok(None),
            Some(d) => Ok(Some(d.get_xml_desc(0)?)),
        })
        .await
    }

    /// The disks of a running domain (None when it is not running).
    pub async fn live_disks(&self, uuid: &str) -> Result<Option<Vec<LiveDisk>>, AgentError> {
        let uuid = uuid.to_string();
        self.run(move |c| {
            let Some(d) = Self::lookup(c, &uuid) else {
                return Ok(None);
            };
            if !d.is_active()? {
                return Ok(None);
            }
            Ok(Some(disks_of(&d.get_xml_desc(0)?)))
        })
        .await
    }

    /// Plugs a device into a running domain (its definition is the agent's to write).
    pub async fn attach_live(&self, uuid: &str, xml: String) -> Result<(), AgentError> {
        let uuid = uuid.to_string();
        self.run(move |c| {
            let d = Self::lookup(c, &uuid)
                .ok_or_else(|| AgentError::Libvirt(format!("domain {uuid} is not defined")))?;
            d.attach_device_flags(&xml, virt::sys::VIR_DOMAIN_AFFECT_LIVE)?;
            Ok(())
        })
        .await
    }

    /// Asks a running domain to unplug a device; returns once asked (the guest lets go in its
    /// own time: libvirt then sends a device-removed event). Asking again while the guest has
    /// not answered is not an error.
    pub async fn detach_live(&self, uuid: &str, xml: String) -> Result<(), AgentError> {
        let uuid = uuid.to_string();
        self.run(move |c| {
            let Some(d) = Self::lookup(c, &uuid) else {
                return Ok(());
            };
            match d.detach_device_flags(&xml, virt::sys::VIR_DOMAIN_AFFECT_LIVE) {
                Ok(_) => Ok(()),
                Err(e) if e.message().contains("already in the process of unplug") => Ok(()),
                // Gone meanwhile (the guest let go, or the domain stopped).
                Err(e) if e.code() == virt::error::ErrorNumber::OperationInvalid => Ok(()),
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    /// Grows a disk of a running domain to `bytes`; the guest sees the new size at once.
    pub async fn block_resize(
        &self,
        uuid: &str,
        target: &str,
        bytes: u64,
    ) -> Result<(), AgentError> {
        let (uuid, target) = (uuid.to_string(), target.to_string());
        self.run(move |c| {
            let d = Self::lookup(c, &uuid)
                .ok_or_else(|| AgentError::Libvirt(format!("domain {uuid} is not defined")))?;
            d.block_resize(&target, bytes, virt::sys::VIR_DOMAIN_BLOCK_RESIZE_BYTES)?;
            Ok(())
        })
        .await
    }

    /// Switches disk `target` of a running domain to the new overlay `overlay` (qcow2, made by
    /// the caller over the disk's current file, which it leaves frozen): an external disk-only
    /// snapshot of that one disk, without libvirt's snapshot metadata (Flotilla keeps its own).
    pub async fn snapshot_disk(
        &self,
        uuid: &str,
        target: &str,
        overlay: &str,
    ) -> Result<(), AgentError> {
        let (uuid, target, overlay) = (uuid.to_string(), target.to_string(), overlay.to_string());
        self.run(move |c| {
            use crate::xml::Element;
            let d = Self::lookup(c, &uuid)
                .ok_or_else(|| AgentError::Libvirt(format!("domain {uuid} is not defined")))?;
            // Every other disk is left alone (the default would snapshot them all).
            let disks = disks_of(&d.get_xml_desc(0)?).into_iter().map(|disk| {
                let element = Element::new("disk").attr("name", &disk.target);
                if disk.target == target {
                    element
                        .attr("snapshot", "external")
                        .attr("type", "file")
                        .child(Element::new("source").attr("file", &overlay))
                        .child(Element::new("driver").attr("type", "qcow2"))
                } else {
                    element.attr("snapshot", "no")
                }
            });
            let xml = Element::new("domainsnapshot")
                .child(Element::new("disks").children(disks))
                .render();
            let flags = virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
                | virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
                | virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
                | virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC;
            virt::domain_snapshot::DomainSnapshot::create_xml(&d, &xml, flags)?;
            Ok(())
        })
        .await
    }

    /// Merges the active overlay of disk `target` of a running domain into `base`, the file
    /// right under it, and switches the disk to that file (an active block commit, then a
    /// pivot); the overlay is left for the caller to delete. (Without a base libvirt would
    /// merge the whole chain into its bottom file, overwriting older snapshots.)
    pub async fn commit_active(
        &self,
        uuid: &str,
        target: &str,
        base: &str,
    ) -> Result<(), AgentError> {
        let (uuid, target, base) = (uuid.to_string(), target.to_string(), base.to_string());
        self.run(move |c| {
            let d = Self::lookup(c, &uuid)
                .ok_or_else(|| AgentError::Libvirt(format!("domain {uuid} is not defined")))?;
            let disk = std::ffi::CString::new(target.clone()).expect("a device name");
            let base = std::ffi::CString::new(base)
                .map_err(|_| AgentError::Libvirt("a path with a NUL byte".into()))?;
            let last = || AgentError::Libvirt(virt::error::Error::last_error().to_string());
            let job = |info: &mut virt::sys::virDomainBlockJobInfo| {
                // SAFETY: a live domain pointer, a C string that outlives the call and a valid
                // struct for it to fill.
                unsafe { virt::sys::virDomainGetBlockJobInfo(d.as_ptr(), disk.as_ptr(), info, 0) }
            };
            let mut info = virt::sys::virDomainBlockJobInfo {
                type_: 0,
                bandwidth: 0,
                cur: 0,
                end: 0,
            };
            // A commit a crash left unpivoted runs (or waits, caught up) in QEMU still: it is
            // taken up where it is rather than refused as a second job on the disk.
            let resumed = job(&mut info) > 0
                && info.type_ == virt::sys::VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT as i32;
            if !resumed {
                // SAFETY: as above; a null top means the active layer.
                let started = unsafe {
                    virt::sys::virDomainBlockCommit(
                        d.as_ptr(),
                        disk.as_ptr(),
                        base.as_ptr(),
                        std::ptr::null(),
                        0,
                        virt::sys::VIR_DOMAIN_BLOCK_COMMIT_ACTIVE,
                    )
                };
                if started < 0 {
                    return Err(last());
                }
            }
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
            let mut said = std::time::Instant::now();
            loop {
                let got = job(&mut info);
                if got < 0 {
                    return Err(last());
                }
                if got == 0 {
                    return Err(AgentError::Libvirt(format!(
                        "the commit job of {target} ended before it could be pivoted"
                    )));
                }
                if info.end > 0 && info.cur == info.end {
                    break;
                }
                if said.elapsed() >= std::time::Duration::from_secs(30) {
                    said = std::time::Instant::now();
                    tracing::info!(domain = %uuid, disk = %target, done = info.cur, of = info.end, "a merge is still catching up");
                }
                if std::time::Instant::now() > deadline {
                    return Err(AgentError::Libvirt(format!(
                        "the commit of {target} did not catch up in 10 minutes"
                    )));
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            // SAFETY: as above.
            let pivoted = unsafe {
                virt::sys::virDomainBlockJobAbort(
                    d.as_ptr(),
                    disk.as_ptr(),
                    virt::sys::VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT,
                )
            };
            if pivoted < 0 {
                return Err(last());
            }
            Ok(())
        })
        .await
    }

    /// Takes an external snapshot of a running domain: disk `target` of each pair switches to
    /// its overlay (made already), every other disk is left alone, and with `memory` the
    /// guest's memory goes to that file (the guest pauses for it, so memory and disks are one
    /// moment). Without metadata: Flotilla keeps the record.
    pub async fn snapshot_domain(
        &self,
        uuid: &str,
        overlays: Vec<(String, String)>,
        memory: Option<String>,
    ) -> Result<(), AgentError> {
        let uuid = uuid.to_string();
        self.run(move |c| {
            use crate::xml::Element;
            let d = Self::lookup(c, &uuid)
                .ok_or_else(|| AgentError::Libvirt(format!("domain {uuid} is not defined")))?;
            let disks = disks_of(&d.get_xml_desc(0)?).into_iter().map(|disk| {
                let element = Element::new("disk").attr("name", &disk.target);
                match overlays.iter().find(|(target, _)| *target == disk.target) {
                    Some((_, overlay)) => element
                        .attr("snapshot", "external")
                        .attr("type", "file")
                        .child(Element::new("source").attr("file", overlay))
                        .child(Element::new("driver").attr("type", "qcow2")),
                    None => element.attr("snapshot", "no"),
                }
            });
            let memory_element = match &memory {
                Some(file) => Element::new("memory")
                    .attr("snapshot", "external")
                    .attr("file", file),
                None => Element::new("memory").attr("snapshot", "no"),
            };
            let xml = Element::new("domainsnapshot")
                .child(memory_element)
                .child(Element::new("disks").children(disks))
                .render();
            let mut flags = virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
                | virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
                | virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC;
            if memory.is_none() {
                flags |= virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY;
            }
            virt::domain_snapshot::DomainSnapshot::create_xml(&d, &xml, flags)?;
            Ok(())
        })
        .await
    }

    /// The domain XML a memory image (a save or a snapshot's memory file) was taken with.
    pub async fn saved_xml(&self, path: &str) -> Result<String, AgentError> {
        let path = path.to_string();
        self.run(move |c| Ok(virt::domain::Domain::save_image_get_xml_desc(c, &path, 0)?))
            .await
    }

    /// Starts the domain from the memory image at `path` with definition `xml` (the image's,
    /// with its disks pointed at the files to use now), running.
    pub async fn restore(&self, path: &str, xml: &str) -> Result<(), AgentError> {
        let (path, xml) = (path.to_string(), xml.to_string());
        self.run(move |c| {
            let from = std::ffi::CString::new(path)
                .map_err(|_| AgentError::Libvirt("a path with a NUL byte".into()))?;
            let dxml = std::ffi::CString::new(xml)
                .map_err(|_| AgentError::Libvirt("XML with a NUL byte".into()))?;
            // SAFETY: a live connection and C strings that outlive the call.
            let restored = unsafe {
                virt::sys::virDomainRestoreFlags(
                    c.as_ptr(),
                    from.as_ptr(),
                    dxml.as_ptr(),
                    virt::sys::VIR_DOMAIN_SAVE_RUNNING,
                )
            };
            if restored < 0 {
                return Err(AgentError::Libvirt(
                    virt::error::Error::last_error().to_string(),
                ));
            }
            Ok(())
        })
        .await
    }

    /// Defines (or redefines) the private libvirt secret `uuid` for Ceph user keys, usage
    /// `usage`, and sets its value (the key, decoded from base64 as libvirt keeps it). Domains
    /// name it in their RBD disks' `<auth>`; the value never leaves libvirtd again.
    pub async fn ceph_secret(
        &self,
        uuid: &str,
        usage: &str,
        key_base64: &str,
    ) -> Result<(), AgentError> {
        use base64::Engine;
        let value = base64::engine::general_purpose::STANDARD
            .decode(key_base64.trim())
            .map_err(|_| AgentError::Config("the Ceph key is not base64".into()))?;
        // Ephemeral: kept in libvirtd's memory only; the agent sets it again after a restart.
        let xml = crate::xml::Element::new("secret")
            .attr("ephemeral", "yes")
            .attr("private", "yes")
            .child(crate::xml::Element::new("uuid").text(uuid))
            .child(
                crate::xml::Element::new("usage")
                    .attr("type", "ceph")
                    .child(crate::xml::Element::new("name").text(usage)),
            )
            .render();
        self.run(move |c| {
            let secret = virt::secret::Secret::define_xml(c, &xml, 0)?;
            secret.set_value(&value, 0)?;
            Ok(())
        })
        .await
    }

    /// Removes the Ceph secrets whose usage starts with `prefix` but that are not in `keep` (by
    /// UUID): those of pools deleted since.
    pub async fn remove_ceph_secrets(
        &self,
        prefix: &str,
        keep: Vec<String>,
    ) -> Result<Vec<String>, AgentError> {
        let prefix = prefix.to_string();
        self.run(move |c| {
            let mut removed = Vec::new();
            for secret in c.list_all_secrets(0)? {
                // Not get_usage_id: virt 0.4.3 frees the string libvirt keeps (a double free).
                let xml = secret.get_xml_desc(0)?;
                let usage = roxmltree::Document::parse(&xml)
                    .ok()
                    .and_then(|doc| {
                        let usage = doc.descendants().find(|n| n.has_tag_name("usage"))?;
                        let name = usage.children().find(|n| n.has_tag_name("name"))?;
                        name.text().map(str::to_string)
                    })
                    .unwrap_or_default();
                let uuid = secret.get_uuid_string()?;
                if usage.starts_with(&prefix) && !keep.contains(&uuid) {
                    secret.undefine()?;
                    removed.push(usage);
                }
            }
            Ok(removed)
        })
        .await
    }

    /// The running domains with `path` open as a disk: (UUID, device name) each; `path` is a
    /// file, or a network disk's name.
    pub async fn disk_users(&self, path: &str) -> Result<Vec<(String, String)>, AgentError> {
        let path = path.to_string();
        self.run(move |c| {
            let mut users = Vec::new();
            for d in c.list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)? {
                let Ok(xml) = d.get_xml_desc(0) else { continue };
                for disk in disks_of(&xml) {
                    if disk.source.as_deref() == Some(path.as_str()) {
                        users.push((d.get_uuid_string()?, disk.target));
                    }
                }
            }
            Ok(users)
        })
        .await
    }

    /// What the guest agent (qemu-guest-agent) says the guest's interfaces hold: (MAC, addresses
    /// without prefix) each. None when the domain has no connected guest agent (most guests
    /// without one answer at once: libvirt knows the channel is not connected).
    pub async fn guest_addresses(
        &self,
        uuid: &str,
    ) -> Result<Option<Vec<(String, Vec<String>)>>, AgentError> {
        let uuid = uuid.to_string();
        self.run(move |c| {
            let Some(d) = Self::lookup(c, &uuid) else {
                return Ok(None);
            };
            match d.interface_addresses(virt::sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT, 0) {
                Ok(interfaces) => Ok(Some(
                    interfaces
                        .into_iter()
                        .map(|i| {
                            let addrs = i.addrs.into_iter().map(|a| a.addr).collect();
                            (i.hwaddr.to_ascii_lowercase(), addrs)
                        })
                        .collect(),
                )),
                // Not configured, not connected, not responding: no guest agent to ask.
                Err(_) => Ok(None),
            }
        })
        .await
    }
}
