//! Helpers for the API tests and the API benchmark: tiny guests that keep running, a podvmm
//! process serving a socket, raw HTTP, and TAP devices.
//!
//! Include next to `tests/common` (`mod common; mod api_support;`).

#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use api::client::{Client, Response};
use serde_json::Value;

use crate::common::{podvmm_bin, Asm, TempDir};

/// A PVH guest that prints `READY <command line>\n` and then halts for good (interrupts
/// are off): the VM stays Running until the VMM stops it.
pub fn hold_guest_code() -> Vec<u8> {
    let mut a = Asm::default();
    a.com1()
        .bytes(&[0x81, 0x3b, 0x78, 0xc5, 0x6e, 0x33]) // cmp dword [ebx], 0x336ec578
        .jump(0x75, "fail")
        .print("READY ")
        .bytes(&[0x8b, 0x73, 0x18]) // mov esi, [ebx + 0x18] (cmdline_paddr)
        .print_string_at_si(&[0x46], "cmd") // inc esi
        .print("\n")
        .label("halt")
        .bytes(&[0xf4]) // hlt
        .jump(0xeb, "halt")
        .label("fail")
        .print("BAD start_info\n")
        .label("hang")
        .bytes(&[0xf4])
        .jump(0xeb, "hang");
    a.finish()
}

/// A PVH guest that counts forever: every ~10 million TSC cycles (a few milliseconds) it
/// increments a counter and writes its low digit (`0`..`7`) to COM1. Its output grows while
/// it runs, at a pace set by time, not by how fast the hypervisor runs its instructions.
pub fn ticker_guest_code() -> Vec<u8> {
    let mut a = Asm::default();
    a.bytes(&[0x31, 0xdb]) // xor ebx, ebx
        .label("top")
        .bytes(&[0x0f, 0x31]) // rdtsc
        .bytes(&[0x89, 0xc6]) // mov esi, eax
        .label("wait")
        .bytes(&[0x0f, 0x31]) // rdtsc
        .bytes(&[0x29, 0xf0]) // sub eax, esi
        .bytes(&[0x3d, 0x80, 0x96, 0x98, 0x00]) // cmp eax, 10_000_000
        .jump(0x72, "wait") // jb wait
        .bytes(&[0x43]) // inc ebx
        .bytes(&[0x89, 0xd8]) // mov eax, ebx
        .bytes(&[0x24, 0x07]) // and al, 7
        .bytes(&[0x04, b'0']) // add al, '0'
        .com1() // rdtsc clobbered DX
        .bytes(&[0xee]) // out dx, al
        .jump(0xeb, "top");
    a.finish()
}

/// A running `podvmm --api-socket`, killed on drop.
pub struct Server {
    pub child: Child,
    pub socket: PathBuf,
    pub stderr: PathBuf,
    /// Time from spawning the process to the first successful `vmm.ping`.
    pub ready_after: Duration,
}

impl Server {
    /// Starts podvmm on `dir/api.sock` with `extra` arguments and waits until it answers
    /// `vmm.ping`.
    pub fn start(dir: &TempDir, extra: &[&str]) -> Server {
        let socket = dir.path("api.sock");
        let stderr = dir.path("podvmm.stderr");
        let started = Instant::now();
        let child = Command::new(podvmm_bin())
            .arg("--api-socket")
            .arg(&socket)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn podvmm");
        let mut server = Server {
            child,
            socket,
            stderr,
            ready_after: Duration::ZERO,
        };
        server.ready_after = server.wait_ready(started);
        server
    }

