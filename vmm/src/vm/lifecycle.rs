//! A VM's vCPU threads: starting them, pausing and resuming them, stopping and joining them.
//!
//! Each vCPU thread calls [`VcpuControl::checkpoint`] before every entry into the guest. To
//! pause or stop, the VMM thread sets the request, then kicks the vCPU threads out of the
//! guest with a real-time signal (the interrupted `KVM_RUN` or `MSHV_RUN_VP` returns `EINTR`).
//! A signal that lands after the checkpoint but before the thread re-enters the guest would
//! be consumed outside the guest; on KVM the handler sets the vCPU's `immediate_exit`, so that
//! entry returns at once and the thread reaches its checkpoint: one kick is enough. On MSHV,
//! which has no such flag, the kick is repeated every millisecond until every thread has
//! acknowledged (parked or exited); on KVM the repeat (every 50 ms) is only a safety net.
//! Requests and acknowledgements go through one mutex and condition variable, so no wake-up
//! is lost.

use std::cell::Cell;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use devices::Serial;

use super::{forward_stdin, ExitReason, Vm};
use crate::{vcpu, Error, Result};

const RUN: u8 = 0;
const PAUSE: u8 = 1;
const STOP: u8 = 2;

/// How long vCPUs get to acknowledge a pause or a stop. A vCPU thread that is outside the
/// guest (in a device) comes back within microseconds; this bounds a wedged one.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an unacknowledged kick is repeated where a kick can be lost (a hypervisor
/// without an immediate-exit flag: a signal landing just before the entry into the guest).
const KICK_INTERVAL: Duration = Duration::from_millis(1);
/// The same where every vCPU has the flag (KVM): one kick is enough, this only bounds a
/// thread that was somewhere no signal reaches.
const KICK_INTERVAL_IMMEDIATE_EXIT: Duration = Duration::from_millis(50);

#[derive(Default)]
struct Acks {
    parked: usize,
    exited: usize,
}

/// Shared by the VMM thread and the vCPU threads of one VM.
pub(crate) struct VcpuControl {
    request: AtomicU8,
    acks: Mutex<Acks>,
    changed: Condvar,
}

