//! The filters stop what they must, let through what they must, on real threads.
//!
//! Each case runs in a child process (this binary again, `child CASE`), because a filter
//! cannot be taken off and a forbidden call ends the process. No test harness: this is a
//! plain program that fails with a non-zero exit.

use std::ffi::CString;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::thread;

use seccomp::{Backend, Mode, ThreadKind, EXIT_FORBIDDEN};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child") {
        child(args.get(2).map(String::as_str).unwrap_or(""));
        std::process::exit(0);
    }
    // Forbidden calls: (case, the system call number the report must name, thread kind).
    let stopped = [
        ("vcpu-socket", libc::SYS_socket, "vcpu"),
        ("vcpu-fork", libc::SYS_clone, "vcpu"),
        ("vcpu-other-ioctl", libc::SYS_ioctl, "vcpu"),
        ("api-open", libc::SYS_openat, "api"),
        ("block-socket", libc::SYS_socket, "block"),
        ("block-new-ring", libc::SYS_io_uring_setup, "block"),
        ("vcpu-new-ring", libc::SYS_io_uring_setup, "vcpu"),
        ("net-open", libc::SYS_openat, "net"),
        ("vsock-inet-socket", libc::SYS_socket, "vsock"),
        ("vmm-exec", libc::SYS_execve, "vmm"),
        ("vmm-kill-other-process", libc::SYS_tgkill, "vmm"),
        ("mshv-vcpu-kvm-ioctl", libc::SYS_ioctl, "vcpu"),
        // Started by the spawner (the caller is filtered): the thread's own filter still holds.
        ("filtered-caller-vcpu-socket", libc::SYS_socket, "vcpu"),
    ];
    let mut failed = 0;
    for (case, nr, kind) in stopped {
        let out = run(case);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let want = format!("forbidden system call {nr} in a thread of kind {kind}");
        // The report names the arguments: here, the ioctl request that was refused.
        let args_named = match case {
            "vcpu-other-ioctl" => stderr.contains(", 0xae01, 0x0)"),
            "mshv-vcpu-kvm-ioctl" => stderr.contains(", 0xae80, 0x0)"),
            _ => stderr.contains(" (arguments 0x"),
        };
        if out.status.code() == Some(EXIT_FORBIDDEN) && stderr.contains(&want) && args_named {
            println!("ok   {case}: stopped ({want})");
        } else {
            println!("FAIL {case}: {:?}, stderr: {stderr}", out.status);
            failed += 1;
        }
    }
    // Allowed work, log mode and off: the child exits 0 after its own checks.
    for case in [
        "allowed",
        "device-ioctls",
        "heap-trim",
        "detached",
        "log",
        "off",
    ] {
        let out = run(case);
        if out.status.success() {
            println!(
                "ok   {case}: {}",
                String::from_utf8_lossy(&out.stdout).trim()
            );
        } else {
            println!(
                "FAIL {case}: {:?} (signal {:?}), stderr: {}",
                out.status,
                out.status.signal(),
                String::from_utf8_lossy(&out.stderr)
            );
            failed += 1;
        }
    }
    // A worker's panic is reported and contained, even with RUST_BACKTRACE set.
    for backtrace in [None, Some("1")] {
        let mut child = Command::new(std::env::current_exe().expect("own path"));
        child
            .args(["child", "worker-panic"])
            .env_remove("RUST_BACKTRACE");
        if let Some(value) = backtrace {
            child.env("RUST_BACKTRACE", value);
        }
        let out = child.output().expect("run the child");
        let backtrace = backtrace.unwrap_or("unset");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let want = "thread 'case' (a vsock thread) panicked at";
        if out.status.success() && stderr.contains(want) && stderr.contains("deliberate") {
            println!(
                "ok   worker-panic (RUST_BACKTRACE={backtrace}): {}",
                String::from_utf8_lossy(&out.stdout).trim()
            );
        } else {
            println!(
                "FAIL worker-panic (RUST_BACKTRACE={backtrace}): {:?}, stderr: {stderr}",
                out.status
            );
            failed += 1;
        }
    }
    if failed > 0 {
        println!("{failed} case(s) failed");
        std::process::exit(1);
    }
}

fn run(case: &str) -> std::process::Output {
    Command::new(std::env::current_exe().expect("own path"))
        .args(["child", case])
        .output()
        .expect("run the child")
}

/// Runs `f` on a thread of `kind` started the way podvmm starts its threads.
fn on_thread<T: Send + 'static>(kind: ThreadKind, f: impl FnOnce() -> T + Send + 'static) -> T {
    seccomp::spawn(thread::Builder::new().name("case".into()), kind, f)
        .expect("spawn")
        .join()
        .expect("join")
}

fn seccomp_status(tid: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("Seccomp:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned()
}

fn inet_socket() -> i32 {
    // SAFETY: creates a socket; the descriptor is leaked on purpose (the process ends).
    unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) }
}

