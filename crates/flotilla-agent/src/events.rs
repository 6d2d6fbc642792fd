//! Domain lifecycle events from libvirt's event loop: started, stopped, crashed, ... as they
//! happen, so the agent reacts without waiting for its periodic resync. libvirt's default event
//! loop runs on a dedicated thread; it must be registered before the first connection opens.

use std::sync::Once;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use virt_sys as sys;

static EVENT_LOOP: Once = Once::new();

/// Registers and runs libvirt's default event loop (once per process).
pub fn ensure_event_loop() {
    EVENT_LOOP.call_once(|| {
        if let Err(e) = virt::event::event_register_default_impl() {
            tracing::warn!(error = %e, "cannot register libvirt's event loop; relying on resyncs");
            return;
        }
        std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| loop {
                // SAFETY: the default implementation was registered above; this call only
                // dispatches the registered callbacks.
                if unsafe { sys::virEventRunDefaultImpl() } < 0 {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            })
            .expect("a thread for libvirt events");
    });
}

/// Called by libvirt for every lifecycle event: sends the domain's UUID.
unsafe extern "C" fn on_lifecycle(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    _event: libc::c_int,
    _detail: libc::c_int,
    opaque: *mut libc::c_void,
) -> libc::c_int {
    let mut buf = [0 as libc::c_char; 64];
    // SAFETY: `dom` is valid for the callback's duration; a UUID string needs 37 bytes.
    if sys::virDomainGetUUIDString(dom, buf.as_mut_ptr()) == 0 {
        let uuid = std::ffi::CStr::from_ptr(buf.as_ptr())
            .to_string_lossy()
            .into_owned();
        // SAFETY: `opaque` is the sender boxed in `subscribe`, freed only by `free_sender`.
        let tx = &*(opaque as *const UnboundedSender<String>);
        let _ = tx.send(uuid);
    }
    0
}

/// Called by libvirt when a guest has let go of an unplugged device: sends the domain's UUID.
unsafe extern "C" fn on_device_removed(
    conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    _alias: *const libc::c_char,
    opaque: *mut libc::c_void,
) {
    // SAFETY: as for a lifecycle event; the event and detail are not read.
    on_lifecycle(conn, dom, 0, 0, opaque);
}

unsafe extern "C" fn free_sender(opaque: *mut libc::c_void) {
    // SAFETY: created by Box::into_raw in `subscribe`; libvirt calls this once.
    drop(Box::from_raw(opaque as *mut UnboundedSender<String>));
}

/// Subscribes to lifecycle events of every domain on `conn`, and to devices their guests let
/// go of (an unplug done); yields domain UUIDs.
pub fn subscribe(conn: &virt::connect::Connect) -> Option<UnboundedReceiver<String>> {
    let (tx, rx) = unbounded_channel();
    let removed = Box::into_raw(Box::new(tx.clone())) as *mut libc::c_void;
    // SAFETY: as below, for the device-removed callback's signature.
    let cb: sys::virConnectDomainEventGenericCallback = unsafe {
        Some(std::mem::transmute::<
            unsafe extern "C" fn(
                sys::virConnectPtr,
                sys::virDomainPtr,
                *const libc::c_char,
                *mut libc::c_void,
            ),
            unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut libc::c_void),
        >(on_device_removed))
    };
    // SAFETY: `conn` is open; `removed` stays valid until libvirt calls `free_sender`.
    let id = unsafe {
        sys::virConnectDomainEventRegisterAny(
            conn.as_ptr(),
            std::ptr::null_mut(),
            sys::VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED as libc::c_int,
            cb,
            removed,
            Some(free_sender),
        )
    };
    if id < 0 {
        // SAFETY: registration failed, so libvirt did not take ownership.
        unsafe { free_sender(removed) };
        tracing::warn!(
            "cannot subscribe to libvirt's device-removed events; unplugs are seen at resyncs"
        );
    }
    let opaque = Box::into_raw(Box::new(tx)) as *mut libc::c_void;
    // SAFETY: libvirt's lifecycle callbacks have this signature; the generic type is what the C
    // API takes (VIR_DOMAIN_EVENT_CALLBACK does the same cast in C).
    let cb: sys::virConnectDomainEventGenericCallback = unsafe {
        Some(std::mem::transmute::<
            unsafe extern "C" fn(
                sys::virConnectPtr,
                sys::virDomainPtr,
                libc::c_int,
                libc::c_int,
                *mut libc::c_void,
            ) -> libc::c_int,
            unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut libc::c_void),
        >(on_lifecycle))
    };
    // SAFETY: `conn` is open; `opaque` stays valid until libvirt calls `free_sender`.
    let id = unsafe {
        sys::virConnectDomainEventRegisterAny(
            conn.as_ptr(),
            std::ptr::null_mut(),
            sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as libc::c_int,
            cb,
            opaque,
            Some(free_sender),
        )
    };
    if id < 0 {
        // SAFETY: registration failed, so libvirt did not take ownership.
        unsafe { free_sender(opaque) };
        tracing::warn!("cannot subscribe to libvirt domain events; relying on resyncs");
        return None;
    }
    Some(rx)
}
