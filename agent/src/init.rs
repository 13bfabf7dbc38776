//! What the agent does when it is the guest's init (PID 1): mount the kernel file systems,
//! and supervise the agent in a child process while reaping every orphan.

use std::ffi::CString;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("mounting {fstype} on {target}: {source}")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("fork: {0}")]
    Fork(#[source] std::io::Error),
}

/// The file systems a guest agent needs.
pub const MOUNTS: &[(&str, &str, &str)] = &[
    ("proc", "/proc", "proc"),
    ("sysfs", "/sys", "sysfs"),
    ("devtmpfs", "/dev", "devtmpfs"),
];

/// Mounts proc, sysfs and devtmpfs; one already mounted there is fine.
pub fn mount_basics() -> Vec<InitError> {
    let mut errors = Vec::new();
    for &(source, target, fstype) in MOUNTS {
        let _ = std::fs::create_dir_all(target);
        let (Ok(src), Ok(tgt), Ok(fs)) = (
            CString::new(source),
            CString::new(target),
            CString::new(fstype),
        ) else {
            continue;
        };
        // SAFETY: the strings are NUL-terminated and outlive the call; no data argument.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                tgt.as_ptr(),
                fs.as_ptr(),
                libc::MS_NOSUID | libc::MS_NOEXEC,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EBUSY) {
                errors.push(InitError::Mount {
                    fstype,
                    target,
                    source: e,
                });
            }
        }
    }
    errors
}

/// PID 1's life: run `agent` in a child, reap every process that ends (orphans are ours),
/// restart the agent if it dies. Never returns; PID 1 must not exit.
pub fn supervise(agent: impl Fn() -> i32) -> ! {
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = Instant::now();
        // SAFETY: PID 1 stays single-threaded (threads exist only in the child), so fork is
        // sound here; the child runs the agent and never returns into this loop.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let code = agent();
            std::process::exit(code);
        }
        if pid < 0 {
            eprintln!(
                "podvmm-agent: {}",
                InitError::Fork(std::io::Error::last_os_error())
            );
        } else {
            loop {
                let mut status = 0;
                // SAFETY: waitpid with a valid pointer to an int.
                let w = unsafe { libc::waitpid(-1, &mut status, 0) };
                if w == pid {
                    eprintln!("podvmm-agent: the agent process ended (wait status {status:#x}); restarting it");
                    break;
                }
                if w < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.raw_os_error() == Some(libc::ECHILD) {
                        break;
                    }
                }
            }
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(100);
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
