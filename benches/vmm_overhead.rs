//! The VMM's memory overhead with a running guest: podvmm's resident memory minus what the
//! guest's RAM mapping holds (Firecracker's bound: 5 MiB with 1 vCPU and 128 MiB; Cloud
//! Hypervisor's CI allows 10 MiB).
//!
//! The guest is a tiny one that does one port write and halts (it stays running, asleep in the
//! hypervisor); the VM has a vsock device (its socket, thread and epoll) as a pod sandbox
//! does. After the guest's first I/O (the event monitor's `kernel_started`) and a short
//! settle, `/proc/<pid>/smaps` gives every mapping's Rss; the guest RAM mapping is the
//! anonymous one exactly the size of the guest memory. Reported: the median over several VMs
//! of (total Rss - guest RAM Rss), for 128 MiB (the headline `vmm_overhead_kib`) and for the
//! pod default of 2 GiB (the overhead must not grow with guest RAM), plus the largest
//! mappings for context.
//!
//! `PODVMM_BENCH_QUICK=1` (or `--quick`): fewer VMs.

#[path = "../tests/common/mod.rs"]
mod common;

/// The podvmm under test (`PODVMM_BIN` overrides, to run the compiled bench elsewhere).
fn podvmm_exe() -> std::path::PathBuf {
    std::env::var_os("PODVMM_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_BIN_EXE_podvmm")))
}

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{path_str, pvh_elf, TempDir};

/// Firecracker's published bound.
const TARGET_KIB: u64 = 5 * 1024;

struct Mapping {
    name: String,
    size_kib: u64,
    rss_kib: u64,
}

fn smaps(pid: u32) -> Vec<Mapping> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap_or_else(|e| panic!("podvmm-bench: reading smaps of {pid}: {e}"));
    let mut out: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        let is_header =
            first.contains('-') && first.split('-').all(|h| u64::from_str_radix(h, 16).is_ok());
        if is_header {
            let rest: Vec<&str> = words.collect();
            out.push(Mapping {
                name: rest
                    .get(4)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "[anon]".into()),
                size_kib: 0,
                rss_kib: 0,
            });
            continue;
        }
        let value = || {
            line.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        if let Some(m) = out.last_mut() {
            match first {
                "Size:" => m.size_kib = value(),
                "Rss:" => m.rss_kib = value(),
                _ => {}
            }
        }
    }
    out
}

struct Sample {
    total_kib: u64,
    guest_kib: u64,
    top: Vec<(String, u64)>,
}

fn measure(dir: &TempDir, kernel: &Path, mem_mib: u64, i: usize) -> Sample {
    let socket = dir.path(&format!("v{mem_mib}-{i}.sock"));
    let monitor = dir.path(&format!("ev{mem_mib}-{i}.jsonl"));
    let mut child = Command::new(podvmm_exe())
        .args(["--kernel", path_str(kernel)])
        .args(["--memory", &format!("size={mem_mib}M")])
        .args(["--serial", "off"])
        .args(["--vsock", &format!("cid=3,socket={}", path_str(&socket))])
        .args(["--event-monitor", &format!("path={}", path_str(&monitor))])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("podvmm-bench: cannot run podvmm");
    let t0 = Instant::now();
    while !std::fs::read_to_string(&monitor)
        .unwrap_or_default()
        .contains("kernel_started")
    {
        if let Ok(Some(s)) = child.try_wait() {
            panic!("podvmm-bench: podvmm exited early ({s})");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "podvmm-bench: the guest never ran"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(300));
    let maps = smaps(child.id());
    let exited = child.try_wait().ok().flatten();
    let _ = child.kill();
    let _ = child.wait();
    let mem_kib = mem_mib * 1024;
    let guest: Vec<&Mapping> = maps
        .iter()
        .filter(|m| m.size_kib == mem_kib && m.name == "[anon]")
        .collect();
    assert_eq!(
        guest.len(),
        1,
        "podvmm-bench: expected one anonymous {mem_kib} KiB mapping (the guest RAM); podvmm {}; anonymous mappings (KiB): {:?}",
        exited.map_or("still running".to_string(), |s| format!("exited: {s}")),
        maps.iter()
            .filter(|m| m.name == "[anon]")
            .map(|m| m.size_kib)
            .collect::<Vec<_>>()
    );
    let guest_kib = guest[0].rss_kib;
    let total_kib: u64 = maps.iter().map(|m| m.rss_kib).sum();
    let mut top: Vec<(String, u64)> = maps
        .iter()
        .filter(|m| !(m.size_kib == mem_kib && m.name == "[anon]"))
        .map(|m| (m.name.clone(), m.rss_kib))
        .collect();
    // Per name: the binary's segments, libc's, anonymous heaps and stacks.
    top.sort();
    let mut merged: Vec<(String, u64)> = Vec::new();
    for (n, k) in top {
        match merged.last_mut() {
            Some((ln, lk)) if *ln == n => *lk += k,
            _ => merged.push((n, k)),
        }
    }
    merged.sort_by_key(|m| std::cmp::Reverse(m.1));
    merged.truncate(5);
    Sample {
        total_kib,
        guest_kib,
        top: merged,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let test_mode = !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--test");
    let quick = test_mode
        || args.iter().any(|a| a == "--quick")
        || std::env::var("PODVMM_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let runs = if test_mode {
        1
    } else if quick {
        3
    } else {
        7
    };
    let dir = TempDir::new("bench-overhead");
    // `out 0x80, al; cli; hlt`: the guest runs, then sleeps in the hypervisor.
    let kernel = dir.write("halt.elf", &pvh_elf(&[0xe6, 0x80, 0xfa, 0xf4, 0xeb, 0xfd]));
    let mut results = Vec::new();
    for mem_mib in [128u64, 2048] {
        let mut overheads = Vec::new();
        let mut last = None;
        for i in 0..runs {
            let s = measure(&dir, &kernel, mem_mib, i);
            overheads.push(s.total_kib - s.guest_kib);
            last = Some(s);
        }
        overheads.sort_unstable();
        let median = overheads[overheads.len() / 2];
        if let Some(s) = last {
            println!(
                "podvmm-bench: {mem_mib} MiB guest: rss {} KiB, guest RAM rss {} KiB, VMM {} KiB; largest: {}",
                s.total_kib,
                s.guest_kib,
                s.total_kib - s.guest_kib,
                s.top
                    .iter()
                    .map(|(n, k)| format!("{n} {k} KiB"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        results.push(median);
    }
    println!(
        "podvmm-bench: vmm_overhead_kib={} (1 vCPU, 128 MiB, vsock; median of {runs}; target <= {TARGET_KIB})",
        results[0]
    );
    println!(
        "podvmm-bench: vmm_overhead_2g_kib={} (1 vCPU, 2 GiB, vsock; median of {runs})",
        results[1]
    );
    if results[0] > TARGET_KIB {
        println!(
            "podvmm-bench: note: over the {TARGET_KIB} KiB target by {} KiB",
            results[0] - TARGET_KIB
        );
    }
}
