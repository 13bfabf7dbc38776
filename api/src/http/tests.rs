//! The HTTP layer against a mock handler: framing, limits, timeouts, descriptors.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::client::{send_with_fds, Client};
use crate::messages::{ApiError, ApiReply, ApiRequest, ApiResult, PingInfo};

/// Answers from a script and remembers what it was asked.
#[derive(Default)]
struct Mock {
    seen: Mutex<Vec<String>>,
    /// Descriptors received with `vm.add-net`, kept open.
    fds: Mutex<Vec<OwnedFd>>,
    /// While true, `vm.counters` blocks (a request the VMM is slow with).
    hold: Mutex<bool>,
    released: std::sync::Condvar,
}

impl Mock {
    fn hold(&self, on: bool) {
        *self.hold.lock().unwrap() = on;
        self.released.notify_all();
    }
}

impl ApiHandler for Mock {
    fn handle(&self, request: ApiRequest) -> ApiResult {
        self.seen.lock().unwrap().push(request.name().to_string());
        match request {
            ApiRequest::VmmPing => Ok(ApiReply::Ping(PingInfo {
                build_version: "test".into(),
                version: "0".into(),
                pid: 1,
                features: vec![],
            })),
            ApiRequest::VmPause => Err(ApiError::Conflict("the VM is not running".into())),
            ApiRequest::VmCounters => {
                let mut held = self.hold.lock().unwrap();
                while *held {
                    held = self.released.wait(held).unwrap();
                }
                Ok(ApiReply::Empty)
            }
            ApiRequest::VmDelete => Err(ApiError::Conflict("caf\u{e9} \u{1f600} ".repeat(60))),
            ApiRequest::VmAddNet(add) => {
                self.fds.lock().unwrap().extend(add.fds);
                Ok(ApiReply::Empty)
            }
            ApiRequest::VmCreate(c) => {
                assert_eq!(c.config.payload.kernel, Some(PathBuf::from("/k")));
                Ok(ApiReply::Empty)
            }
            _ => Ok(ApiReply::Empty),
        }
    }
}

