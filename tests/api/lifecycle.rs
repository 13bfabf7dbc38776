//! The VM's life under the API: pause and resume a running guest, shut it down and boot it
//! again, a guest reset, and no thread or descriptor left behind.

use crate::api_support;
use crate::common;

use std::time::{Duration, Instant};

use api_support::*;
use common::*;

/// Waits until the file stops growing for `quiet`, and returns its length.
fn settled_len(path: &std::path::Path, quiet: Duration) -> usize {
    let mut len = read_lossy(path).len();
    let mut since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        std::thread::sleep(Duration::from_millis(10));
        let now = read_lossy(path).len();
        if now != len {
            len = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return len;
        }
        assert!(Instant::now() < deadline, "output never stopped growing");
    }
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    let dir = TempDir::new("api-pause");
    let kernel = dir.write("ticker.elf", &pvh_elf(&ticker_guest_code()));
    let serial = dir.path("serial.log");
    let server = Server::start(&dir, &[]);
    let mut config = vm_config(&kernel, "ticker", &serial);
    config["cpus"] = serde_json::json!({"boot_vcpus": 2, "max_vcpus": 2});
    server.ok("PUT", "vm.create", Some(&config.to_string()));
    server.ok("PUT", "vm.boot", None);
    // The guest counts.
    wait_for_output(&serial, "0123", Duration::from_secs(20));
    let before = read_lossy(&serial).len();
    let deadline = Instant::now() + Duration::from_secs(10);
    while read_lossy(&serial).len() < before + 8 {
        assert!(
            Instant::now() < deadline,
            "the guest's output does not grow"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    for round in 0..3 {
        let t = Instant::now();
        server.ok("PUT", "vm.pause", None);
        let pause_ms = t.elapsed().as_secs_f64() * 1e3;
        eprintln!("round {round}: vm.pause answered in {pause_ms:.2} ms");
        assert_eq!(server.state(), "Paused");
        // Paused: not one more byte. (settled_len waits out a byte already on its way.)
        let paused_len = settled_len(&serial, Duration::from_millis(50));
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            read_lossy(&serial).len(),
            paused_len,
            "the guest ran while paused"
        );
        // Calls that make no sense while paused.
        assert!(server
            .refused("PUT", "vm.pause", None, 409)
            .contains("already paused"));
        assert!(server
            .refused("PUT", "vm.boot", None, 409)
            .contains("paused"));
        server.ok("PUT", "vm.resume", None);
        assert_eq!(server.state(), "Running");
        let deadline = Instant::now() + Duration::from_secs(10);
        while read_lossy(&serial).len() < paused_len + 8 {
            assert!(
                Instant::now() < deadline,
                "the guest did not run after vm.resume"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(server
            .refused("PUT", "vm.resume", None, 409)
            .contains("not paused"));
    }
    // The digits count on across the pauses: no step was lost or repeated.
    let out = read_lossy(&serial);
    for (i, w) in out.as_bytes().windows(2).enumerate() {
        let (a, b) = (w[0] - b'0', w[1] - b'0');
        assert_eq!((a + 1) % 8, b, "output broke at byte {i}: {out:?}");
    }
    // Shut down while paused works too.
    server.ok("PUT", "vm.pause", None);
    server.ok("PUT", "vm.shutdown", None);
    // As in Cloud Hypervisor: shut down, the VM is Created again, ready to boot.
    assert_eq!(server.state(), "Created");
}

#[test]
fn shutdown_boot_again_delete_and_nothing_leaks() {
    let dir = TempDir::new("api-cycle");
    let kernel = dir.write("hold.elf", &pvh_elf(&hold_guest_code()));
    let serial = dir.path("serial.log");
    let server = Server::start(&dir, &[]);
    let mut config = vm_config(&kernel, "cycle", &serial);
    config["cpus"] = serde_json::json!({"boot_vcpus": 4, "max_vcpus": 4});
    let config = config.to_string();
    // Let the server settle (the readiness ping's connection closes).
    std::thread::sleep(Duration::from_millis(100));
    let (vcpus0, fds0) = server.threads_and_fds();
    assert_eq!(vcpus0, 0);
    server.ok("PUT", "vm.create", Some(&config));
    for cycle in 0..3 {
        server.ok("PUT", "vm.boot", None);
        assert_eq!(server.state(), "Running");
        // Each boot starts the serial file afresh (as Cloud Hypervisor does).
        wait_for_output(&serial, "READY cycle", Duration::from_secs(20));
        // (A thread takes its name once it runs: give them a moment.)
        let (vcpus, _) = server.wait_for_counts(|(t, _)| t == 4);
        assert_eq!(vcpus, 4, "cycle {cycle}: 4 vCPU threads expected");
        server.ok("PUT", "vm.shutdown", None);
        let info = server.info();
        assert_eq!(info["state"], "Created");
        assert_eq!(info["stop_reason"], "vm.shutdown");
        // The digests of what was booted stay.
        assert!(info["boot_digests"]["kernel_sha256"].is_string());
        assert!(server
            .refused("PUT", "vm.shutdown", None, 409)
            .contains("not been booted"));
        server.refused("PUT", "vm.pause", None, 409);
        // vCPU threads joined and descriptors closed (KVM, eventfds, memory).
        let counts = server.wait_for_counts(|(t, f)| t == 0 && f <= fds0);
        assert!(
            counts.0 == 0 && counts.1 <= fds0,
            "cycle {cycle}: vCPU threads/fds {counts:?}, {fds0} fds at start"
        );
    }
    // Delete while running: stops the guest, releases everything.
    server.ok("PUT", "vm.boot", None);
    server.ok("PUT", "vm.delete", None);
    server.refused("GET", "vm.info", None, 404);
    let counts = server.wait_for_counts(|(t, f)| t == 0 && f <= fds0);
    assert!(counts.0 == 0 && counts.1 <= fds0, "{counts:?}");
    // And a new VM can be created.
    server.ok("PUT", "vm.create", Some(&config));
    assert_eq!(server.state(), "Created");
}

#[test]
fn guest_reset_moves_the_vm_to_shutdown_and_the_vmm_stays() {
    let dir = TempDir::new("api-reset");
    // The PVH test guest prints its command line and resets through the i8042.
    let kernel = dir.write("tiny.elf", &pvh_elf(&pvh_guest_code()));
    let serial = dir.path("serial.log");
    let mut config = vm_config(&kernel, "reset me", &serial);
    config["cpus"] = serde_json::json!({"boot_vcpus": 2, "max_vcpus": 2});
    let server = Server::start(&dir, &[]);
    server.ok("PUT", "vm.create", Some(&config.to_string()));
    server.ok("PUT", "vm.boot", None);
    let deadline = Instant::now() + Duration::from_secs(20);
    let info = loop {
        let info = server.info();
        if info["state"] == "Shutdown" {
            break info;
        }
        assert!(Instant::now() < deadline, "still {}", info["state"]);
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(info["stop_reason"], "Reset");
    assert_eq!(
        read_lossy(&serial),
        format!("PVH {}\n", guest_cmdline("reset me"))
    );
    // The VMM is still there, and the VM boots again.
    server.ok("GET", "vmm.ping", None);
    server.ok("PUT", "vm.boot", None);
    // The serial file starts afresh at each boot: the line is the second run's.
    wait_for_output(&serial, "PVH reset me", Duration::from_secs(20));
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.state() != "Shutdown" {
        assert!(Instant::now() < deadline, "the second run did not reset");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn cli_mode_without_a_socket_still_exits_on_reset() {
    // The command-line path now stops and joins the vCPU threads: still exit 0 on reset,
    // with 4 vCPUs (3 of them never started by the guest) as with 1.
    let dir = TempDir::new("api-cli-reset");
    let kernel = dir.write("tiny.elf", &pvh_elf(&pvh_guest_code()));
    let started = Instant::now();
    let out = run_podvmm(
        &[
            "--kernel",
            path_str(&kernel),
            "--cpus",
            "boot=4",
            "--memory",
            "size=128M",
        ],
        30,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    // Pod sizing on the command line.
    let out = run_podvmm(
        &["--kernel", path_str(&kernel), "--pod-limits", "cpu=300"],
        30,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("vCPUs"));
    let out = run_podvmm(
        &["--kernel", path_str(&kernel), "--pod-limits", "cpu=-1"],
        30,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("negative"));
    let out = run_podvmm(
        &[
            "--kernel",
            path_str(&kernel),
            "--pod-limits",
            "cpu=1,memory=1Gi",
            "--memory",
            "size=128M",
        ],
        30,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sigterm_and_sigint_end_podvmm_cleanly() {
    use std::os::unix::process::ExitStatusExt;
    let dir = TempDir::new("api-signals");
    let kernel = dir.write("ticker.elf", &pvh_elf(&ticker_guest_code()));
    let serial = dir.path("serial.log");
    let vsock = dir.path("v.sock");
    let events = dir.path("events.jsonl");
    let k = path_str(&kernel);
    let serial_arg = format!("file={}", path_str(&serial));
    let vsock_arg = format!("cid=3,socket={}", path_str(&vsock));
    let events_arg = format!("path={}", path_str(&events));
    // The API server with a running VM, then SIGTERM.
    let mut server = Server::start(
        &dir,
        &[
            "--kernel",
            k,
            "--serial",
            &serial_arg,
            "--vsock",
            &vsock_arg,
            "--event-monitor",
            &events_arg,
        ],
    );
    wait_for_output(&serial, "012", Duration::from_secs(20));
    assert!(vsock.exists());
    // SAFETY: kill(2) on our own child.
    let sent = unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    assert_eq!(sent, 0);
    let status = server.wait_exit(Duration::from_secs(10));
    assert_eq!(
        status.code(),
        Some(143),
        "{status:?}: {}",
        server.stderr_text()
    );
    assert!(
        status.signal().is_none(),
        "killed by the signal instead of exiting"
    );
    assert!(!server.socket.exists(), "API socket left behind");
    assert!(!vsock.exists(), "vsock socket left behind");
    let log = std::fs::read_to_string(&events).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("\"shutdown\"") && l.contains("SIGTERM")),
        "{log}"
    );
    assert!(server.stderr_text().contains("stopped by SIGTERM"));

    // The command line alone, then SIGINT.
    let _ = std::fs::remove_file(&events);
    let child = std::process::Command::new(podvmm_bin())
        .args(["--kernel", k, "--serial", &serial_arg])
        .args(["--vsock", &vsock_arg, "--event-monitor", &events_arg])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !vsock.exists() || read_lossy(&serial).len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: kill(2) on our own child.
    let sent = unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert_eq!(sent, 0);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{:?}", out.status);
    assert!(!vsock.exists(), "vsock socket left behind");
    let log = std::fs::read_to_string(&events).unwrap();
    assert!(log.contains("SIGINT"), "{log}");
}
