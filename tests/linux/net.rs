//! Boots the guest kit's Linux kernel with a virtio-net interface on a TAP inside a network
//! namespace the test creates, served by dnsmasq, with the agent as init. It checks DHCP
//! (`ip=dhcp`, both directions), ARP and ICMP answered by the guest kernel, TCP from guest user
//! space (busybox `wget`) to an HTTP server of the test's own on the host side of the TAP, and
//! the egress deny list: the guest's TCP to `169.254.169.254` (the cloud metadata address, on
//! the TAP's host side too) is dropped by podvmm while other traffic passes, and replies to a
//! denied address never leave.
//!
//! Needs root, iproute2, dnsmasq (Debian `dnsmasq-base`), arping and ping (`iputils-arping`,
//! `iputils-ping`): `scripts/setup.sh` installs them. Nothing leaves the namespace: all
//! addresses are on the TAP inside it, and the namespace is deleted even when the test fails.

use crate::common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::linux::{one_boot_at_a_time, sh, sh_ok, Boot, CMDLINE};
use common::*;

const HOST_IP: &str = "10.77.0.1";
const GUEST_IP: &str = "10.77.0.2";
/// A second host address whose traffic the guest may not send: `deny=` in the VMM.
const DENIED_IP: &str = "10.77.0.3";
const GUEST_MAC: &str = "02:00:0a:4d:00:02";
/// The cloud metadata address: a pod must not reach it (`deny=`), though the host side has it.
const METADATA_IP: &str = "169.254.169.254";
const HTTP_PORT: u16 = 8080;
const TAP: &str = "ptap0";

/// A network namespace with the processes the test started in it; everything is removed on
/// drop, which also runs when the test panics.
struct Netns {
    name: String,
    children: Vec<Child>,
}

impl Netns {
    fn new() -> Netns {
        let name = format!("podvmm-net-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let ns = Netns {
            name,
            children: Vec::new(),
        };
        ns.ip(&["netns", "add", &ns.name]);
        ns
    }

    /// Runs `ip` (outside the namespace; use `-n NAME` for inside), panicking on failure.
    fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip").args(args).output().expect("run ip");
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A command run inside the namespace.
    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["-n", &self.name, "link", "del", TAP])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// An HTTP server on every address of the namespace `ns`, on a thread of its own that joined
/// that namespace (setns(2) moves only the calling thread). Answers each request with a body
/// naming the address it was reached at; stops when the flag is set.
fn http_server(ns: &str, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u32> {
    let path = format!("/run/netns/{ns}");
    let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a namespace descriptor we hold; it changes only this thread.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        let l = TcpListener::bind(("0.0.0.0", HTTP_PORT)).expect("bind the HTTP server");
        l.set_nonblocking(true).unwrap();
        let mut served = 0;
        while !stop.load(Ordering::Relaxed) {
            let Ok((mut s, _)) = l.accept() else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let local = s
                .local_addr()
                .map(|a| a.ip().to_string())
                .unwrap_or_default();
            let body = format!("podvmm-net-ok via {local}\n");
            let _ = s.write_all(
                format!(
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
            served += 1;
        }
        served
    })
}

fn need_tools() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test creates network namespaces and TAPs: run it as root"
    );
    for tool in ["ip", "dnsmasq", "arping", "ping"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false)
            || ["/usr/sbin", "/sbin"]
                .iter()
                .any(|d| PathBuf::from(d).join(tool).is_file());
        assert!(
            found,
            "{tool} not found: run scripts/setup.sh (dnsmasq-base, iputils-arping, iputils-ping)"
        );
    }
}

/// Runs a command to its end with a time limit, returning (success, stdout + stderr).
fn run_for(mut cmd: Command, limit: Duration) -> (bool, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut text = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut text);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut text);
    }
    let _ = child.wait();
    (status.is_some_and(|s| s.success()), text)
}

