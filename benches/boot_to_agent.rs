//! Boot to agent: from exec of `podvmm` to the guest agent's first ping answered through the
//! hybrid vsock socket, with the event monitor's timestamps for the steps in between.
//!
//! Each run boots the guest kit (2 vCPUs, 512 MiB) with a vsock
//! device, connects once (`CONNECT 1024`: podvmm holds it until the agent announces itself),
//! pings, then powers the VM off through the agent. Two boot paths: the agent as PID 1
//! (`rdinit=/sbin/podvmm-agent`, not `quiet`, for the split) gives `boot_to_agent_ms`; the kit's
//! busybox `/init` starting the agent gives `boot_to_agent_init_ms`.
//!
//! Also the VMM's own part, with a tiny guest that halts: exec to the vsock socket accepting
//! connections, and exec to `vm_booted`.
//!
//! Under software KVM (PVM) the guest kit's kernel runs user space through its syscall fix-up:
//! the figures are labelled `kvm=pvm` and say nothing about hardware (guest kernel code is
//! emulated there); a quick run boots once. The split comes from the event monitor:
//! `kernel_started` (first guest I/O), `device_activated` (virtio-vsock up), `init_started` (the
//! kernel's "Run ... as init process" line on the console), `agent_ready`.
//!
//! Environment: `PODVMM_BENCH_QUICK=1` (or `--quick`) for fewer runs; `PODVMM_GUEST_DIR`
//! for the kit.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

/// The podvmm under test (`PODVMM_BIN` overrides, to run the compiled bench elsewhere).
fn podvmm_exe() -> std::path::PathBuf {
    std::env::var_os("PODVMM_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_BIN_EXE_podvmm")))
}

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::{median, quick_requested};

use common::{path_str, pvh_elf, TempDir};
use criterion::Criterion;
use serde_json::Value;

/// `cargo test --benches` runs benches in test mode: one short pass.
fn test_mode() -> bool {
    let args: Vec<String> = std::env::args().collect();
    !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--test")
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn kit_dir() -> PathBuf {
    std::env::var_os("PODVMM_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/guest"))
}

/// The events of a run, as (name, ms since our exec of podvmm).
fn events(path: &Path, exec_ns: u64) -> Vec<(String, f64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|e| {
            let ns = e["monotonic_ns"].as_u64().unwrap_or(0);
            (
                e["event"].as_str().unwrap_or("?").to_string(),
                ns.saturating_sub(exec_ns) as f64 / 1e6,
            )
        })
        .collect()
}

fn spawn(args: &[String]) -> Child {
    Command::new(podvmm_exe())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("podvmm-bench: cannot run podvmm")
}

