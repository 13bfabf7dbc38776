//! The allow-lists. Each kind of thread gets the base set (what Rust's runtime and glibc do
//! in any thread: memory, futexes, signals, thread exit) plus what its own code calls.
//! Found by running the whole test suite with the filters on; `--seccomp log` shows what a
//! change needs.

use std::collections::BTreeMap;
use std::mem::size_of;

use kvm_bindings::{
    kvm_cpuid2, kvm_fpu, kvm_ioeventfd, kvm_irqfd, kvm_lapic_state, kvm_msrs, kvm_pit_config,
    kvm_regs, kvm_sregs, kvm_translation, kvm_userspace_memory_region, kvm_vcpu_events,
};
use libc::c_long;
use seccompiler::{
    BackendError, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond,
    SeccompRule,
};

use crate::{Backend, ThreadKind};

pub(crate) type Rules = BTreeMap<i64, Vec<SeccompRule>>;

const IOC_NONE: u64 = 0;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

/// A KVM ioctl request number (`_IOC(dir, KVMIO, nr, size)`).
pub(crate) const fn kvm(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (0xAE << 8) | nr
}

const KVM_GET_API_VERSION: u64 = kvm(IOC_NONE, 0x00, 0);
const KVM_CREATE_VM: u64 = kvm(IOC_NONE, 0x01, 0);
const KVM_CHECK_EXTENSION: u64 = kvm(IOC_NONE, 0x03, 0);
const KVM_GET_VCPU_MMAP_SIZE: u64 = kvm(IOC_NONE, 0x04, 0);
const KVM_GET_SUPPORTED_CPUID: u64 = kvm(IOC_READ | IOC_WRITE, 0x05, size_of::<kvm_cpuid2>());
const KVM_CREATE_VCPU: u64 = kvm(IOC_NONE, 0x41, 0);
const KVM_SET_USER_MEMORY_REGION: u64 =
    kvm(IOC_WRITE, 0x46, size_of::<kvm_userspace_memory_region>());
const KVM_SET_TSS_ADDR: u64 = kvm(IOC_NONE, 0x47, 0);
const KVM_CREATE_IRQCHIP: u64 = kvm(IOC_NONE, 0x60, 0);
const KVM_IRQFD: u64 = kvm(IOC_WRITE, 0x76, size_of::<kvm_irqfd>());
const KVM_CREATE_PIT2: u64 = kvm(IOC_WRITE, 0x77, size_of::<kvm_pit_config>());
const KVM_IOEVENTFD: u64 = kvm(IOC_WRITE, 0x79, size_of::<kvm_ioeventfd>());
pub(crate) const KVM_RUN: u64 = kvm(IOC_NONE, 0x80, 0);
const KVM_GET_REGS: u64 = kvm(IOC_READ, 0x81, size_of::<kvm_regs>());
const KVM_SET_REGS: u64 = kvm(IOC_WRITE, 0x82, size_of::<kvm_regs>());
const KVM_GET_SREGS: u64 = kvm(IOC_READ, 0x83, size_of::<kvm_sregs>());
const KVM_SET_SREGS: u64 = kvm(IOC_WRITE, 0x84, size_of::<kvm_sregs>());
const KVM_TRANSLATE: u64 = kvm(IOC_READ | IOC_WRITE, 0x85, size_of::<kvm_translation>());
const KVM_SET_MSRS: u64 = kvm(IOC_WRITE, 0x89, size_of::<kvm_msrs>());
const KVM_SET_FPU: u64 = kvm(IOC_WRITE, 0x8d, size_of::<kvm_fpu>());
const KVM_GET_LAPIC: u64 = kvm(IOC_READ, 0x8e, size_of::<kvm_lapic_state>());
const KVM_SET_LAPIC: u64 = kvm(IOC_WRITE, 0x8f, size_of::<kvm_lapic_state>());
const KVM_SET_CPUID2: u64 = kvm(IOC_WRITE, 0x90, size_of::<kvm_cpuid2>());
const KVM_GET_VCPU_EVENTS: u64 = kvm(IOC_READ, 0x9f, size_of::<kvm_vcpu_events>());
const KVM_SET_VCPU_EVENTS: u64 = kvm(IOC_WRITE, 0xa0, size_of::<kvm_vcpu_events>());

