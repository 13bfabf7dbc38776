//! System call filters on a running `podvmm`: every thread carries one (`Seccomp: 2` in
//! /proc), in API-only mode and with a VM whose devices are busy; `--seccomp false` turns
//! them off; a bad value is a usage error. (The filters stopping forbidden calls is proven
//! in `seccomp/tests/enforce.rs`; that the whole suite passes with them on, by the suite.)

use crate::api_support;
use crate::common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use api_support::*;
use common::testguest::{
    first_mismatch, pattern_disk, testguest, testguest_command, GuestRun, Netns, DISK_KEY,
    GUEST_IP, GUEST_MAC, HOST_IP,
};
use common::*;

/// Thread name → Seccomp field, for every thread of `pid` now.
fn thread_filters(pid: u32) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue; // the thread ended while we looked
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        if field("State:").starts_with('Z') {
            continue; // exited, not yet reaped: nothing runs there
        }
        out.entry(field("Name:"))
            .or_default()
            .push(field("Seccomp:"));
    }
    out
}

fn print_threads(what: &str, threads: &BTreeMap<String, Vec<String>>) {
    let list: Vec<String> = threads
        .iter()
        .map(|(name, v)| format!("{name} x{} (Seccomp {})", v.len(), v.join(",")))
        .collect();
    println!("{what}: {}", list.join("; "));
}

fn assert_all(threads: &BTreeMap<String, Vec<String>>, want: &str) {
    for (name, values) in threads {
        assert!(
            values.iter().all(|v| v == want),
            "thread {name}: Seccomp {values:?}, expected {want}"
        );
    }
}

#[test]
fn every_thread_is_filtered_in_api_only_mode() {
    let dir = TempDir::new("seccomp-api");
    let server = Server::start(&dir, &[]);
    // A request served, so the connection threads have done real work.
    assert_eq!(server.call("GET", "vmm.ping", None).status, 200);
    let threads = thread_filters(server.child.id());
    print_threads("api-only", &threads);
    for name in ["podvmm", "spawner", "api-conn"] {
        assert!(threads.contains_key(name), "no {name} thread: {threads:?}");
    }
    assert_all(&threads, "2");
}

#[test]
fn seccomp_false_turns_the_filters_off() {
    let dir = TempDir::new("seccomp-off");
    let server = Server::start(&dir, &["--seccomp", "false"]);
    assert_eq!(server.call("GET", "vmm.ping", None).status, 200);
    let threads = thread_filters(server.child.id());
    print_threads("--seccomp false", &threads);
    assert!(!threads.contains_key("spawner"));
    assert_all(&threads, "0");
}

#[test]
fn a_bad_seccomp_value_is_a_usage_error() {
    let out = run_podvmm(&["--api-socket", "/tmp/never.sock", "--seccomp", "on"], 10);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("true, false or log"), "{stderr}");
}

/// The test guest reading its disk for two seconds and pinging the host through a
/// multi-queue TAP for one, with a vsock device too (in a network namespace of its own: root and iproute2):
/// while it runs, every thread (main, spawner, vCPU, the disk's queue workers, the network
/// queue pair's worker, vsock) is sampled.
#[test]
fn every_thread_is_filtered_while_devices_work() {
    let dir = TempDir::new("seccomp-vm");
    let disk = dir.path("disk.img");
    pattern_disk(&disk, 8 << 20);
    let vsock = dir.path("vsock.sock");
    let ns = Netns::new("seccomp");
    // `ip netns exec` execs podvmm in place: the child's pid is podvmm's.
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(podvmm_bin())
        .arg("--kernel")
        .arg(testguest())
        .args(["--memory", "size=256M", "--serial", "tty", "--cmdline"])
        .arg(format!(
            "testguest.run=blk,net testguest.blk_ms=2000 testguest.blk_qd=8 \
             testguest.net_ip={GUEST_IP} testguest.net_host={HOST_IP} testguest.net_ms=1000"
        ))
        .arg("--disk")
        .arg(format!("path={},num_queues=2", path_str(&disk)))
        .arg("--vsock")
        .arg(format!("cid=3,socket={}", path_str(&vsock)))
        .arg("--net")
        .arg(format!(
            "tap=scmp0,mac={GUEST_MAC},ip={HOST_IP},mask=255.255.255.0,num_queues=4"
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn podvmm");
    let pid = child.id();
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut samples = 0;
    while child.try_wait().expect("poll podvmm").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the guest did not finish in 60 s");
        }
        let now = thread_filters(pid);
        // Until the guest runs, the process is still starting (the main thread installs
        // its filter after parsing the command line, before it reads any input).
        if !now.contains_key("vcpu0") {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        samples += 1;
        for (name, values) in now {
            seen.entry(name).or_default().extend(values);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let run = GuestRun::from_output(child.wait_with_output().expect("wait for podvmm"));
    run.assert_passed("blk");
    run.assert_passed("net");
    for values in seen.values_mut() {
        values.sort();
        values.dedup();
    }
    print_threads(&format!("with a VM ({samples} samples)"), &seen);
    for name in [
        "podvmm",
        "spawner",
        "vcpu0",
        "vsock",
        "blk-disk0-q0",
        "blk-disk0-q1",
    ] {
        assert!(seen.contains_key(name), "no {name} thread seen: {seen:?}");
    }
    assert_all(&seen, "2");
}

/// A pseudo-terminal's two ends: podvmm forwards its stdin to the serial port (on a `stdin`
/// thread) only when stdin is a terminal.
fn open_pty() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    // SAFETY: posix_openpt returns a new descriptor or -1 (checked); grantpt/unlockpt act on
    // it; ptsname's result is copied before any other call.
    unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        assert!(
            master >= 0,
            "posix_openpt: {}",
            std::io::Error::last_os_error()
        );
        assert_eq!(libc::grantpt(master), 0);
        assert_eq!(libc::unlockpt(master), 0);
        let name = std::ffi::CStr::from_ptr(libc::ptsname(master))
            .to_string_lossy()
            .into_owned();
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&name)
            .expect("open the terminal's slave end");
        (std::fs::File::from_raw_fd(master), slave)
    }
}