impl VcpuControl {
    fn new() -> Self {
        VcpuControl {
            request: AtomicU8::new(RUN),
            acks: Mutex::new(Acks::default()),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Acks> {
        self.acks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by a vCPU thread before each entry into the guest: returns at once while the VM
    /// runs, parks while it is paused, and returns `false` when the thread must end.
    pub(crate) fn checkpoint(&self) -> bool {
        if self.request.load(Ordering::Acquire) == RUN {
            return true;
        }
        let mut acks = self.lock();
        loop {
            match self.request.load(Ordering::Acquire) {
                RUN => return true,
                STOP => return false,
                _ => {
                    acks.parked += 1;
                    self.changed.notify_all();
                    while self.request.load(Ordering::Acquire) == PAUSE {
                        acks = self.changed.wait(acks).unwrap_or_else(|p| p.into_inner());
                    }
                    acks.parked -= 1;
                }
            }
        }
    }

    /// Sets the request under the lock (so a vCPU deciding to wait sees it) and wakes parked
    /// vCPUs.
    fn set(&self, request: u8) {
        let _acks = self.lock();
        self.request.store(request, Ordering::Release);
        self.changed.notify_all();
    }

    /// Kicks `threads` until `done` holds or the time is up. Returns whether it holds.
    fn kick_until(
        &self,
        threads: &[JoinHandle<()>],
        interval: Duration,
        done: impl Fn(&Acks) -> bool,
    ) -> bool {
        let deadline = Instant::now() + ACK_TIMEOUT;
        let mut acks = self.lock();
        loop {
            if done(&acks) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            drop(acks);
            for t in threads.iter().filter(|t| !t.is_finished()) {
                // SAFETY: a thread of ours that has not been joined (its handle is still
                // held), so the id is valid; the signal's handler does nothing.
                unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
            }
            acks = self.lock();
            if done(&acks) {
                return true;
            }
            acks = self
                .changed
                .wait_timeout(acks, interval)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

/// Counts a vCPU thread as exited when it ends, however it ends.
struct ExitAck(Arc<VcpuControl>);

impl Drop for ExitAck {
    fn drop(&mut self) {
        let mut acks = self.0.lock();
        acks.exited += 1;
        self.0.changed.notify_all();
    }
}

thread_local! {
    /// This thread's vCPU's immediate-exit flag, if it is a vCPU thread whose hypervisor has
    /// one (`Vcpu::immediate_exit`); null otherwise.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// Sets this vCPU thread's immediate-exit flag for as long as it lives.
pub(crate) struct ImmediateExit;

impl ImmediateExit {
    pub(crate) fn install(flag: Option<std::ptr::NonNull<u8>>) -> ImmediateExit {
        IMMEDIATE_EXIT.with(|c| c.set(flag.map_or(std::ptr::null_mut(), |p| p.as_ptr())));
        ImmediateExit
    }
}

impl Drop for ImmediateExit {
    fn drop(&mut self) {
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // A kick that lands between the checkpoint and the entry into the guest makes that entry
    // return at once, so one signal is enough on KVM.
    let flag = IMMEDIATE_EXIT.with(|c| c.get());
    if !flag.is_null() {
        // SAFETY: set by this thread from its live vCPU (`ImmediateExit`, dropped before the
        // vCPU); a byte store is async-signal-safe.
        unsafe { flag.write_volatile(1) };
    }
}

/// The signal that kicks vCPU threads out of the guest, registered once per process.
fn kick_signal() -> libc::c_int {
    static SIGNAL: OnceLock<libc::c_int> = OnceLock::new();
    *SIGNAL.get_or_init(|| {
        let signal = vmm_sys_util::signal::SIGRTMIN();
        // Registration only fails for an invalid signal number; SIGRTMIN is valid.
        let _ = vmm_sys_util::signal::register_signal_handler(signal, kick_handler);
        signal
    })
}

/// The vCPU threads of a VM once started.
pub(crate) struct VcpuThreads {
    control: Arc<VcpuControl>,
    handles: Vec<JoinHandle<()>>,
    started: bool,
    kick_interval: Duration,
}

impl Default for VcpuThreads {
    fn default() -> Self {
        VcpuThreads {
            control: Arc::new(VcpuControl::new()),
            handles: Vec::new(),
            started: false,
            kick_interval: KICK_INTERVAL,
        }
    }
}

impl Vm {
    /// Starts the vCPU threads (and the console input thread) and returns at once.
    pub fn start(&mut self) -> Result<()> {
        if self.threads.started {
            return Ok(());
        }
        self.threads.started = true;
        // Registered before any vCPU thread exists, so a kick always finds the handler.
        kick_signal();
        let mut vcpus: Vec<_> = self.vcpus.drain(..).collect();
        if vcpus.iter_mut().all(|v| v.immediate_exit().is_some()) {
            self.threads.kick_interval = KICK_INTERVAL_IMMEDIATE_EXIT;
        }
        self.booted_at = Some(Instant::now());
        crate::event_monitor::emit(
            "vmm",
            "vm_booted",
            serde_json::json!({"vcpus": vcpus.len()}),
        );
        for vcpu in vcpus {
            let ctx = vcpu::VcpuContext {
                io: self.io.clone(),
                mem: self.mem.clone(),
                exit: self.exit.clone(),
                control: self.threads.control.clone(),
            };
            let ack = ExitAck(self.threads.control.clone());
            let handle = seccomp::spawn(
                thread::Builder::new().name(format!("vcpu{}", vcpu.id())),
                seccomp::ThreadKind::Vcpu,
                move || {
                    let _ack = ack;
                    vcpu::run(vcpu, ctx)
                },
            )
            .map_err(|source| Error::Io {
                what: "spawning a vCPU thread",
                source,
            });
            match handle {
                Ok(h) => self.threads.handles.push(h),
                Err(e) => {
                    self.stop();
                    return Err(e);
                }
            }
        }
        if self.forward_stdin {
            let serial: Weak<Mutex<Serial>> = Arc::downgrade(&self.serial);
            seccomp::spawn(
                thread::Builder::new().name("stdin".into()),
                seccomp::ThreadKind::Stdin,
                move || forward_stdin(serial),
            )
            .map_err(|source| Error::Io {
                what: "spawning the console input thread",
                source,
            })?;
        }
        Ok(())
    }

    /// Becomes readable when the guest stops (reset, power-off, an error): poll it, then
    /// call [`Vm::exit_reason`].
    pub fn exit_fd(&self) -> RawFd {
        self.exit.evt.as_raw_fd()
    }

    /// Why the guest stopped, if it has: never blocks (a stale readiness report finds
    /// nothing).
    pub fn exit_reason(&self) -> Option<ExitReason> {
        let mut pfd = libc::pollfd {
            fd: self.exit.evt.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the length given; a zero timeout never blocks.
        let ready = unsafe { libc::poll(&mut pfd, 1, 0) } == 1;
        ready.then(|| self.exit.take())
    }

    /// Blocks until the guest stops.
    pub fn wait(&self) -> ExitReason {
        self.exit.wait()
    }

    /// Parks every vCPU outside the guest. Returns when all are parked (or have exited).
    pub fn pause(&self) -> Result<()> {
        let control = &self.threads.control;
        let n = self.threads.handles.len();
        control.set(PAUSE);
        if control.kick_until(&self.threads.handles, self.threads.kick_interval, |a| {
            a.parked + a.exited >= n
        }) {
            return Ok(());
        }
        control.set(RUN);
        Err(Error::Limit(format!(
            "the vCPUs did not pause within {} s",
            ACK_TIMEOUT.as_secs()
        )))
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        self.threads.control.set(RUN);
    }

    /// Stops every vCPU thread and joins it. Idempotent; also done on drop.
    pub fn stop(&mut self) {
        if self.threads.handles.is_empty() {
            return;
        }
        crate::event_monitor::emit("vmm", "shutdown", serde_json::Value::Null);
        let control = self.threads.control.clone();
        let n = self.threads.handles.len();
        control.set(STOP);
        let all_out = control.kick_until(&self.threads.handles, self.threads.kick_interval, |a| {
            a.exited >= n
        });
        for handle in self.threads.handles.drain(..) {
            if all_out || handle.is_finished() {
                let _ = handle.join();
            } else {
                // Wedged outside the guest (a device call that never returns): joining would
                // hang the VMM. Leave it; it ends with the process.
                log::warn!("vCPU thread {:?} did not stop", handle.thread().name());
            }
        }
    }

    /// The command line the guest received (the configured one, plus what podvmm appended).
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Threads that behave like vCPU threads: a checkpoint, then a long blocking system call
    /// (standing in for KVM_RUN) that only a signal cuts short.
    fn fake_vcpus(control: &Arc<VcpuControl>, n: usize) -> Vec<JoinHandle<()>> {
        kick_signal();
        (0..n)
            .map(|_| {
                let c = control.clone();
                let ack = ExitAck(control.clone());
                thread::spawn(move || {
                    let _ack = ack;
                    while c.checkpoint() {
                        // SAFETY: poll on no descriptors is a plain sleep; EINTR ends it early.
                        unsafe { libc::poll(std::ptr::null_mut(), 0, 10_000) };
                    }
                })
            })
            .collect()
    }

    #[test]
    fn kicks_reach_threads_blocked_outside_user_space_and_none_is_lost() {
        let control = Arc::new(VcpuControl::new());
        let threads = fake_vcpus(&control, 3);
        // Many quick cycles: a kick landing between a checkpoint and the blocking call is
        // lost, and the repeat must catch it (else a pause would take the full 10 s).
        for _ in 0..200 {
            let t = Instant::now();
            control.set(PAUSE);
            assert!(control.kick_until(&threads, KICK_INTERVAL, |a| a.parked == 3));
            assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
            control.set(RUN);
        }
        control.set(STOP);
        assert!(control.kick_until(&threads, KICK_INTERVAL, |a| a.exited == 3));
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn stop_reaches_paused_threads() {
        let control = Arc::new(VcpuControl::new());
        let threads = fake_vcpus(&control, 2);
        control.set(PAUSE);
        assert!(control.kick_until(&threads, KICK_INTERVAL, |a| a.parked == 2));
        control.set(STOP);
        assert!(control.kick_until(&threads, KICK_INTERVAL, |a| a.exited == 2));
        for t in threads {
            t.join().unwrap();
        }
    }
}
