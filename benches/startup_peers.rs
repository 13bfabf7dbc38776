//! Start-up next to the other VMMs, side by side in one run: podvmm, QEMU microvm (always,
//! when `qemu-system-x86_64` is on PATH) and Cloud Hypervisor and Firecracker when
//! `$PODVMM_PEERS_DIR` names a directory holding their binaries (`cloud-hypervisor`,
//! `firecracker`, or more builds named `cloud-hypervisor*`, `firecracker*`; build them yourself
//! from their release tags, nothing here builds them).
//!
//! Every VMM boots the same tiny PVH image (`tests/common`: it checks the start info, prints
//! `PVH <command line>` on COM1 and ends the run through whichever device each VMM has), 1
//! vCPU, serial console on stdout. Per VMM, medians over interleaved rounds (the VMMs take
//! turns, each round starting one further, so noise hits all alike):
//!
//! - `first_output_ms`: exec to the read that brought the guest's `PVH ` from the console;
//! - `cpu_ms`: user + system CPU of the whole run (`wait4`'s rusage), exec to exit;
//! - `wall_ms`: exec to exit;
//! - `api_ready_ms`: exec of the VMM with only its API socket to the first answer (podvmm
//!   and Cloud Hypervisor: `GET /api/v1/vmm.ping` = 200; Firecracker: `GET /` = 200; QEMU: the
//!   QMP greeting), polled every 50 µs;
//! - `rss_kib` / `pss_kib`: the VMM process 300 ms after an idle guest with 2 GiB configured
//!   printed its line (`/proc/PID/status`, `/proc/PID/smaps_rollup`).
//!
//! Every run is checked: the guest's line must arrive and the VMM must exit with its own
//! success status, or the bench panics. podvmm runs with 128 MiB and with 2 GiB; the others
//! with 128 MiB. The closing lines:
//!
//! ```text
//! podvmm-bench: start_ratio_vs_best=<podvmm first output / best peer's>
//! podvmm-bench: cpu_ratio_vs_best=<...>
//! podvmm-bench: api_ready_ratio_vs_best=<...>
//! podvmm-bench: rss_kib=<podvmm, 2 GiB idle guest> (best peer <name> <kib>)
//! podvmm-bench: start_2g_vs_128m=<podvmm first output, 2 GiB / 128 MiB>
//! ```
//!
//! A ratio below 1 means podvmm is ahead. Environment: `PODVMM_BENCH_QUICK=1` (or `--quick`)
//! cuts the rounds, for CI; under `cargo test --benches` each measurement runs twice.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use common::{pvh_elf, pvh_guest_code_any_vmm, pvh_guest_code_idle, TempDir};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use support::vmms::{find_on_path, host_kvm, peers_from_env, Kind, Probe, Vmm};
use support::{median, mode_from_args, quick_requested, Mode};

/// The guest's command line; it prints it back.
const CMDLINE: &str = "startup-bench";
/// A run that takes longer than this is killed and the bench fails.
const RUN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an idle guest sits before its VMM's memory is read.
const IDLE_SETTLE: Duration = Duration::from_millis(300);

/// One whole run, measured.
struct Run {
    first_output: Duration,
    wall: Duration,
    cpu: Duration,
}

/// A VMM under test with its memory size and its samples.
struct Subject {
    vmm: Vmm,
    mem_mib: u32,
    runs: Vec<Run>,
    api_ready: Vec<Duration>,
    memory: Vec<(u64, u64)>,
}

impl Subject {
    fn id(&self) -> String {
        format!("{}_{}M", self.vmm.name(), self.mem_mib)
    }
}

/// Kills `pid` unless `done` hears from the caller within `RUN_TIMEOUT`: no hung VMM (Cloud
/// Hypervisor reboots at an i8042 reset, for one) can hang the bench.
fn watchdog(pid: u32) -> mpsc::Sender<()> {
    let (done, rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(RUN_TIMEOUT) {
            // SAFETY: kill(2) on a pid this process spawned and has not yet reaped.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    });
    done
}

/// Reaps `child` with wait4, returning its exit code (None when signalled) and CPU time.
fn reap(child: &Child) -> (Option<i32>, Duration) {
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, writing only into the two locals.
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(r, child.id() as i32, "podvmm-bench: wait4 failed");
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    (code, tv(usage.ru_utime) + tv(usage.ru_stime))
}

/// Reads `out` until the guest's `PVH ` has arrived; returns what was read.
fn read_until_line(out: &mut impl Read, seen: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match out.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => {
                seen.extend_from_slice(&buf[..n]);
                if seen.windows(4).any(|w| w == b"PVH ") {
                    return true;
                }
            }
        }
    }
}

