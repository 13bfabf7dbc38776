//! `--vsock` and `--event-monitor` on a real VM: a tiny guest that does one port write and
//! halts. It never drives the vsock device (the issue-6 test guest does that), so these tests
//! check what the host sees around it: the socket exists before the guest runs, a CONNECT
//! waits for the guest driver, bad input gets clear errors, the socket path is handled as
//! documented (live: refused; stale: replaced; removed on exit), and the event monitor's lines.

use crate::common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// `out 0x80, al; cli; hlt; jmp hlt`: one I/O exit (the monitor's `kernel_started`), then the
/// vCPU sleeps in the hypervisor for good.
fn halt_guest() -> Vec<u8> {
    pvh_elf(&[0xe6, 0x80, 0xfa, 0xf4, 0xeb, 0xfd])
}

struct Vmm {
    child: Child,
}

impl Vmm {
    fn start(kernel: &Path, extra: &[&str]) -> Vmm {
        let child = Command::new(podvmm_bin())
            .args(["--kernel", path_str(kernel), "--memory", "size=64M"])
            .args(["--serial", "off"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start podvmm");
        Vmm { child }
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().expect("poll podvmm").is_none()
    }

    fn kill(mut self) -> String {
        use std::io::Read;
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        err
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn vsock_arg(socket: &Path) -> String {
    format!("cid=3,socket={}", path_str(socket))
}

fn events(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn names(ev: &[serde_json::Value]) -> Vec<String> {
    ev.iter()
        .map(|e| e["event"].as_str().unwrap_or("?").to_string())
        .collect()
}

#[test]
fn socket_and_events_around_a_running_vm() {
    let dir = TempDir::new("vsock-cli");
    let kernel = dir.write("halt.elf", &halt_guest());
    let socket = dir.path("v.sock");
    let monitor = dir.path("events.jsonl");
    let vsock = vsock_arg(&socket);
    let ev_arg = format!("path={}", path_str(&monitor));
    let mut vmm = Vmm::start(&kernel, &["--vsock", &vsock, "--event-monitor", &ev_arg]);
    wait_for("the vsock socket", Duration::from_secs(20), || {
        socket.exists()
    });
    wait_for("kernel_started", Duration::from_secs(20), || {
        names(&events(&monitor)).contains(&"kernel_started".to_string())
    });
    assert!(vmm.running());
    let ev = events(&monitor);
    let n = names(&ev);
    assert_eq!(
        n[..4],
        ["vmm_started", "vm_created", "vm_booted", "kernel_started"],
        "{ev:?}"
    );
    let ms: Vec<f64> = ev.iter().map(|e| e["ms"].as_f64().unwrap()).collect();
    assert!(ms.windows(2).all(|w| w[0] <= w[1]), "{ms:?}");
    assert_eq!(ev[3]["properties"]["addr"], 0x80);
    eprintln!(
        "vsock-cli: events {:?}",
        ev.iter()
            .map(|e| (e["event"].clone(), e["ms"].clone()))
            .collect::<Vec<_>>()
    );

    // A CONNECT waits for the guest (whose driver never comes up here): the client times out,
    // cleanly, and the VMM is unaffected.
    let out = Command::new(podvmm_bin())
        .args([
            "agent",
            "--socket",
            path_str(&socket),
            "--timeout",
            "1",
            "ping",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("timed out"), "{stderr}");

    // Garbage instead of CONNECT: an error line, then the VMM closes that connection.
    for (input, want) in [
        ("HELLO\n", "expected 'CONNECT <port>'"),
        ("CONNECT 4294967296\n", "out of range"),
    ] {
        let mut s = UnixStream::connect(&socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(input.as_bytes()).unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        assert!(
            line.starts_with("ERR ") && line.contains(want),
            "{input:?}: {line}"
        );
    }
    // A client that connects and leaves mid-line.
    drop(UnixStream::connect(&socket).unwrap());

    // A second VMM on the same socket is refused: the socket is live.
    let other = run_podvmm(
        &[
            "--kernel",
            path_str(&kernel),
            "--memory",
            "size=64M",
            "--serial",
            "off",
            "--vsock",
            &vsock,
        ],
        30,
    );
    let err = String::from_utf8_lossy(&other.stderr);
    assert_eq!(other.status.code(), Some(1), "{err}");
    assert!(err.contains("in use"), "{err}");
    assert!(vmm.running(), "the first VMM must be unaffected");

    // Killed without clean-up (SIGKILL): the socket file stays behind, stale; the next VMM
    // replaces it.
    vmm.kill();
    assert!(socket.exists());
    let mut vmm2 = Vmm::start(&kernel, &["--vsock", &vsock]);
    wait_for(
        "the replaced socket to answer",
        Duration::from_secs(20),
        || UnixStream::connect(&socket).is_ok(),
    );
    assert!(vmm2.running());
    let stderr = vmm2.kill();
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_vsock_options() {
    let dir = TempDir::new("vsock-bad");
    let kernel = dir.write("halt.elf", &halt_guest());
    let k = path_str(&kernel);
    // Usage errors (exit 2): reserved cid, missing socket.
    for bad in [
        "cid=2,socket=/tmp/x",
        "cid=3",
        "socket=/tmp/x",
        "cid=3,socket=/tmp/x,port=5",
    ] {
        let out = run_podvmm(&["--kernel", k, "--vsock", bad], 30);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{bad}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The VM cannot be built (exit 1) with a reason.
    let missing: PathBuf = dir.path("no/such/dir/v.sock");
    let not_socket = dir.write("regular", b"keep me");
    let long = format!("/tmp/{}", "x".repeat(120));
    for (socket, want) in [
        (path_str(&missing).to_string(), "binding"),
        (path_str(&not_socket).to_string(), "not a socket"),
        (long, "longer than"),
    ] {
        let arg = format!("cid=3,socket={socket}");
        let out = run_podvmm(&["--kernel", k, "--serial", "off", "--vsock", &arg], 30);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{socket}: {err}");
        assert!(err.contains(want), "{socket}: {err}");
    }
    assert_eq!(std::fs::read(&not_socket).unwrap(), b"keep me");
    // The event monitor needs a writable file.
    let out = run_podvmm(
        &["--kernel", k, "--event-monitor", "path=/no/such/dir/ev"],
        30,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("event monitor"));
    // The agent client with no VM behind the socket.
    let out = Command::new(podvmm_bin())
        .args(["agent", "--socket", "/no/such/v.sock", "ping"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is the VM running"));
    let out = Command::new(podvmm_bin())
        .args(["agent", "--socket", "/s", "--port", "4294967295", "ping"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn socket_removed_when_the_guest_stops() {
    // The PVH test guest prints and resets at once: podvmm exits 0 and removes its socket.
    let dir = TempDir::new("vsock-exit");
    let kernel = dir.write("pvh.elf", &pvh_elf(&pvh_guest_code()));
    let socket = dir.path("v.sock");
    let out = run_podvmm(
        &[
            "--kernel",
            path_str(&kernel),
            "--memory",
            "size=64M",
            "--serial",
            "off",
            "--vsock",
            &vsock_arg(&socket),
        ],
        60,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!socket.exists());
}

#[test]
fn the_vsock_socket_is_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("vsock-umask");
    let kernel = dir.write("halt.elf", &halt_guest());
    let socket = dir.path("v.sock");
    // umask 000 would leave a plain bind() with 0777.
    let mut cmd = Command::new(podvmm_bin());
    cmd.args([
        "--kernel",
        path_str(&kernel),
        "--memory",
        "size=64M",
        "--serial",
        "off",
    ])
    .args(["--vsock", &vsock_arg(&socket)])
    .stdin(Stdio::null())
    .stdout(Stdio::null());
    // SAFETY: umask(2) is async-signal-safe and touches nothing else in the child.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::umask(0);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    wait_for("the vsock socket", Duration::from_secs(20), || {
        socket.exists()
    });
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(mode, 0o600, "{mode:o}");
}