    fn wait_ready(&mut self, started: Instant) -> Duration {
        let deadline = started + Duration::from_secs(20);
        loop {
            if let Ok(mut c) = Client::connect(&self.socket) {
                if let Ok(r) = c.request("GET", "vmm.ping", None) {
                    if r.status == 200 {
                        return started.elapsed();
                    }
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "podvmm exited before answering ({status}): {}",
                    self.stderr_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no answer to vmm.ping within 20 s"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn client(&self) -> Client {
        let c = Client::connect(&self.socket).expect("connect to the API socket");
        c.set_timeout(Some(Duration::from_secs(30))).unwrap();
        c
    }

    /// One request on a new connection.
    pub fn call(&self, method: &str, endpoint: &str, body: Option<&str>) -> Response {
        self.client()
            .request(method, endpoint, body.map(str::as_bytes))
            .unwrap_or_else(|e| panic!("{endpoint}: {e}; stderr: {}", self.stderr_text()))
    }

    /// A request that must succeed.
    pub fn ok(&self, method: &str, endpoint: &str, body: Option<&str>) -> Response {
        let r = self.call(method, endpoint, body);
        assert!(
            r.is_success(),
            "{endpoint}: {} {}; stderr: {}",
            r.status,
            r.error_message(),
            self.stderr_text()
        );
        r
    }

    /// A request that must fail with `status`; returns the message.
    pub fn refused(&self, method: &str, endpoint: &str, body: Option<&str>, status: u16) -> String {
        let r = self.call(method, endpoint, body);
        assert_eq!(
            r.status,
            status,
            "{endpoint} {body:?}: {}",
            r.error_message()
        );
        let msg = r.error_message();
        assert!(!msg.is_empty(), "{endpoint}: an error needs a message");
        msg
    }

    pub fn info(&self) -> Value {
        let r = self.ok("GET", "vm.info", None);
        serde_json::from_slice(&r.body).expect("vm.info is JSON")
    }

    pub fn state(&self) -> String {
        self.info()["state"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Waits for the process to end by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "podvmm did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// vCPU threads and open descriptors of the podvmm process.
    pub fn threads_and_fds(&self) -> (usize, usize) {
        let pid = self.child.id();
        let vcpus = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| {
                d.flatten()
                    .filter(|t| {
                        std::fs::read_to_string(t.path().join("comm"))
                            .is_ok_and(|c| c.starts_with("vcpu"))
                    })
                    .count()
            })
            .unwrap_or(0);
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0);
        (vcpus, fds)
    }

    /// Waits until `f` holds for the process's (threads, fds), up to 5 s.
    pub fn wait_for_counts(&self, f: impl Fn((usize, usize)) -> bool) -> (usize, usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let c = self.threads_and_fds();
            if f(c) || Instant::now() > deadline {
                return c;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A JSON `VmConfig` for a tiny guest: kernel, command line, serial to a file, 128 MiB.
pub fn vm_config(kernel: &Path, cmdline: &str, serial: &Path) -> Value {
    serde_json::json!({
        "payload": {"kernel": kernel, "cmdline": cmdline},
        "memory": {"size": 128u64 << 20},
        "serial": {"mode": "File", "file": serial},
        "console": {"mode": "Off"},
    })
}

/// Sends raw bytes on a new connection and reads until the server closes it (or 10 s).
pub fn raw_exchange(socket: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The status of a raw HTTP response.
pub fn status_of(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"))
}

/// Creates a TAP device (as a CNI plugin would for Kata) and returns its descriptor. The
/// device goes away when the last descriptor closes. Needs CAP_NET_ADMIN (CI runs as root).
pub fn create_tap(name: &str) -> OwnedFd {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const IFF_TAP: libc::c_short = 0x0002;
    const IFF_NO_PI: libc::c_short = 0x1000;
    const IFF_VNET_HDR: libc::c_short = 0x4000;
    assert!(name.len() < 16, "interface names are at most 15 bytes");
    // SAFETY: a plain open of a device node; the result is checked.
    let raw = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    assert!(
        raw >= 0,
        "/dev/net/tun: {} (the API tests need root and the tun module)",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut ifreq = [0u8; 40];
    ifreq[..name.len()].copy_from_slice(name.as_bytes());
    ifreq[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq (40 bytes), which the buffer is.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            TUNSETIFF,
            ifreq.as_mut_ptr(),
        )
    };
    assert!(
        rc == 0,
        "TUNSETIFF {name}: {} (the API tests need CAP_NET_ADMIN)",
        std::io::Error::last_os_error()
    );
    fd
}

/// Reads a file that may not exist yet.
pub fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Waits until `path` contains `needle` (up to `timeout`).
pub fn wait_for_output(path: &Path, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = read_lossy(path);
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{} never showed {needle:?}: {text:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