/// The guest printed `PVH <CMDLINE>` (its command line's first word) on a line of its own;
/// a VMM may log other lines on stdout (Firecracker does).
fn guest_line_ok(output: &[u8]) -> bool {
    let want = format!("PVH {CMDLINE}");
    String::from_utf8_lossy(output).lines().any(|l| l == want)
}

/// One whole run of `kernel` on `s`, checked.
// The child is reaped by `reap` (wait4, for its rusage), which clippy cannot see.
#[allow(clippy::zombie_processes)]
fn run_once(s: &Subject, kernel: &Path, scratch: &Path) -> Run {
    let id = s.id();
    let stderr_path = scratch.join(format!("{id}.stderr"));
    let stderr = std::fs::File::create(&stderr_path).expect("create stderr file");
    let mut cmd = s.vmm.boot(kernel, CMDLINE, s.mem_mib, scratch);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr);
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("podvmm-bench: cannot run {id}: {e}"));
    let done = watchdog(child.id());
    let mut out = child.stdout.take().expect("piped stdout");
    let mut seen = Vec::new();
    let got_line = read_until_line(&mut out, &mut seen);
    let first_output = start.elapsed();
    let _ = out.read_to_end(&mut seen);
    let (code, cpu) = reap(&child);
    let wall = start.elapsed();
    let _ = done.send(());
    let fail = |why: &str| -> ! {
        panic!(
            "podvmm-bench: {id}: {why} (exit {code:?})\n  command: {cmd:?}\n  stdout: {:?}\n  stderr: {}",
            String::from_utf8_lossy(&seen),
            std::fs::read_to_string(&stderr_path).unwrap_or_default().trim_end()
        )
    };
    if !got_line || !guest_line_ok(&seen) {
        fail(&format!("the guest did not print `PVH {CMDLINE}`"));
    }
    if code != Some(s.vmm.ok_code()) {
        fail(&format!("the VMM did not exit with {}", s.vmm.ok_code()));
    }
    Run {
        first_output,
        wall,
        cpu,
    }
}

/// Whether the socket answers as `probe` expects.
fn probe_answers(socket: &Path, probe: &Probe) -> bool {
    let Ok(mut c) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = [0u8; 512];
    match probe {
        Probe::HttpGet(path) => {
            let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n");
            if c.write_all(req.as_bytes()).is_err() {
                return false;
            }
            let mut got = Vec::new();
            while !got.windows(2).any(|w| w == b"\r\n") {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            got.starts_with(b"HTTP/1.1 200") || got.starts_with(b"HTTP/1.0 200")
        }
        Probe::QmpGreeting => {
            matches!(c.read(&mut buf), Ok(n) if buf[..n].starts_with(b"{\"QMP\""))
        }
    }
}

/// Exec of the VMM with only its API socket to the first answer.
fn api_ready_once(s: &Subject, scratch: &Path, round: usize) -> Duration {
    let socket = scratch.join(format!("{}-{round}.sock", s.vmm.name()));
    let _ = std::fs::remove_file(&socket);
    let (mut cmd, probe) = s.vmm.api_only(&socket);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("podvmm-bench: cannot run {}: {e}", s.id()));
    let ready = loop {
        if probe_answers(&socket, &probe) {
            break start.elapsed();
        }
        if start.elapsed() > RUN_TIMEOUT || matches!(child.try_wait(), Ok(Some(_))) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "podvmm-bench: {}'s API socket {} never answered",
                s.id(),
                socket.display()
            );
        }
        std::thread::sleep(Duration::from_micros(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&socket);
    ready
}

