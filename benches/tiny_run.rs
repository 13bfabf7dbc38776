//! The VMM's whole cost for one run of a tiny guest: exec of `podvmm` to process exit.
//!
//! The guest is the PVH test guest of `tests/common` (a few dozen instructions: it checks the
//! start info, prints `PVH <command line>` on COM1 and resets through the i8042), in the
//! variant that also ends QEMU microvm (and Cloud Hypervisor, see `startup_peers`), so QEMU
//! can boot the very same image side by side. Serial output goes to `null` in the timed runs; before any timing,
//! every VMM is run once with its console captured and must print the expected line and exit
//! as expected, or the bench panics.
//!
//! Reports (criterion): `tiny_run/podvmm_128M`, `tiny_run/podvmm_2G`,
//! `tiny_run/podvmm_128M_seccomp_off` (the same without system call filters) and, where
//! `qemu-system-x86_64` is on PATH, `tiny_run/qemu_microvm_128M` (`..._tcg_128M` when QEMU
//! cannot use KVM here). Then an independent set of interleaved runs (the VMMs take turns, so
//! noise hits all alike) gives the medians in the closing `podvmm-bench:` lines.
//!
//! Environment: `PODVMM_BENCH_QUICK=1` (or criterion's own `--quick`) cuts the sample sizes
//! and the number of interleaved runs, for CI. Under `cargo test --benches` (criterion's test
//! mode) each benchmark runs once and the interleaved set is 3 rounds.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use common::{path_str, pvh_elf, pvh_guest_code_any_vmm, TempDir};
use criterion::{Criterion, SamplingMode};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::vmms::{find_on_path, host_kvm, qemu_machine, version_of};
use support::{mode_from_args, quick_requested, Mode};

/// The guest's command line; it prints it back.
const CMDLINE: &str = "tiny-bench";
/// Seconds a verification run may take before it is killed (and the bench fails).
const VERIFY_TIMEOUT_S: u32 = 60;
/// QEMU's exit status for `isa-debug-exit` with value 0: `(0 << 1) | 1`.
const QEMU_DEBUG_EXIT_OK: i32 = 1;

/// One way of running the tiny guest.
struct Vm {
    /// The criterion id within the `tiny_run` group.
    id: String,
    program: PathBuf,
    /// Arguments for the timed runs (console discarded).
    timed_args: Vec<String>,
    /// Arguments for the verification run (console on stdout).
    verify_args: Vec<String>,
    /// The exit status that means the guest ran to its end.
    ok_code: i32,
}

impl Vm {
    fn command_line(&self, args: &[String]) -> String {
        let mut s = self.program.display().to_string();
        for a in args {
            s.push(' ');
            s.push_str(a);
        }
        s
    }

    /// One timed run: exec to exit. Panics unless the VMM exited with `ok_code`.
    fn run_timed(&self) -> Duration {
        let start = Instant::now();
        let status = Command::new(&self.program)
            .args(&self.timed_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("podvmm-bench: cannot run {}: {e}", self.id));
        let elapsed = start.elapsed();
        assert_eq!(
            status.code(),
            Some(self.ok_code),
            "podvmm-bench: {} failed in a timed run ({status}): {}",
            self.id,
            self.command_line(&self.timed_args)
        );
        elapsed
    }

    /// Runs `args` under coreutils `timeout`, capturing stdout and stderr.
    fn run_captured(&self, args: &[String]) -> Output {
        Command::new("timeout")
            .arg("--kill-after=5")
            .arg(VERIFY_TIMEOUT_S.to_string())
            .arg(&self.program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("podvmm-bench: cannot run timeout(1) for {}: {e}", self.id))
    }

