//! The REST API's cost: `vm.info` round trips over the Unix socket, and how soon after exec
//! the socket answers `vmm.ping`.
//!
//! Setup: `podvmm --api-socket` with a running tiny guest (the hold guest of
//! `tests/api_support`, which prints a line and halts), so `vm.info` reports a booted VM with
//! its digests, as a shim sees it after boot.
//!
//! Reports (criterion): `api_info/keepalive` (one connection kept open, as Kata's Go client
//! does) and `api_info/new_connection` (connect, ask, close: what curl does). Then an
//! independent run of round trips on a kept-alive connection gives the percentiles in the
//! closing lines, and a set of fresh `podvmm --api-socket` processes gives the time from
//! exec to the first successful `vmm.ping`:
//!
//! ```text
//! podvmm-bench: api_info_p99_ms=<p99>
//! podvmm-bench: api_ping_ready_ms=<median>
//! ```
//!
//! Environment: `PODVMM_BENCH_QUICK=1` (or `--quick`) cuts sample sizes and counts, for CI.

#[path = "../tests/api_support/mod.rs"]
mod api_support;
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::quick_requested;

use api::client::Client;
use api_support::{hold_guest_code, vm_config, Server};
use common::{podvmm_bin, pvh_elf, TempDir};
use criterion::Criterion;

fn listing() -> bool {
    std::env::args().any(|a| a == "--list")
}

/// The value at fraction `q` of the sorted samples (nearest rank).
fn percentile_ms(sorted_ms: &[f64], q: f64) -> f64 {
    let rank = ((q * sorted_ms.len() as f64).ceil() as usize).clamp(1, sorted_ms.len());
    sorted_ms[rank - 1]
}

fn info_round_trip(client: &mut Client) {
    let r = client
        .request("GET", "vm.info", None)
        .expect("vm.info round trip");
    assert_eq!(r.status, 200, "{}", r.error_message());
}

/// Exec of `podvmm --api-socket` to its first successful `vmm.ping`, polling as a shim does
/// (but every 50 µs, not every 10 ms, to see the real readiness).
fn ping_ready(dir: &TempDir, i: usize) -> Duration {
    let socket = dir.path(&format!("ready-{i}.sock"));
    let started = Instant::now();
    let mut child = Command::new(podvmm_bin())
        .arg("--api-socket")
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn podvmm");
    let ready = loop {
        if let Ok(mut c) = Client::connect(&socket) {
            if c.request("GET", "vmm.ping", None)
                .is_ok_and(|r| r.status == 200)
            {
                break started.elapsed();
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "podvmm-bench: no vmm.ping answer within 10 s"
        );
        std::thread::sleep(Duration::from_micros(50));
    };
    if let Ok(mut c) = Client::connect(&socket) {
        let _ = c.request("PUT", "vmm.shutdown", None);
    }
    let _ = child.wait();
    ready
}

fn main() {
    let quick = quick_requested();
    let (sample_size, measurement, warm_up, round_trips, spawns) = if quick {
        (
            10,
            Duration::from_secs(1),
            Duration::from_millis(300),
            2_000,
            11,
        )
    } else {
        (
            50,
            Duration::from_secs(3),
            Duration::from_secs(1),
            20_000,
            31,
        )
    };
    let mut criterion = Criterion::default()
        .sample_size(sample_size)
        .measurement_time(measurement)
        .warm_up_time(warm_up)
        .configure_from_args();

    if listing() {
        println!("api_info/keepalive: benchmark");
        println!("api_info/new_connection: benchmark");
        return;
    }

    let dir = TempDir::new("bench-api");
    let kernel = dir.write("hold.elf", &pvh_elf(&hold_guest_code()));
    let serial = dir.path("serial.log");
    let server = Server::start(&dir, &[]);
    server.ok(
        "PUT",
        "vm.create",
        Some(&vm_config(&kernel, "bench", &serial).to_string()),
    );
    server.ok("PUT", "vm.boot", None);
    let info = server.info();
    assert_eq!(
        info["state"], "Running",
        "podvmm-bench: the VM did not boot"
    );
    println!(
        "podvmm-bench: vm.info answer is {} bytes",
        serde_json::to_vec(&info).map(|v| v.len()).unwrap_or(0)
    );

    let mut group = criterion.benchmark_group("api_info");
    let mut kept = server.client();
    group.bench_function("keepalive", |b| b.iter(|| info_round_trip(&mut kept)));
    group.bench_function("new_connection", |b| {
        b.iter(|| info_round_trip(&mut server.client()))
    });
    group.finish();
    criterion.final_summary();

    // Percentiles from plain timed round trips on one kept-alive connection.
    let mut client = server.client();
    for _ in 0..100 {
        info_round_trip(&mut client);
    }
    let mut ms: Vec<f64> = (0..round_trips)
        .map(|_| {
            let t = Instant::now();
            info_round_trip(&mut client);
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    let mut fresh: Vec<f64> = (0..round_trips / 10)
        .map(|_| {
            let t = Instant::now();
            info_round_trip(&mut server.client());
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    fresh.sort_by(f64::total_cmp);
    println!(
        "podvmm-bench: api_info keepalive n={} p50_ms={:.3} p90_ms={:.3} p99_ms={:.3} max_ms={:.3}",
        ms.len(),
        percentile_ms(&ms, 0.5),
        percentile_ms(&ms, 0.9),
        percentile_ms(&ms, 0.99),
        ms[ms.len() - 1]
    );
    println!(
        "podvmm-bench: api_info new_connection n={} p50_ms={:.3} p99_ms={:.3}",
        fresh.len(),
        percentile_ms(&fresh, 0.5),
        percentile_ms(&fresh, 0.99)
    );
    server.ok("PUT", "vmm.shutdown", None);
    drop(server);

    let ready_dir = TempDir::new("bench-ready");
    let mut ready: Vec<f64> = (0..spawns)
        .map(|i| ping_ready(&ready_dir, i).as_secs_f64() * 1e3)
        .collect();
    ready.sort_by(f64::total_cmp);
    println!(
        "podvmm-bench: api_ping_ready runs={} min_ms={:.2} max_ms={:.2}",
        ready.len(),
        ready[0],
        ready[ready.len() - 1]
    );
    println!(
        "podvmm-bench: api_info_p99_ms={:.3}",
        percentile_ms(&ms, 0.99)
    );
    println!(
        "podvmm-bench: api_ping_ready_ms={:.2}",
        percentile_ms(&ready, 0.5)
    );
}
