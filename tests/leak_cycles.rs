//! Resource hygiene: 200 create/boot/shutdown/delete cycles through the REST API with a tiny
//! guest leave no growth in the podvmm process's open descriptors, threads or resident
//! memory. The figures are printed (`cargo test --test leak_cycles -- --nocapture`).

mod api_support;
mod common;

use std::time::{Duration, Instant};

use api_support::*;
use common::*;

const CYCLES: usize = 200;
/// The baseline is taken once allocator arenas, thread pools and caches have warmed up.
const BASELINE: usize = 10;
/// Resident memory may move by allocator noise, not by a leak per cycle.
const RSS_SLACK_KIB: u64 = 1024;
/// The API's connection threads are a pool: idle ones wait in accept() for the next client,
/// so their number follows how many connections overlapped, not how many VMs were run. The
/// test's client makes one request at a time; a handful covers its overlap.
const POOL_THREAD: &str = "api-conn";
const POOL_BOUND: usize = 4;

#[derive(Clone, Copy, Debug)]
struct Figures {
    fds: usize,
    /// Threads other than the connection pool's.
    threads: usize,
    pool_threads: usize,
    rss_kib: u64,
}

fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .map(|c| c.trim().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn figures(pid: u32) -> Figures {
    let count = |dir: String| std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let names = thread_names(pid);
    let pool_threads = names.iter().filter(|n| *n == POOL_THREAD).count();
    Figures {
        fds: count(format!("/proc/{pid}/fd")),
        threads: names.len() - pool_threads,
        pool_threads,
        rss_kib,
    }
}

/// The process once connection threads that served the last requests went back to waiting
/// (or ended): sampled until two readings 50 ms apart agree.
fn settled(pid: u32) -> Figures {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut last = figures(pid);
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = figures(pid);
        if (now.fds == last.fds
            && now.threads == last.threads
            && now.pool_threads == last.pool_threads)
            || Instant::now() > deadline
        {
            return now;
        }
        last = now;
    }
}

#[test]
fn two_hundred_vm_cycles_leak_nothing() {
    let dir = TempDir::new("leak-cycles");
    let kernel = dir.write("hold.elf", &pvh_elf(&hold_guest_code()));
    let serial = dir.path("serial.log");
    let server = Server::start(&dir, &[]);
    let pid = server.child.id();
    let mut config = vm_config(&kernel, "leak", &serial);
    config["cpus"] = serde_json::json!({"boot_vcpus": 2, "max_vcpus": 2});
    let config = config.to_string();

    let started = Instant::now();
    let mut baseline = None;
    for cycle in 1..=CYCLES {
        server.ok("PUT", "vm.create", Some(&config));
        server.ok("PUT", "vm.boot", None);
        wait_for_output(&serial, "READY leak", Duration::from_secs(20));
        assert_eq!(server.state(), "Running", "cycle {cycle}");
        server.ok("PUT", "vm.shutdown", None);
        server.ok("PUT", "vm.delete", None);
        if cycle == BASELINE {
            let f = settled(pid);
            eprintln!("after cycle {cycle}: {f:?}");
            baseline = Some(f);
        }
    }
    let elapsed = started.elapsed();
    let base = baseline.expect("baseline taken");
    let end = settled(pid);
    eprintln!(
        "after cycle {CYCLES}: {end:?} ({:.1} s, {:.1} ms per cycle)",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e3 / CYCLES as f64
    );
    eprintln!(
        "growth from cycle {BASELINE} to {CYCLES}: fds {:+}, threads {:+}, RSS {:+} KiB",
        end.fds as i64 - base.fds as i64,
        end.threads as i64 - base.threads as i64,
        end.rss_kib as i64 - base.rss_kib as i64
    );
    assert!(end.fds <= base.fds, "descriptors grew: {base:?} -> {end:?}");
    assert!(
        end.threads <= base.threads,
        "threads grew: {base:?} -> {end:?}: {:?}",
        thread_names(pid)
    );
    assert!(
        end.pool_threads <= POOL_BOUND,
        "the connection pool grew past {POOL_BOUND}: {end:?}"
    );
    assert!(
        end.rss_kib <= base.rss_kib + RSS_SLACK_KIB,
        "resident memory grew by more than {RSS_SLACK_KIB} KiB: {base:?} -> {end:?}"
    );
}
