//! The files podvmm writes (the serial log, the event monitor, the log file, its sockets) must
//! never be one of the VM's inputs (kernel, initramfs, disks, rng source) nor one another: a
//! `--serial file=` naming the disk image would truncate the tenant's data before anything else
//! was checked. This runs before any output is opened, on the command line and at `vm.create`
//! and `vm.boot` alike.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use api::{ConsoleOutputMode, VmConfig};

/// A file and what it is to the VM, for messages.
pub type Named = (String, PathBuf);

/// The VM's inputs: files it reads and must never write.
pub fn inputs(config: &VmConfig) -> Vec<Named> {
    let mut v: Vec<Named> = Vec::new();
    if let Some(k) = &config.payload.kernel {
        v.push(("kernel".into(), k.clone()));
    }
    if let Some(i) = &config.payload.initramfs {
        v.push(("initramfs".into(), i.clone()));
    }
    for (i, d) in config.disks.iter().flatten().enumerate() {
        v.push((format!("disk {i}"), d.path.clone()));
    }
    if let Some(r) = &config.rng {
        v.push(("rng source".into(), r.src.clone()));
    }
    v
}

/// What the VM itself writes or creates: the serial log and the vsock socket.
pub fn outputs(config: &VmConfig) -> Vec<Named> {
    let mut v: Vec<Named> = Vec::new();
    if config.serial.mode == ConsoleOutputMode::File {
        if let Some(f) = &config.serial.file {
            v.push(("serial file".into(), f.clone()));
        }
    }
    if let Some(vs) = &config.vsock {
        v.push(("vsock socket".into(), vs.socket.clone()));
    }
    v
}

/// Which file a path names: its device and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

/// The file `p` names, following symlinks; None if it does not exist.
fn file_id(p: &Path) -> Option<FileId> {
    std::fs::metadata(p).ok().map(|m| FileId {
        dev: m.dev(),
        ino: m.ino(),
    })
}

/// The path made absolute (not resolved), to compare paths of files that do not exist yet.
fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}

/// Checks that no output of `config` or of `more` (the process's own: event monitor, log file,
/// API socket) is one of the VM's inputs, or another output.
pub fn check(config: &VmConfig, more: &[Named]) -> Result<(), String> {
    let ins = inputs(config);
    let outs: Vec<Named> = outputs(config)
        .into_iter()
        .chain(more.iter().cloned())
        .collect();
    for (ow, op) in &outs {
        if op.as_os_str().is_empty() {
            continue;
        }
        if let Some(o) = file_id(op) {
            for (iw, ip) in &ins {
                if file_id(ip) == Some(o) {
                    return Err(format!(
                        "{ow} {} is the VM's {iw} ({}): podvmm would overwrite it; choose \
                         another file",
                        op.display(),
                        ip.display()
                    ));
                }
            }
        }
    }
    for (i, (aw, ap)) in outs.iter().enumerate() {
        for (bw, bp) in &outs[i + 1..] {
            let same = match (file_id(ap), file_id(bp)) {
                (Some(a), Some(b)) => a == b,
                _ => absolute(ap) == absolute(bp),
            };
            if same {
                return Err(format!(
                    "{aw} {} and {bw} {} are the same file; give each its own",
                    ap.display(),
                    bp.display()
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::{ConsoleConfig, DiskConfig};

    fn config(dir: &Path) -> VmConfig {
        let mut c: VmConfig = serde_json::from_str(&format!(
            r#"{{"payload":{{"kernel":"{}"}}}}"#,
            dir.join("vmlinux").display()
        ))
        .unwrap();
        c.disks = Some(vec![DiskConfig::parse(&format!(
            "path={},readonly=on",
            dir.join("disk.img").display()
        ))
        .unwrap()]);
        c
    }

    #[test]
    fn an_output_may_not_be_an_input_or_another_output() {
        let dir = std::env::temp_dir().join(format!("podvmm-outputs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("vmlinux"), b"k").unwrap();
        std::fs::write(dir.join("disk.img"), b"d").unwrap();
        std::os::unix::fs::symlink(dir.join("disk.img"), dir.join("link")).unwrap();
        let mut c = config(&dir);
        assert_eq!(check(&c, &[]), Ok(()));
        // The serial log on the disk image, directly or through a symlink.
        for name in ["disk.img", "link"] {
            c.serial = ConsoleConfig::parse(&format!("file={}", dir.join(name).display())).unwrap();
            let e = check(&c, &[]).unwrap_err();
            assert!(e.contains("is the VM's disk 0"), "{e}");
        }
        // The event monitor on the kernel.
        c.serial = ConsoleConfig::tty();
        let e = check(&c, &[("event monitor".into(), dir.join("vmlinux"))]).unwrap_err();
        assert!(e.contains("event monitor") && e.contains("kernel"), "{e}");
        // Two outputs on one new path: the serial log on the vsock socket.
        c.serial = ConsoleConfig::parse(&format!("file={}", dir.join("v.sock").display())).unwrap();
        c.vsock = Some(
            api::VsockConfig::parse(&format!("cid=3,socket={}", dir.join("v.sock").display()))
                .unwrap(),
        );
        let e = check(&c, &[]).unwrap_err();
        assert!(e.contains("are the same file"), "{e}");
        // Files nothing else uses are fine, existing or not.
        c.vsock = None;
        assert_eq!(
            check(&c, &[("log file".into(), dir.join("podvmm.log"))]),
            Ok(())
        );
        // The inputs are untouched.
        assert_eq!(std::fs::read(dir.join("disk.img")).unwrap(), b"d");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
