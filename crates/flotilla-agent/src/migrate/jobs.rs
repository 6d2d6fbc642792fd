//! The libvirt calls a migration makes: the migratable XML, suspend and resume, a paused
//! start, job statistics, aborting a job, post-copy, and the peer-to-peer migration itself.

use crate::error::AgentError;
use crate::libvirt::Libvirt;

/// The libvirt side of a move.
pub(super) struct Copy {
    pub(super) uuid: String,
    pub(super) dest_uri: String,
    pub(super) params: virt::domain::MigrateParameters,
    pub(super) flags: u32,
    pub(super) max_downtime_ms: Option<u64>,
}

impl Libvirt {
    /// The running domain's XML as a migration destination takes it.
    pub async fn migratable_xml(&self, uuid: &str) -> Result<Option<String>, AgentError> {
        let uuid = uuid.to_string();
        self.run(move |c| match Self::lookup(c, &uuid) {
            None => Ok(None),
            Some(d) => Ok(Some(d.get_xml_desc(
                virt::sys::VIR_DOMAIN_XML_MIGRATABLE | virt::sys::VIR_DOMAIN_XML_SECURE,
            )?)),
        })
        .await
    }

    /// The host UUID libvirt reports (its capabilities' `<host><uuid>`).
    pub async fn host_uuid(&self) -> Result<Option<String>, AgentError> {
        self.run(|c| {
            let caps = c.get_capabilities()?;
            let doc = roxmltree::Document::parse(&caps)
                .map_err(|e| AgentError::Libvirt(format!("capabilities: {e}")))?;
            Ok(doc
                .descendants()
                .find(|n| n.has_tag_name("host"))
                .and_then(|h| h.children().find(|n| n.has_tag_name("uuid")))
                .and_then(|u| u.text())
                .map(str::to_string))
        })
        .await
    }

    pub async fn suspend(&self, uuid: &str) -> Result<(), AgentError> {
        let uuid = uuid.to_string();
        self.run(move |c| {
            if let Some(d) = Self::lookup(c, &uuid) {
                d.suspend()?;
            }
            Ok(())
        })
        .await
    }

    pub async fn resume(&self, uuid: &str) -> Result<(), AgentError> {
        let uuid = uuid.to_string();
        self.run(move |c| {
            if let Some(d) = Self::lookup(c, &uuid) {
                d.resume()?;
            }
            Ok(())
        })
        .await
    }

    /// Starts the defined domain with its CPUs stopped.
    pub async fn start_paused(&self, uuid: &str) -> Result<(), AgentError> {
        let uuid = uuid.to_string();
        self.run(move |c| {
            let d = Self::lookup(c, &uuid)
                .ok_or_else(|| AgentError::Libvirt(format!("domain {uuid} is not defined")))?;
            if !d.is_active()? {
                d.create_with_flags(virt::sys::VIR_DOMAIN_START_PAUSED)?;
            }
            Ok(())
        })
        .await
    }

    /// The job under way on the domain (or, with `completed`, the one that ended last).
    pub async fn job_stats(
        &self,
        uuid: &str,
        completed: bool,
    ) -> Result<Option<virt::domain::JobStats>, AgentError> {
        let uuid = uuid.to_string();
        self.run(move |c| {
            let Some(d) = Self::lookup(c, &uuid) else {
                return Ok(None);
            };
            let flags = if completed {
                virt::sys::VIR_DOMAIN_JOB_STATS_COMPLETED
            } else {
                0
            };
            // Not `Domain::get_job_stats`: without a job libvirt gives no parameters (a null
            // pointer), which that wrapper turns into a Vec (undefined behaviour).
            let (mut kind, mut params, mut count) = (0, std::ptr::null_mut(), 0);
            // SAFETY: valid out-pointers; `d` holds the domain for the call.
            let ret = unsafe {
                virt::sys::virDomainGetJobStats(
                    d.as_ptr(),
                    &mut kind,
                    &mut params,
                    &mut count,
                    flags,
                )
            };
            if ret == -1 {
                return Ok(None);
            }
            if params.is_null() || count <= 0 {
                return Ok(Some((kind, Vec::new()).into()));
            }
            // SAFETY: libvirt returned `count` parameters at `params`; they are copied (strings
            // included) before libvirt frees them.
            let stats: virt::domain::JobStats = unsafe {
                let copy = std::slice::from_raw_parts(params, count as usize).to_vec();
                (kind, copy).into()
            };
            // SAFETY: the array libvirt allocated, freed once.
            unsafe { virt::sys::virTypedParamsFree(params, count) };
            Ok(Some(stats))
        })
        .await
    }

    /// Aborts the job under way on the domain (a migration: the domain stays here).
    pub async fn abort_job(&self, uuid: &str) -> Result<(), AgentError> {
        let uuid = uuid.to_string();
        self.run(move |c| {
            if let Some(d) = Self::lookup(c, &uuid) {
                // SAFETY: a valid domain pointer, owned by `d` for the call.
                if unsafe { virt::sys::virDomainAbortJob(d.as_ptr()) } != 0 {
                    return Err(virt::error::Error::last_error().into());
                }
            }
            Ok(())
        })
        .await
    }

    /// Switches the migration under way to post-copy.
    pub async fn start_post_copy(&self, uuid: &str) -> Result<(), AgentError> {
        let uuid = uuid.to_string();
        self.run(move |c| {
            if let Some(d) = Self::lookup(c, &uuid) {
                // SAFETY: a valid domain pointer, owned by `d` for the call.
                if unsafe { virt::sys::virDomainMigrateStartPostCopy(d.as_ptr(), 0) } != 0 {
                    return Err(virt::error::Error::last_error().into());
                }
            }
            Ok(())
        })
        .await
    }

    /// Runs the migration; returns when libvirt has finished it (or failed).
    pub(super) async fn migrate(&self, copy: Copy) -> Result<(), AgentError> {
        self.run(move |c| {
            let d = Self::lookup(c, &copy.uuid).ok_or_else(|| {
                AgentError::Libvirt(format!("domain {} is not defined", copy.uuid))
            })?;
            if let Some(ms) = copy.max_downtime_ms {
                d.migrate_set_max_downtime(ms, 0)?;
            }
            d.migrate_to_uri3(Some(&copy.dest_uri), copy.params, copy.flags)?;
            Ok(())
        })
        .await
    }
}
