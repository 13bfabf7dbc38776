//! Boots the guest kit's Linux with a vsock device and talks to the guest agent through the
//! hybrid socket: ping, info, exec, the event monitor's timeline, poweroff; then once more
//! with the agent as PID 1 (`rdinit=/sbin/podvmm-agent`).
//!
//! Needs the kit (`scripts/build-guest.sh`, which puts the agent in the initramfs). Under
//! software KVM (PVM: `/sys/module/kvm_pvm`) guest user space cannot run, so the agent never
//! starts: the test says so loudly and checks the kernel's side instead — the virtio-vsock
//! driver brought the device up (DRIVER_OK, the monitor's `device_activated`), `PF_VSOCK` is
//! registered, and a host `CONNECT 1024` made then is answered by the guest kernel with RST
//! (nothing listens), which the device reports (`vsock_connect_refused`) and retries: a round
//! trip through the real Linux driver, both queues. It never passes silently.
//!
//! `PODVMM_BIN` and `PODVMM_GUEST_DIR` override the podvmm binary and the kit directory (to
//! run the compiled test elsewhere).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent::{Client, ExecRequest};
use common::*;
use serde_json::Value;

const PF_VSOCK: &str = "NET: Registered PF_VSOCK protocol family";
const RUN_INIT: &str = "Run /init as init process";
/// What PVM's missing system-call path looks like: init faults on the kernel's syscall entry.
const PVM_SYSCALL_FAULT: &str = "init[1]: segfault at ffffffff";

fn kit_dir() -> PathBuf {
    std::env::var_os("PODVMM_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/guest"))
}

fn kit_file(name: &str) -> PathBuf {
    let p = kit_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the guest kit first with scripts/build-guest.sh",
        p.display()
    );
    p
}

