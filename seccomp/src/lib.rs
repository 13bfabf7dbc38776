//! podvmm's system call filters: one allow-list per kind of thread (docs/security.md).
//!
//! The process sets them up with [`init`] at start-up (`--seccomp true|false|log`); a
//! thread installs its kind's filter with [`apply`] before it touches guest or client input,
//! and threads are started with [`spawn`], which does that first thing in the new thread.
//!
//! Filters are per thread (no TSYNC), and a thread inherits its parent's filter: a system
//! call must pass both. So that a thread's filter is its own and nothing wider, every thread
//! started by a filtered thread is started by one *spawner* thread, whose filter is the union
//! of all the others (it runs no code but `thread::Builder::spawn`). Otherwise a vCPU thread,
//! which starts a device's worker when the guest activates the device, would need every
//! worker's system calls. The main thread, before its own filter, starts threads itself: they
//! inherit nothing. (Threads that call [`spawn`] are the main thread and threads [`spawn`]
//! started; a thread started otherwise by a filtered one would be taken for the main thread.)
//!
//! With `true`, a forbidden call raises SIGSYS; the handler names the call and the thread
//! on stderr and ends the process with [`EXIT_FORBIDDEN`]. With `log`, the kernel logs
//! the call (audit) and lets it run: the way to find what a new feature needs. Until
//! [`init`] runs (library users, unit tests, fuzzing), [`apply`] does nothing and [`spawn`]
//! is `thread::Builder::spawn`.

mod rules;

use std::cell::Cell;
use std::io;
use std::str::FromStr;
use std::sync::mpsc::{self, Sender};
use std::sync::OnceLock;
use std::thread::{self, JoinHandle};

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

pub use rules::allowed_syscalls;

/// Exit status of a process stopped by a forbidden system call (128 + SIGSYS, as if the
/// signal had killed it).
pub const EXIT_FORBIDDEN: i32 = 128 + libc::SIGSYS;

/// What `--seccomp` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    /// Filters on; a forbidden call stops the process.
    #[default]
    Enforce,
    /// Filters on; a forbidden call is logged by the kernel and allowed.
    Log,
    /// No filters.
    Off,
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "true" => Ok(Mode::Enforce),
            "log" => Ok(Mode::Log),
            "false" => Ok(Mode::Off),
            other => Err(format!(
                "unknown seccomp mode '{other}' (expected true, false or log)"
            )),
        }
    }
}

/// Which hypervisor's ioctls the filters allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Only the KVM ioctls podvmm issues, each on the threads that issue it.
    Kvm,
    /// MSHV: ioctls on the VMM and vCPU threads are not narrowed by request number yet
    /// (no `/dev/mshv` here to prove a list against).
    Mshv,
}

