//! The host side: reach the agent through a VMM's hybrid vsock socket (`CONNECT <port>` /
//! `OK <host port>`) and make requests.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::protocol::{ExecRequest, ExecResult, Info, PingResult, PowerResult, Request, Response};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot connect to the vsock socket {path}: {source} (is the VM running with --vsock?)"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VMM refused CONNECT {port}: {msg}")]
    Refused { port: u32, msg: String },
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("the connection closed {0}")]
    Closed(&'static str),
    #[error("unexpected answer {what}: {line:?}")]
    Unexpected { what: &'static str, line: String },
    #[error("the agent answered an error: {0}")]
    Agent(String),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> ClientError {
    move |source| match source.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ClientError::Timeout(what),
        _ => ClientError::Io { what, source },
    }
}

#[derive(Debug)]
pub struct Client {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    next_id: u64,
    host_port: u32,
    timeout: Duration,
}

impl Client {
    /// Connects to guest `port` through the hybrid vsock socket at `socket`, waiting up to
    /// `timeout` for the VMM's `OK` (podvmm holds a CONNECT until the guest listens, up to its
    /// own connect timeout).
    pub fn connect(socket: &Path, port: u32, timeout: Duration) -> Result<Client, ClientError> {
        let writer = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
            path: socket.to_owned(),
            source,
        })?;
        let reader = writer.try_clone().map_err(io("cloning the socket"))?;
        reader
            .set_read_timeout(Some(timeout))
            .map_err(io("setting a timeout"))?;
        let mut c = Client {
            writer,
            reader: BufReader::new(reader),
            next_id: 1,
            host_port: 0,
            timeout,
        };
        c.writer
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .map_err(io("sending CONNECT"))?;
        let line = c.read_line("waiting for the VMM to answer CONNECT")?;
        if let Some(rest) = line.strip_prefix("OK ") {
            c.host_port = rest.trim().parse().map_err(|_| ClientError::Unexpected {
                what: "to CONNECT",
                line: line.clone(),
            })?;
            return Ok(c);
        }
        match line.strip_prefix("ERR ") {
            Some(msg) => Err(ClientError::Refused {
                port,
                msg: msg.to_string(),
            }),
            None => Err(ClientError::Unexpected {
                what: "to CONNECT",
                line,
            }),
        }
    }

    /// The host-side port the VMM gave this connection.
    pub fn host_port(&self) -> u32 {
        self.host_port
    }

    fn read_line(&mut self, what: &'static str) -> Result<String, ClientError> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(ClientError::Closed(what)),
            Ok(_) => Ok(line.trim_end_matches(['\r', '\n']).to_string()),
            Err(e) => Err(io(what)(e)),
        }
    }

    /// Sends one request and returns the agent's `result`.
    pub fn call(&mut self, req: Request) -> Result<serde_json::Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut value = serde_json::to_value(&req).map_err(|e| ClientError::Io {
            what: "encoding the request",
            source: std::io::Error::other(e),
        })?;
        if let Some(obj) = value.as_object_mut() {
            obj.insert("id".into(), id.into());
        }
        // exec may run long: wait for it past its own limit.
        let wait = match &req {
            Request::Exec { timeout_ms, .. } => {
                Duration::from_millis(
                    timeout_ms.unwrap_or(crate::protocol::DEFAULT_EXEC_TIMEOUT_MS),
                ) + self.timeout
            }
            _ => self.timeout,
        };
        self.reader
            .get_ref()
            .set_read_timeout(Some(wait))
            .map_err(io("setting a timeout"))?;
        let mut line = value.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(io("sending the request"))?;
        let answer = self.read_line("waiting for the agent's answer")?;
        let resp: Response =
            serde_json::from_str(&answer).map_err(|_| ClientError::Unexpected {
                what: "from the agent",
                line: answer.clone(),
            })?;
        if resp.id.is_some_and(|r| r != id) {
            return Err(ClientError::Unexpected {
                what: "(answer to another request)",
                line: answer,
            });
        }
        if !resp.ok {
            return Err(ClientError::Agent(
                resp.error.unwrap_or_else(|| "no message".into()),
            ));
        }
        resp.result.ok_or(ClientError::Unexpected {
            what: "(no result)",
            line: answer,
        })
    }

    fn typed<T: DeserializeOwned>(&mut self, req: Request) -> Result<T, ClientError> {
        let v = self.call(req)?;
        serde_json::from_value(v.clone()).map_err(|_| ClientError::Unexpected {
            what: "result",
            line: v.to_string(),
        })
    }

    pub fn ping(&mut self) -> Result<PingResult, ClientError> {
        self.typed(Request::Ping { id: None })
    }

    pub fn exec(&mut self, req: ExecRequest) -> Result<ExecResult, ClientError> {
        self.typed(Request::exec(None, req))
    }

    pub fn info(&mut self) -> Result<Info, ClientError> {
        self.typed(Request::Info { id: None })
    }

    /// Asks the agent to end the VM, then closes the connection (the agent waits for that).
    pub fn poweroff(mut self) -> Result<PowerResult, ClientError> {
        self.typed(Request::Poweroff { id: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::PowerAction;
    use crate::server::{Agent, Power};
    use std::io::Read;
    use std::os::unix::net::UnixListener;
    use std::sync::{Arc, Mutex};

    struct NoPower(Mutex<u32>);
    impl Power for NoPower {
        fn plan(&self) -> PowerAction {
            PowerAction::PowerOff
        }
        fn perform(&self, _: PowerAction) {
            *self.0.lock().unwrap() += 1;
        }
    }

    /// A stand-in for the VMM's hybrid socket: answers the CONNECT line as told, then hands
    /// the stream to an agent.
    fn fake_vmm(tag: &str, answer: &'static str) -> (PathBuf, Arc<NoPower>) {
        let dir = std::env::temp_dir().join(format!("podvmm-client-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let power = Arc::new(NoPower(Mutex::new(0)));
        let agent = Arc::new(Agent::new(power.clone()));
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else { return };
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while s.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
                    line.push(b[0]);
                }
                assert_eq!(line, b"CONNECT 1024");
                s.write_all(answer.as_bytes()).unwrap();
                if answer.starts_with("OK") {
                    let a = agent.clone();
                    std::thread::spawn(move || a.handle(s));
                }
            }
        });
        (path, power)
    }

    #[test]
    fn through_a_hybrid_socket() {
        let (path, power) = fake_vmm("ok", "OK 1073741824\n");
        let mut c = Client::connect(&path, 1024, Duration::from_secs(10)).unwrap();
        assert_eq!(c.host_port(), 1 << 30);
        assert!(c.ping().unwrap().pong);
        let r = c
            .exec(ExecRequest {
                argv: vec!["echo".into(), "hello".into()],
                ..ExecRequest::default()
            })
            .unwrap();
        assert_eq!(r.stdout, "hello\n");
        assert!(c.info().unwrap().cpus_online >= 1);
        let e = c
            .exec(ExecRequest {
                argv: vec![],
                ..ExecRequest::default()
            })
            .unwrap_err();
        assert!(
            matches!(e, ClientError::Agent(ref m) if m.contains("argv is empty")),
            "{e}"
        );
        assert_eq!(c.poweroff().unwrap().action, PowerAction::PowerOff);
        let t = std::time::Instant::now();
        while *power.0.lock().unwrap() == 0 {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "poweroff never performed"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn refusals_and_missing_sockets() {
        let (path, _) = fake_vmm("err", "ERR guest port 1024 refused the connection\n");
        let e = Client::connect(&path, 1024, Duration::from_secs(10)).unwrap_err();
        assert!(matches!(e, ClientError::Refused { port: 1024, .. }), "{e}");
        let (path, _) = fake_vmm("junk", "HELLO\n");
        let e = Client::connect(&path, 1024, Duration::from_secs(10)).unwrap_err();
        assert!(matches!(e, ClientError::Unexpected { .. }), "{e}");
        let e = Client::connect(
            Path::new("/nonexistent/v.sock"),
            1024,
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(e.to_string().contains("is the VM running"), "{e}");
    }
}