/// The value of `key` (in kB) in a /proc file of `key: value kB` lines.
fn proc_kib(path: &str, key: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// RSS and PSS (KiB) of the VMM with an idle guest of `mem_mib`.
fn idle_memory_once(vmm: &Vmm, kernel: &Path, mem_mib: u32, scratch: &Path) -> (u64, u64) {
    let mut cmd = vmm.boot(kernel, CMDLINE, mem_mib, scratch);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("podvmm-bench: cannot run {}: {e}", vmm.name()));
    let done = watchdog(child.id());
    let mut out = child.stdout.take().expect("piped stdout");
    let mut seen = Vec::new();
    let got = read_until_line(&mut out, &mut seen);
    std::thread::sleep(IDLE_SETTLE);
    let pid = child.id();
    let rss = proc_kib(&format!("/proc/{pid}/status"), "VmRSS");
    let pss = proc_kib(&format!("/proc/{pid}/smaps_rollup"), "Pss");
    let _ = child.kill();
    let _ = child.wait();
    let _ = done.send(());
    assert!(
        got,
        "podvmm-bench: {} with the idle guest printed no line: {:?}",
        vmm.name(),
        String::from_utf8_lossy(&seen)
    );
    match (rss, pss) {
        (Some(r), Some(p)) => (r, p),
        _ => panic!("podvmm-bench: cannot read {}'s memory in /proc", vmm.name()),
    }
}

fn ms(d: &Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median_of(samples: impl Iterator<Item = f64>) -> f64 {
    median(&samples.collect::<Vec<_>>())
}

/// QEMU microvm with KVM, or with TCG where KVM fails here (said so), or none.
fn qemu_subject(kernel: &Path, scratch: &Path) -> Option<Subject> {
    let Some(program) = find_on_path("qemu-system-x86_64") else {
        println!("podvmm-bench: qemu=absent (apt-get install qemu-system-x86)");
        return None;
    };
    for accel in ["kvm", "tcg"] {
        let s = Subject {
            vmm: Vmm::new(Kind::Qemu(accel), program.clone()),
            mem_mib: 128,
            runs: Vec::new(),
            api_ready: Vec::new(),
            memory: Vec::new(),
        };
        let verified = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_once(&s, kernel, scratch)
        }));
        match verified {
            Ok(_) => {
                println!("podvmm-bench: qemu accel={accel} ({})", s.vmm.version);
                return Some(s);
            }
            Err(_) => println!("podvmm-bench: qemu cannot boot the guest with accel={accel}"),
        }
    }
    None
}