struct TestServer {
    _dir: TempDir,
    path: PathBuf,
    mock: Arc<Mock>,
    server: ApiServer,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(tag: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!(
        "podvmm-http-{tag}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

fn start(tag: &str, limits: Limits) -> TestServer {
    let dir = temp_dir(tag);
    let path = dir.0.join("api.sock");
    let mock = Arc::new(Mock::default());
    let server = ApiServer::start(&path, mock.clone(), limits).unwrap();
    TestServer {
        _dir: dir,
        path,
        mock,
        server,
    }
}

fn short_limits() -> Limits {
    Limits {
        request_timeout: Duration::from_millis(300),
        ..Limits::default()
    }
}

/// Sends raw bytes on a new connection and reads until the server closes it.
fn raw(path: &std::path::Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The server may answer (and close) before reading everything: a 503 at the connection
    // cap, a 413 from the head alone. Its answer is still there to read.
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"))
}

#[test]
fn keep_alive_serves_many_requests_on_one_connection() {
    let t = start("keepalive", Limits::default());
    let mut c = Client::connect(&t.path).unwrap();
    for _ in 0..3 {
        let r = c.request("GET", "vmm.ping", None).unwrap();
        assert_eq!(r.status, 200);
        let ping: PingInfo = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(ping.build_version, "test");
    }
    let r = c.request("PUT", "vm.boot", None).unwrap();
    assert_eq!((r.status, r.body.len()), (204, 0));
    let r = c.request("PUT", "vm.pause", None).unwrap();
    assert_eq!(r.status, 409);
    assert_eq!(r.error_message(), "the VM is not running");
    // Still usable after an error answer.
    assert_eq!(c.request("GET", "vmm.ping", None).unwrap().status, 200);
    let r = c
        .request("PUT", "vm.create", Some(br#"{"payload":{"kernel":"/k"}}"#))
        .unwrap();
    assert_eq!(r.status, 204, "{}", r.body_text());
}

#[test]
fn paths_and_methods() {
    let t = start("paths", Limits::default());
    let mut c = Client::connect(&t.path).unwrap();
    let r = c.request("GET", "vm.nosuch", None).unwrap();
    assert_eq!(r.status, 404);
    assert!(r.error_message().contains("vm.nosuch"));
    let r = c.request("PUT", "vm.reboot", None).unwrap();
    assert_eq!(r.status, 501);
    let r = c.request("PUT", "vm.info", None).unwrap();
    assert_eq!(r.status, 405);
    assert!(r.error_message().contains("GET"), "{}", r.error_message());
    let r = c.request("GET", "vm.boot", None).unwrap();
    assert_eq!(r.status, 405);
    let resp = raw(
        &t.path,
        b"GET /nothing HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status_of(&resp), 404);
    let resp = raw(
        &t.path,
        b"DELETE /api/v1/vm.info HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status_of(&resp), 405);
    assert!(resp.contains("Allow: GET"), "{resp}");
    // Absolute form and a query string.
    let resp = raw(
        &t.path,
        b"GET http://localhost/api/v1/vmm.ping?x=1 HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status_of(&resp), 200);
}

#[test]
fn bad_bodies_are_400_with_the_reason() {
    let t = start("bodies", Limits::default());
    let mut c = Client::connect(&t.path).unwrap();
    for (body, needle) in [
        (&b""[..], "needs a JSON body"),
        (b"{", "malformed JSON"),
        (b"[1,2]", "must be a JSON object"),
        (b"\xff\xfe", "malformed JSON"),
        (
            br#"{"payload":{"kernel":"/k"},"gpu":true}"#,
            "unknown field `gpu`",
        ),
        (
            br#"{"payload":{"kernel":"/k"},"memory":{"size":-1}}"#,
            "invalid VmConfig",
        ),
        (
            br#"{"payload":{"kernel":"/k"},"memory":{"size":"2G"}}"#,
            "invalid VmConfig",
        ),
        (
            br#"{"payload":{"kernel":"/k"},"memory":{"size":1,"mergeable":true}}"#,
            "memory.mergeable",
        ),
    ] {
        let r = c.request("PUT", "vm.create", Some(body)).unwrap();
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(body));
        assert!(
            r.error_message().contains(needle),
            "{}: {}",
            String::from_utf8_lossy(body),
            r.error_message()
        );
    }
    // Deeply nested JSON is refused by the parser's depth limit, not a stack overflow.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let r = c
        .request("PUT", "vm.add-disk", Some(deep.as_bytes()))
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.error_message());
    assert!(
        r.error_message().contains("recursion limit"),
        "{}",
        r.error_message()
    );
    // Larger than the body limit: 413, and the connection is closed.
    let big = format!("{{\"path\":\"{}\"}}", "a".repeat(300 << 10));
    let r = c
        .request("PUT", "vm.add-disk", Some(big.as_bytes()))
        .unwrap();
    assert_eq!(r.status, 413);
    assert!(c.request("GET", "vmm.ping", None).is_err());
    assert!(t.mock.seen.lock().unwrap().iter().all(|n| n != "vm.create"));
}

#[test]
fn framing_errors_and_limits() {
    let t = start("framing", Limits::default());
    let resp = raw(&t.path, b"this is not http\r\n\r\n");
    assert_eq!(status_of(&resp), 400);
    let resp = raw(
        &t.path,
        b"GET /api/v1/vmm.ping HTTP/1.1\r\nContent-Length: x\r\n\r\n",
    );
    assert_eq!(status_of(&resp), 400);
    let resp = raw(
        &t.path,
        b"GET /api/v1/vmm.ping HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    );
    assert_eq!(status_of(&resp), 400);
    let resp = raw(
        &t.path,
        b"PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    );
    assert_eq!(status_of(&resp), 411);
    // A megabyte body: refused from its Content-Length, before it is read.
    let resp = raw(
        &t.path,
        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 10485760\r\n\r\n{",
    );
    assert_eq!(status_of(&resp), 413);
    assert!(resp.contains("10485760"), "{resp}");
    // Huge headers.
    let mut big = b"GET /api/v1/vmm.ping HTTP/1.1\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 20_000));
    big.extend_from_slice(b"\r\n\r\n");
    assert_eq!(status_of(&raw(&t.path, &big)), 431);
    let mut many = b"GET /api/v1/vmm.ping HTTP/1.1\r\n".to_vec();
    for i in 0..100 {
        many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    assert_eq!(status_of(&raw(&t.path, &many)), 431);
    // A small body announced with Expect: 100-continue gets the interim answer, then the real one.
    let mut s = UnixStream::connect(&t.path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"PUT /api/v1/vm.boot HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut interim = [0u8; 17];
    s.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 \r\n\r\n");
    s.write_all(b"{}").unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    assert_eq!(status_of(&resp), 204, "{resp}");
    // HTTP/1.0 closes by default.
    let resp = raw(&t.path, b"GET /api/v1/vmm.ping HTTP/1.0\r\n\r\n");
    assert_eq!(status_of(&resp), 200);
    // Two pipelined requests in one write.
    let resp = raw(
        &t.path,
        b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\nPUT /api/v1/vm.boot HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert!(
        resp.contains("HTTP/1.1 200 \r\n") && resp.contains("HTTP/1.1 204 \r\n"),
        "{resp}"
    );
}

#[test]
fn slow_and_vanishing_clients_do_not_block_others() {
    let t = start("slow", short_limits());
    // A client that starts a request and stalls.
    let mut slow = UnixStream::connect(&t.path).unwrap();
    slow.write_all(b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Le")
        .unwrap();
    // One that connects and says nothing.
    let _idle = UnixStream::connect(&t.path).unwrap();
    // One that sends half a body and disconnects.
    let mut gone = UnixStream::connect(&t.path).unwrap();
    gone.write_all(b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"pay")
        .unwrap();
    drop(gone);
    // Meanwhile others are served at once.
    let started = Instant::now();
    let mut c = Client::connect(&t.path).unwrap();
    assert_eq!(c.request("GET", "vmm.ping", None).unwrap().status, 200);
    assert!(started.elapsed() < Duration::from_secs(1));
    // The stalled client gets a 408 once its time is up, and is closed.
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = String::new();
    let _ = slow.read_to_string(&mut out);
    assert_eq!(status_of(&out), 408, "{out}");
    // A client trickling one byte at a time is held to the same deadline.
    let mut trickle = UnixStream::connect(&t.path).unwrap();
    trickle
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let started = Instant::now();
    for b in b"GET /api/v1/vmm.ping HTTP/1.1\r\nX-Slow: ".iter() {
        if trickle.write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut out = String::new();
    let _ = trickle.read_to_string(&mut out);
    assert_eq!(status_of(&out), 408, "{out}");
    assert!(started.elapsed() < Duration::from_secs(3));
    // Nothing half-received reached the handler.
    assert!(t.mock.seen.lock().unwrap().iter().all(|n| n != "vm.create"));
    assert_eq!(c.request("GET", "vmm.ping", None).unwrap().status, 200);
}

#[test]
fn a_kept_connection_outlives_the_first_request_timeout() {
    // Kata's Rust runtime keeps one connection for the pod's life (tests/api/replay.rs drives
    // it with that client's own framing); idling is never a reason to close it.
    let t = start(
        "kept",
        Limits {
            first_request_timeout: Duration::from_millis(200),
            ..Limits::default()
        },
    );
    let mut c = Client::connect(&t.path).unwrap();
    assert_eq!(c.request("GET", "vmm.ping", None).unwrap().status, 200);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(c.request("GET", "vmm.ping", None).unwrap().status, 200);
    // Non-ASCII text in an answer is escaped: the bytes on the wire are ASCII.
    let r = c.request("PUT", "vm.delete", None).unwrap();
    assert_eq!(r.status, 409);
    assert!(r.body.is_ascii(), "{}", r.body_text());
    assert!(r.error_message().starts_with("caf\u{e9} \u{1f600}"));
}

#[test]
fn the_status_line_has_no_reason_phrase() {
    let t = start("status-line", Limits::default());
    let out = raw(
        &t.path,
        b"GET /api/v1/vmm.ping HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert!(out.starts_with("HTTP/1.1 200 \r\n"), "{out:?}");
    let out = raw(
        &t.path,
        b"GET /api/v1/vm.nosuch HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert!(out.starts_with("HTTP/1.1 404 \r\n"), "{out:?}");
    assert!(out.contains("\r\nContent-Length: "), "{out:?}");
}

#[test]
fn a_connection_that_never_sends_is_closed_after_its_first_request_timeout() {
    let t = start(
        "silent",
        Limits {
            first_request_timeout: Duration::from_millis(200),
            ..Limits::default()
        },
    );
    let mut s = UnixStream::connect(&t.path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(out.is_empty(), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[test]
fn idle_and_stalled_clients_never_lock_a_shim_out() {
    let t = start(
        "lockout",
        Limits {
            max_connections: 4,
            ..Limits::default()
        },
    );
    // The shim's kept connection, used once and then idle.
    let mut shim = Client::connect(&t.path).unwrap();
    assert_eq!(shim.request("GET", "vmm.ping", None).unwrap().status, 200);
    // Connections that send nothing, and one stalled mid-request, reopened again and again.
    let mut hogs: Vec<UnixStream> = Vec::new();
    let mut worst = Duration::ZERO;
    for round in 0..50 {
        hogs.retain(|_| false);
        for _ in 0..3 {
            hogs.push(UnixStream::connect(&t.path).unwrap());
        }
        if round % 2 == 0 {
            let mut h = UnixStream::connect(&t.path).unwrap();
            h.write_all(b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Le")
                .unwrap();
            hogs.push(h);
        }
        // A new call from the shim (a second connection, as Kata's Go runtime makes) gets in.
        let started = Instant::now();
        let mut c = Client::connect(&t.path).unwrap();
        assert_eq!(
            c.request("GET", "vmm.ping", None).unwrap().status,
            200,
            "round {round}"
        );
        worst = worst.max(started.elapsed());
    }
    assert!(worst < Duration::from_secs(1), "a call took {worst:?}");
    // Only when twice the limit of connections all have a request with the VMM is a newcomer
    // refused.
    drop(hogs);
    t.mock.hold(true);
    // One at a time, each request with the VMM before the next client connects: a client
    // that connected and has not written yet is fair game at twice the limit (on a loaded
    // host the gap between its connect and its write can be long).
    let held = || {
        t.mock
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|n| *n == "vm.counters")
            .count()
    };
    let mut busy = Vec::new();
    for i in 0..8 {
        let path = t.path.clone();
        busy.push(std::thread::spawn(move || {
            let mut c = Client::connect(&path).unwrap();
            c.request("GET", "vm.counters", None).unwrap().status
        }));
        let deadline = Instant::now() + Duration::from_secs(10);
        while held() < i + 1 {
            assert!(Instant::now() < deadline, "held request {i} did not arrive");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let resp = raw(&t.path, b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n");
    assert_eq!(status_of(&resp), 503, "{resp}");
    t.mock.hold(false);
    for b in busy {
        assert_eq!(b.join().unwrap(), 204);
    }
}

#[test]
fn kept_connections_past_twice_the_limit_make_room_longest_idle_first() {
    let t = start(
        "cap",
        Limits {
            max_connections: 2,
            ..Limits::default()
        },
    );
    // Four kept connections, each served once: twice the limit, nobody closed.
    let mut kept: Vec<Client> = (0..4).map(|_| Client::connect(&t.path).unwrap()).collect();
    for c in &mut kept {
        assert_eq!(c.request("GET", "vmm.ping", None).unwrap().status, 200);
    }
    // A fifth client gets in: the first, idle the longest, is closed for it.
    let resp = raw(
        &t.path,
        b"GET /api/v1/vmm.ping HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status_of(&resp), 200, "{resp}");
    assert!(
        kept[0].request("GET", "vmm.ping", None).is_err(),
        "the longest idle was not closed"
    );
    for c in &mut kept[1..] {
        assert_eq!(c.request("GET", "vmm.ping", None).unwrap().status, 200);
    }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors pipe2 writes.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors are fresh and owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Whether every write end of the pipe is closed (a read sees end-of-file at once).
fn writers_closed(read_end: &OwnedFd, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: read_end.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    pfd.revents & libc::POLLHUP != 0
}

#[test]
fn descriptors_travel_with_add_net_and_are_closed_elsewhere() {
    let t = start("fds", Limits::default());
    let mut c = Client::connect(&t.path).unwrap();
    let (r1, w1) = pipe();
    let (r2, w2) = pipe();
    // JSON fd numbers are ignored; the descriptors come with the request.
    let body = br#"{"mac":"02:00:00:00:00:01","fds":[99]}"#;
    let r = c
        .request_with_fds(
            "PUT",
            "vm.add-net",
            Some(body),
            &[w1.as_raw_fd(), w2.as_raw_fd()],
        )
        .unwrap();
    assert_eq!(r.status, 204, "{}", r.error_message());
    drop((w1, w2));
    assert_eq!(t.mock.fds.lock().unwrap().len(), 2, "both TAP fds received");
    assert!(!writers_closed(&r1, 50) && !writers_closed(&r2, 50));
    t.mock.fds.lock().unwrap().clear();
    assert!(writers_closed(&r1, 2000) && writers_closed(&r2, 2000));

    // Descriptors sent with any other request are closed by the server.
    let c = Client::connect(&t.path).unwrap();
    let (r3, w3) = pipe();
    send_with_fds(
        c.stream(),
        b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n",
        &[w3.as_raw_fd()],
    )
    .unwrap();
    drop(w3);
    assert!(
        writers_closed(&r3, 2000),
        "a descriptor nobody asked for leaked"
    );

    // Too many descriptors: 400, all closed.
    let c = Client::connect(&t.path).unwrap();
    let pipes: Vec<_> = (0..17).map(|_| pipe()).collect();
    let raw_fds: Vec<_> = pipes.iter().map(|(_, w)| w.as_raw_fd()).collect();
    send_with_fds(
        c.stream(),
        b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n",
        &raw_fds,
    )
    .unwrap();
    let mut out = String::new();
    c.stream()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = c.stream().read_to_string(&mut out);
    assert_eq!(status_of(&out), 400, "{out}");
    let (reads, writes): (Vec<_>, Vec<_>) = pipes.into_iter().unzip();
    drop(writes);
    assert!(reads.iter().all(|r| writers_closed(r, 2000)));
}

#[test]
fn vmm_shutdown_closes_the_connection_and_is_waited_for() {
    let t = start("shutdown", Limits::default());
    let resp = raw(&t.path, b"PUT /api/v1/vmm.shutdown HTTP/1.1\r\n\r\n");
    assert_eq!(status_of(&resp), 204);
    assert!(resp.contains("Connection: close"));
    t.server.wait_answered(Duration::from_secs(1));
}

#[test]
fn socket_is_private_stale_is_replaced_live_is_refused() {
    let t = start("bind", Limits::default());
    let mode = std::fs::metadata(&t.path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // A second server on the same path is refused: the first one is alive.
    let err = bind(&t.path).unwrap_err();
    assert!(matches!(err, HttpError::InUse(_)), "{err}");
    assert!(err.to_string().contains("in use"));
    // A stale socket (its listener gone) is replaced.
    let dir = temp_dir("stale");
    let stale = dir.0.join("s.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let l = bind(&stale).unwrap();
    drop(l);
    // A regular file is not ours to remove.
    let file = dir.0.join("file");
    std::fs::write(&file, b"keep me").unwrap();
    assert!(matches!(bind(&file), Err(HttpError::NotASocket(_))));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    let long = dir.0.join("x".repeat(200));
    assert!(matches!(bind(&long), Err(HttpError::PathTooLong(_))));
    // The server removes its own socket, and only its own.
    t.server.remove_socket();
    assert!(!t.path.exists());
}