#[test]
#[ignore = "boots Linux: minutes under PVM; scripts/test.sh and CI run it with --include-ignored"]
fn linux_gets_dhcp_answers_arp_and_talks_tcp_over_virtio_net() {
    let _one = one_boot_at_a_time();
    need_tools();
    let dir = TempDir::new("netlinux");
    let leases = dir.path("leases");

    let mut ns = Netns::new();
    ns.ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
    // A persistent TAP made the way a CNI plugin or the shim would (vnet_hdr); podvmm opens it
    // by name, gives the host side its address and brings it up.
    ns.ip(&[
        "-n", &ns.name, "tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr",
    ]);

    let net = format!(
        "tap={TAP},mac={GUEST_MAC},ip={HOST_IP},mask=255.255.255.0,deny={DENIED_IP}/32,deny={METADATA_IP}/32"
    );
    let mut vmm = Command::new("ip");
    vmm.args([
        "netns",
        "exec",
        &ns.name,
        path_str(&common::linux::podvmm()),
    ]);
    let start = Instant::now();
    let mut b = Boot::spawn(
        vmm,
        &dir,
        "net",
        1,
        &["--net", &net],
        &format!("{CMDLINE} ip=dhcp rdinit=/sbin/podvmm-agent"),
    );

    // podvmm configures the host side before the guest runs.
    let t0 = Instant::now();
    loop {
        let addr = ns.ip(&["-n", &ns.name, "-4", "addr", "show", "dev", TAP]);
        if addr.contains(&format!("{HOST_IP}/24")) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "podvmm did not configure {TAP}: {addr}\n{}",
            b.context()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The metadata address exists on the host side: only the deny list keeps the guest away.
    ns.ip(&[
        "-n",
        &ns.name,
        "addr",
        "add",
        &format!("{METADATA_IP}/32"),
        "dev",
        TAP,
    ]);
    let stop = Arc::new(AtomicBool::new(false));
    let server = http_server(&ns.name, stop.clone());
    let dnsmasq = ns
        .cmd("dnsmasq")
        .args([
            "--no-daemon",
            "--conf-file=/dev/null",
            "--port=0", // no DNS
            "--user=root",
            "--bind-interfaces",
            "--no-ping",
            "--log-dhcp",
        ])
        .arg(format!("--interface={TAP}"))
        .arg(format!(
            "--dhcp-range={GUEST_IP},{GUEST_IP},255.255.255.0,1h"
        ))
        .arg(format!("--dhcp-leasefile={}", path_str(&leases)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start dnsmasq");
    ns.children.push(dnsmasq);

    // The kernel prints "IP-Config: Complete:" and then, line by line, what it got.
    b.wait_for("DHCP to complete", common::linux::deadline(), |b| {
        let text = b.console();
        text.contains("IP-Config: Complete") && text.contains("nameserver0=")
    });
    let complete = start.elapsed();
    let text = b.console();
    for line in text
        .lines()
        .filter(|l| l.contains("IP-Config") || l.contains("ipaddr=") || l.contains("virtio_net"))
    {
        eprintln!("net-linux: console: {}", line.trim_end());
    }
    assert!(
        text.contains(&format!(
            "IP-Config: Got DHCP answer from {HOST_IP}, my address is {GUEST_IP}"
        )),
        "{}",
        b.context()
    );
    assert!(
        text.contains(&format!(
            "hwaddr={GUEST_MAC}, ipaddr={GUEST_IP}, mask=255.255.255.0"
        )),
        "{}",
        b.context()
    );
    eprintln!(
        "net-linux: DHCP complete {:.1} s after exec (wall)",
        complete.as_secs_f64()
    );

    // ARP: the guest kernel answers for its address. (arping's status says whether all probes
    // were answered; under PVM the busy guest may answer a probe late: one answer proves it.)
    let mut arping = ns.cmd("arping");
    arping.args(["-c", "3", "-w", "60", "-I", TAP, GUEST_IP]);
    let (_, out) = run_for(arping, Duration::from_secs(90));
    eprintln!("net-linux: arping:\n{}", out.trim_end());
    assert!(
        out.to_lowercase().contains(&format!("[{GUEST_MAC}]")),
        "no ARP reply from the guest\n{}",
        b.context()
    );

    // ICMP both ways, answered by the guest kernel.
    let mut ping = ns.cmd("ping");
    ping.args(["-c", "2", "-w", "120", GUEST_IP]);
    let (ok, out) = run_for(ping, Duration::from_secs(150));
    eprintln!("net-linux: ping:\n{}", out.trim_end());
    assert!(ok, "the guest did not answer ping\n{}", b.context());

    // TCP from guest user space to the host side, through the agent. (Not `wget -T`: Debian's
    // busybox 1.35 wget crashes with it, on the host as well.)
    let mut c = b.agent();
    let get = |host: &str| format!("timeout 60 wget -O - http://{host}:{HTTP_PORT}/");
    let body = sh_ok(&mut c, &b, &get(HOST_IP), None);
    assert_eq!(body, format!("podvmm-net-ok via {HOST_IP}\n"));
    eprintln!(
        "net-linux: guest wget to {HOST_IP}:{HTTP_PORT}: {}",
        body.trim()
    );

    // The metadata address is denied: the guest's SYNs never leave podvmm.
    let r = sh(
        &mut c,
        &b,
        &format!("timeout 8 wget -O - http://{METADATA_IP}:{HTTP_PORT}/"),
        None,
    );
    assert_ne!(
        r.exit_code,
        Some(0),
        "the guest reached {METADATA_IP}: {r:?}"
    );
    eprintln!(
        "net-linux: guest wget to {METADATA_IP}: {:?}",
        r.stderr.trim()
    );
    let err = b.stderr();
    assert!(
        err.contains(&format!("frame to {METADATA_IP} dropped by the deny list")),
        "podvmm did not report the denied frames:\n{err}"
    );
    // ...while other traffic still passes.
    let body = sh_ok(&mut c, &b, &get(HOST_IP), None);
    assert_eq!(body, format!("podvmm-net-ok via {HOST_IP}\n"));

    // The deny list on replies too: ICMP replies to DENIED_IP are dropped in the VMM.
    ns.ip(&[
        "-n",
        &ns.name,
        "addr",
        "add",
        &format!("{DENIED_IP}/24"),
        "dev",
        TAP,
    ]);
    let mut ping = ns.cmd("ping");
    ping.args(["-c", "3", "-w", "8", "-I", DENIED_IP, GUEST_IP]);
    let (ok, out) = run_for(ping, Duration::from_secs(30));
    eprintln!(
        "net-linux: ping from the denied address:\n{}",
        out.trim_end()
    );
    // (podvmm logs the first dropped frame per interface, the metadata one above; the rest are
    // counted.) The same guest answered the allowed address's ping a moment ago.
    assert!(!ok, "replies to a denied address got through:\n{out}");

    b.poweroff(c);
    stop.store(true, Ordering::Relaxed);
    let served = server.join().expect("the HTTP server");
    assert_eq!(
        served, 2,
        "the server saw {served} requests, not the 2 allowed ones"
    );
    drop(ns);
}
