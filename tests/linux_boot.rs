//! Boots the guest kit's Linux kernel and checks, from its console, what the kernel did.
//!
//! Needs the kit (`scripts/build-guest.sh`). Under software-virtualized KVM (PVM) the kernel
//! is emulated instruction by instruction: it takes minutes to reach `/init`, and its user
//! space cannot run at all. The test says which case it met; it never passes silently.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn kit_dir() -> PathBuf {
    std::env::var_os("PODVMM_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/guest"))
}

fn kit_file(name: &str) -> PathBuf {
    let p = kit_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the guest kit first with scripts/build-guest.sh",
        p.display()
    );
    p
}

const RUN_INIT: &str = "Run /init as init process";
const INIT_MARKER: &str = "podvmm-guest: init started";
/// What PVM's missing system-call path looks like: init faults on the kernel's syscall entry.
const PVM_SYSCALL_FAULT: &str = "init[1]: segfault at ffffffff";

#[test]
#[ignore = "boots Linux: minutes under PVM; scripts/test.sh and CI run it with --include-ignored"]
fn linux_boots_two_cpus_to_init() {
    let kernel = kit_file("vmlinux");
    let initramfs = kit_file("initramfs.cpio");
    let dir = TempDir::new("linux");
    let log = dir.path("console.log");
    let serial = format!("file={}", path_str(&log));
    let start = Instant::now();
    let mut child = Command::new(podvmm_bin())
        .args([
            "--kernel",
            path_str(&kernel),
            "--initramfs",
            path_str(&initramfs),
        ])
        .args([
            "--cpus",
            "boot=2",
            "--memory",
            "size=512M",
            "--serial",
            &serial,
        ])
        .args([
            "--cmdline",
            "console=ttyS0 reboot=k podvmm.test=reboot rcupdate.rcu_cpu_stall_suppress=1",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start podvmm");

    // Generous: two guests sharing 2 emulated cores have taken 7 minutes to reach /init.
    let deadline = Duration::from_secs(
        std::env::var("PODVMM_LINUX_TIMEOUT_S")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(900),
    );
    let console = || std::fs::read_to_string(&log).unwrap_or_default();
    let mut reached_init = None;
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll podvmm") {
            break Some(status);
        }
        let text = console();
        if reached_init.is_none() && text.contains(RUN_INIT) {
            reached_init = Some(start.elapsed());
        }
        // After /init: either init runs (its marker) or, under PVM, dies at its first syscall.
        if reached_init.is_some_and(|t| start.elapsed() > t + Duration::from_secs(20))
            || text.contains(PVM_SYSCALL_FAULT)
        {
            break None;
        }
        if start.elapsed() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    if status.is_none() {
        // Still running: a panicked or spinning guest. Stop it; the console says the rest.
        let _ = child.kill();
    }
    let output = child.wait_with_output().expect("collect podvmm");
    let text = console();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let tail: String = text
        .lines()
        .rev()
        .take(25)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    let ctx = format!("podvmm stderr:\n{stderr}\nconsole tail:\n{tail}");

    assert!(
        text.contains("Linux version 6.12"),
        "kernel did not start\n{ctx}"
    );
    assert!(
        text.contains("smp: Brought up 1 node, 2 CPUs"),
        "2 CPUs not up\n{ctx}"
    );
    let t = reached_init.unwrap_or_else(|| panic!("kernel did not reach /init\n{ctx}"));
    eprintln!(
        "linux-boot: exec to '{RUN_INIT}' in {:.1} s (wall)",
        t.as_secs_f64()
    );

    if text.contains(INIT_MARKER) {
        // Hardware-assisted KVM: user space runs, init reboots, podvmm exits 0.
        let status = status.unwrap_or_else(|| panic!("guest did not reboot\n{ctx}"));
        assert!(status.success(), "{status:?}\n{ctx}");
        eprintln!("linux-boot: guest user space ran and rebooted the VM");
    } else if hypervisor::kvm::is_pvm() {
        assert!(
            text.contains(PVM_SYSCALL_FAULT),
            "on PVM /init should die at its first system call; something else happened\n{ctx}"
        );
        eprintln!(
            "linux-boot: NOTE: this host's KVM is PVM (software): guest user space cannot run, \
             /init died at its first system call as expected; the kernel part passed"
        );
    } else {
        panic!("init never started on a hardware-assisted KVM\n{ctx}");
    }
}