/// The type byte of every MSHV ioctl (`MSHV_IOCTL`).
const MSHV_IOCTL_TYPE: u64 = 0xb8;

/// What the VMM thread asks of KVM: creating and configuring the VM and its vCPUs.
const KVM_VMM_IOCTLS: &[u64] = &[
    KVM_GET_API_VERSION,
    KVM_CREATE_VM,
    KVM_CHECK_EXTENSION,
    KVM_GET_VCPU_MMAP_SIZE,
    KVM_GET_SUPPORTED_CPUID,
    KVM_CREATE_VCPU,
    KVM_SET_USER_MEMORY_REGION,
    KVM_SET_TSS_ADDR,
    KVM_CREATE_IRQCHIP,
    KVM_IRQFD,
    KVM_CREATE_PIT2,
    KVM_IOEVENTFD,
    KVM_GET_REGS,
    KVM_SET_REGS,
    KVM_GET_SREGS,
    KVM_SET_SREGS,
    KVM_SET_MSRS,
    KVM_SET_FPU,
    KVM_GET_LAPIC,
    KVM_SET_LAPIC,
    KVM_SET_CPUID2,
];

/// What a vCPU thread asks of KVM: running, and completing what KVM's emulator gave up on.
const KVM_VCPU_IOCTLS: &[u64] = &[
    KVM_RUN,
    KVM_GET_REGS,
    KVM_SET_REGS,
    KVM_GET_SREGS,
    KVM_TRANSLATE,
    KVM_GET_VCPU_EVENTS,
    KVM_SET_VCPU_EVENTS,
];

/// TAP set-up on the VMM thread: the TUN device, and the interface's address, flags and
/// MAC through a socket.
const TAP_SETUP_IOCTLS: &[u64] = &[
    libc::TUNSETIFF,
    libc::TUNGETIFF,
    libc::TUNSETVNETHDRSZ,
    libc::TUNSETOFFLOAD,
    libc::TUNSETQUEUE,
    libc::SIOCETHTOOL,
    libc::SIOCGIFHWADDR,
    libc::SIOCGIFFLAGS,
    libc::SIOCSIFFLAGS,
    libc::SIOCSIFADDR,
    libc::SIOCSIFNETMASK,
];

/// The base set: memory, futexes, signals, time, thread exit, plain reads and writes on
/// descriptors the thread already holds.
const BASE: &[c_long] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_gettid,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_restart_syscall,
    libc::SYS_getrandom,
    libc::SYS_fcntl,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

struct Builder {
    rules: Rules,
}

impl Builder {
    fn new() -> Self {
        let mut b = Builder {
            rules: Rules::new(),
        };
        b.allow(BASE);
        b
    }

    /// Allows each call whatever its arguments.
    fn allow(&mut self, calls: &[c_long]) {
        for &call in calls {
            self.rules.insert(call, Vec::new());
        }
    }

    /// Allows `call` when argument `arg` is one of `values` (adds to what is allowed already;
    /// a call already allowed whatever its arguments stays so).
    fn allow_arg(&mut self, call: c_long, arg: u8, values: &[u64]) -> Result<(), BackendError> {
        if self.rules.get(&call).is_some_and(Vec::is_empty) {
            return Ok(());
        }
        let mut new = Vec::new();
        for &v in values {
            new.push(SeccompRule::new(vec![Cond::new(
                arg,
                Len::Dword,
                Op::Eq,
                v,
            )?])?);
        }
        if new.is_empty() {
            return Ok(());
        }
        self.rules.entry(call).or_default().extend(new);
        Ok(())
    }

    fn ioctls(&mut self, requests: &[u64]) -> Result<(), BackendError> {
        self.allow_arg(libc::SYS_ioctl, 1, requests)
    }

