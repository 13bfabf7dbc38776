//! What podvmm reads on the guest's console: the moment the kernel starts init (an
//! `init_started` event, for the boot timeline), and known guest failures, so the operator gets
//! one line that says what is wrong instead of a bare kernel panic. The console is the guest's:
//! a guest can print these lines itself, so they feed reports, never decisions.

use devices::serial::LineWatch;

/// The console watcher of a VM; `pvm` enables the PVM syscall check.
pub fn console_watch(pvm: bool) -> LineWatch {
    let mut said_fixup = false;
    let mut said_init = false;
    Box::new(move |line: &[u8]| {
        if !said_init {
            if let Some(init) = init_started(line) {
                said_init = true;
                crate::event_monitor::emit(
                    "guest",
                    "init_started",
                    serde_json::json!({ "init": init }),
                );
            }
        }
        if pvm && !said_fixup && is_syscall_entry_fault(line) {
            said_fixup = true;
            log::error!("{SYSCALL_FIXUP_MISSING}");
            crate::event_monitor::emit(
                "guest",
                "guest_syscall_unsupported",
                serde_json::json!({ "line": String::from_utf8_lossy(line) }),
            );
        }
    })
}

/// The program of the kernel's `Run /init as init process` line (not printed with `quiet`).
pub fn init_started(line: &[u8]) -> Option<String> {
    let line = std::str::from_utf8(line).ok()?;
    let rest = line.split("Run ").nth(1)?;
    let init = rest.strip_suffix(" as init process")?;
    (!init.is_empty() && !init.contains(' ')).then(|| init.to_string())
}

/// The one-line explanation for [`is_syscall_entry_fault`].
pub const SYSCALL_FIXUP_MISSING: &str = "the guest's user space died at its first system call (a \
segfault at the kernel's syscall entry): this host's KVM is PVM, where a 64-bit syscall does not \
reach the guest kernel; the guest kernel needs the guest kit's syscall fix-up \
(resources/kernel-patches/, turned on by the pvm_syscall_fixup parameter podvmm passes), and this \
kernel lacks it or has it turned off";

/// Whether a console line is a user task's segfault on the kernel's syscall entry: the fault
/// address equals the instruction pointer and lies in the kernel's half of the address space.
/// That is what a 64-bit `syscall` does under PVM without the fix-up (e.g.
/// `init[1]: segfault at ffffffff81600040 ip ffffffff81600040 sp 00007ffd... error 15`).
pub fn is_syscall_entry_fault(line: &[u8]) -> bool {
    let Ok(line) = std::str::from_utf8(line) else {
        return false;
    };
    let Some(rest) = line.split("segfault at ").nth(1) else {
        return false;
    };
    let mut words = rest.split_whitespace();
    let (Some(at), Some("ip"), Some(ip)) = (words.next(), words.next(), words.next()) else {
        return false;
    };
    match (u64::from_str_radix(at, 16), u64::from_str_radix(ip, 16)) {
        (Ok(at), Ok(ip)) => at == ip && at >= 0xffff_8000_0000_0000,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_the_start_of_init() {
        assert_eq!(
            init_started(b"[    2.1] Run /init as init process").as_deref(),
            Some("/init")
        );
        assert_eq!(
            init_started(b"Run /sbin/podvmm-agent as init process").as_deref(),
            Some("/sbin/podvmm-agent")
        );
        for other in [&b"Run /init"[..], b"Run  as init process", b"nothing"] {
            assert_eq!(init_started(other), None, "{other:?}");
        }
    }

    #[test]
    fn recognises_the_pvm_syscall_fault_only() {
        let real = b"[   41.2] init[1]: segfault at ffffffff81600040 ip ffffffff81600040 sp 00007ffd1e0 error 15";
        assert!(is_syscall_entry_fault(real));
        // An ordinary user segfault, a kernel address read from user code, garbage.
        for other in [
            &b"sh[70]: segfault at 0 ip 0000000000401000 sp 00007ffd error 4"[..],
            b"a[2]: segfault at ffffffff81000000 ip 0000000000401000 sp 0 error 5",
            b"a[2]: segfault at 401000 ip 401000 sp 0 error 14",
            b"segfault at ffffffff81600040",
            b"segfault at zz ip zz",
            b"\xff\xfe segfault",
        ] {
            assert!(!is_syscall_entry_fault(other), "{other:?}");
        }
    }
}
