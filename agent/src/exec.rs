//! Runs one command for `exec`: output captured (bounded), a time limit, the exit status.

use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::protocol::{ExecRequest, ExecResult, DEFAULT_EXEC_TIMEOUT_MS, MAX_OUTPUT};

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("argv is empty: nothing to run")]
    EmptyArgv,
    #[error("argv[0] is empty")]
    EmptyProgram,
    #[error("cannot run '{program}': {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for '{program}': {source}")]
    Wait {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

/// Output of one stream, shared with the thread that reads it.
#[derive(Default)]
struct Captured {
    bytes: Vec<u8>,
    truncated: bool,
}

fn capture(
    mut from: impl Read + Send + 'static,
) -> (Arc<Mutex<Captured>>, std::thread::JoinHandle<()>) {
    let out = Arc::new(Mutex::new(Captured::default()));
    let sink = out.clone();
    let handle = std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let mut c = sink.lock().unwrap_or_else(|p| p.into_inner());
                    let room = MAX_OUTPUT.saturating_sub(c.bytes.len());
                    c.bytes.extend_from_slice(&buf[..n.min(room)]);
                    // Keep draining past the cap, so the command never blocks on a full pipe.
                    if n > room {
                        c.truncated = true;
                    }
                }
            }
        }
    });
    (out, handle)
}

fn take(c: &Arc<Mutex<Captured>>) -> (String, bool) {
    let c = c.lock().unwrap_or_else(|p| p.into_inner());
    (String::from_utf8_lossy(&c.bytes).into_owned(), c.truncated)
}

/// Runs the command to completion or its time limit.
pub fn run(req: &ExecRequest) -> Result<ExecResult, ExecError> {
    let program = req.argv.first().ok_or(ExecError::EmptyArgv)?;
    if program.is_empty() {
        return Err(ExecError::EmptyProgram);
    }
    let start = Instant::now();
    let mut cmd = Command::new(program);
    cmd.args(&req.argv[1..])
        .stdin(if req.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in &req.env {
        cmd.env(k, v);
    }
    if let Some(dir) = &req.cwd {
        cmd.current_dir(dir);
    }
    let mut child = cmd.spawn().map_err(|source| ExecError::Spawn {
        program: program.clone(),
        source,
    })?;
    if let (Some(mut pipe), Some(data)) = (child.stdin.take(), req.stdin.clone()) {
        // A command that does not read its input must not block us: write from a thread.
        std::thread::spawn(move || {
            let _ = pipe.write_all(data.as_bytes());
        });
    }
    let (out, out_thread) = match child.stdout.take() {
        Some(p) => {
            let (c, h) = capture(p);
            (c, Some(h))
        }
        None => (Arc::default(), None),
    };
    let (err, err_thread) = match child.stderr.take() {
        Some(p) => {
            let (c, h) = capture(p);
            (c, Some(h))
        }
        None => (Arc::default(), None),
    };
    let limit = Duration::from_millis(req.timeout_ms.unwrap_or(DEFAULT_EXEC_TIMEOUT_MS));
    let mut timed_out = false;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(source) => {
                let _ = child.kill();
                return Err(ExecError::Wait {
                    program: program.clone(),
                    source,
                });
            }
        }
        if start.elapsed() >= limit {
            timed_out = true;
            let _ = child.kill();
            break child.wait().map_err(|source| ExecError::Wait {
                program: program.clone(),
                source,
            })?;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    };
    // Output ends when the pipes close. A background process the command left behind may
    // hold them open: then take what arrived within a short grace period.
    let grace = Instant::now() + Duration::from_millis(200);
    for h in [out_thread, err_thread].into_iter().flatten() {
        while !h.is_finished() && Instant::now() < grace {
            std::thread::sleep(Duration::from_millis(2));
        }
        if h.is_finished() {
            let _ = h.join();
        }
    }
    let (stdout, stdout_truncated) = take(&out);
    let (stderr, stderr_truncated) = take(&err);
    Ok(ExecResult {
        exit_code: status.code(),
        signal: status.signal(),
        stdout,
        stderr,
        stdout_truncated,
        stderr_truncated,
        timed_out,
        duration_ms: start.elapsed().as_millis() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> ExecRequest {
        ExecRequest {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            ..ExecRequest::default()
        }
    }

    #[test]
    fn output_status_and_input() {
        let r = run(&sh("echo out; echo err >&2; exit 3")).unwrap();
        assert_eq!((r.stdout.as_str(), r.stderr.as_str()), ("out\n", "err\n"));
        assert_eq!((r.exit_code, r.signal, r.timed_out), (Some(3), None, false));
        let mut req = sh("cat; echo \"$GREETING\"");
        req.stdin = Some("from stdin\n".into());
        req.env = vec![("GREETING".into(), "hi".into())];
        let r = run(&req).unwrap();
        assert_eq!(r.stdout, "from stdin\nhi\n");
        let mut req = sh("pwd");
        req.cwd = Some("/".into());
        assert_eq!(run(&req).unwrap().stdout, "/\n");
    }

    #[test]
    fn signals_timeouts_and_bad_commands() {
        let r = run(&sh("kill -9 $$")).unwrap();
        assert_eq!((r.exit_code, r.signal), (None, Some(9)));
        let mut req = sh("sleep 10");
        req.timeout_ms = Some(100);
        let r = run(&req).unwrap();
        assert!(r.timed_out && r.signal == Some(9), "{r:?}");
        assert!(r.duration_ms < 5000);
        let e = run(&ExecRequest {
            argv: vec!["/no/such/program".into()],
            ..ExecRequest::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("cannot run '/no/such/program'"), "{e}");
        assert!(matches!(
            run(&ExecRequest::default()),
            Err(ExecError::EmptyArgv)
        ));
        let mut bad_dir = sh("true");
        bad_dir.cwd = Some("/no/such/dir".into());
        assert!(run(&bad_dir).is_err());
    }

    #[test]
    fn output_is_bounded() {
        let r = run(&sh("head -c 3000000 /dev/zero | tr '\\0' a")).unwrap();
        assert_eq!(r.stdout.len(), MAX_OUTPUT);
        assert!(r.stdout_truncated && !r.stderr_truncated);
        assert_eq!(r.exit_code, Some(0));
    }

    #[test]
    fn a_lingering_background_child_does_not_hang_exec() {
        let r = run(&sh("sleep 5 & echo started")).unwrap();
        assert_eq!(r.exit_code, Some(0));
        assert!(r.duration_ms < 3000, "{r:?}");
    }
}