/// The kinds of thread podvmm runs, each with its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The main thread: command line, API requests, VM creation and teardown.
    Vmm,
    /// One per vCPU: KVM_RUN and the device emulation its exits lead to.
    Vcpu,
    /// The REST API's connection threads.
    Api,
    /// A virtio-blk queue worker.
    Block,
    /// A virtio-net queue-pair worker.
    Net,
    /// The virtio-vsock muxer.
    Vsock,
    /// The virtio-rng worker: reads the entropy source into guest buffers.
    Rng,
    /// A virtio-fs device's thread: relays the vhost-user back-end's interrupts, watches its
    /// socket, answers requests itself once the back-end is gone.
    Fs,
    /// Copies the terminal to the serial port.
    Stdin,
    /// Starts every other thread (see [`spawn`]).
    Spawner,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 10] = [
        ThreadKind::Vmm,
        ThreadKind::Vcpu,
        ThreadKind::Api,
        ThreadKind::Block,
        ThreadKind::Net,
        ThreadKind::Vsock,
        ThreadKind::Rng,
        ThreadKind::Fs,
        ThreadKind::Stdin,
        ThreadKind::Spawner,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Api => "api",
            ThreadKind::Block => "block",
            ThreadKind::Net => "net",
            ThreadKind::Vsock => "vsock",
            ThreadKind::Rng => "rng",
            ThreadKind::Fs => "fs",
            ThreadKind::Stdin => "stdin",
            ThreadKind::Spawner => "spawner",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("building the {kind} system call filter: {source}")]
    Build {
        kind: &'static str,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("compiling the {kind} system call filter: {source}")]
    Compile {
        kind: &'static str,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("installing the {kind} system call filter: {source}")]
    Install {
        kind: &'static str,
        #[source]
        source: seccompiler::Error,
    },
    #[error("installing the SIGSYS handler: {0}")]
    Handler(#[source] io::Error),
    #[error("system call filters were already set up")]
    AlreadyInitialized,
    #[error("no {0} system call filter was compiled")]
    Missing(&'static str),
    #[error("starting the spawner thread: {0}")]
    Spawner(#[source] io::Error),
}

type Job = Box<dyn FnOnce() + Send>;

struct State {
    mode: Mode,
    programs: Vec<(ThreadKind, BpfProgram)>,
    /// Where [`spawn`] sends its work when filters are on.
    spawner: Option<Sender<Job>>,
}

static STATE: OnceLock<State> = OnceLock::new();

thread_local! {
    /// The kind of the filter this thread installed, for the SIGSYS report.
    /// Const-initialised: safe to read in a signal handler.
    static CURRENT: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

/// Compiles every kind's filter and, unless `mode` is [`Mode::Off`], arms the SIGSYS
/// handler and starts the spawner thread. Call once, early, while the process has one
/// thread. Filters are compiled here so a bad rule fails at start-up, not when a device
/// starts.
pub fn init(mode: Mode, backend: Backend) -> Result<(), Error> {
    if STATE.get().is_some() {
        return Err(Error::AlreadyInitialized);
    }
    if mode == Mode::Off {
        let _ = STATE.set(State {
            mode,
            programs: Vec::new(),
            spawner: None,
        });
        return Ok(());
    }
    let mismatch = match mode {
        Mode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let mut programs = Vec::new();
    for kind in ThreadKind::ALL {
        programs.push((kind, compile(kind, backend, mismatch.clone())?));
    }
    prepare_process()?;
    if mode == Mode::Enforce {
        install_panic_hook();
    }
    let (tx, rx) = mpsc::channel::<Job>();
    let state = State {
        mode,
        programs,
        spawner: Some(tx),
    };
    if STATE.set(state).is_err() {
        return Err(Error::AlreadyInitialized);
    }
    // Not waited for: the spawner filters itself while the caller goes on building the VM
    // (a thread takes a millisecond or more to start under software virtualization), and
    // work sent to it waits in the channel until it is filtered.
    thread::Builder::new()
        .name("spawner".into())
        .stack_size(64 << 10)
        .spawn(move || {
            // Before any thread that may not open files exists: they all start here.
            HEAP_PREPARED.call_once(churn_heap);
            apply_or_exit(ThreadKind::Spawner);
            for job in rx {
                job();
            }
        })
        .map_err(Error::Spawner)?;
    Ok(())
}

/// Installs `kind`'s filter on this new thread, or ends the process: a thread that cannot be
/// filtered must not run.
fn apply_or_exit(kind: ThreadKind) {
    if let Err(e) = apply(kind) {
        eprintln!("podvmm: error: {e}");
        // SAFETY: ends the process at once; nothing of this thread's state is used.
        unsafe { libc::_exit(1) };
    }
}

/// The BPF program for one kind of thread.
pub fn compile(
    kind: ThreadKind,
    backend: Backend,
    mismatch: SeccompAction,
) -> Result<BpfProgram, Error> {
    let filter = SeccompFilter::new(
        rules::rules(kind, backend).map_err(|source| Error::Build {
            kind: kind.name(),
            source,
        })?,
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|source| Error::Build {
        kind: kind.name(),
        source,
    })?;
    filter.try_into().map_err(|source| Error::Compile {
        kind: kind.name(),
        source,
    })
}

/// Installs `kind`'s filter on the calling thread (a no-op with `--seccomp false` or
/// before [`init`]).
pub fn apply(kind: ThreadKind) -> Result<(), Error> {
    let Some(state) = STATE.get() else {
        return Ok(());
    };
    if state.mode == Mode::Off {
        return Ok(());
    }
    let Some((_, program)) = state.programs.iter().find(|(k, _)| *k == kind) else {
        return Err(Error::Missing(kind.name()));
    };
    seccompiler::apply_filter(program).map_err(|source| Error::Install {
        kind: kind.name(),
        source,
    })?;
    CURRENT.with(|c| c.set(Some(kind)));
    Ok(())
}

/// Starts a thread of `kind` whose first act is to install its filter. With filters on,
/// the spawner thread starts it (see the crate's documentation). A thread whose filter
/// cannot be installed does not run unfiltered: the process ends with an error.
pub fn spawn<F, T>(builder: thread::Builder, kind: ThreadKind, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    match route() {
        Route::Here { prepare_heap } => start_filtered(builder, kind, prepare_heap, f),
        Route::Spawner(_) => setup(move || start_filtered(builder, kind, false, f))?,
    }
}

/// Like [`spawn`], but returns as soon as the spawner has the work, without waiting for the
/// thread to exist: for a thread nobody joins, started on a path that must not wait (an API
/// connection thread starting the next one). If the thread cannot be started, `on_error`
/// runs with the reason (on the spawner thread when filters are on).
pub fn spawn_detached<F, E>(
    builder: thread::Builder,
    kind: ThreadKind,
    f: F,
    on_error: E,
) -> io::Result<()>
where
    F: FnOnce() + Send + 'static,
    E: FnOnce(io::Error) + Send + 'static,
{
    match route() {
        Route::Here { prepare_heap } => {
            if let Err(e) = start_filtered(builder, kind, prepare_heap, f) {
                on_error(e);
            }
            Ok(())
        }
        Route::Spawner(spawner) => {
            let job: Job = Box::new(move || {
                if let Err(e) = start_filtered(builder, kind, false, f) {
                    on_error(e);
                }
            });
            spawner
                .send(job)
                .map_err(|_| io::Error::other("the spawner thread has ended"))
        }
    }
}

/// Where a new thread is started from.
enum Route {
    /// Right here: filters are off, or this thread has none yet (the main thread before its
    /// own), so a child inherits nothing. Such a child may be the first filtered thread to
    /// run, so with filters on (`prepare_heap`) it makes sure the heap's one-time look at
    /// overcommit has happened before its filter goes on.
    Here { prepare_heap: bool },
    /// By the spawner, whose filter is the only one the child inherits.
    Spawner(&'static Sender<Job>),
}

fn route() -> Route {
    match STATE.get().and_then(|s| s.spawner.as_ref()) {
        None => Route::Here {
            prepare_heap: false,
        },
        Some(_) if CURRENT.with(|c| c.get()).is_none() => Route::Here { prepare_heap: true },
        Some(spawner) => Route::Spawner(spawner),
    }
}

fn start_filtered<F, T>(
    builder: thread::Builder,
    kind: ThreadKind,
    prepare_heap: bool,
    f: F,
) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    builder.spawn(move || {
        if prepare_heap {
            HEAP_PREPARED.call_once(churn_heap);
        }
        apply_or_exit(kind);
        f()
    })
}

/// Set once some thread with a malloc arena of its own has run [`churn_heap`] unfiltered.
static HEAP_PREPARED: std::sync::Once = std::sync::Once::new();

/// Runs set-up work that the calling thread's filter forbids, on the spawner thread, and
/// returns its result: a vCPU activating a disk gets its io_uring this way, so neither the
/// vCPU nor the disk's worker may create rings (io_uring's operations are out of seccomp's
/// sight). Runs `f` in place when filters are off.
pub fn setup<T, F>(f: F) -> io::Result<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let Some(spawner) = STATE.get().and_then(|s| s.spawner.as_ref()) else {
        return Ok(f());
    };
    let (tx, rx) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = tx.send(f());
    });
    let gone = || io::Error::other("the spawner thread has ended");
    spawner.send(job).map_err(|_| gone())?;
    rx.recv().map_err(|_| gone())
}

/// What must happen before any filter is on: the SIGSYS handler, and the glibc
/// allocator's one-time look at the number of CPUs (it reads /sys, which no worker may
/// open, the first time some thread needs a new arena).
fn prepare_process() -> Result<(), Error> {
    // The CPUs this process may run on: one sched_getaffinity, where available_parallelism
    // would also open /proc/self/cgroup and the cgroup's quota files, on the way to the
    // first guest instruction.
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for this thread.
    let cpus = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            (libc::CPU_COUNT(&set) as usize).max(1)
        } else {
            1
        }
    };
    // glibc's default on 64-bit: 8 arenas per CPU. Setting it explicitly is what keeps the
    // allocator from counting CPUs later.
    // SAFETY: mallopt only changes allocator tuning.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, (8 * cpus).min(i32::MAX as usize) as i32) };
    // SAFETY: an all-zero sigaction is valid; the fields that matter are set below.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = sigsys_handler as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: installs a handler that only does async-signal-safe work (see below).
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(Error::Handler(io::Error::last_os_error()));
    }
    Ok(())
}

