//! Guest facts for `info`: kernel, CPUs, memory, uptime.

use std::path::Path;

use crate::protocol::{agent_version, Info};

#[derive(Debug, thiserror::Error)]
pub enum FactsError {
    #[error("uname: {0}")]
    Uname(#[source] std::io::Error),
    #[error("{path}: {source}")]
    Read {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no {what}")]
    Parse {
        path: &'static str,
        what: &'static str,
    },
}

fn field(chars: &[libc::c_char]) -> String {
    let bytes: Vec<u8> = chars
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn read(path: &'static str) -> Result<String, FactsError> {
    std::fs::read_to_string(Path::new(path)).map_err(|source| FactsError::Read { path, source })
}

/// Counts the CPUs in a kernel CPU list such as `0-3,5,7-8`; None if malformed.
pub fn count_cpu_list(list: &str) -> Option<u32> {
    let list = list.trim();
    if list.is_empty() {
        return Some(0);
    }
    let mut n = 0u32;
    for part in list.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                if b < a {
                    return None;
                }
                n = n.checked_add(b - a + 1)?;
            }
            None => {
                part.parse::<u32>().ok()?;
                n = n.checked_add(1)?;
            }
        }
    }
    Some(n)
}

/// `MemTotal:       1004112 kB` -> 1004112.
pub fn meminfo_kib(meminfo: &str, key: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

pub fn gather() -> Result<Info, FactsError> {
    // SAFETY: utsname is plain data; uname fills it.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable utsname.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return Err(FactsError::Uname(std::io::Error::last_os_error()));
    }
    const ONLINE: &str = "/sys/devices/system/cpu/online";
    const MEMINFO: &str = "/proc/meminfo";
    const UPTIME: &str = "/proc/uptime";
    let online = read(ONLINE)?.trim().to_string();
    let cpus = count_cpu_list(&online).ok_or(FactsError::Parse {
        path: ONLINE,
        what: "CPU list",
    })?;
    let meminfo = read(MEMINFO)?;
    let total = meminfo_kib(&meminfo, "MemTotal").ok_or(FactsError::Parse {
        path: MEMINFO,
        what: "MemTotal",
    })?;
    let available = meminfo_kib(&meminfo, "MemAvailable")
        .or_else(|| meminfo_kib(&meminfo, "MemFree"))
        .unwrap_or(0);
    let uptime = read(UPTIME)?
        .split_whitespace()
        .next()
        .and_then(|s| s.parse::<f64>().ok())
        .ok_or(FactsError::Parse {
            path: UPTIME,
            what: "uptime",
        })?;
    Ok(Info {
        kernel_release: field(&uts.release),
        kernel_version: field(&uts.version),
        machine: field(&uts.machine),
        hostname: field(&uts.nodename),
        cpus_online: cpus,
        cpus_online_list: online,
        mem_total_kib: total,
        mem_available_kib: available,
        uptime_s: uptime,
        agent_version: agent_version(),
        agent_pid: std::process::id(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list("0-1\n"), Some(2));
        assert_eq!(count_cpu_list("0-3,5,7-8"), Some(7));
        assert_eq!(count_cpu_list(""), Some(0));
        for bad in ["a", "3-1", "0-", "1,,2"] {
            assert_eq!(count_cpu_list(bad), None, "{bad}");
        }
    }

    #[test]
    fn meminfo_lines() {
        let m = "MemTotal:        1004112 kB\nMemFree:  5 kB\nMemAvailable:   900 kB\n";
        assert_eq!(meminfo_kib(m, "MemTotal"), Some(1004112));
        assert_eq!(meminfo_kib(m, "MemAvailable"), Some(900));
        assert_eq!(meminfo_kib(m, "Mem"), None);
        assert_eq!(meminfo_kib(m, "SwapTotal"), None);
    }

    #[test]
    fn facts_of_this_machine() {
        let i = gather().unwrap();
        assert!(!i.kernel_release.is_empty());
        assert!(i.cpus_online >= 1);
        assert!(i.mem_total_kib > 0);
        assert_eq!(i.agent_pid, std::process::id());
        let procfs = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        assert_eq!(i.kernel_release, procfs.trim());
    }
}