#[test]
fn the_console_input_thread_is_filtered_and_forwards_keys() {
    use std::io::Write;
    let dir = TempDir::new("seccomp-tty");
    let kernel = dir.write("hold.elf", &pvh_elf(&hold_guest_code()));
    let (mut master, slave) = open_pty();
    let mut child = Command::new(podvmm_bin())
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory", "size=64M", "--serial", "tty"])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn podvmm");
    drop(slave);
    let deadline = Instant::now() + Duration::from_secs(20);
    let threads = loop {
        let now = thread_filters(child.id());
        if now.contains_key("stdin") && now.contains_key("vcpu0") {
            break now;
        }
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            panic!("no stdin thread: {now:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // Keys reach the filtered thread, which hands them to the serial port.
    master.write_all(b"hello\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let alive = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    print_threads("with a terminal", &threads);
    assert!(
        alive,
        "podvmm stopped after input: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_all(&threads, "2");
}

/// Runs the test guest with `cmdline` and a 2-queue disk at `disk`, in a podvmm started under
/// an outer filter that answers `io_uring_setup` with ENOSYS, as a kernel without io_uring
/// does: podvmm falls back to the synchronous block engine, under its own filters.
fn run_without_io_uring(cmdline: &str, disk: &std::path::Path) -> GuestRun {
    use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
    use std::os::unix::process::CommandExt;
    let no_uring: BpfProgram = SeccompFilter::new(
        [(libc::SYS_io_uring_setup, vec![])].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .and_then(TryInto::try_into)
    .expect("compile the outer filter");
    let disk_arg = format!("path={},num_queues=2", path_str(disk));
    let mut cmd = testguest_command(&[], cmdline, &["--disk", &disk_arg], 60);
    // SAFETY: between fork and exec the child only installs an already compiled program
    // (prctl and seccomp(2), no allocation); it stays on through exec (no_new_privs).
    unsafe {
        cmd.pre_exec(move || seccompiler::apply_filter(&no_uring).map_err(std::io::Error::other));
    }
    GuestRun::from_output(cmd.output().expect("run podvmm"))
}

/// The synchronous block engine (used where io_uring is missing or forbidden) serves the
/// test guest's reads, writes and flushes, and refuses its hostile requests, under the block
/// workers' filter: no call it needs is missing from the list.
#[test]
fn the_synchronous_block_engine_works_under_its_filter() {
    let dir = TempDir::new("seccomp-sync");
    let disk = dir.path("disk.img");
    pattern_disk(&disk, 8 << 20);
    let note = "using synchronous I/O";
    let run = run_without_io_uring(
        "testguest.run=blk testguest.blk_ms=500 testguest.blk_qd=8",
        &disk,
    );
    assert!(run.stderr.contains(note), "{}", run.dump());
    run.assert_passed("blk");
    assert!(run.status.success(), "{}", run.dump());
    pattern_disk(&disk, 8 << 20);
    let run = run_without_io_uring("testguest.mode=hostile", &disk);
    assert!(run.stderr.contains(note), "{}", run.dump());
    let cases = run.assert_hostile_cases("blk_hostile", 40);
    assert!(run.status.success(), "{}", run.dump());
    let bytes = std::fs::read(&disk).expect("read the disk");
    assert_eq!(
        first_mismatch(&bytes, 0, DISK_KEY),
        None,
        "a hostile request changed the disk"
    );
    println!("synchronous engine under filters: blk passed, {cases} hostile cases refused");
}
