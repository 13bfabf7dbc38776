//! The one place device threads are started: named, under their kind's seccomp filter, and
//! watched. A worker that stops on its own (an error it cannot go on from, or a panic) is a
//! device failure the guest and the operator both see: the device asks the driver for a reset
//! (DEVICE_NEEDS_RESET and a configuration interrupt), its `worker_failures` counter goes up,
//! and one line on stderr says which device and why. The VM and the other devices go on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::Interrupt;

/// Why a worker gave up.
pub type Failure = String;

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
        eprintln!(
            "podvmm: {device}: worker thread {thread} stopped: {why}; the device asks the \
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
