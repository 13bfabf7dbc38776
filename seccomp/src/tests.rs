use super::*;
use crate::rules::KVM_RUN;

#[test]
fn every_kind_compiles_for_both_backends() {
    for backend in [Backend::Kvm, Backend::Mshv] {
        for kind in ThreadKind::ALL {
            let prog = compile(kind, backend, SeccompAction::Trap).unwrap();
            println!(
                "{backend:?} {:8} {:3} system calls, {:4} BPF instructions",
                kind.name(),
                allowed_syscalls(kind, backend).len(),
                prog.len()
            );
            // The kernel takes at most 4096 instructions per filter.
            assert!(prog.len() < 4096, "{kind:?}: {} instructions", prog.len());
        }
    }
}

#[test]
fn ioctl_numbers_match_the_kernel_headers() {
    assert_eq!(KVM_RUN, 0xae80);
    assert_eq!(rules::kvm(1, 0x82, size_of_regs()), 0x4090_ae82); // KVM_SET_REGS
    assert_eq!(
        rules::kvm(
            1,
            0x46,
            std::mem::size_of::<kvm_bindings::kvm_userspace_memory_region>()
        ),
        0x4020_ae46
    );
    assert_eq!(
        rules::kvm(3, 0x05, std::mem::size_of::<kvm_bindings::kvm_cpuid2>()),
        0xc008_ae05
    );
}

fn size_of_regs() -> usize {
    std::mem::size_of::<kvm_bindings::kvm_regs>()
}

#[test]
fn workers_get_less_than_the_vmm_thread() {
    let vmm = allowed_syscalls(ThreadKind::Vmm, Backend::Kvm);
    let spawner = allowed_syscalls(ThreadKind::Spawner, Backend::Kvm);
    for kind in ThreadKind::ALL {
        let mine = allowed_syscalls(kind, Backend::Kvm);
        // The spawner's filter is under every thread's: it must allow all they do.
        assert!(mine.iter().all(|c| spawner.contains(c)), "{kind:?}");
    }
    for kind in [
        ThreadKind::Vcpu,
        ThreadKind::Api,
        ThreadKind::Net,
        ThreadKind::Rng,
        ThreadKind::Stdin,
    ] {
        let mine = allowed_syscalls(kind, Backend::Kvm);
        assert!(mine.len() < vmm.len(), "{kind:?}: {}", mine.len());
        for forbidden in [
            libc::SYS_openat,
            libc::SYS_execve,
            libc::SYS_clone,
            libc::SYS_socket,
        ] {
            assert!(!mine.contains(&forbidden), "{kind:?} may call {forbidden}");
        }
    }
    // Nobody execs, forks, traces or mounts.
    for forbidden in [
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_fork,
        libc::SYS_vfork,
        libc::SYS_clone,
        libc::SYS_ptrace,
        libc::SYS_mount,
        libc::SYS_process_vm_writev,
    ] {
        assert!(!spawner.contains(&forbidden), "{forbidden}");
    }
}

#[test]
fn modes_parse() {
    assert_eq!("true".parse(), Ok(Mode::Enforce));
    assert_eq!("log".parse(), Ok(Mode::Log));
    assert_eq!("false".parse(), Ok(Mode::Off));
    assert!("on"
        .parse::<Mode>()
        .unwrap_err()
        .contains("true, false or log"));
}

#[test]
fn the_sigsys_report_formats_numbers() {
    let mut buf = [0u8; 32];
    let mut w = Writer {
        buf: &mut buf,
        len: 0,
    };
    w.num(0);
    w.put(b" ");
    w.num(-41);
    w.put(b" ");
    w.num(i64::from(i32::MAX));
    let len = w.len;
    assert_eq!(&buf[..len], b"0 -41 2147483647");
}
