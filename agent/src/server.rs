//! The agent's request handling, over any [`Stream`], and its accept loop over any
//! [`Listener`].

use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::protocol::{
    agent_version, PingResult, PowerAction, PowerResult, Request, Response, MAX_REQUEST_LINE,
};
use crate::vsock::{Listener, Stream};
use crate::{exec, facts};

/// Connections served at once; more are answered with an error and closed.
pub const MAX_CONNECTIONS: usize = 64;
/// After answering `poweroff`, how long to wait for the client to close before acting.
pub const POWEROFF_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("request line longer than {MAX_REQUEST_LINE} bytes")]
    LineTooLong,
}

/// Ending the VM, behind a trait so tests can watch instead.
pub trait Power: Send + Sync {
    /// What `perform` will do.
    fn plan(&self) -> PowerAction;
    fn perform(&self, action: PowerAction);
}

/// The real thing: `reboot(2)`. Power off where the kernel can (ACPI); otherwise restart,
/// which the guest kit's kernel (`reboot=k`) turns into an i8042 reset that ends the VMM.
pub struct SystemPower;

impl Power for SystemPower {
    fn plan(&self) -> PowerAction {
        if std::path::Path::new("/sys/firmware/acpi").is_dir() {
            PowerAction::PowerOff
        } else {
            PowerAction::Restart
        }
    }

