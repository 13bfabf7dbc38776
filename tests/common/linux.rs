//! The guest kit's Linux under podvmm, with its agent reachable over vsock: what the end-to-end
//! tests share (one boot, its console, its event monitor, the agent client, waiting with the
//! console tail in every failure).
//!
//! Under software KVM (PVM) guest user space runs because the kit's kernel carries the syscall
//! fix-up (`resources/kernel-patches/`) and podvmm passes `pvm_syscall_fixup`; a boot to the
//! agent takes a minute or two there, so tests keep boots few and take [`one_boot_at_a_time`].

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use agent::{Client, ExecRequest, ExecResult};
use serde_json::Value;

use super::{path_str, podvmm_bin, TempDir};

/// The kernel command line the tests use: quiet (each console byte is a VM exit under PVM),
/// reset on panic, no RCU stall reports (a loaded host stretches the emulated boot).
pub const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 rcupdate.rcu_cpu_stall_suppress=1";

static BOOT: Mutex<()> = Mutex::new(());

/// One Linux boot at a time per test binary: two emulated guests on two cores crawl.
pub fn one_boot_at_a_time() -> MutexGuard<'static, ()> {
    BOOT.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn kit_dir() -> PathBuf {
    std::env::var_os("PODVMM_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/guest"))
}

pub fn kit_file(name: &str) -> PathBuf {
    let p = kit_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the guest kit first with scripts/build-guest.sh",
        p.display()
    );
    p
}

/// The podvmm under test (`PODVMM_BIN` overrides it, to run a compiled test elsewhere).
pub fn podvmm() -> PathBuf {
    std::env::var_os("PODVMM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(podvmm_bin)
}

/// How long one boot may take before a test gives up (`PODVMM_LINUX_TIMEOUT_S`, default 900 s).
pub fn deadline() -> Duration {
    Duration::from_secs(
        std::env::var("PODVMM_LINUX_TIMEOUT_S")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(900),
    )
}

/// One podvmm running the kit with a vsock device and an event monitor.
pub struct Boot {
    child: Option<Child>,
    pub console: PathBuf,
    pub events: PathBuf,
    pub socket: PathBuf,
    stderr: PathBuf,
    pub started: Instant,
}

impl Boot {
    /// Boots the kit (vmlinux, initramfs with the agent) with `vcpus`, `extra` podvmm
    /// arguments and `cmdline`; files live in `dir`, named after `tag`.
    pub fn start(dir: &TempDir, tag: &str, vcpus: u32, extra: &[&str], cmdline: &str) -> Boot {
        Self::spawn(Command::new(podvmm()), dir, tag, vcpus, extra, cmdline)
    }

    /// Boots with `cmd` as the VMM command (podvmm itself, or a wrapper whose arguments lead to
    /// podvmm); the kit's arguments are appended.
    pub fn spawn(
        mut cmd: Command,
        dir: &TempDir,
        tag: &str,
        vcpus: u32,
        extra: &[&str],
        cmdline: &str,
    ) -> Boot {
        let console = dir.path(&format!("{tag}.console.log"));
        let events = dir.path(&format!("{tag}.events.jsonl"));
        let socket = dir.path(&format!("{tag}.vsock"));
        let stderr = dir.path(&format!("{tag}.stderr"));
        let _ = std::fs::remove_file(&console);
        let _ = std::fs::remove_file(&events);
        let started = Instant::now();
        let child = cmd
            .args(["--kernel", path_str(&kit_file("vmlinux"))])
            .args(["--initramfs", path_str(&kit_file("initramfs.cpio"))])
            .args(["--cpus", &format!("boot={vcpus}"), "--memory", "size=512M"])
            .args(["--serial", &format!("file={}", path_str(&console))])
            .args(["--vsock", &format!("cid=3,socket={}", path_str(&socket))])
            .args(["--event-monitor", &format!("path={}", path_str(&events))])
            .args(extra)
            .args(["--cmdline", cmdline])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("podvmm stderr file"))
            .spawn()
            .expect("start podvmm");
        Boot {
            child: Some(child),
            console,
            events,
            socket,
            stderr,
            started,
        }
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.events)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn event(&self, name: &str) -> Option<Value> {
        self.events().into_iter().find(|e| e["event"] == name)
    }

    /// The order of the events seen so far.
    pub fn event_names(&self) -> Vec<String> {
        self.events()
            .iter()
            .map(|e| e["event"].as_str().unwrap_or("").to_string())
            .collect()
    }

    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Polls until `cond` holds; panics with the context on timeout or if podvmm exits.
    pub fn wait_for(&mut self, what: &str, timeout: Duration, mut cond: impl FnMut(&Boot) -> bool) {
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

    /// podvmm's stderr, the events and the console's last lines: what a failure message needs.
    pub fn context(&self) -> String {
        let text = self.console();
        let tail: Vec<&str> = text.lines().rev().take(25).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "podvmm stderr:\n{}\nevents: {}\nconsole tail:\n{}",
            self.stderr(),
            self.breakdown(),
            tail.join("\n")
        )
    }

    /// Waits for podvmm to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
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

    /// The events as `name=ms` (ms since podvmm started).
    pub fn breakdown(&self) -> String {
        self.events()
            .iter()
            .map(|e| {
                format!(
                    "{}={:.0}ms",
                    e["event"].as_str().unwrap_or("?"),
                    e["ms"].as_f64().unwrap_or(f64::NAN)
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Connects to the agent: one CONNECT, held by podvmm until the agent listens.
    pub fn agent(&mut self) -> Client {
        self.wait_for("the vsock socket", Duration::from_secs(30), |b| {
            b.socket.exists()
        });
        Client::connect(&self.socket, agent::AGENT_PORT, deadline())
            .unwrap_or_else(|e| panic!("connecting to the agent: {e}\n{}", self.context()))
    }

    /// Powers the guest off through the agent and checks that podvmm ends with status 0.
    pub fn poweroff(mut self, client: Client) {
        client
            .poweroff()
            .unwrap_or_else(|e| panic!("poweroff: {e}\n{}", self.context()));
        let status = self.wait_exit(Duration::from_secs(120));
        assert!(status.success(), "{status}\n{}", self.context());
        assert!(!self.socket.exists(), "vsock socket left behind");
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

/// Runs `sh -c script` in the guest through the agent; panics (with the boot's context) if the
/// agent cannot run it. The result carries the exit code and both outputs.
pub fn sh(c: &mut Client, b: &Boot, script: &str, stdin: Option<&str>) -> ExecResult {
    c.exec(ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        stdin: stdin.map(str::to_string),
        ..ExecRequest::default()
    })
    .unwrap_or_else(|e| panic!("exec {script:?}: {e}\n{}", b.context()))
}

/// Like [`sh`], and the script must succeed; returns its stdout.
pub fn sh_ok(c: &mut Client, b: &Boot, script: &str, stdin: Option<&str>) -> String {
    let r = sh(c, b, script, stdin);
    assert_eq!(
        r.exit_code,
        Some(0),
        "{script:?} failed: stdout {:?} stderr {:?}\n{}",
        r.stdout,
        r.stderr,
        b.context()
    );
    r.stdout
}
