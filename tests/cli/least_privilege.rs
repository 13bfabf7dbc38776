//! podvmm needs no privilege beyond access to /dev/kvm and its own files (docs/security.md):
//! run as `nobody`, with no capabilities and no supplementary groups, it is refused /dev/kvm
//! until an ACL grants that one user read-write access, and then boots a tiny guest.
//!
//! Needs root (to switch user and to set the ACL) and `setfacl`; fails otherwise. The ACL
//! is removed, and /dev/kvm's mode restored, whatever the outcome.

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};

use common::*;

const NOBODY: u32 = 65534;

/// Grants `nobody` rw on /dev/kvm for as long as it lives.
struct KvmAcl {
    mode: u32,
    /// /dev/kvm had no extended ACL before: remove the whole ACL again, mask included.
    had_none: bool,
}

impl KvmAcl {
    fn grant() -> KvmAcl {
        let mode = std::fs::metadata("/dev/kvm")
            .expect("/dev/kvm")
            .permissions()
            .mode();
        let had_none = Command::new("getfacl")
            .args(["--skip-base", "--absolute-names", "/dev/kvm"])
            .output()
            .is_ok_and(|o| o.status.success() && o.stdout.trim_ascii().is_empty());
        let acl = KvmAcl { mode, had_none };
        let ok = Command::new("setfacl")
            .args(["-m", &format!("u:{NOBODY}:rw"), "/dev/kvm"])
            .status()
            .expect("setfacl")
            .success();
        assert!(ok, "setfacl -m failed");
        acl
    }
}

impl Drop for KvmAcl {
    fn drop(&mut self) {
        let user = format!("u:{NOBODY}");
        let args: &[&str] = if self.had_none {
            &["-b", "/dev/kvm"]
        } else {
            &["-x", &user, "/dev/kvm"]
        };
        let _ = Command::new("setfacl").args(args).status();
        // Put the mode back as it was (an ACL's mask shows as the group bits).
        let _ = std::fs::set_permissions("/dev/kvm", std::fs::Permissions::from_mode(self.mode));
    }
}

fn run_as_nobody(bin: &std::path::Path, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("--kill-after=5")
        .arg("30")
        .arg(bin)
        .args(args)
        .stdin(Stdio::null())
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .expect("run podvmm as nobody")
}

/// The test needs root (to switch user and set the ACL) and setfacl (scripts/setup.sh
/// installs it); it fails rather than pass without having run.
fn require_prerequisites() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let setfacl = Command::new("setfacl")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        root && setfacl,
        "needs root ({root}) and setfacl ({setfacl}); run it through scripts/test.sh"
    );
}

#[test]
fn boots_as_nobody_given_only_dev_kvm() {
    require_prerequisites();
    let dir = TempDir::new("least-privilege");
    let kernel = dir.write("tiny.elf", &pvh_elf(&pvh_guest_code()));
    // A copy of the binary that `nobody` can reach wherever the checkout lives.
    let bin = dir.path("podvmm");
    std::fs::copy(podvmm_bin(), &bin).unwrap();
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let args = [
        "--kernel",
        path_str(&kernel),
        "--cmdline",
        "unprivileged",
        "--memory",
        "size=128M",
    ];

    // Only root may open /dev/kvm here (it is 0600 root:root on this host), unless an ACL
    // already grants more: then the refusal cannot be shown, only the boot.
    let open_to_others = std::fs::metadata("/dev/kvm").unwrap().permissions().mode() & 0o006 != 0;
    if !open_to_others {
        let refused = run_as_nobody(&bin, &args);
        let err = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(refused.status.code(), Some(1), "stderr: {err}");
        assert!(
            err.contains("/dev/kvm") || err.contains("ermission"),
            "stderr: {err}"
        );
        eprintln!("without access: exit 1, {}", err.trim());
    }

    let _acl = KvmAcl::grant();
    let out = run_as_nobody(&bin, &args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout,
        format!("PVH {}\n", guest_cmdline("unprivileged")),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{:?}", out.status);
    eprintln!("as nobody with an ACL on /dev/kvm: booted, exit 0");
}
