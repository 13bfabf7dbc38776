//! podvmm's `log` back end: one line per record, `podvmm: LEVEL: message`, to stderr or to the
//! `--log-file`. `-v` raises the level (warn by default; -v info, -vv debug, -vvv trace), as
//! Cloud Hypervisor's `-v` does, which Kata passes when its debug is on.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use log::{LevelFilter, Log, Metadata, Record};

struct Logger {
    level: LevelFilter,
    out: Mutex<Box<dyn Write + Send>>,
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = format!(
            "podvmm: {}: {}\n",
            record.level().as_str().to_ascii_lowercase(),
            record.args()
        );
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        // A log that cannot be written must not stop the VMM.
        let _ = out.write_all(line.as_bytes());
    }

    fn flush(&self) {
        let _ = self.out.lock().map(|mut o| o.flush());
    }
}

/// The level for `verbosity` times `-v`.
pub fn level(verbosity: u8) -> LevelFilter {
    match verbosity {
        0 => LevelFilter::Warn,
        1 => LevelFilter::Info,
        2 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    }
}

/// Installs the logger. The log file is opened for appending (created 0600 if missing), before
/// any seccomp filter, and is never truncated.
pub fn init(verbosity: u8, file: Option<&Path>) -> std::io::Result<()> {
    let out: Box<dyn Write + Send> = match file {
        Some(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            let f: File = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK)
                .open(path)?;
            let meta = f.metadata()?;
            if !meta.file_type().is_file() {
                return Err(std::io::Error::other(format!(
                    "{} is not a regular file",
                    path.display()
                )));
            }
            Box::new(f)
        }
        None => Box::new(std::io::stderr()),
    };
    let level = level(verbosity);
    // Installed once for the life of the process.
    log::set_logger(Box::leak(Box::new(Logger {
        level,
        out: Mutex::new(out),
    })))
    .map_err(|e| std::io::Error::other(e.to_string()))?;
    log::set_max_level(level);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_follow_the_v_count() {
        assert_eq!(level(0), LevelFilter::Warn);
        assert_eq!(level(1), LevelFilter::Info);
        assert_eq!(level(2), LevelFilter::Debug);
        assert_eq!(level(9), LevelFilter::Trace);
    }
}