fn main() {
    let mode = mode_from_args();
    if mode == Mode::List {
        println!("startup_peers: bench");
        return;
    }
    let rounds = match (mode, quick_requested()) {
        (Mode::Test, _) => 2,
        (_, true) => 15,
        _ => 60,
    };
    let memory_rounds = if mode == Mode::Test { 1 } else { 3 };

    let dir = TempDir::new("bench-startup");
    let scratch = dir.path("");
    let kernel = dir.write("tiny.elf", &pvh_elf(&pvh_guest_code_any_vmm()));
    let idle = dir.write("idle.elf", &pvh_elf(&pvh_guest_code_idle()));
    println!("podvmm-bench: host kvm={}", host_kvm());

    let podvmm = Vmm::new(
        Kind::Podvmm,
        std::path::PathBuf::from(env!("CARGO_BIN_EXE_podvmm")),
    );
    let subject = |vmm: Vmm, mem_mib| Subject {
        vmm,
        mem_mib,
        runs: Vec::new(),
        api_ready: Vec::new(),
        memory: Vec::new(),
    };
    let mut subjects = vec![subject(podvmm.clone(), 128), subject(podvmm.clone(), 2048)];
    subjects.extend(qemu_subject(&kernel, &scratch));
    for peer in peers_from_env() {
        println!(
            "podvmm-bench: peer {} = {} ({})",
            peer.name(),
            peer.program.display(),
            peer.version
        );
        subjects.push(subject(peer, 128));
    }
    // Every subject once, outside the figures: a VMM that cannot boot the guest fails here.
    for s in &subjects {
        run_once(s, &kernel, &scratch);
        println!("podvmm-bench: verified {}", s.id());
    }

    let n = subjects.len();
    for round in 0..rounds {
        for k in 0..n {
            let i = (round + k) % n;
            let run = run_once(&subjects[i], &kernel, &scratch);
            subjects[i].runs.push(run);
        }
    }
    // The API set: one process per VMM kind (the 2 GiB podvmm is the same program).
    let api_subjects: Vec<usize> = (0..n).filter(|&i| i != 1).collect();
    for round in 0..rounds {
        for k in 0..api_subjects.len() {
            let i = api_subjects[(round + k) % api_subjects.len()];
            let t = api_ready_once(&subjects[i], &scratch, round);
            subjects[i].api_ready.push(t);
        }
    }
    for _ in 0..memory_rounds {
        for s in subjects.iter_mut() {
            let m = idle_memory_once(&s.vmm, &idle, 2048, &scratch);
            s.memory.push(m);
        }
    }
    // The 128 MiB podvmm also sits idle with 128 MiB: the memory figure must not follow the
    // configured size.
    let podvmm_small: Vec<(u64, u64)> = (0..memory_rounds)
        .map(|_| idle_memory_once(&podvmm, &idle, 128, &scratch))
        .collect();

    struct Figures {
        first: f64,
        cpu: f64,
        wall: f64,
        api: Option<f64>,
        rss: f64,
        pss: f64,
    }
    let figures: Vec<Figures> = subjects
        .iter()
        .map(|s| Figures {
            first: median_of(s.runs.iter().map(|r| ms(&r.first_output))),
            cpu: median_of(s.runs.iter().map(|r| ms(&r.cpu))),
            wall: median_of(s.runs.iter().map(|r| ms(&r.wall))),
            api: (!s.api_ready.is_empty()).then(|| median_of(s.api_ready.iter().map(ms))),
            rss: median_of(s.memory.iter().map(|m| m.0 as f64)),
            pss: median_of(s.memory.iter().map(|m| m.1 as f64)),
        })
        .collect();
    for (s, f) in subjects.iter().zip(&figures) {
        let api = f.api.map_or("-".to_string(), |a| format!("{a:.2}"));
        println!(
            "podvmm-bench: startup {} runs={} first_output_ms={:.2} cpu_ms={:.2} wall_ms={:.2} \
             api_ready_ms={api} idle_2g_rss_kib={:.0} idle_2g_pss_kib={:.0}",
            s.id(),
            s.runs.len(),
            f.first,
            f.cpu,
            f.wall,
            f.rss,
            f.pss
        );
    }

    // Ratios against the best peer (the lowest figure among the other VMMs).
    let peers: Vec<usize> = (2..n).collect();
    let best = |figure: &dyn Fn(&Figures) -> Option<f64>| -> Option<(f64, String)> {
        peers
            .iter()
            .filter_map(|&i| figure(&figures[i]).map(|v| (v, subjects[i].vmm.name())))
            .min_by(|a, b| a.0.total_cmp(&b.0))
    };
    let ratio_line =
        |key: &str, ours: f64, figure: &dyn Fn(&Figures) -> Option<f64>| match best(figure) {
            Some((theirs, name)) => println!(
                "podvmm-bench: {key}={:.2} (podvmm {ours:.2} ms, best peer {name} {theirs:.2} ms)",
                ours / theirs
            ),
            None => println!("podvmm-bench: {key}=absent (no peer measured)"),
        };
    let ours = &figures[0];
    ratio_line("start_ratio_vs_best", ours.first, &|f| Some(f.first));
    ratio_line("cpu_ratio_vs_best", ours.cpu, &|f| Some(f.cpu));
    ratio_line(
        "api_ready_ratio_vs_best",
        ours.api.unwrap_or(f64::NAN),
        &|f| f.api,
    );
    let small_rss = median_of(podvmm_small.iter().map(|m| m.0 as f64));
    match best(&|f| Some(f.rss)) {
        Some((theirs, name)) => println!(
            "podvmm-bench: rss_kib={:.0} (idle guest, 2 GiB configured; best peer {name} {theirs:.0})",
            ours.rss
        ),
        None => println!("podvmm-bench: rss_kib={:.0} (idle guest, 2 GiB configured)", ours.rss),
    }
    println!("podvmm-bench: rss_128m_kib={small_rss:.0} (podvmm, idle guest, 128 MiB configured)");
    println!(
        "podvmm-bench: start_2g_vs_128m={:.2} cpu_2g_vs_128m={:.2}",
        figures[1].first / ours.first,
        figures[1].cpu / ours.cpu
    );
}