    /// Checks, outside any timing, that the guest really ran: the console shows the guest's
    /// line and the VMM exits with `ok_code`; and that the timed variant exits the same way
    /// without console output. `Err` says what went wrong.
    fn verify(&self) -> Result<String, String> {
        let out = self.run_captured(&self.verify_args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        // The first line says what failed in brief (it is what a fallback reports); the
        // details follow.
        let what = |reason: &str| {
            format!(
                "{reason} (status: {}; stderr: {})\n  command: {}\n  stdout: {stdout:?}\n  stderr: {}",
                out.status,
                stderr.lines().next().unwrap_or("empty"),
                self.command_line(&self.verify_args),
                stderr.trim_end()
            )
        };
        if !guest_line_ok(&stdout) {
            return Err(what(&format!("the guest did not print `PVH {CMDLINE}`")));
        }
        if out.status.code() != Some(self.ok_code) {
            return Err(what(&format!("exit status is not {}", self.ok_code)));
        }
        let quiet = self.run_captured(&self.timed_args);
        if quiet.status.code() != Some(self.ok_code) || !quiet.stdout.is_empty() {
            return Err(format!(
                "the timed variant misbehaved (status: {})\n  command: {}\n  stdout: {:?}\n  stderr: {}",
                quiet.status,
                self.command_line(&self.timed_args),
                String::from_utf8_lossy(&quiet.stdout),
                String::from_utf8_lossy(&quiet.stderr).trim_end()
            ));
        }
        Ok(stdout.trim_end().to_string())
    }
}

/// The guest prints `PVH <the first word of its command line>\n` and nothing else (podvmm
/// appends PVM workarounds to the command line here; the guest stops at the first space).
fn guest_line_ok(stdout: &str) -> bool {
    let Some(line) = stdout.strip_suffix('\n') else {
        return false;
    };
    let want = format!("PVH {CMDLINE}");
    line == want
}

/// podvmm with `memory` of RAM; `seccomp_off` adds `--seccomp false` (to show what the
/// filters and the spawner thread cost at start-up).
fn podvmm(kernel: &Path, memory: &str, seccomp_off: bool) -> Vm {
    let args = |serial: &str| -> Vec<String> {
        let mut a: Vec<String> = [
            "--kernel",
            path_str(kernel),
            "--cmdline",
            CMDLINE,
            "--memory",
            &format!("size={memory}"),
            "--cpus",
            "boot=1",
            "--serial",
            serial,
        ]
        .map(String::from)
        .to_vec();
        if seccomp_off {
            a.extend(["--seccomp".to_string(), "false".to_string()]);
        }
        a
    };
    Vm {
        id: if seccomp_off {
            format!("podvmm_{memory}_seccomp_off")
        } else {
            format!("podvmm_{memory}")
        },
        program: PathBuf::from(env!("CARGO_BIN_EXE_podvmm")),
        timed_args: args("null"),
        verify_args: args("tty"),
        ok_code: 0,
    }
}

/// QEMU microvm booting the same image with `accel` (`kvm` or `tcg`).
fn qemu(program: &Path, kernel: &Path, accel: &str) -> Vm {
    let args = |serial: &str| -> Vec<String> {
        let mut a = qemu_machine(accel, 128);
        a.extend(
            [
                "-serial",
                serial,
                "-kernel",
                path_str(kernel),
                "-append",
                CMDLINE,
            ]
            .map(String::from),
        );
        a
    };
    let id = if accel == "kvm" {
        "qemu_microvm_128M".to_string()
    } else {
        format!("qemu_microvm_{accel}_128M")
    };
    Vm {
        id,
        program: program.to_path_buf(),
        timed_args: args("null"),
        verify_args: args("stdio"),
        ok_code: QEMU_DEBUG_EXIT_OK,
    }
}

fn median_ms(samples: &[Duration]) -> f64 {
    let ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    support::median(&ms)
}

fn main() {
    let mode = mode_from_args();
    let quick = quick_requested();
    let (sample_size, measurement, warm_up, rounds) = if quick {
        (10, Duration::from_secs(1), Duration::from_millis(300), 11)
    } else {
        (20, Duration::from_secs(3), Duration::from_secs(1), 31)
    };
    let rounds = if mode == Mode::Test { 3 } else { rounds };

    let mut criterion = Criterion::default()
        .sample_size(sample_size)
        .measurement_time(measurement)
        .warm_up_time(warm_up)
        .configure_from_args();

    let dir = TempDir::new("bench-tiny");
    let kernel = dir.write("tiny.elf", &pvh_elf(&pvh_guest_code_any_vmm()));

    let mut vms = vec![
        podvmm(&kernel, "128M", false),
        podvmm(&kernel, "2G", false),
        podvmm(&kernel, "128M", true),
    ];
    let mut qemu_id = None;

    if mode != Mode::List {
        println!("podvmm-bench: host kvm={}", host_kvm());
        for vm in &vms {
            match vm.verify() {
                Ok(line) => println!("podvmm-bench: verified {}: guest printed {line:?}", vm.id),
                Err(e) => panic!(
                    "podvmm-bench: {} did not run the guest correctly: {e}",
                    vm.id
                ),
            }
        }
    }

    match find_on_path("qemu-system-x86_64") {
        None => println!("podvmm-bench: qemu=absent (apt-get install qemu-system-x86)"),
        Some(program) if mode == Mode::List => {
            // Listing only: name the benchmark without running anything.
            let vm = qemu(&program, &kernel, "kvm");
            qemu_id = Some(vm.id.clone());
            vms.push(vm);
        }
        Some(program) => {
            let version = version_of(&program);
            let kvm = qemu(&program, &kernel, "kvm");
            let chosen = match kvm.verify() {
                Ok(_) => Some((kvm, "kvm".to_string())),
                Err(kvm_err) => {
                    let first = kvm_err.lines().next().unwrap_or_default().to_string();
                    println!("podvmm-bench: qemu cannot use kvm here ({first}); trying tcg");
                    eprintln!("podvmm-bench: qemu with kvm: {kvm_err}");
                    let tcg = qemu(&program, &kernel, "tcg");
                    match tcg.verify() {
                        Ok(_) => Some((tcg, "tcg (pure software, kvm failed)".to_string())),
                        Err(e) => {
                            println!("podvmm-bench: qemu=unusable (kvm and tcg both failed)");
                            eprintln!("podvmm-bench: qemu with tcg: {e}");
                            None
                        }
                    }
                }
            };
            if let Some((vm, accel)) = chosen {
                println!(
                    "podvmm-bench: qemu=present accel={accel} ({version}), verified {}: {}",
                    vm.id,
                    vm.command_line(&vm.timed_args)
                );
                qemu_id = Some(vm.id.clone());
                vms.push(vm);
            }
        }
    }

    let mut group = criterion.benchmark_group("tiny_run");
    // Each iteration is a whole process lifetime (tens of milliseconds): flat sampling keeps
    // the iteration count, and so the run time, bounded.
    group.sampling_mode(SamplingMode::Flat);
    for vm in &vms {
        group.bench_function(vm.id.as_str(), |b| b.iter(|| vm.run_timed()));
    }
    group.finish();
    criterion.final_summary();

    if mode == Mode::List {
        return;
    }

    // The independent set: all VMMs take turns, starting one further each round.
    let mut samples: Vec<Vec<Duration>> = vec![Vec::with_capacity(rounds); vms.len()];
    for round in 0..rounds {
        for k in 0..vms.len() {
            let i = (round + k) % vms.len();
            samples[i].push(vms[i].run_timed());
        }
    }
    let medians: Vec<f64> = samples.iter().map(|s| median_ms(s)).collect();
    for (vm, s) in vms.iter().zip(&samples) {
        let ms = |d: &Duration| d.as_secs_f64() * 1e3;
        let min = s.iter().map(ms).fold(f64::INFINITY, f64::min);
        let max = s.iter().map(ms).fold(0.0, f64::max);
        println!(
            "podvmm-bench: interleaved {} runs={} median_ms={:.2} min_ms={min:.2} max_ms={max:.2}",
            vm.id,
            s.len(),
            median_ms(s)
        );
    }
    let ratio = medians[1] / medians[0];
    if !(0.8..=1.25).contains(&ratio) {
        println!(
            "podvmm-bench: note: podvmm's run time depends on the memory size here \
             (2G/128M = {ratio:.2}); it should not"
        );
    }
    let qemu_ms = match &qemu_id {
        Some(_) => format!("{:.2}", medians[3]),
        None => "absent".to_string(),
    };
    println!("podvmm-bench: tiny_run_ms={:.2}", medians[0]);
    println!("podvmm-bench: tiny_run_2g_ms={:.2}", medians[1]);
    println!(
        "podvmm-bench: tiny_run_seccomp_off_ms={:.2} (filters cost {:+.2} ms)",
        medians[2],
        medians[0] - medians[2]
    );
    println!("podvmm-bench: qemu_microvm_ms={qemu_ms}");
    println!("podvmm-bench: ratio_2g_vs_128m={ratio:.2}");
}