/// Grows the calling thread's malloc heap by 360 KiB, in blocks below the mmap threshold,
/// and frees it newest first, so the top of the heap passes the trim threshold and glibc
/// shrinks the heap.
///
/// The first time a thread arena's heap shrinks, glibc reads `/proc/sys/vm/overcommit_memory`
/// (once per process). Left for later, that open would come from whichever filtered worker
/// first frees enough memory at once, and stop the process; so the spawner, a thread with an
/// arena of its own, runs this before its filter and before it starts any other thread.
/// Public for `tests/enforce.rs`, which runs it on filtered workers.
#[doc(hidden)]
pub fn churn_heap() {
    // Below glibc's mmap threshold (128 KiB), so the blocks come from the heap; together
    // past its trim threshold (128 KiB as well), so freeing them shrinks it.
    const CHURN_BLOCK: usize = 120 << 10;
    const CHURN_BLOCKS: usize = 3;
    // Capacity only: malloc writes its chunk headers and nothing else, so the heap grows
    // without a page fault per 4 KiB (filling the blocks cost about 3 ms of page faults under
    // software virtualization, on the way to the first API answer).
    let blocks: Vec<Vec<u8>> = (0..CHURN_BLOCKS)
        .map(|_| std::hint::black_box(Vec::<u8>::with_capacity(CHURN_BLOCK)))
        .collect();
    for b in blocks.into_iter().rev() {
        drop(std::hint::black_box(b));
    }
}

