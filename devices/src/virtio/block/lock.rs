//! Disk image locks, as QEMU and Cloud Hypervisor take them: an open-file-description (OFD)
//! lock on the whole image, shared for a read-only disk and exclusive for a read-write one. Two
//! VMs can then share a read-only image, but never write one that another VM reads or writes.
//! OFD locks belong to the open file, so the lock goes when the disk's descriptor is closed
//! (the device is dropped, or the process dies), never by accident when some other descriptor
//! to the same file is closed, as a classic POSIX lock would.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

/// Takes the lock, without waiting. On conflict, the error says who holds the file open.
pub fn lock(file: &File, readonly: bool) -> Result<(), String> {
    // SAFETY: flock is plain data; all-zero is "the whole file from offset 0".
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if readonly {
        libc::F_RDLCK
    } else {
        libc::F_WRLCK
    } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: F_OFD_SETLK with a valid flock on a descriptor we own; l_pid must be 0.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => {
            let others = holders(file);
            let who = if others.is_empty() {
                "another process".to_string()
            } else {
                others.join(", ")
            };
            Err(format!(
                "in use: {who} holds a {} lock on it ({})",
                if readonly { "write" } else { "read or write" },
                if readonly {
                    "a disk another VM writes cannot be shared"
                } else {
                    "a read-write disk belongs to one VM; share it read-only (readonly=on) or not at all"
                }
            ))
        }
        // Locks not supported by the file system (some network file systems): serve anyway.
        Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => Ok(()),
        _ => Err(format!("locking: {e}")),
    }
}

/// The other processes that have the same file open, as "pid N (name)". OFD locks do not
/// record their owner, so this is who may hold it. Bounded: the first 8 found.
fn holders(file: &File) -> Vec<String> {
    let Ok(me) = file.metadata() else {
        return Vec::new();
    };
    let target = (me.dev(), me.ino());
    let own = std::process::id();
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        // Our own descriptor being locked is the one that failed: another of ours means the
        // same image is given twice.
        let mine = file.as_raw_fd().to_string();
        let open = fds.flatten().any(|fd| {
            (pid != own || fd.file_name().to_str() != Some(mine.as_str()))
                && std::fs::metadata(fd.path()).is_ok_and(|m| (m.dev(), m.ino()) == target)
        });
        if open && pid == own {
            found.push("this VM (the image is given twice)".to_string());
        } else if open {
            let name = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            found.push(format!("pid {pid} ({})", name.trim()));
            if found.len() == 8 {
                break;
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_locks_share_and_a_write_lock_excludes() {
        let p = std::env::temp_dir().join(format!("podvmm-lock-{}", std::process::id()));
        std::fs::write(&p, [0u8; 4096]).unwrap();
        let open = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&p)
                .unwrap()
        };
        let (a, b, c) = (open(), open(), open());
        // Two readers share.
        lock(&a, true).unwrap();
        lock(&b, true).unwrap();
        // A writer is refused while they read, and told why.
        let e = lock(&c, false).unwrap_err();
        assert!(e.contains("in use") && e.contains("read-write disk"), "{e}");
        drop((a, b));
        // Once they are gone, the writer gets it, and then a reader is refused.
        lock(&c, false).unwrap();
        let d = open();
        let e = lock(&d, true).unwrap_err();
        assert!(e.contains("holds a write lock"), "{e}");
        drop(c);
        lock(&d, true).unwrap();
        let _ = std::fs::remove_file(&p);
    }
}
