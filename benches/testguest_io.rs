//! Device figures measured inside a VM by the freestanding test guest (docs/testguest.md),
//! whose hot loops run in ring 3 (natively, even under software KVM) and poll the used
//! rings, so what is measured is podvmm's device path:
//!
//! - `vm_iops`: 4 KiB random reads at queue depth 32 from a 256 MiB disk image in the host's
//!   page cache (podvmm's default: io_uring, no O_DIRECT), next to `host_fio_iops`, fio
//!   doing the same on the same file in the same run (io_uring, iodepth 32, direct=0);
//!   `vm_iops_seccomp_off` is the same guest run with `--seccomp false`, in the same round,
//!   so `seccomp_on_over_off_iops` is what the system call filters cost on this path;
//! - `vsock_rtt_per_sec`: 64-byte round trips guest -> host echo server -> guest;
//! - `boot_to_guest_vsock_ms`: from the exec of podvmm to the guest's first answer over
//!   vsock (host `CONNECT` to a guest port, 8 bytes sent, echoed back).
//!
//! Every guest run must end with the guest's `end status=pass` line, or the bench panics.
//! `PODVMM_BENCH_QUICK=1` (or `--quick`) shortens every phase for CI; under `cargo test
//! --benches` (no `--bench` argument) each figure is taken once, briefly.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};
use support::median;

use common::testguest::{pattern_disk, run_testguest, testguest, GuestRun};
use common::TempDir;

const DISK_SIZE: u64 = 256 << 20;

struct Plan {
    rounds: usize,
    fio_s: u64,
    vm_ms: u64,
    vsock_ms: u64,
    boots: usize,
}

fn plan() -> Plan {
    let args: Vec<String> = std::env::args().collect();
    let bench = args.iter().any(|a| a == "--bench");
    let quick = std::env::var("PODVMM_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0")
        || args.iter().any(|a| a == "--quick");
    if !bench {
        Plan {
            rounds: 1,
            fio_s: 1,
            vm_ms: 300,
            vsock_ms: 100,
            boots: 1,
        }
    } else if quick {
        Plan {
            rounds: 1,
            fio_s: 2,
            vm_ms: 1000,
            vsock_ms: 500,
            boots: 3,
        }
    } else {
        Plan {
            rounds: 3,
            fio_s: 5,
            vm_ms: 3000,
            vsock_ms: 2000,
            boots: 11,
        }
    }
}

fn passed(run: &GuestRun, what: &str) {
    assert!(
        run.value("end", "status").as_deref() == Some("pass") && run.status.success(),
        "podvmm-bench: the test guest failed ({what}):\n{}",
        run.dump()
    );
}

/// fio's read IOPS on `file`, or why there is none.
fn fio_iops(file: &Path, seconds: u64) -> Result<f64, String> {
    let out = Command::new("fio")
        .args([
            "--name=host",
            "--rw=randread",
            "--bs=4k",
            "--iodepth=32",
            "--ioengine=io_uring",
            "--direct=0",
            "--invalidate=0",
            "--norandommap",
            "--time_based",
            "--output-format=terse",
            "--terse-version=3",
        ])
        .arg(format!("--runtime={seconds}"))
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--size={DISK_SIZE}"))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("fio not runnable ({e}); scripts/setup.sh installs it"))?;
    if !out.status.success() {
        return Err(format!(
            "fio failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    // Terse v3: field 8 (1-based) is the read IOPS.
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.starts_with("3;"))
        .and_then(|l| l.split(';').nth(7))
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| format!("cannot read fio's output: {text}"))
}

fn blk(plan: &Plan) {
    let dir = TempDir::new("bench-tg-blk");
    let img = dir.path("disk.img");
    pattern_disk(&img, DISK_SIZE);
    // Both sides read from the page cache: make sure the whole file is in it.
    let _ = std::fs::read(&img);
    let disk_arg = format!("path={}", img.display());
    let cmdline = format!(
        "testguest.run=blk testguest.blk_qd=32 testguest.blk_ms={}",
        plan.vm_ms
    );
    let (mut vm, mut unfiltered, mut host) = (Vec::new(), Vec::new(), Vec::new());
    let mut fio_err = None;
    for _ in 0..plan.rounds {
        let run = run_testguest(&cmdline, &["--disk", &disk_arg], 120);
        passed(&run, "blk");
        vm.push(run.num("blk", "iops", "iops").expect("iops line") as f64);
        // The same without system call filters: what seccomp costs on the I/O path.
        let run = run_testguest(&cmdline, &["--disk", &disk_arg, "--seccomp", "false"], 120);
        passed(&run, "blk");
        unfiltered.push(run.num("blk", "iops", "iops").expect("iops line") as f64);
        match fio_iops(&img, plan.fio_s) {
            Ok(v) => host.push(v),
            Err(e) => fio_err = Some(e),
        }
    }
    let vm_iops = median(&vm);
    let unfiltered_iops = median(&unfiltered);
    println!("podvmm-bench: vm_iops={vm_iops:.0}");
    println!("podvmm-bench: vm_iops_seccomp_off={unfiltered_iops:.0}");
    println!(
        "podvmm-bench: seccomp_on_over_off_iops={:.3}",
        vm_iops / unfiltered_iops
    );
    match fio_err {
        None => {
            let host_iops = median(&host);
            println!("podvmm-bench: host_fio_iops={host_iops:.0}");
            println!("podvmm-bench: vm_over_host_iops={:.3}", vm_iops / host_iops);
        }
        Some(e) => println!("podvmm-bench: host_fio_iops=unavailable ({e})"),
    }
    println!(
        "podvmm-bench: blk setup: 4 KiB random reads, queue depth 32, {} MiB raw image in the page cache, runs={}",
        DISK_SIZE >> 20,
        plan.rounds
    );
}

/// Echoes one connection until the peer shuts down.
fn echo_once(listener: UnixListener) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        if let Ok((mut c, _)) = listener.accept() {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 || c.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    })
}

