//! The agent protocol: one JSON object per line each way, over a vsock stream.
//!
//! A request names its operation in `op` and may carry a numeric `id`, which the response
//! echoes. Requests on one connection are answered in order, one response line each:
//!
//! ```text
//! {"id":1,"op":"ping"}                      -> {"id":1,"ok":true,"result":{"pong":true,...}}
//! {"id":2,"op":"exec","argv":["uname","-r"]} -> {"id":2,"ok":true,"result":{"exit_code":0,"stdout":"6.12...\n",...}}
//! {"id":3,"op":"info"}                      -> {"id":3,"ok":true,"result":{"kernel_release":...}}
//! {"id":4,"op":"poweroff"}                  -> {"id":4,"ok":true,"result":{"action":"restart"}}
//! {"op":"bogus"}                            -> {"ok":false,"error":"bad request: unknown variant `bogus`..."}
//! ```
//!
//! See `docs/vsock.md` for every field.

use serde::{Deserialize, Serialize};

/// The vsock port the agent listens on (Kata's agent port).
pub const AGENT_PORT: u32 = 1024;
/// The host port the agent connects to once it listens: podvmm's ready signal. The VMM records
/// the time and refuses the connection; nothing else happens.
pub const READY_PORT: u32 = 1023;
/// The host's context id.
pub const HOST_CID: u32 = 2;
/// Longest request line (exec's stdin travels inside it).
pub const MAX_REQUEST_LINE: usize = 1 << 20;
/// Most output kept per stream of an exec; the rest is read and dropped.
pub const MAX_OUTPUT: usize = 1 << 20;
/// exec's default time limit.
pub const DEFAULT_EXEC_TIMEOUT_MS: u64 = 60_000;

/// A request, without its `id`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Ping {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    Exec {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        argv: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stdin: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        env: Vec<(String, String)>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cwd: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    Info {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    Poweroff {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
}

impl Request {
    pub fn exec(id: Option<u64>, e: ExecRequest) -> Self {
        Request::Exec {
            id,
            argv: e.argv,
            stdin: e.stdin,
            env: e.env,
            cwd: e.cwd,
            timeout_ms: e.timeout_ms,
        }
    }

    pub fn id(&self) -> Option<u64> {
        match self {
            Request::Ping { id }
            | Request::Exec { id, .. }
            | Request::Info { id }
            | Request::Poweroff { id } => *id,
        }
    }
}

/// What `exec` runs: `argv[0]` (looked up in `PATH`) with the rest as arguments.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// Bytes for the command's standard input (none: /dev/null).
    pub stdin: Option<String>,
    /// Extra environment variables, `[name, value]` pairs.
    pub env: Vec<(String, String)>,
    /// Working directory (default: the agent's, `/`).
    pub cwd: Option<String>,
    /// Killed (SIGKILL) after this many milliseconds; default 60000.
    pub timeout_ms: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    /// The exit status, when the command exited.
    pub exit_code: Option<i32>,
    /// The signal that ended it, when one did.
    pub signal: Option<i32>,
    /// Standard output and error, as UTF-8 (invalid sequences replaced).
    pub stdout: String,
    pub stderr: String,
    /// Whether output beyond `MAX_OUTPUT` bytes was dropped.
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// Killed for running past its time limit.
    pub timed_out: bool,
    pub duration_ms: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PingResult {
    pub pong: bool,
    /// `podvmm-agent <version>`.
    pub agent: String,
    /// Milliseconds since the agent started listening.
    pub agent_uptime_ms: u64,
}

/// Facts about the guest.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Info {
    /// `uname -r`, `uname -v`, `uname -m`, `uname -n`.
    pub kernel_release: String,
    pub kernel_version: String,
    pub machine: String,
    pub hostname: String,
    /// Online CPUs: how many, and the kernel's list (`0-1`).
    pub cpus_online: u32,
    pub cpus_online_list: String,
    /// From /proc/meminfo.
    pub mem_total_kib: u64,
    pub mem_available_kib: u64,
    /// Seconds since the guest kernel booted (/proc/uptime).
    pub uptime_s: f64,
    pub agent_version: String,
    /// The agent's process id (1 when it is init).
    pub agent_pid: u32,
}

/// What `poweroff` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerAction {
    /// `reboot(RB_POWER_OFF)`: with ACPI, the VMM sees a power-off.
    PowerOff,
    /// `reboot(RB_AUTOBOOT)`: without ACPI (the guest kit's kernel), a reset through the
    /// i8042 (`reboot=k`), which podvmm treats as the end of the VM (exit status 0).
    Restart,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerResult {
    pub action: PowerAction,
}

/// One response line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn ok(id: Option<u64>, result: serde_json::Value) -> Self {
        Response {
            id,
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    pub fn error(id: Option<u64>, msg: impl Into<String>) -> Self {
        Response {
            id,
            ok: false,
            result: None,
            error: Some(msg.into()),
        }
    }
}

pub fn agent_version() -> String {
    format!("podvmm-agent {}", env!("CARGO_PKG_VERSION"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_forms() {
        let r: Request = serde_json::from_str(r#"{"op":"ping","id":7}"#).unwrap();
        assert_eq!(r, Request::Ping { id: Some(7) });
        let r: Request =
            serde_json::from_str(r#"{"op":"exec","argv":["ls","-l"],"timeout_ms":5}"#).unwrap();
        let Request::Exec {
            id: None,
            argv,
            timeout_ms,
            ..
        } = r
        else {
            panic!("{r:?}")
        };
        assert_eq!(argv, ["ls", "-l"]);
        assert_eq!(timeout_ms, Some(5));
        let line = serde_json::to_string(&Request::Info { id: None }).unwrap();
        assert_eq!(line, r#"{"op":"info"}"#);
        for bad in [
            r#"{"op":"reboot"}"#,
            r#"{"id":1}"#,
            r#"{"op":"ping","extra":1}"#,
            r#"{"op":"exec"}"#,
            r#"{"op":"exec","argv":"ls"}"#,
            r#"{"op":"exec","argv":["ls"],"user":"root"}"#,
            r#"[1,2]"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn response_forms() {
        let r = Response::error(Some(3), "nope");
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"id":3,"ok":false,"error":"nope"}"#
        );
        let p = serde_json::to_value(PowerResult {
            action: PowerAction::Restart,
        })
        .unwrap();
        assert_eq!(p, serde_json::json!({"action": "restart"}));
    }
}