fn kill(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

// --------------------------------------------------------------- VMM part --

/// `out 0x80, al; cli; hlt`: one I/O exit, then the vCPU sleeps.
fn halt_guest() -> Vec<u8> {
    pvh_elf(&[0xe6, 0x80, 0xfa, 0xf4, 0xeb, 0xfd])
}

/// One run of the tiny guest: (exec to socket accepting, exec to vm_booted), in ms.
fn vmm_part(dir: &TempDir, kernel: &Path, i: usize) -> (f64, f64) {
    let socket = dir.path(&format!("v{i}.sock"));
    let monitor = dir.path(&format!("ev{i}.jsonl"));
    let args: Vec<String> = [
        "--kernel",
        path_str(kernel),
        "--memory",
        "size=128M",
        "--serial",
        "off",
        "--vsock",
        &format!("cid=3,socket={}", path_str(&socket)),
        "--event-monitor",
        &format!("path={}", path_str(&monitor)),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let exec_ns = monotonic_ns();
    let t0 = Instant::now();
    let mut child = spawn(&args);
    let socket_ms = loop {
        if UnixStream::connect(&socket).is_ok() {
            break t0.elapsed().as_secs_f64() * 1e3;
        }
        if let Ok(Some(s)) = child.try_wait() {
            panic!("podvmm-bench: podvmm exited early ({s})");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "podvmm-bench: no vsock socket"
        );
        std::thread::sleep(Duration::from_micros(200));
    };
    let booted = loop {
        if let Some((_, ms)) = events(&monitor, exec_ns)
            .into_iter()
            .find(|(n, _)| n == "vm_booted")
        {
            break ms;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "podvmm-bench: no vm_booted event"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    kill(child);
    (socket_ms, booted)
}

// ------------------------------------------------------------- Linux part --

struct LinuxRun {
    total_ms: f64,
    events: Vec<(String, f64)>,
}

fn linux_run(dir: &TempDir, i: usize, cmdline: &str) -> Result<LinuxRun, String> {
    let kit = kit_dir();
    let socket = dir.path(&format!("l{i}.sock"));
    let monitor = dir.path(&format!("lev{i}.jsonl"));
    let args: Vec<String> = vec![
        "--kernel".into(),
        kit.join("vmlinux").display().to_string(),
        "--initramfs".into(),
        kit.join("initramfs.cpio").display().to_string(),
        "--cpus".into(),
        "boot=2".into(),
        "--memory".into(),
        "size=512M".into(),
        "--serial".into(),
        "null".into(),
        "--vsock".into(),
        format!("cid=3,socket={}", path_str(&socket)),
        "--event-monitor".into(),
        format!("path={}", path_str(&monitor)),
        "--cmdline".into(),
        cmdline.into(),
    ];
    let exec_ns = monotonic_ns();
    let t0 = Instant::now();
    let mut child = spawn(&args);
    while !socket.exists() {
        if t0.elapsed() > Duration::from_secs(30) {
            kill(child);
            return Err("no vsock socket within 30 s".into());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let result = agent::Client::connect(&socket, agent::AGENT_PORT, Duration::from_secs(900))
        .and_then(|mut c| {
            c.ping()?;
            Ok(c)
        });
    let total_ms = t0.elapsed().as_secs_f64() * 1e3;
    match result {
        Ok(c) => {
            let _ = c.poweroff();
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            kill(child);
            Ok(LinuxRun {
                total_ms,
                events: events(&monitor, exec_ns),
            })
        }
        Err(e) => {
            kill(child);
            Err(format!("agent not reached: {e}"))
        }
    }
}

fn linux_series(dir: &TempDir, runs: usize, cmdline: &str, label: &str) -> Option<f64> {
    let mut totals = Vec::new();
    let mut steps: Vec<Vec<(String, f64)>> = Vec::new();
    for i in 0..runs {
        match linux_run(dir, i + 1000 * label.len(), cmdline) {
            Ok(r) => {
                totals.push(r.total_ms);
                steps.push(r.events);
            }
            Err(e) => {
                println!("podvmm-bench: {label}: run {i} failed: {e}");
                return None;
            }
        }
    }
    let m = median(&totals);
    // Median of each step across runs.
    let mut line = String::new();
    for name in [
        "vmm_started",
        "vm_created",
        "vm_booted",
        "kernel_started",
        "device_activated",
        "init_started",
        "agent_ready",
    ] {
        let v: Vec<f64> = steps
            .iter()
            .filter_map(|s| s.iter().find(|(n, _)| n == name).map(|(_, ms)| *ms))
            .collect();
        if !v.is_empty() {
            line.push_str(&format!(" {name}={:.1}", median(&v)));
        }
    }
    println!("podvmm-bench: {label} breakdown (median ms from exec):{line} first_ping={m:.1}");
    Some(m)
}

fn main() {
    let quick = quick_requested() || test_mode();
    let runs = if test_mode() {
        2
    } else if quick {
        5
    } else {
        15
    };
    let dir = TempDir::new("bench-boot-to-agent");
    let pvm = hypervisor::kvm::is_pvm();
    println!(
        "podvmm-bench: host kvm={}",
        if pvm { "pvm (software)" } else { "hardware" }
    );

    // The VMM's own part, on any KVM.
    let kernel = dir.write("halt.elf", &halt_guest());
    let mut socket_ms = Vec::new();
    let mut booted_ms = Vec::new();
    for i in 0..runs {
        let (s, b) = vmm_part(&dir, &kernel, i);
        socket_ms.push(s);
        booted_ms.push(b);
    }
    let mut criterion = Criterion::default()
        .sample_size(10)
        .measurement_time(Duration::from_secs(if quick { 1 } else { 3 }))
        .warm_up_time(Duration::from_millis(300))
        .configure_from_args();
    let mut n = 10_000;
    criterion.bench_function("boot_to_agent/exec_to_vsock_socket", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                n += 1;
                total += Duration::from_secs_f64(vmm_part(&dir, &kernel, n).0 / 1e3);
            }
            total
        })
    });
    criterion.final_summary();
    println!(
        "podvmm-bench: exec_to_vsock_socket_ms={:.2} (tiny guest, 128 MiB, median of {runs})",
        median(&socket_ms)
    );
    println!(
        "podvmm-bench: exec_to_vm_booted_ms={:.2} (tiny guest, 128 MiB, median of {runs})",
        median(&booted_ms)
    );

    // The whole path. Under PVM the kit's kernel completes the system calls PVM leaves in user
    // mode, so the agent runs there too, slowly: fewer runs, and every figure says `kvm=pvm`.
    if !kit_dir().join("initramfs.cpio").is_file() {
        println!(
            "podvmm-bench: boot_to_agent_ms=unavailable (no guest kit: run scripts/build-guest.sh)"
        );
        return;
    }
    let label = if pvm { "pvm" } else { "hardware" };
    let linux_runs = match (pvm, test_mode(), quick) {
        (_, true, _) | (true, _, true) => 1,
        (true, false, false) => 3,
        (false, _, true) => 3,
        (false, _, false) => 10,
    };
    // Not `quiet`: the kernel's "Run ... as init process" line gives the split's init_started.
    match linux_series(
        &dir,
        linux_runs,
        "console=ttyS0 reboot=k panic=-1 rcupdate.rcu_cpu_stall_suppress=1 rdinit=/sbin/podvmm-agent",
        "agent_as_pid1",
    ) {
        Some(ms) => println!(
            "podvmm-bench: boot_to_agent_ms={ms:.1} (kvm={label}, 2 vCPUs, 512 MiB, agent as PID 1, median of {linux_runs})"
        ),
        None => println!("podvmm-bench: boot_to_agent_ms=unavailable (see the failure above)"),
    }
    if pvm && quick {
        println!(
            "podvmm-bench: boot_to_agent_init_ms=skipped (kvm=pvm, quick run: one boot is enough)"
        );
        return;
    }
    match linux_series(
        &dir,
        linux_runs,
        "console=ttyS0 reboot=k panic=-1 quiet rcupdate.rcu_cpu_stall_suppress=1",
        "busybox_init",
    ) {
        Some(ms) => println!(
            "podvmm-bench: boot_to_agent_init_ms={ms:.1} (kvm={label}, busybox /init starts the agent)"
        ),
        None => println!("podvmm-bench: boot_to_agent_init_ms=unavailable (see the failure above)"),
    }
}