fn podvmm() -> PathBuf {
    std::env::var_os("PODVMM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(podvmm_bin)
}

fn deadline_s() -> u64 {
    std::env::var("PODVMM_LINUX_TIMEOUT_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(900)
}

/// One podvmm running the kit.
struct Boot {
    child: Option<Child>,
    _dir: TempDir,
    console: PathBuf,
    events: PathBuf,
    socket: PathBuf,
    started: Instant,
}

impl Boot {
    fn start(tag: &str, cmdline: &str) -> Boot {
        let dir = TempDir::new(tag);
        let console = dir.path("console.log");
        let events = dir.path("events.jsonl");
        let socket = dir.path("vsock.sock");
        // The initramfs must contain the agent: the kit was built with it.
        let initramfs = kit_file("initramfs.cpio");
        let started = Instant::now();
        let child = Command::new(podvmm())
            .args(["--kernel", path_str(&kit_file("vmlinux"))])
            .args(["--initramfs", path_str(&initramfs)])
            .args(["--cpus", "boot=2", "--memory", "size=512M"])
            .args(["--serial", &format!("file={}", path_str(&console))])
            .args(["--vsock", &format!("cid=3,socket={}", path_str(&socket))])
            .args(["--event-monitor", &format!("path={}", path_str(&events))])
            .args(["--cmdline", cmdline])
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start podvmm");
        Boot {
            child: Some(child),
            _dir: dir,
            console,
            events,
            socket,
            started,
        }
    }

    fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.events)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn event(&self, name: &str) -> Option<Value> {
        self.events().into_iter().find(|e| e["event"] == name)
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Polls until `cond` holds; panics with the console tail on timeout or if podvmm exits.
    fn wait_for(&mut self, what: &str, timeout: Duration, mut cond: impl FnMut(&Boot) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if cond(self) {
                return;
            }
            if let Some(status) = self.exited() {
                panic!(
                    "podvmm exited ({status}) while waiting for {what}\n{}",
                    self.context()
                );
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}\n{}", self.context());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn context(&mut self) -> String {
        let text = self.console();
        let tail: Vec<&str> = text.lines().rev().take(25).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        let mut stderr = String::new();
        if let Some(c) = self.child.as_mut() {
            if c.try_wait().ok().flatten().is_some() {
                if let Some(mut e) = c.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
                }
            }
        }
        format!(
            "podvmm stderr:\n{stderr}\nevents:\n{}\nconsole tail:\n{}",
            self.events()
                .iter()
                .map(|e| format!("  {} at {} ms", e["event"], e["ms"]))
                .collect::<Vec<_>>()
                .join("\n"),
            tail.join("\n")
        )
    }

    /// Waits for podvmm to exit by itself.
    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exited() {
                return s;
            }
            if Instant::now() > deadline {
                panic!("podvmm did not exit\n{}", self.context());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn breakdown(&self) -> String {
        self.events()
            .iter()
            .map(|e| {
                format!(
                    "{}={:.1}ms",
                    e["event"].as_str().unwrap_or("?"),
                    e["ms"].as_f64().unwrap_or(f64::NAN)
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl Drop for Boot {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
#[ignore = "boots Linux: minutes under PVM; scripts/test.sh and CI run it with --include-ignored"]
fn linux_agent_answers_over_vsock() {
    if hypervisor::kvm::is_pvm() {
        eprintln!(
            "linux-agent: NOTE: this host's KVM is PVM (software, /sys/module/kvm_pvm): guest \
             user space cannot run, so the agent CANNOT start and the agent round trip is NOT \
             tested here. Checking the guest kernel's side of vsock instead (minutes)."
        );
        kernel_side_only();
        eprintln!(
            "linux-agent: NOTE: PVM host: kernel-side vsock checks passed; ping/exec/info/poweroff \
             through the agent were NOT run (they run where KVM is hardware-assisted)"
        );
        return;
    }
    agent_via_init();
    agent_as_pid1();
}

/// Under PVM: everything up to the point where user space would start.
fn kernel_side_only() {
    // Under PVM a loaded host stretches the initramfs unpacking past RCU's 21 s stall timeout;
    // the stall report's NMI backtrace was then seen to wedge the guest for good. The
    // report says nothing about vsock: suppress it.
    let mut b = Boot::start(
        "linux-agent-pvm",
        "console=ttyS0 reboot=k rcupdate.rcu_cpu_stall_suppress=1",
    );
    let timeout = Duration::from_secs(deadline_s());
    b.wait_for("the vsock socket", Duration::from_secs(30), |b| {
        b.socket.exists()
    });
    b.wait_for(
        "the guest's virtio-vsock driver (device_activated)",
        timeout,
        |b| b.event("device_activated").is_some(),
    );
    let activated = b.started.elapsed();
    // The driver is up and the kernel still booting: ask for the agent's port now.
    let mut s = UnixStream::connect(&b.socket).expect("connect to the vsock socket");
    s.write_all(b"CONNECT 1024\n").unwrap();
    b.wait_for(
        "the guest kernel's RST to CONNECT 1024 (vsock_connect_refused)",
        timeout,
        |b| {
            b.event("vsock_connect_refused")
                .is_some_and(|e| e["properties"]["port"] == 1024)
        },
    );
    let refused = b.started.elapsed();
    // The VMM retries until its 30 s connect timeout, then tells the client why it gave up:
    // the guest kernel kept refusing (RST), since nothing can listen.
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut line = String::new();
    let _ = BufReader::new(&s).read_line(&mut line);
    assert!(
        line.starts_with("ERR ") && line.contains("1024"),
        "the waiting CONNECT should end with an ERR line after the VMM's timeout, got {line:?}\n{}",
        b.context()
    );
    eprintln!(
        "linux-agent: the waiting CONNECT ended with: {}",
        line.trim_end()
    );
    b.wait_for(PF_VSOCK, timeout, |b| b.console().contains(PF_VSOCK));
    b.wait_for("/init", timeout, |b| {
        b.console().contains(RUN_INIT) || b.console().contains(PVM_SYSCALL_FAULT)
    });
    eprintln!(
        "linux-agent: exec to virtio-vsock DRIVER_OK {:.1} s, guest RST to CONNECT 1024 by {:.1} s; {}",
        activated.as_secs_f64(),
        refused.as_secs_f64(),
        b.breakdown()
    );
    let console = b.console();
    assert!(console.contains("Linux version 6.12"), "{}", b.context());
}

fn connect(b: &mut Boot) -> Client {
    b.wait_for("the vsock socket", Duration::from_secs(30), |b| {
        b.socket.exists()
    });
    // One CONNECT: podvmm holds it until the agent listens.
    Client::connect(&b.socket, agent::AGENT_PORT, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("connecting to the agent: {e}\n{}", b.context()))
}

/// The default kit: /init starts the agent in the background.
fn agent_via_init() {
    let mut b = Boot::start("linux-agent", "console=ttyS0 reboot=k panic=-1");
    let t0 = Instant::now();
    let mut c = connect(&mut b);
    let pong = c.ping().expect("ping");
    let first_ping = t0.elapsed();
    assert!(pong.agent.starts_with("podvmm-agent"), "{pong:?}");
    let info = c.info().expect("info");
    assert!(info.kernel_release.starts_with("6.12"), "{info:?}");
    assert_eq!(info.cpus_online, 2, "{info:?}");
    assert!(
        (300 << 10..=512 << 10).contains(&info.mem_total_kib),
        "{info:?}"
    );
    let uname = c
        .exec(ExecRequest {
            argv: vec!["uname".into(), "-r".into()],
            ..ExecRequest::default()
        })
        .expect("exec uname");
    assert_eq!(uname.stdout.trim(), info.kernel_release);
    let r = c
        .exec(ExecRequest {
            argv: vec!["sh".into(), "-c".into(), "cat; echo err >&2; exit 7".into()],
            stdin: Some("via stdin\n".into()),
            ..ExecRequest::default()
        })
        .expect("exec sh");
    assert_eq!(
        (r.stdout.as_str(), r.stderr.as_str(), r.exit_code),
        ("via stdin\n", "err\n", Some(7))
    );
    let e = c
        .exec(ExecRequest {
            argv: vec!["/no/such/program".into()],
            ..ExecRequest::default()
        })
        .unwrap_err();
    assert!(e.to_string().contains("cannot run"), "{e}");
    // The CLI client, on a second connection.
    let out = Command::new(podvmm())
        .args([
            "agent",
            "--socket",
            path_str(&b.socket),
            "exec",
            "--",
            "cat",
            "/proc/cmdline",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("panic=-1"));
    // The timeline: every step, in order.
    let names: Vec<String> = b
        .events()
        .iter()
        .map(|e| e["event"].as_str().unwrap_or("").to_string())
        .collect();
    for (a, z) in [
        ("vmm_started", "vm_booted"),
        ("vm_booted", "kernel_started"),
        ("kernel_started", "device_activated"),
        ("device_activated", "agent_ready"),
    ] {
        let pa = names.iter().position(|n| n == a);
        let pz = names.iter().position(|n| n == z);
        assert!(
            pa.is_some() && pz.is_some() && pa < pz,
            "{a} before {z}: {names:?}"
        );
    }
    eprintln!(
        "linux-agent: exec to first ping answered {:.1} ms; {}",
        first_ping.as_secs_f64() * 1e3,
        b.breakdown()
    );
    // Power off through the agent: the VM ends, podvmm exits 0 and removes the socket.
    let p = c.poweroff().expect("poweroff");
    eprintln!("linux-agent: poweroff answered {:?}", p.action);
    let status = b.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "{status}\n{}", b.context());
    assert!(!b.socket.exists(), "socket left behind");
    assert!(b.event("shutdown").is_some());
}

/// The fast path: the agent is init (it mounts, reaps, and restarts itself if it dies).
fn agent_as_pid1() {
    let mut b = Boot::start(
        "linux-agent-pid1",
        "console=ttyS0 reboot=k panic=-1 rdinit=/sbin/podvmm-agent",
    );
    let t0 = Instant::now();
    let mut c = connect(&mut b);
    c.ping().expect("ping");
    eprintln!(
        "linux-agent: agent as PID 1: exec to first ping answered {:.1} ms; {}",
        t0.elapsed().as_secs_f64() * 1e3,
        b.breakdown()
    );
    let r = c
        .exec(ExecRequest {
            argv: vec!["cat".into(), "/proc/1/cmdline".into()],
            ..ExecRequest::default()
        })
        .expect("exec");
    assert!(r.stdout.contains("podvmm-agent"), "{r:?}");
    let info = c.info().expect("info");
    assert!(info.mem_total_kib > 0 && info.cpus_online == 2, "{info:?}");
    c.poweroff().expect("poweroff");
    let status = b.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "{status}\n{}", b.context());
}
