//! Replays of what Kata Containers' two Cloud Hypervisor drivers send, byte for byte, through
//! clients that frame and parse HTTP the way each runtime's client does, against a real podvmm
//! booting a tiny guest. The bodies are data (`tests/data/kata/`, written out from Kata's
//! sources); the clients are ours:
//!
//! - the Go runtime (`clh.go` and its generated OpenAPI client over Go's net/http): headers as
//!   Go sends them, sorted-key bodies ending in a newline, `Content-Length: 0` on a bodiless
//!   PUT, a status line and headers parsed as Go does, JSON decoded only with a JSON
//!   `Content-Type`; `vm.add-net` as the raw request plus the TAP descriptor in one `sendmsg`;
//! - the Rust runtime (Cloud Hypervisor's `api_client` crate): one connection for the whole
//!   pod, the head (with descriptors) in one write and `Content-Length` and the body in
//!   others, the status taken as everything between `HTTP/1.1 ` and CR, `Content-Length: `
//!   found case-sensitively, the answer read 256 bytes at a time with each read decoded as
//!   UTF-8 on its own; it ends with `vmm.shutdown` after idling past every timeout of ours.
//!
//! Both need root (a TAP device, as a CNI plugin would make it).

use crate::api_support;
use crate::common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use api_support::*;
use common::virtiofsd::Virtiofsd;
use common::*;
use serde_json::Value;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

fn fixture(name: &str, fill: &[(&str, String)]) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/kata")
        .join(name);
    let mut s = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
    for (k, v) in fill {
        s = s.replace(k, v);
    }
    assert!(!s.contains('@'), "{name}: a placeholder is left: {s}");
    s
}

/// What a test pod is made of: a tiny guest, a raw disk image, the vsock socket path.
struct Pod {
    dir: TempDir,
    fill: Vec<(&'static str, String)>,
}

impl Pod {
    fn new(tag: &str) -> Pod {
        let dir = TempDir::new(tag);
        let kernel = dir.write("tiny.elf", &pvh_elf(&hold_guest_code()));
        let disk = dir.path("rootfs.img");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let fill = vec![
            ("@KERNEL@", path_str(&kernel).to_string()),
            ("@DISK@", path_str(&disk).to_string()),
            ("@VSOCK@", path_str(&dir.path("kata.vsock")).to_string()),
            (
                "@FSSOCK@",
                path_str(&dir.path("virtiofsd.sock")).to_string(),
            ),
            ("@MAXVCPUS@", "2".to_string()),
            ("@HOTPLUG@", (8u64 << 30).to_string()),
            ("@MAC@", "02:00:ca:fe:00:07".to_string()),
        ];
        Pod { dir, fill }
    }

    fn body(&self, name: &str) -> String {
        fixture(name, &self.fill)
    }
}

// ------------------------------------------------------------------- Go's net/http --

struct GoResponse {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl GoResponse {
    /// The generated client's `decode`: JSON only with a JSON Content-Type; an empty body
    /// decodes to nothing.
    fn json(&self) -> Option<Value> {
        if self.body.is_empty() {
            return None;
        }
        let ct = self
            .headers
            .get("content-type")
            .expect("a body without Content-Type: Go's client cannot decode it");
        assert!(ct.contains("json"), "undefined response type {ct}");
        Some(serde_json::from_slice(&self.body).expect("JSON body"))
    }
}

/// Reads one response as Go's `http.ReadResponse` does (status line `HTTP/1.1 NNN[ text]`,
/// headers case-insensitive, a body framed by Content-Length; none for 204).
fn go_read_response(s: &mut UnixStream) -> GoResponse {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).expect("reading the response head");
        assert_eq!(
            n,
            1,
            "connection closed mid-head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).expect("ASCII head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let (proto, rest) = status_line
        .split_once(' ')
        .expect("malformed HTTP response");
    assert_eq!(proto, "HTTP/1.1");
    let code = rest.split(' ').next().unwrap();
    assert_eq!(code.len(), 3, "malformed HTTP status code {code:?}");
    let status: u16 = code.parse().expect("malformed HTTP status code");
    let mut headers = HashMap::new();
    for l in lines.filter(|l| !l.is_empty()) {
        let (k, v) = l.split_once(':').expect("malformed header");
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    let len = match headers.get("content-length") {
        Some(v) => v.parse().expect("Content-Length"),
        None => {
            // Go would read a body until EOF on a kept connection: a hang. Only 204 (and
            // 1xx/304) may go without.
            assert_eq!(status, 204, "a {status} answer without Content-Length");
            0
        }
    };
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).expect("the body");
    GoResponse {
        status,
        headers,
        body,
    }
}

/// One keep-alive connection of Go's transport, with the generated client's headers.
struct GoClient {
    s: UnixStream,
}

impl GoClient {
    fn connect(socket: &Path) -> GoClient {
        let s = UnixStream::connect(socket).expect("dial the API socket");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        GoClient { s }
    }

