//! `--event-monitor path=FILE`: one JSON object per line for each step of the VMM's and the
//! guest's life, with timestamps, so a shim (or a benchmark) can see where start-up time goes
//! without polling anything.
//!
//! ```text
//! {"event":"vmm_started","source":"vmm","timestamp":{"secs":0,"nanos":0},"ms":0.0,"monotonic_ns":81234567890,"properties":null}
//! {"event":"vm_booted","source":"vmm","timestamp":{"secs":0,"nanos":3517000},"ms":3.517,...}
//! ```
//!
//! `timestamp` (Cloud Hypervisor's shape) and `ms` count from `vmm_started`; `monotonic_ns` is
//! the host's `CLOCK_MONOTONIC`, comparable with any other process's clock readings. Events
//! (see `docs/vsock.md`): `vmm_started`, `vm_created`, `vm_booted`, `kernel_started` (the
//! first guest I/O exit reaching the VMM), `device_activated` (a virtio driver set
//! DRIVER_OK), `agent_ready`, `shutdown`.
//!
//! The monitor is process-wide: [`start`] once, then [`emit`] from anywhere; without
//! `start`, `emit` does nothing.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("--event-monitor: expected path=FILE, got '{0}'")]
    Syntax(String),
    #[error("--event-monitor: the event monitor is already started")]
    AlreadyStarted,
    #[error("event monitor {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

struct Monitor {
    file: Mutex<File>,
    start: Instant,
    start_ns: u64,
}

static MONITOR: OnceLock<Monitor> = OnceLock::new();
static PROCESS_START: OnceLock<Instant> = OnceLock::new();

/// The host's `CLOCK_MONOTONIC` in nanoseconds (what `Instant` reads on Linux).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// Marks when the VMM started (call first thing in `main`); later calls change nothing.
pub fn mark_start() -> Instant {
    *PROCESS_START.get_or_init(Instant::now)
}

/// Parses `path=FILE` (Cloud Hypervisor's form; a bare path is accepted too).
pub fn parse_option(s: &str) -> Result<PathBuf, MonitorError> {
    let path = s.strip_prefix("path=").unwrap_or(s);
    if path.is_empty() || path.contains(',') || path.starts_with("fd=") {
        return Err(MonitorError::Syntax(s.to_string()));
    }
    Ok(PathBuf::from(path))
}

/// Opens (creates or truncates) the monitor file and writes `vmm_started`.
pub fn start(path: &Path) -> Result<(), MonitorError> {
    if MONITOR.get().is_some() {
        return Err(MonitorError::AlreadyStarted);
    }
    let file = File::create(path).map_err(|source| MonitorError::Open {
        path: path.to_owned(),
        source,
    })?;
    let start = mark_start();
    let start_ns = monotonic_ns().saturating_sub(start.elapsed().as_nanos() as u64);
    MONITOR
        .set(Monitor {
            file: Mutex::new(file),
            start,
            start_ns,
        })
        .map_err(|_| MonitorError::AlreadyStarted)?;
    emit_at("vmm", "vmm_started", Value::Null, start);
    Ok(())
}

/// Whether events go anywhere.
pub fn enabled() -> bool {
    MONITOR.get().is_some()
}

/// Records `event` now.
pub fn emit(source: &str, event: &str, properties: Value) {
    emit_at(source, event, properties, Instant::now());
}

/// Records `event` at `when` (something measured earlier).
pub fn emit_at(source: &str, event: &str, properties: Value, when: Instant) {
    let Some(m) = MONITOR.get() else {
        return;
    };
    let since = when.saturating_duration_since(m.start);
    let line = json!({
        "event": event,
        "source": source,
        "timestamp": {"secs": since.as_secs(), "nanos": since.subsec_nanos()},
        "ms": since.as_secs_f64() * 1000.0,
        "monotonic_ns": m.start_ns + since.as_nanos() as u64,
        "properties": properties,
    });
    let mut text = line.to_string();
    text.push('\n');
    let mut f = m.file.lock().unwrap_or_else(|p| p.into_inner());
    // One write per line, so a reader never sees half a line; a failing disk loses events,
    // never the VM.
    let _ = f.write_all(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_forms() {
        assert_eq!(
            parse_option("path=/tmp/ev").unwrap(),
            PathBuf::from("/tmp/ev")
        );
        assert_eq!(parse_option("/tmp/ev").unwrap(), PathBuf::from("/tmp/ev"));
        for bad in ["", "path=", "fd=3", "path=/a,fd=3"] {
            assert!(parse_option(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lines_with_timestamps() {
        let dir = std::env::temp_dir().join(format!("podvmm-events-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.jsonl");
        assert!(matches!(
            start(Path::new("/nonexistent/dir/ev")),
            Err(MonitorError::Open { .. })
        ));
        let before = monotonic_ns();
        start(&path).unwrap();
        assert!(enabled());
        emit("vmm", "vm_booted", json!({"vcpus": 2}));
        assert!(matches!(start(&path), Err(MonitorError::AlreadyStarted)));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], "vmm_started");
        assert_eq!(lines[1]["event"], "vm_booted");
        assert_eq!(lines[1]["properties"]["vcpus"], 2);
        let ms = lines[1]["ms"].as_f64().unwrap();
        assert!(ms >= lines[0]["ms"].as_f64().unwrap());
        let mono = lines[1]["monotonic_ns"].as_u64().unwrap();
        assert!(mono + 5_000_000_000 > before && mono <= monotonic_ns());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
