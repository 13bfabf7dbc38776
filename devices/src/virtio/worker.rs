//! The one place device threads are started: named, under their kind's seccomp filter, and
//! watched. A worker that stops on its own (an error it cannot go on from, or a panic) is a
//! device failure the guest and the operator both see: the device asks the driver for a reset
//! (DEVICE_NEEDS_RESET and a configuration interrupt), its `worker_failures` counter goes up,
//! and one line on stderr says which device and why. The VM and the other devices go on.
//!
//! A worker's body is an event-manager loop ([`event_loop`]) over a [`DeviceLoop`]: rng,
//! virtio-fs and net; block waits in its io_uring, vsock in a loop of its own (with timers).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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

/// Starts `f` on a thread `name` of seccomp kind `kind`, for the device `device` (in messages).
pub fn spawn<F>(
    name: String,
    kind: seccomp::ThreadKind,
    device: String,
    interrupt: Arc<Interrupt>,
    failures: Arc<AtomicU64>,
    f: F,
) -> std::io::Result<JoinHandle<()>>
where
    F: FnOnce() -> Result<(), Failure> + Send + 'static,
{
    let thread = name.clone();
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
