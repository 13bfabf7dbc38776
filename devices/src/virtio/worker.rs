//! The one place device threads are started: named, under their kind's seccomp filter, and
//! watched. A worker that stops on its own (an error it cannot go on from, or a panic) is a
//! device failure the guest and the operator both see: the device asks the driver for a reset
//! (DEVICE_NEEDS_RESET and a configuration interrupt), its `worker_failures` counter goes up,
//! and one line on stderr says which device and why. The VM and the other devices go on.
//!
//! A worker's body is an event-manager loop ([`event_loop`]) over a [`DeviceLoop`]: rng,
//! virtio-fs, net and vsock (its deadlines on a timerfd among its events); block waits in its
//! io_uring.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use super::Interrupt;

/// Why a worker gave up.
pub type Failure = String;

/// A device thread's event handling, on event-manager: the subscriber registers its events in
/// `init`, handles them in `process`, and says after each batch whether to go on.
pub trait DeviceLoop: event_manager::MutEventSubscriber {
    /// `None` to wait for more events; `Some(Ok(()))` when told to stop; `Some(Err(why))` when
    /// it cannot go on (a device failure, see [`spawn`]).
    fn outcome(&mut self) -> Option<Result<(), Failure>>;
}

/// Runs `device`'s events until its [`DeviceLoop::outcome`] says to end: the body of a device
/// thread started by [`spawn`].
pub fn event_loop<D: DeviceLoop>(device: D) -> Result<(), Failure> {
    use event_manager::{EventManager, SubscriberOps};
    let mut manager: EventManager<D> =
        EventManager::new().map_err(|e| format!("creating its event loop: {e}"))?;
    let id = manager.add_subscriber(device);
    loop {
        let device = manager
            .subscriber_mut(id)
            .map_err(|e| format!("its event loop lost it: {e}"))?;
        if let Some(outcome) = device.outcome() {
            return outcome;
        }
        // An interruption by a signal comes back as zero events.
        manager
            .run()
            .map_err(|e| format!("waiting for events: {e}"))?;
    }
}

/// Whom a failed worker asks for a reset.
#[derive(Clone)]
pub enum ResetLine {
    /// The interrupt of the activation the worker serves.
    Fixed(Arc<Interrupt>),
    /// For a worker that outlives activations (vsock's, which owns its socket from the VM's
    /// creation on): the interrupt of the activation current when it fails, if any.
    Current(Arc<Mutex<Option<Arc<Interrupt>>>>),
}

impl ResetLine {
    fn signal_needs_reset(&self) {
        match self {
            ResetLine::Fixed(interrupt) => interrupt.signal_needs_reset(),
            ResetLine::Current(slot) => {
                let current = slot.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(interrupt) = current.as_ref() {
                    interrupt.signal_needs_reset();
                }
            }
        }
    }
}

impl From<Arc<Interrupt>> for ResetLine {
    fn from(interrupt: Arc<Interrupt>) -> Self {
        ResetLine::Fixed(interrupt)
    }
}

/// Starts `f` on a thread `name` of seccomp kind `kind`, for the device `device` (in messages).
pub fn spawn<F>(
    name: String,
    kind: seccomp::ThreadKind,
    device: String,
    interrupt: impl Into<ResetLine>,
    failures: Arc<AtomicU64>,
    f: F,
) -> std::io::Result<JoinHandle<()>>
where
    F: FnOnce() -> Result<(), Failure> + Send + 'static,
{
    let thread = name.clone();
    let interrupt = interrupt.into();
    seccomp::spawn(std::thread::Builder::new().name(name), kind, move || {
        let why = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            Ok(Ok(())) => return,
            Ok(Err(why)) => why,
            Err(_) => "it panicked".to_string(),
        };
        failures.fetch_add(1, Ordering::Relaxed);
        interrupt.signal_needs_reset();
        log::error!(
            "{device}: worker thread {thread} stopped: {why}; the device asks the \
                 guest for a reset, the VM goes on"
        );
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn a_failing_or_panicking_worker_becomes_a_device_error() {
        for (name, f) in [
            (
                "fails",
                Box::new(|| Err("epoll_wait: bad descriptor".to_string()))
                    as Box<dyn FnOnce() -> Result<(), Failure> + Send>,
            ),
            ("panics", Box::new(|| panic!("a bug"))),
            ("ends", Box::new(|| Ok(()))),
        ] {
            let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
            let failures = Arc::new(AtomicU64::new(0));
            spawn(
                format!("test-{name}"),
                seccomp::ThreadKind::Block,
                "disk d0".into(),
                interrupt.clone(),
                failures.clone(),
                f,
            )
            .unwrap()
            .join()
            .unwrap();
            let failed = name != "ends";
            assert_eq!(interrupt.needs_reset(), failed, "{name}");
            assert_eq!(
                failures.load(Ordering::Relaxed),
                u64::from(failed),
                "{name}"
            );
        }
    }
}