    fn perform(&self, action: PowerAction) {
        let cmd = match action {
            PowerAction::PowerOff => libc::RB_POWER_OFF,
            PowerAction::Restart => libc::RB_AUTOBOOT,
        };
        // SAFETY: sync(2) and reboot(2) take no pointers; reboot returns only on failure.
        unsafe {
            libc::sync();
            if libc::reboot(cmd) != 0 {
                eprintln!(
                    "podvmm-agent: reboot({action:?}) failed: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

pub struct Agent {
    power: Arc<dyn Power>,
    started: Instant,
    active: AtomicUsize,
}

/// Splits a byte stream into lines of bounded length.
struct Lines {
    buf: Vec<u8>,
    start: usize,
}

impl Lines {
    fn next<R: Read>(&mut self, r: &mut R) -> Result<Option<Vec<u8>>, ServerError> {
        loop {
            if let Some(i) = self.buf[self.start..].iter().position(|&b| b == b'\n') {
                let line = self.buf[self.start..self.start + i].to_vec();
                self.start += i + 1;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                return Ok(Some(line));
            }
            if self.buf.len() - self.start > MAX_REQUEST_LINE {
                return Err(ServerError::LineTooLong);
            }
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            let mut chunk = [0u8; 8192];
            let n = match r.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                // EOF; a last line without newline still counts.
                if self.buf.len() > self.start {
                    let line = self.buf[self.start..].to_vec();
                    self.buf.clear();
                    self.start = 0;
                    return Ok(Some(line));
                }
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn send<S: Write>(s: &mut S, r: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    line.push(b'\n');
    s.write_all(&line)?;
    s.flush()
}

impl Agent {
    pub fn new(power: Arc<dyn Power>) -> Self {
        Agent {
            power,
            started: Instant::now(),
            active: AtomicUsize::new(0),
        }
    }

    /// Answers one request line. The second value is set for `poweroff`: act on it once the
    /// response is out.
    pub fn respond(&self, line: &[u8]) -> (Response, Option<PowerAction>) {
        let value: Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) => {
                return (
                    Response::error(None, format!("bad request: not JSON: {e}")),
                    None,
                )
            }
        };
        let id = value.get("id").and_then(Value::as_u64);
        let req: Request = match serde_json::from_value(value) {
            Ok(r) => r,
            Err(e) => return (Response::error(id, format!("bad request: {e}")), None),
        };
        let to_value = |r: Result<Value, serde_json::Error>| match r {
            Ok(v) => Response::ok(id, v),
            Err(e) => Response::error(id, format!("internal error: {e}")),
        };
        match req {
            Request::Ping { .. } => (
                to_value(serde_json::to_value(PingResult {
                    pong: true,
                    agent: agent_version(),
                    agent_uptime_ms: self.started.elapsed().as_millis() as u64,
                })),
                None,
            ),
            Request::Exec {
                argv,
                stdin,
                env,
                cwd,
                timeout_ms,
                ..
            } => {
                let req = crate::protocol::ExecRequest {
                    argv,
                    stdin,
                    env,
                    cwd,
                    timeout_ms,
                };
                match exec::run(&req) {
                    Ok(r) => (to_value(serde_json::to_value(r)), None),
                    Err(e) => (Response::error(id, e.to_string()), None),
                }
            }
            Request::Info { .. } => match facts::gather() {
                Ok(i) => (to_value(serde_json::to_value(i)), None),
                Err(e) => (Response::error(id, e.to_string()), None),
            },
            Request::Poweroff { .. } => {
                let action = self.power.plan();
                (
                    to_value(serde_json::to_value(PowerResult { action })),
                    Some(action),
                )
            }
        }
    }

    /// Serves one connection until the client closes it.
    pub fn handle<S: Stream>(&self, mut stream: S) -> Result<(), ServerError> {
        let mut lines = Lines {
            buf: Vec::new(),
            start: 0,
        };
        loop {
            let line = match lines.next(&mut stream) {
                Ok(Some(l)) => l,
                Ok(None) => return Ok(()),
                Err(ServerError::LineTooLong) => {
                    let _ = send(
                        &mut stream,
                        &Response::error(None, ServerError::LineTooLong.to_string()),
                    );
                    return Err(ServerError::LineTooLong);
                }
                Err(e) => return Err(e),
            };
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let (resp, power) = self.respond(&line);
            send(&mut stream, &resp)?;
            if let Some(action) = power {
                // Let the answer reach the host before the VM goes: wait for the client to
                // close (it does on reading the answer), at most a short while.
                let _ = stream.shutdown_write();
                let _ = stream.set_read_timeout(Some(POWEROFF_GRACE));
                let mut sink = [0u8; 256];
                while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
                self.power.perform(action);
                return Ok(());
            }
        }
    }
}

/// Accepts connections forever, one thread each.
pub fn serve<L: Listener>(listener: L, agent: Arc<Agent>) -> std::io::Result<()> {
    let mut failures = 0u32;
    loop {
        let mut stream = match listener.accept() {
            Ok(s) => {
                failures = 0;
                s
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                failures += 1;
                if failures > 100 {
                    return Err(e);
                }
                std::thread::sleep(Duration::from_millis(10 * u64::from(failures.min(10))));
                continue;
            }
        };
        if agent.active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            agent.active.fetch_sub(1, Ordering::SeqCst);
            let _ = send(
                &mut stream,
                &Response::error(None, format!("busy: {MAX_CONNECTIONS} connections already")),
            );
            continue;
        }
        let a = agent.clone();
        let spawned = std::thread::Builder::new()
            .name("agent-conn".into())
            .spawn(move || {
                let _ = a.handle(stream);
                a.active.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            agent.active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ExecResult, Info};
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixStream;
    use std::sync::Mutex;

    #[derive(Default)]
    struct FakePower(Mutex<Vec<PowerAction>>);

    impl Power for FakePower {
        fn plan(&self) -> PowerAction {
            PowerAction::Restart
        }
        fn perform(&self, action: PowerAction) {
            self.0.lock().unwrap().push(action);
        }
    }

    type Pair = (
        BufReader<UnixStream>,
        UnixStream,
        std::thread::JoinHandle<Result<(), ServerError>>,
        Arc<FakePower>,
    );

    /// An agent on one end of a socket pair, a line client on the other.
    fn pair() -> Pair {
        let (a, b) = UnixStream::pair().unwrap();
        let power = Arc::new(FakePower::default());
        let agent = Agent::new(power.clone());
        let t = std::thread::spawn(move || agent.handle(a));
        b.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        (BufReader::new(b.try_clone().unwrap()), b, t, power)
    }

    fn call(r: &mut BufReader<UnixStream>, w: &mut UnixStream, line: &str) -> Response {
        w.write_all(line.as_bytes()).unwrap();
        w.write_all(b"\n").unwrap();
        let mut out = String::new();
        r.read_line(&mut out).unwrap();
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out:?}"))
    }

    #[test]
    fn ping_exec_info() {
        let (mut r, mut w, t, _) = pair();
        let p = call(&mut r, &mut w, r#"{"id":1,"op":"ping"}"#);
        assert!(p.ok && p.id == Some(1), "{p:?}");
        let ping: PingResult = serde_json::from_value(p.result.unwrap()).unwrap();
        assert!(ping.pong && ping.agent.starts_with("podvmm-agent "));
        let e = call(
            &mut r,
            &mut w,
            r#"{"id":2,"op":"exec","argv":["sh","-c","printf hi; printf oops >&2; exit 4"]}"#,
        );
        let res: ExecResult = serde_json::from_value(e.result.unwrap()).unwrap();
        assert_eq!((res.stdout.as_str(), res.stderr.as_str()), ("hi", "oops"));
        assert_eq!(res.exit_code, Some(4));
        let i = call(&mut r, &mut w, r#"{"id":3,"op":"info"}"#);
        let info: Info = serde_json::from_value(i.result.unwrap()).unwrap();
        assert!(info.cpus_online >= 1 && info.mem_total_kib > 0);
        // Blank lines are skipped; no id, no id echoed.
        let p = call(&mut r, &mut w, "\n  \n{\"op\":\"ping\"}");
        assert!(p.ok && p.id.is_none());
        drop(w);
        drop(r);
        t.join().unwrap().unwrap();
    }

    #[test]
    fn bad_requests_get_errors_and_the_connection_goes_on() {
        let (mut r, mut w, _t, _) = pair();
        for (line, want) in [
            ("not json", "bad request: not JSON"),
            (r#"{"id":5,"op":"fly"}"#, "unknown variant `fly`"),
            (r#"{"id":6,"op":"ping","x":1}"#, "unknown field `x`"),
            (r#"{"id":7,"op":"exec","argv":[]}"#, "argv is empty"),
            (
                r#"{"id":8,"op":"exec","argv":["/nonexistent/cmd"]}"#,
                "cannot run '/nonexistent/cmd'",
            ),
            ("[]", "bad request"),
        ] {
            let resp = call(&mut r, &mut w, line);
            assert!(!resp.ok, "{line}");
            let msg = resp.error.unwrap();
            assert!(msg.contains(want), "{line}: {msg}");
            if line.contains("\"id\"") {
                assert!(resp.id.is_some(), "{line}");
            }
        }
        assert!(call(&mut r, &mut w, r#"{"op":"ping"}"#).ok);
    }

    #[test]
    fn oversized_line_is_refused() {
        let (mut r, w, t, _) = pair();
        let big = vec![b'a'; MAX_REQUEST_LINE + 10_000];
        // The agent answers once it has seen too much; write from a thread.
        let mut w2 = w.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let _ = w2.write_all(&big);
        });
        let mut out = String::new();
        r.read_line(&mut out).unwrap();
        let resp: Response = serde_json::from_str(&out).unwrap();
        assert!(resp.error.unwrap().contains("longer than"));
        assert!(matches!(t.join().unwrap(), Err(ServerError::LineTooLong)));
        let _ = w.shutdown(std::net::Shutdown::Both);
        let _ = writer.join();
    }

    #[test]
    fn poweroff_answers_then_acts_once_the_client_closes() {
        let (mut r, mut w, t, power) = pair();
        let resp = call(&mut r, &mut w, r#"{"id":9,"op":"poweroff"}"#);
        let p: PowerResult = serde_json::from_value(resp.result.unwrap()).unwrap();
        assert_eq!(p.action, PowerAction::Restart);
        // The agent closed its side and waits for ours.
        let mut rest = String::new();
        assert_eq!(r.read_line(&mut rest).unwrap(), 0);
        assert!(power.0.lock().unwrap().is_empty());
        drop(w);
        drop(r);
        t.join().unwrap().unwrap();
        assert_eq!(*power.0.lock().unwrap(), vec![PowerAction::Restart]);
    }

    #[test]
    fn serves_many_connections_over_a_listener() {
        let dir = std::env::temp_dir().join(format!("podvmm-agent-serve-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let agent = Arc::new(Agent::new(Arc::new(FakePower::default())));
        std::thread::spawn(move || serve(listener, agent));
        let clients: Vec<_> = (0..8)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let mut w = UnixStream::connect(&path).unwrap();
                    let mut r = BufReader::new(w.try_clone().unwrap());
                    let line = format!(
                        r#"{{"id":{i},"op":"exec","argv":["sh","-c","sleep 0.2; echo {i}"]}}"#
                    );
                    let resp = call(&mut r, &mut w, &line);
                    let res: ExecResult = serde_json::from_value(resp.result.unwrap()).unwrap();
                    assert_eq!(res.stdout, format!("{i}\n"));
                })
            })
            .collect();
        let t = Instant::now();
        for c in clients {
            c.join().unwrap();
        }
        // Served at once, not one after the other.
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "{:?}",
            t.elapsed()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