fn vsock_rtt(plan: &Plan) {
    let dir = TempDir::new("bench-tg-vsock");
    let socket = dir.path("v.sock");
    let echo = echo_once(UnixListener::bind(dir.path("v.sock_5000")).unwrap());
    let vsock_arg = format!("cid=3,socket={}", socket.display());
    let cmdline = format!(
        "testguest.run=vsock testguest.vsock_port=5000 testguest.vsock_ms={} testguest.vsock_bulk=4M",
        plan.vsock_ms
    );
    let run = run_testguest(&cmdline, &["--vsock", &vsock_arg], 120);
    passed(&run, "vsock");
    echo.join().unwrap();
    println!(
        "podvmm-bench: vsock_rtt_per_sec={}",
        run.num("vsock", "rtt", "per_sec").unwrap()
    );
    println!(
        "podvmm-bench: vsock_bulk_mib_per_sec={}",
        run.num("vsock", "bulk", "mib_per_sec").unwrap()
    );
}

/// One timed boot: exec of podvmm to the guest's echo of 8 bytes on vsock port 1234.
fn boot_to_vsock(dir: &TempDir, round: usize) -> Duration {
    let socket = dir.path(&format!("b{round}.sock"));
    let vsock_arg = format!("cid=3,socket={}", socket.display());
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_podvmm"))
        .arg("--kernel")
        .arg(testguest())
        .args([
            "--memory",
            "size=256M",
            "--serial",
            "null",
            "--vsock",
            &vsock_arg,
        ])
        .args([
            "--cmdline",
            "testguest.run=vsock testguest.vsock_listen=1234",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn podvmm");
    let mut s = loop {
        match UnixStream::connect(&socket) {
            Ok(s) => break s,
            Err(_) if start.elapsed() < Duration::from_secs(30) => {
                thread::sleep(Duration::from_micros(200))
            }
            Err(e) => panic!("podvmm-bench: vsock socket never appeared: {e}"),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"CONNECT 1234\n").unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        s.read_exact(&mut b)
            .expect("podvmm-bench: no OK line from podvmm");
        line.push(b[0]);
    }
    assert!(
        line.starts_with(b"OK "),
        "podvmm-bench: {:?}",
        String::from_utf8_lossy(&line)
    );
    s.write_all(b"ping1234").unwrap();
    let mut echo = [0u8; 8];
    s.read_exact(&mut echo)
        .expect("podvmm-bench: no echo from the guest");
    let elapsed = start.elapsed();
    assert_eq!(&echo, b"ping1234");
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let _ = s.read_to_end(&mut Vec::new());
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "podvmm-bench: podvmm exited with {status}"
    );
    elapsed
}

fn boot(plan: &Plan) {
    let dir = TempDir::new("bench-tg-boot");
    let ms: Vec<f64> = (0..plan.boots)
        .map(|i| boot_to_vsock(&dir, i).as_secs_f64() * 1e3)
        .collect();
    let min = ms.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "podvmm-bench: boot_to_guest_vsock_ms={:.2} (median of {}, min {min:.2})",
        median(&ms),
        plan.boots
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("testguest_io: bench");
        return;
    }
    let plan = plan();
    println!("podvmm-bench: test guest {}", testguest().display());
    blk(&plan);
    vsock_rtt(&plan);
    boot(&plan);
}
