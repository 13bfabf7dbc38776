//! Boots the guest kit's Linux kernel and checks, from its console, what the kernel did: 2 CPUs
//! up, `/init` run to its end (it prints its marker and reboots the VM, podvmm exits 0).
//!
//! Under software KVM (PVM) guest kernel code is emulated (a minute or so to `/init`) and user
//! space runs only through the kit kernel's syscall fix-up, which podvmm turns on with
//! `pvm_syscall_fixup`. The second test turns it off (`pvm_syscall_fixup=off`) to check that
//! podvmm then names what is missing in one line instead of leaving a bare kernel panic.
//!
//! Needs the kit (`scripts/build-guest.sh`).

use crate::common;

use std::time::Duration;

use common::linux::*;
use common::*;

const RUN_INIT: &str = "Run /init as init process";
const INIT_MARKER: &str = "podvmm-guest: init started";

#[test]
#[ignore = "boots Linux: minutes under PVM; scripts/test.sh and CI run it with --include-ignored"]
fn linux_boots_two_cpus_to_init() {
    let _one = one_boot_at_a_time();
    let dir = TempDir::new("linux");
    let mut b = Boot::start(
        &dir,
        "boot",
        2,
        &[],
        &format!("{CMDLINE} podvmm.test=reboot"),
    );
    let status = b.wait_exit(deadline());
    let text = b.console();
    let ctx = b.context();
    assert!(
        text.contains("Linux version 6.12"),
        "kernel did not start\n{ctx}"
    );
    assert!(
        text.contains("smp: Brought up 1 node, 2 CPUs"),
        "2 CPUs not up\n{ctx}"
    );
    assert!(text.contains(RUN_INIT), "kernel did not reach /init\n{ctx}");
    assert!(text.contains(INIT_MARKER), "/init did not run\n{ctx}");
    assert!(
        text.contains("podvmm-guest: reboot"),
        "/init did not get to its end\n{ctx}"
    );
    assert!(status.success(), "{status:?}\n{ctx}");
    let init = b.event("init_started").expect("init_started event");
    assert_eq!(init["properties"]["init"], "/init");
    eprintln!(
        "linux-boot: /init ran and rebooted the VM after {:.1} s; {}",
        b.started.elapsed().as_secs_f64(),
        b.breakdown()
    );
}

#[test]
#[ignore = "boots Linux: minutes under PVM; scripts/test.sh and CI run it with --include-ignored"]
fn without_the_syscall_fixup_podvmm_says_what_is_missing() {
    let _one = one_boot_at_a_time();
    let dir = TempDir::new("linux-nofixup");
    let mut b = Boot::start(
        &dir,
        "nofixup",
        1,
        &[],
        &format!("{CMDLINE} podvmm.test=reboot pvm_syscall_fixup=off"),
    );
    if !hypervisor::kvm::is_pvm() {
        // Hardware KVM: system calls work without any fix-up; init runs to its end.
        let status = b.wait_exit(deadline());
        assert!(status.success(), "{status:?}\n{}", b.context());
        assert!(b.console().contains(INIT_MARKER), "{}", b.context());
        eprintln!("linux-boot: hardware KVM: no fix-up needed, init ran");
        return;
    }
    b.wait_for("podvmm's one-line explanation", deadline(), |b| {
        b.stderr().contains("died at its first system call")
    });
    let err = b.stderr();
    let line = err
        .lines()
        .find(|l| l.contains("died at its first system call"))
        .unwrap_or_default();
    assert!(line.contains("resources/kernel-patches"), "{line}");
    assert_eq!(
        err.matches("died at its first system call").count(),
        1,
        "said more than once:\n{err}"
    );
    let ev = b
        .event("guest_syscall_unsupported")
        .unwrap_or_else(|| panic!("no guest_syscall_unsupported event\n{}", b.context()));
    assert!(
        ev["properties"]["line"]
            .as_str()
            .is_some_and(|l| l.contains("segfault at ffffffff")),
        "{ev}"
    );
    // init died, the kernel panicked, panic=-1 reset the VM: podvmm ends by itself.
    let status = b.wait_exit(Duration::from_secs(120));
    assert!(status.success(), "{status:?}\n{}", b.context());
    eprintln!("linux-boot: PVM without the fix-up: {line}");
}
