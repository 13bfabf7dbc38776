//! SIGTERM and SIGINT end podvmm cleanly instead of killing it: the guest is stopped, the
//! sockets podvmm made are removed, the event monitor gets its `shutdown` line, and the process
//! exits with 128 + the signal's number (143 for SIGTERM, 130 for SIGINT).
//!
//! The handler only records the signal and writes to an eventfd (both async-signal-safe, and
//! allowed by every thread's seccomp filter: a signal may land on any thread); the VMM thread
//! waits on that eventfd next to its other events and does the work.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

static EVT: OnceLock<EventFd> = OnceLock::new();
static EVT_FD: AtomicI32 = AtomicI32::new(-1);
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    let _ = SIGNAL.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
    let fd = EVT_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) of 8 bytes from a local to an eventfd; async-signal-safe.
        unsafe { libc::write(fd, std::ptr::addr_of!(one).cast(), 8) };
    }
}

/// Installs the handlers (once, before other threads start, so every thread has them).
pub fn install() -> std::io::Result<()> {
    let evt = match EVT.get() {
        Some(e) => e,
        None => {
            let e = EventFd::new(EFD_NONBLOCK)?;
            EVT.get_or_init(|| e)
        }
    };
    EVT_FD.store(evt.as_raw_fd(), Ordering::SeqCst);
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: sigaction is plain data; all-zero is a valid empty mask and no flags.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = libc::SA_RESTART;
        // SAFETY: a valid sigaction for a catchable signal; the old action is not wanted.
        if unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The descriptor that becomes readable once a termination signal arrived (after [`install`]).
pub fn fd() -> Option<RawFd> {
    EVT.get().map(AsRawFd::as_raw_fd)
}

/// The termination signal received, if any.
pub fn received() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// `SIGTERM`, `SIGINT`, or the number.
pub fn name(sig: i32) -> String {
    match sig {
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGINT => "SIGINT".into(),
        n => format!("signal {n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_is_recorded_and_wakes_the_eventfd() {
        install().unwrap();
        // SAFETY: raising a signal whose handler we installed, on this thread.
        assert_eq!(unsafe { libc::raise(libc::SIGTERM) }, 0);
        assert_eq!(received(), Some(libc::SIGTERM));
        assert_eq!(EVT.get().unwrap().read().unwrap(), 1);
        assert_eq!(name(libc::SIGINT), "SIGINT");
    }
}