/// Reports a panic on a filtered thread without what the default hook needs and no filter
/// allows (with `RUST_BACKTRACE` set, it reads the working directory and opens the
/// executable to name the frames): with the default hook, a device worker's panic, which
/// the VM is meant to survive, would stop the process with a report of a forbidden call.
/// Unfiltered threads keep the default hook.
fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let Some(kind) = CURRENT.with(|c| c.get()) else {
            return default(info);
        };
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("Box<dyn Any>");
        let location = info.location().map(|l| l.to_string()).unwrap_or_default();
        let current = thread::current();
        let name = current.name().unwrap_or("<unnamed>");
        eprintln!(
            "\nthread '{name}' (a {} thread) panicked at {location}:\n{msg}\n\
             note: no backtrace on a filtered thread; run with --seccomp log and \
             RUST_BACKTRACE=1 for one",
            kind.name()
        );
    }));
}

/// `siginfo_t` as the kernel fills it for SIGSYS (the libc crate does not expose `_sigsys`).
#[repr(C)]
struct SigsysInfo {
    signo: i32,
    errno: i32,
    code: i32,
    _pad: i32,
    call_addr: *mut libc::c_void,
    syscall: i32,
    arch: u32,
}

const SYS_SECCOMP: i32 = 1;

/// Names the forbidden call and the thread, then ends the process. Async-signal-safe: it
/// formats into a stack buffer and uses write(2) and _exit(2) only, both allowed to every
/// thread.
extern "C" fn sigsys_handler(_sig: i32, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let mut buf = [0u8; 256];
    let mut w = Writer {
        buf: &mut buf,
        len: 0,
    };
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler; SigsysInfo
    // mirrors its SIGSYS layout on x86_64.
    let info = unsafe { &*(info as *const SigsysInfo) };
    w.put(b"podvmm: seccomp: forbidden system call ");
    if info.code == SYS_SECCOMP {
        w.num(info.syscall as i64);
    } else {
        w.put(b"(not from a filter)");
    }
    w.put(b" in a thread of kind ");
    let kind = CURRENT.with(|c| c.get());
    w.put(kind.map_or("unknown", |k| k.name()).as_bytes());
    // The call's first three arguments (an ioctl's request number is the second): the
    // registers as the thread entered the kernel.
    if !ctx.is_null() {
        // SAFETY: for a SA_SIGINFO handler the third argument is the thread's ucontext_t.
        let regs = unsafe { &(*(ctx as *const libc::ucontext_t)).uc_mcontext.gregs };
        w.put(b" (arguments ");
        for (i, reg) in [libc::REG_RDI, libc::REG_RSI, libc::REG_RDX]
            .into_iter()
            .enumerate()
        {
            if i > 0 {
                w.put(b", ");
            }
            w.hex(regs[reg as usize] as u64);
        }
        w.put(b")");
    }
    w.put(b"; stopping (run with --seccomp log to see every such call)\n");
    let len = w.len;
    // SAFETY: writes bytes from a live stack buffer to stderr, then ends the process.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(EXIT_FORBIDDEN);
    }
}

struct Writer<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Writer<'_> {
    fn put(&mut self, s: &[u8]) {
        for &b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn hex(&mut self, n: u64) {
        self.put(b"0x");
        let mut started = false;
        for shift in (0..16).rev() {
            let digit = ((n >> (shift * 4)) & 0xf) as usize;
            if digit != 0 || started || shift == 0 {
                started = true;
                self.put(&[b"0123456789abcdef"[digit]]);
            }
        }
    }

    fn num(&mut self, mut n: i64) {
        if n < 0 {
            self.put(b"-");
            n = -n;
        }
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.put(&digits[i..]);
    }
}

#[cfg(test)]
mod tests;