    fn call(&mut self, method: &str, endpoint: &str, body: Option<&str>) -> GoResponse {
        let body = body.unwrap_or("");
        let mut req = format!(
            "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\n\
             User-Agent: OpenAPI-Generator/1.0.0/go\r\nContent-Length: {}\r\n\
             Accept: application/json\r\n",
            body.len()
        );
        if !body.is_empty() {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str("Accept-Encoding: gzip\r\n\r\n");
        req.push_str(body);
        self.s.write_all(req.as_bytes()).expect("send the request");
        go_read_response(&mut self.s)
    }
}

/// `vmAddNetPut`: its own connection, `httputil.DumpRequest`'s bytes and the TAP descriptors in
/// one `sendmsg`.
fn go_add_net(socket: &Path, body: &str, fds: &[RawFd]) -> GoResponse {
    let mut s = UnixStream::connect(socket).expect("dial");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!(
        "PUT /api/v1/vm.add-net HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Length: {}\r\nContent-Type: application/json\r\n\r\n{body}",
        body.len()
    );
    let n = s.send_with_fds(&[req.as_bytes()], fds).expect("sendmsg");
    assert_eq!(n, req.len());
    go_read_response(&mut s)
}

fn assert_pci_device_info(v: &Value) {
    let bdf = v["bdf"].as_str().unwrap_or_else(|| panic!("no bdf: {v}"));
    // clhPciInfoToPath: "0000:00:DD.0".
    let parts: Vec<&str> = bdf.split(':').collect();
    assert_eq!(parts.len(), 3, "{bdf}");
    assert_eq!((parts[0], parts[1]), ("0000", "00"), "{bdf}");
    let (dev, func) = parts[2].split_once('.').expect("DD.F");
    assert!(
        dev.len() == 2 && u8::from_str_radix(dev, 16).is_ok() && func == "0",
        "{bdf}"
    );
    assert!(v["id"].as_str().is_some_and(|s| !s.is_empty()), "{v}");
}

#[test]
fn kata_go_runtime_drives_a_pod_from_start_to_stop() {
    let pod = Pod::new("replay-go");
    let mut server = Server::start(&pod.dir, &[]);
    let socket = server.socket.clone();
    // isClhRunning: vmm.ping until it answers.
    let mut c = GoClient::connect(&socket);
    let r = c.call("GET", "vmm.ping", None);
    assert_eq!(r.status, 200);
    assert!(r.json().unwrap()["version"].is_string());
    // The default configuration shares files through virtio-fs: without its virtiofsd, a
    // clear refusal the client can report.
    let r = c.call(
        "PUT",
        "vm.create",
        Some(&pod.body("go-create-default.json")),
    );
    assert_eq!(r.status, 400);
    let msg = String::from_utf8_lossy(&r.body).into_owned();
    assert!(
        msg.contains("fs kataShared") && msg.contains("virtiofsd"),
        "{msg}"
    );
    // Kata starts virtiofsd before vm.create: then the default body is accepted as sent.
    let share = pod.dir.path("share");
    std::fs::create_dir(&share).unwrap();
    let _virtiofsd = Virtiofsd::start(
        &share,
        Path::new(&pod.fill[3].1),
        &pod.dir.path("virtiofsd.log"),
    );
    let r = c.call(
        "PUT",
        "vm.create",
        Some(&pod.body("go-create-default.json")),
    );
    assert!(r.status < 300, "{}", String::from_utf8_lossy(&r.body));
    let info = c.call("GET", "vm.info", None).json().unwrap();
    assert_eq!(info["state"], "Created");
    assert_eq!(info["config"]["fs"][0]["tag"], "kataShared");
    assert_eq!(info["config"]["memory"]["shared"], true);
    assert_eq!(info["config"]["cpus"]["boot_vcpus"], 1);
    assert_eq!(info["config"]["cpus"]["max_vcpus"], 2);
    assert_eq!(info["config"]["memory"]["size"], 2u64 << 30);
    assert_eq!(info["config"]["memory"]["hotplug_size"], 8u64 << 30);
    assert_eq!(info["memory_actual_size"], 2u64 << 30);
    // vm.add-net, the TAP descriptor in the same sendmsg.
    let tap = create_tap(&format!("pgo{}", std::process::id() % 100_000));
    let r = go_add_net(&socket, &pod.body("go-add-net.json"), &[tap.as_raw_fd()]);
    assert!(
        r.status == 200 || r.status == 204,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    if let Some(dev) = r.json() {
        assert_pci_device_info(&dev);
    }
    drop(tap);
    let r = c.call("PUT", "vm.boot", None);
    assert!(r.status < 300, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        c.call("GET", "vm.info", None).json().unwrap()["state"],
        "Running"
    );
    // updateResources on the first container: the vCPU count the VM has, every time.
    let r = c.call("PUT", "vm.resize", Some("{\"desired_vcpus\":1}\n"));
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    // A container with CPU limits would need hotplug: a clear error, not a silent success.
    let r = c.call("PUT", "vm.resize", Some("{\"desired_vcpus\":2}\n"));
    assert_eq!(r.status, 400);
    assert!(String::from_utf8_lossy(&r.body).contains("hotplug"));
    let info = c.call("GET", "vm.info", None).json().unwrap();
    assert_eq!(info["state"], "Running");
    assert_eq!(info["memory_actual_size"], 2u64 << 30);
    // terminate: vmm.shutdown, then the process must be gone within 3 s.
    let r = c.call("PUT", "vmm.shutdown", None);
    assert!(r.status < 300);
    let t = Instant::now();
    assert!(server.wait_exit(Duration::from_secs(3)).success());
    eprintln!(
        "replay-go: podvmm exited {:?} after vmm.shutdown",
        t.elapsed()
    );
}

// ----------------------------------------------------- Cloud Hypervisor's api_client --

/// One call as `api_client::simple_api_full_command_with_fds_and_response` makes it; the
/// status and the body as it returns them.
fn ch_call(
    s: &mut UnixStream,
    method: &str,
    endpoint: &str,
    body: Option<&str>,
    fds: &[RawFd],
) -> (u16, Option<String>) {
    let head =
        format!("{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n");
    s.send_with_fds(&[head.as_bytes()], fds).expect("sendmsg");
    if let Some(b) = body {
        s.write_all(format!("Content-Length: {}\r\n", b.len()).as_bytes())
            .unwrap();
    }
    s.write_all(b"\r\n").unwrap();
    if let Some(b) = body {
        s.write_all(b.as_bytes()).unwrap();
    }
    let mut res = String::new();
    let mut body_at = None;
    let mut length: Option<usize> = None;
    loop {
        let mut chunk = [0u8; 256];
        let n = s.read(&mut chunk).expect("read");
        if n == 0 {
            break;
        }
        res.push_str(
            std::str::from_utf8(&chunk[..n])
                .expect("api_client panics on a read that is not UTF-8"),
        );
        if let Some(o) = res.find("\r\n\r\n") {
            body_at = Some(o + 4);
            length = res.find("Content-Length: ").map(|o| {
                let v = &res[o + 16..];
                v[..v.find('\r').unwrap()]
                    .trim()
                    .parse()
                    .expect("Content-Length")
            });
            if length.is_none() {
                break;
            }
        }
        if let (Some(o), Some(l)) = (body_at, length) {
            if res.len() >= o + l {
                break;
            }
        }
    }
    let o = res
        .find("HTTP/1.1")
        .expect("HTTP output is missing protocol statement");
    let code: u16 = res[o + 9..o + res[o..].find('\r').unwrap()]
        .trim()
        .parse()
        .expect("error parsing HTTP status code");
    (code, length.and(body_at.map(|o| res[o..].to_string())))
}

/// What the Rust runtime's `VmInfo` decode requires (ch-config's serde types).
fn assert_runtime_rs_decodes(info: &Value) {
    let one_of = |v: &Value, set: &[&str]| v.as_str().is_some_and(|s| set.contains(&s));
    assert!(
        one_of(
            &info["state"],
            &["Created", "Running", "Shutdown", "Paused"]
        ),
        "{info}"
    );
    let cfg = &info["config"];
    let cpus = &cfg["cpus"];
    for k in ["boot_vcpus", "max_vcpus", "max_phys_bits"] {
        assert!(cpus[k].is_u64(), "cpus.{k}: {cpus}");
    }
    assert!(cfg["memory"]["size"].is_u64());
    for k in ["serial", "console"] {
        assert!(
            one_of(&cfg[k]["mode"], &["Off", "Pty", "Tty", "File", "Null"]),
            "{k}: {cfg}"
        );
    }
    for d in cfg["disks"].as_array().into_iter().flatten() {
        assert!(d["num_queues"].is_u64() && d["queue_size"].is_u64(), "{d}");
        assert!(
            one_of(
                &d["image_type"],
                &["FixedVhd", "Qcow2", "Raw", "Vhdx", "Unknown"]
            ),
            "{d}"
        );
    }
    for n in cfg["net"].as_array().into_iter().flatten() {
        for k in ["ip", "mask", "mac"] {
            assert!(n[k].is_string(), "net.{k}: {n}");
        }
        assert!(n["num_queues"].is_u64() && n["queue_size"].is_u64(), "{n}");
    }
    if let Some(r) = cfg.get("rng") {
        assert!(r["src"].is_string(), "{r}");
    }
    assert!(cfg["vsock"]["cid"].is_u64() && cfg["vsock"]["socket"].is_string());
    // Never null where a string or a number is expected.
    fn no_nulls(v: &Value, path: &str) {
        match v {
            Value::Null => panic!("{path} is null"),
            Value::Object(m) => m
                .iter()
                .for_each(|(k, v)| no_nulls(v, &format!("{path}.{k}"))),
            Value::Array(a) => a.iter().for_each(|v| no_nulls(v, &format!("{path}[]"))),
            _ => {}
        }
    }
    no_nulls(info, "vm.info");
}

#[test]
fn kata_rust_runtime_keeps_one_connection_for_the_pods_life() {
    let pod = Pod::new("replay-rs");
    let mut server = Server::start(&pod.dir, &[]);
    let mut s = UnixStream::connect(&server.socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // cloud_hypervisor_ping_until_ready: the body must parse as JSON.
    let (code, body) = ch_call(&mut s, "GET", "vmm.ping", None, &[]);
    assert_eq!(code, 200);
    let ping: Value = serde_json::from_str(&body.expect("a body")).expect("JSON");
    assert!(ping["features"].is_array());
    // The default configuration (virtio-fs) without its virtiofsd: refused, saying why, on
    // the same connection.
    let (code, body) = ch_call(
        &mut s,
        "PUT",
        "vm.create",
        Some(&pod.body("rs-create-default.json")),
        &[],
    );
    assert_eq!(code, 400);
    assert!(body.unwrap_or_default().contains("virtiofsd"));
    // With its virtiofsd listening, the same bytes are accepted (and the VM deleted again).
    let share = pod.dir.path("share");
    std::fs::create_dir(&share).unwrap();
    let virtiofsd = Virtiofsd::start(
        &share,
        Path::new(&pod.fill[3].1),
        &pod.dir.path("virtiofsd.log"),
    );
    let (code, body) = ch_call(
        &mut s,
        "PUT",
        "vm.create",
        Some(&pod.body("rs-create-default.json")),
        &[],
    );
    assert!(code == 204 || code == 200, "{code}: {body:?}");
    let (code, _) = ch_call(&mut s, "PUT", "vm.delete", None, &[]);
    assert_eq!(code, 204);
    drop(virtiofsd);
    // image_type "Unknown" is probed: a qcow2 image is refused, saying so.
    let qcow = pod.dir.path("image.qcow2");
    let mut q = vec![0u8; 4096];
    q[..4].copy_from_slice(b"QFI\xfb");
    std::fs::write(&qcow, &q).unwrap();
    let body_qcow = pod
        .body("rs-create-nofs.json")
        .replace(&pod.fill[1].1, path_str(&qcow));
    let (code, body) = ch_call(&mut s, "PUT", "vm.create", Some(&body_qcow), &[]);
    assert_eq!(code, 400);
    assert!(body.unwrap_or_default().contains("qcow2"));
    // shared_fs = "none": accepted as sent (nulls, Unknown image type, shared memory...).
    let (code, body) = ch_call(
        &mut s,
        "PUT",
        "vm.create",
        Some(&pod.body("rs-create-nofs.json")),
        &[],
    );
    assert!(code == 204 || code == 200, "{code}: {body:?}");
    // vm.add-net with the TAP descriptor riding on the head's sendmsg.
    let tap = create_tap(&format!("prs{}", std::process::id() % 100_000));
    let (code, body) = ch_call(
        &mut s,
        "PUT",
        "vm.add-net",
        Some(&pod.body("rs-add-net.json")),
        &[tap.as_raw_fd()],
    );
    assert_eq!(code, 200, "{body:?}");
    let dev: Value = serde_json::from_str(&body.unwrap()).unwrap();
    assert_pci_device_info(&dev);
    drop(tap);
    let (code, body) = ch_call(&mut s, "PUT", "vm.boot", None, &[]);
    assert_eq!((code, body.as_deref()), (204, None));
    let (code, body) = ch_call(&mut s, "GET", "vm.info", None, &[]);
    assert_eq!(code, 200);
    let info: Value = serde_json::from_str(&body.unwrap()).unwrap();
    assert_eq!(info["state"], "Running");
    assert_eq!(info["config"]["memory"]["shared"], true);
    assert_eq!(info["config"]["disks"][0]["image_type"], "Unknown");
    assert_runtime_rs_decodes(&info);
    // A non-ASCII error message, long enough to straddle 256-byte reads, still decodes.
    let far = "/n\u{e9}ant/\u{1f600}".repeat(20);
    let (code, body) = ch_call(
        &mut s,
        "PUT",
        "vm.add-disk",
        Some(&format!("{{\"path\":\"{far}\"}}")),
        &[],
    );
    assert!((400..500).contains(&code), "{code}");
    assert!(body.unwrap_or_default().is_ascii());
    // The pod lives on; the runtime's connection idles past every timeout of ours.
    std::thread::sleep(Duration::from_secs(11));
    let (code, _) = ch_call(&mut s, "PUT", "vmm.shutdown", None, &[]);
    assert!(code == 200 || code == 204, "{code}");
    assert!(server.wait_exit(Duration::from_secs(3)).success());
}