/// io_uring_setup with no flags: a ring whose operations seccomp would never see.
fn new_ring() -> i64 {
    let mut params = [0u8; 120]; // struct io_uring_params
                                 // SAFETY: valid parameters for a 4-entry ring; the descriptor is leaked (the process ends).
    unsafe { libc::syscall(libc::SYS_io_uring_setup, 4, params.as_mut_ptr()) }
}

fn open_file() -> bool {
    std::fs::File::open("/proc/self/status").is_ok()
}

fn child(case: &str) {
    let mode = match case {
        "log" => Mode::Log,
        "off" => Mode::Off,
        _ => Mode::Enforce,
    };
    let backend = if case.starts_with("mshv-") {
        Backend::Mshv
    } else {
        Backend::Kvm
    };
    seccomp::init(mode, backend).expect("init");
    match case {
        "vcpu-socket" => {
            on_thread(ThreadKind::Vcpu, inet_socket);
        }
        "vcpu-fork" => {
            // SAFETY: fork, to be stopped before it returns.
            on_thread(ThreadKind::Vcpu, || unsafe { libc::fork() });
        }
        "vcpu-other-ioctl" => {
            let null = std::fs::File::open("/dev/null").unwrap();
            on_thread(ThreadKind::Vcpu, move || {
                use std::os::fd::AsRawFd;
                // SAFETY: ioctls on /dev/null with no argument: ENOTTY.
                let run = unsafe { libc::ioctl(null.as_raw_fd(), 0xae80, 0) };
                assert_eq!(run, -1, "KVM_RUN on /dev/null is let through, and fails");
                // KVM_CREATE_VM: not a vCPU's business.
                // SAFETY: as above.
                unsafe { libc::ioctl(null.as_raw_fd(), 0xae01, 0) }
            });
        }
        "mshv-vcpu-kvm-ioctl" => {
            let null = std::fs::File::open("/dev/null").unwrap();
            on_thread(ThreadKind::Vcpu, move || {
                use std::os::fd::AsRawFd;
                // With MSHV, any MSHV request passes (type 0xB8: here MSHV_INITIALIZE_PARTITION)
                // neighbourhood) and fails on /dev/null...
                // SAFETY: ioctls on /dev/null with no argument: ENOTTY.
                let mshv = unsafe { libc::ioctl(null.as_raw_fd(), 0xb800, 0) };
                assert_eq!(mshv, -1);
                // ...and a KVM one is stopped.
                // SAFETY: as above.
                unsafe { libc::ioctl(null.as_raw_fd(), 0xae80, 0) }
            });
        }
        "api-open" => {
            on_thread(ThreadKind::Api, open_file);
        }
        "filtered-caller-vcpu-socket" => {
            seccomp::apply(ThreadKind::Vmm).unwrap();
            on_thread(ThreadKind::Vcpu, inet_socket);
        }
        "detached" => {
            // From the unfiltered main thread (started here) and from a filtered one (started
            // by the spawner): the caller does not wait, and the thread runs filtered.
            for filtered_caller in [false, true] {
                if filtered_caller {
                    seccomp::apply(ThreadKind::Vmm).unwrap();
                }
                let (tx, rx) = std::sync::mpsc::channel();
                let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
                seccomp::spawn_detached(
                    thread::Builder::new().name("case".into()),
                    ThreadKind::Api,
                    move || {
                        // SAFETY: gettid has no arguments and cannot fail.
                        let _ = tx.send(unsafe { libc::gettid() });
                        let _ = done_rx.recv();
                    },
                    |e| panic!("the detached thread did not start: {e}"),
                )
                .expect("spawn_detached");
                let tid = rx
                    .recv_timeout(std::time::Duration::from_secs(10))
                    .expect("the detached thread ran");
                assert_eq!(seccomp_status(&tid.to_string()), "2", "thread {tid}");
                let _ = done_tx.send(());
            }
            println!("api threads started without waiting, from both kinds of caller");
        }
        "block-socket" => {
            on_thread(ThreadKind::Block, inet_socket);
        }
        "block-new-ring" => {
            on_thread(ThreadKind::Block, new_ring);
        }
        "vcpu-new-ring" => {
            on_thread(ThreadKind::Vcpu, new_ring);
        }
        "net-open" => {
            on_thread(ThreadKind::Net, open_file);
        }
        "vsock-inet-socket" => {
            on_thread(ThreadKind::Vsock, || {
                // Unix sockets are the muxer's job; IPv4 is not.
                // SAFETY: creates a socket, leaked (the process ends).
                let unix = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
                assert!(unix >= 0);
                inet_socket()
            });
        }
        "vmm-exec" => {
            seccomp::apply(ThreadKind::Vmm).unwrap();
            let path = CString::new("/bin/true").unwrap();
            let argv = [path.as_ptr(), std::ptr::null()];
            // SAFETY: valid NUL-terminated path and argv; stopped before it runs.
            unsafe { libc::execv(path.as_ptr(), argv.as_ptr()) };
        }
        "vmm-kill-other-process" => {
            seccomp::apply(ThreadKind::Vmm).unwrap();
            // SAFETY: signal 0 to pid 1's main thread: only asks whether it exists.
            unsafe { libc::syscall(libc::SYS_tgkill, 1, 1, 0) };
        }
        "allowed" => {
            // A worker, alive while its status is read from outside (it may not open files).
            let (tid_tx, tid_rx) = std::sync::mpsc::channel();
            let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
            let worker = seccomp::spawn(thread::Builder::new(), ThreadKind::Block, move || {
                // SAFETY: gettid has no failure mode.
                let tid = unsafe { libc::gettid() };
                // Allowed: a plain write on a descriptor it holds.
                // SAFETY: writes nothing from a valid (empty) buffer.
                let n = unsafe { libc::write(1, b"".as_ptr().cast(), 0) };
                tid_tx.send((tid, n)).unwrap();
                let _ = done_rx.recv();
            })
            .unwrap();
            let (worker_tid, wrote) = tid_rx.recv().unwrap();
            assert_eq!(wrote, 0);
            let main_tid = std::process::id().to_string();
            let tids: Vec<String> = std::fs::read_dir("/proc/self/task")
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            // The main thread (not filtered yet), the spawner, the worker.
            assert_eq!(tids.len(), 3, "{tids:?}");
            for tid in &tids {
                let want = if *tid == main_tid { "0" } else { "2" };
                assert_eq!(seccomp_status(tid), want, "thread {tid}");
            }
            assert_eq!(seccomp_status(&worker_tid.to_string()), "2");
            done_tx.send(()).unwrap();
            worker.join().unwrap();
            seccomp::apply(ThreadKind::Vmm).unwrap();
            assert!(open_file(), "the VMM thread opens files");
            assert_eq!(seccomp_status(&main_tid), "2");
            println!("main, spawner and a block worker: Seccomp 2 on each");
        }
        "device-ioctls" => {
            // The TAP ioctls a vCPU (device activation) and a net worker (the control
            // queue) make pass the filter (on /dev/null they fail with ENOTTY, untrapped).
            use std::os::fd::AsRawFd;
            let null = std::fs::File::open("/dev/null").unwrap();
            let fd = null.as_raw_fd();
            let calls = |requests: &'static [u64]| {
                move || {
                    for &r in requests {
                        // SAFETY: ioctls on /dev/null with a null argument: ENOTTY.
                        let ret = unsafe { libc::ioctl(fd, r as _, 0) };
                        assert_eq!(ret, -1);
                    }
                }
            };
            const VCPU: &[u64] = &[0xae80, libc::TUNSETOFFLOAD, libc::TUNSETQUEUE];
            const NET: &[u64] = &[libc::TUNSETQUEUE];
            on_thread(ThreadKind::Vcpu, calls(VCPU));
            on_thread(ThreadKind::Net, calls(NET));
            drop(null);
            println!(
                "KVM_RUN, TUNSETOFFLOAD, TUNSETQUEUE from a vCPU; TUNSETQUEUE from a net worker"
            );
        }
        "heap-trim" => {
            // glibc reads /proc/sys/vm/overcommit_memory the first time it shrinks a
            // thread arena's heap: a filtered worker that frees enough memory at once
            // must find that answer already known.
            for kind in [ThreadKind::Vsock, ThreadKind::Block, ThreadKind::Vcpu] {
                on_thread(kind, seccomp::churn_heap);
            }
            println!("vsock, block and vcpu workers grew and trimmed their heaps");
        }
        "worker-panic" => {
            let worker = seccomp::spawn(
                thread::Builder::new().name("case".into()),
                ThreadKind::Vsock,
                || panic!("deliberate"),
            );
            assert!(worker.expect("spawn").join().is_err());
            // The process goes on: the VMM thread can still do its work.
            seccomp::apply(ThreadKind::Vmm).unwrap();
            assert!(open_file());
            println!("reported, and the process went on");
        }
        "log" => {
            let fd = on_thread(ThreadKind::Vcpu, inet_socket);
            assert!(fd >= 0, "log mode lets the call run");
            println!("a forbidden socket() ran and was logged");
        }
        "off" => {
            let fd = on_thread(ThreadKind::Vcpu, inet_socket);
            assert!(fd >= 0);
            let tids = std::fs::read_dir("/proc/self/task").unwrap().count();
            for e in std::fs::read_dir("/proc/self/task").unwrap() {
                let tid = e.unwrap().file_name().into_string().unwrap();
                assert_eq!(seccomp_status(&tid), "0");
            }
            println!("no filters on {tids} threads");
        }
        other => panic!("unknown case {other}"),
    }
}