    fn hypervisor_ioctls(&mut self, backend: Backend, kvm: &[u64]) -> Result<(), BackendError> {
        match backend {
            Backend::Kvm => self.ioctls(kvm),
            // Any MSHV request (type byte 0xB8), no other device's: the exact list could not
            // be proven without /dev/mshv.
            Backend::Mshv => {
                if self.rules.get(&libc::SYS_ioctl).is_some_and(Vec::is_empty) {
                    return Ok(());
                }
                let mshv = Cond::new(1, Len::Dword, Op::MaskedEq(0xff00), MSHV_IOCTL_TYPE << 8)?;
                self.rules
                    .entry(libc::SYS_ioctl)
                    .or_default()
                    .push(SeccompRule::new(vec![mshv])?);
                Ok(())
            }
        }
    }
}

/// The rules for one kind of thread.
pub(crate) fn rules(kind: ThreadKind, backend: Backend) -> Result<Rules, BackendError> {
    let mut b = Builder::new();
    match kind {
        ThreadKind::Vmm => {
            b.allow(&[
                // Files: kernel, initramfs, disks, serial log, /dev/kvm, /dev/net/tun,
                // /proc/meminfo; the vsock socket's stale file.
                libc::SYS_openat,
                libc::SYS_newfstatat,
                libc::SYS_statx,
                libc::SYS_lseek,
                libc::SYS_pread64,
                libc::SYS_unlink,
                libc::SYS_chmod,
                libc::SYS_fchmod,
                // Shared guest memory (`memory.shared`): a memfd sized to the guest's RAM.
                libc::SYS_memfd_create,
                libc::SYS_ftruncate,
                // Naming who holds a locked disk image: /proc/<pid>/fd listed.
                libc::SYS_getdents64,
                // Event loop and device plumbing (vsock's timer is made with its device).
                libc::SYS_poll,
                libc::SYS_epoll_create1,
                libc::SYS_epoll_ctl,
                libc::SYS_epoll_wait,
                libc::SYS_eventfd2,
                libc::SYS_timerfd_create,
                // Probing for io_uring with opcode restrictions (a disk's rings are made
                // the same way, by the spawner).
                libc::SYS_io_uring_setup,
                libc::SYS_io_uring_register,
                // A virtio-fs back-end's negotiation (vhost-user, at vm.boot).
                libc::SYS_sendmsg,
                libc::SYS_recvmsg,
                // vsock's listening socket.
                libc::SYS_bind,
                libc::SYS_listen,
                libc::SYS_connect,
                libc::SYS_setsockopt,
                libc::SYS_getpid,
                libc::SYS_rt_sigaction,
            ]);
            // Unix sockets (vsock), and one IPv4 socket to set a TAP's address.
            b.allow_arg(
                libc::SYS_socket,
                0,
                &[libc::AF_UNIX as u64, libc::AF_INET as u64],
            )?;
            // Kicking vCPU threads out of KVM_RUN: only this process's threads.
            // SAFETY: getpid has no failure mode.
            let pid = unsafe { libc::getpid() } as u64;
            b.allow_arg(libc::SYS_tgkill, 0, &[pid])?;
            b.hypervisor_ioctls(backend, KVM_VMM_IOCTLS)?;
            b.ioctls(TAP_SETUP_IOCTLS)?;
            b.ioctls(&[libc::TCGETS, libc::FIONBIO])?;
        }
        ThreadKind::Vcpu => {
            b.hypervisor_ioctls(backend, KVM_VCPU_IOCTLS)?;
            // A device's activation runs on the vCPU that wrote DRIVER_OK: its eventfds and
            // the TAP's offloads. Its threads and io_urings are made by the spawner thread
            // (`spawn`, `setup`), not here.
            b.allow(&[libc::SYS_eventfd2]);
            // The TAP's offloads, and which queues of a multi-queue TAP carry frames.
            b.ioctls(&[libc::TUNSETOFFLOAD, libc::TUNSETQUEUE])?;
        }
        ThreadKind::Api => {
            b.allow(&[
                libc::SYS_accept4,
                libc::SYS_recvfrom,
                libc::SYS_recvmsg,
                libc::SYS_sendto,
                libc::SYS_setsockopt,
                libc::SYS_poll,
                // Closing an idle connection to make room for a new client (http/registry.rs).
                libc::SYS_shutdown,
            ]);
            b.ioctls(&[libc::FIONBIO])?;
        }
        ThreadKind::Block => {
            b.allow(&[
                // io_uring, the default engine: one call submits, waits and reaps.
                libc::SYS_io_uring_enter,
                // The synchronous engine (kernels without io_uring), waiting in epoll.
                libc::SYS_preadv,
                libc::SYS_pwritev,
                libc::SYS_fdatasync,
                libc::SYS_fallocate,
                libc::SYS_epoll_create1,
                libc::SYS_epoll_ctl,
                libc::SYS_epoll_wait,
            ]);
        }
        ThreadKind::Net => {
            b.allow(&[
                libc::SYS_readv,
                libc::SYS_writev,
                libc::SYS_epoll_create1,
                libc::SYS_epoll_ctl,
                libc::SYS_epoll_wait,
            ]);
            // The control queue's VQ_PAIRS_SET attaches and detaches TAP queues.
            b.ioctls(&[libc::TUNSETQUEUE])?;
        }
        ThreadKind::Vsock => {
            b.allow(&[
                libc::SYS_accept4,
                libc::SYS_connect,
                libc::SYS_recvfrom,
                libc::SYS_sendto,
                libc::SYS_shutdown,
                libc::SYS_epoll_create1,
                libc::SYS_epoll_ctl,
                libc::SYS_epoll_wait,
                // Its timer, armed for the nearest deadline after each pass.
                libc::SYS_timerfd_settime,
            ]);
            b.allow_arg(libc::SYS_socket, 0, &[libc::AF_UNIX as u64])?;
            b.ioctls(&[libc::FIONBIO])?;
        }
        // Reads the entropy source (the base set's read) and waits on its queue.
        ThreadKind::Rng => {
            b.allow(&[
                libc::SYS_epoll_create1,
                libc::SYS_epoll_ctl,
                libc::SYS_epoll_wait,
            ]);
        }
        // vhost-user messages (with descriptors) to the back-end: the vrings at activation,
        // their return at a reset; and its event loop.
        ThreadKind::Fs => {
            b.allow(&[
                libc::SYS_sendmsg,
                libc::SYS_recvmsg,
                libc::SYS_epoll_create1,
                libc::SYS_epoll_ctl,
                libc::SYS_epoll_wait,
            ]);
        }
        // Reads the terminal, locks the serial port, raises its interrupt: the base set.
        ThreadKind::Stdin => {}
        ThreadKind::Spawner => {
            // Starts every other thread, so it must allow what each of them does before
            // its own filter is on (glibc's and Rust's thread start-up), and what any of
            // them does after (a filter only narrows the one it stacks on).
            b.allow(&[
                libc::SYS_clone3,
                libc::SYS_set_robust_list,
                libc::SYS_rseq,
                libc::SYS_seccomp,
            ]);
            b.allow_arg(
                libc::SYS_prctl,
                0,
                &[libc::PR_SET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64],
            )?;
            for other in ThreadKind::ALL {
                if other != ThreadKind::Spawner {
                    b.merge(rules(other, backend)?);
                }
            }
        }
    }
    Ok(b.rules)
}

impl Builder {
    /// Allows what `other` allows too.
    fn merge(&mut self, other: Rules) {
        for (call, rules) in other {
            if rules.is_empty() {
                self.rules.insert(call, Vec::new());
            } else if !self.rules.get(&call).is_some_and(Vec::is_empty) {
                let mine = self.rules.entry(call).or_default();
                for rule in rules {
                    if !mine.contains(&rule) {
                        mine.push(rule);
                    }
                }
            }
        }
    }
}

/// The system calls a kind of thread may make (some only with certain arguments), by
/// number, for the documentation and tests.
pub fn allowed_syscalls(kind: ThreadKind, backend: Backend) -> Vec<i64> {
    rules(kind, backend)
        .map(|r| r.keys().copied().collect())
        .unwrap_or_default()
}
