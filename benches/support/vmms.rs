//! The VMMs the start-up benchmarks compare, and how each one is started: podvmm, QEMU microvm
//! (Debian's, on PATH), and Cloud Hypervisor and Firecracker where `$PODVMM_PEERS_DIR` holds
//! their binaries: every executable there named `cloud-hypervisor*` or `firecracker*` (so
//! `firecracker-static` next to `firecracker` compares both builds). Every one boots the same
//! tiny PVH image (`pvh_guest_code_any_vmm` or `pvh_guest_code_idle` of `tests/common`) with
//! its serial console on stdout, 1 vCPU, and the memory asked for.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The environment variable naming a directory with peer VMM binaries.
pub const PEERS_DIR_ENV: &str = "PODVMM_PEERS_DIR";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Podvmm,
    CloudHypervisor,
    Firecracker,
    /// QEMU microvm with this accelerator.
    Qemu(&'static str),
}

/// One VMM binary and how to drive it.
#[derive(Clone, Debug)]
pub struct Vmm {
    pub kind: Kind,
    /// The binary's file name, for peers (`firecracker-static`).
    label: Option<String>,
    pub program: PathBuf,
    /// `--version`'s first line, for the record.
    pub version: String,
}

/// How to tell that an API socket answers.
pub enum Probe {
    /// `GET <path>` over HTTP/1.1 answered `200`.
    HttpGet(&'static str),
    /// QMP's greeting (`{"QMP": ...`) arrived.
    QmpGreeting,
}

impl Vmm {
    pub fn new(kind: Kind, program: PathBuf) -> Self {
        let version = version_of(&program);
        Vmm {
            kind,
            label: None,
            program,
            version,
        }
    }

    /// A peer binary, named after its file.
    fn peer(kind: Kind, program: PathBuf) -> Self {
        let label = program
            .file_name()
            .map(|n| n.to_string_lossy().replace('-', "_"));
        Vmm {
            label,
            ..Vmm::new(kind, program)
        }
    }

    /// The name in the report lines.
    pub fn name(&self) -> String {
        if let Some(label) = &self.label {
            return label.clone();
        }
        match self.kind {
            Kind::Podvmm => "podvmm".into(),
            Kind::CloudHypervisor => "cloud_hypervisor".into(),
            Kind::Firecracker => "firecracker".into(),
            Kind::Qemu("kvm") => "qemu_microvm".into(),
            Kind::Qemu(accel) => format!("qemu_microvm_{accel}"),
        }
    }

    /// The exit status that means the guest ran to its end.
    pub fn ok_code(&self) -> i32 {
        match self.kind {
            // `isa-debug-exit` with 0: (0 << 1) | 1.
            Kind::Qemu(_) => 1,
            _ => 0,
        }
    }

    /// Boots `kernel` (command line `cmdline`) with `mem_mib` of RAM, the serial console on
    /// stdout. `scratch` takes the files a VMM needs besides (Firecracker's configuration).
    pub fn boot(&self, kernel: &Path, cmdline: &str, mem_mib: u32, scratch: &Path) -> Command {
        let mut c = Command::new(&self.program);
        let kernel_s = kernel.to_str().expect("utf-8 path");
        match self.kind {
            Kind::Podvmm | Kind::CloudHypervisor => {
                c.args(["--kernel", kernel_s, "--cmdline", cmdline])
                    .args(["--memory", &format!("size={mem_mib}M")])
                    .args(["--cpus", "boot=1", "--serial", "tty"]);
                if self.kind == Kind::CloudHypervisor {
                    c.args(["--console", "off"]);
                }
            }
            Kind::Firecracker => {
                let config = scratch.join(format!("fc-{mem_mib}.json"));
                let body = serde_json::json!({
                    "boot-source": {"kernel_image_path": kernel_s, "boot_args": cmdline},
                    "machine-config": {"vcpu_count": 1, "mem_size_mib": mem_mib},
                    "drives": [],
                });
                std::fs::write(&config, body.to_string()).expect("write firecracker config");
                c.arg("--no-api").arg("--config-file").arg(&config);
            }
            Kind::Qemu(accel) => {
                c.args(qemu_machine(accel, mem_mib))
                    .args(["-serial", "stdio", "-kernel", kernel_s, "-append", cmdline]);
            }
        }
        c
    }

    /// Starts the VMM with only its API socket at `socket` (no VM yet where the VMM allows
    /// it), and says how to tell that the socket answers.
    pub fn api_only(&self, socket: &Path) -> (Command, Probe) {
        let mut c = Command::new(&self.program);
        let probe = match self.kind {
            Kind::Podvmm => {
                c.arg("--api-socket").arg(socket);
                Probe::HttpGet("/api/v1/vmm.ping")
            }
            Kind::CloudHypervisor => {
                c.arg("--api-socket")
                    .arg(format!("path={}", socket.display()));
                Probe::HttpGet("/api/v1/vmm.ping")
            }
            Kind::Firecracker => {
                c.arg("--api-sock").arg(socket);
                Probe::HttpGet("/")
            }
            Kind::Qemu(accel) => {
                // QEMU always builds its machine; `-S` keeps the vCPU stopped.
                c.args(qemu_machine(accel, 128))
                    .arg("-S")
                    .arg("-qmp")
                    .arg(format!("unix:{},server=on,wait=off", socket.display()));
                Probe::QmpGreeting
            }
        };
        (c, probe)
    }
}

/// QEMU microvm's machine options; the console and kernel come after.
pub fn qemu_machine(accel: &str, mem_mib: u32) -> Vec<String> {
    [
        "-M",
        "microvm,x-option-roms=off,rtc=off,pit=off,pic=off",
        "-accel",
        accel,
        // `-cpu host` and `max` abort under PVM (MSR 0x10a); the default qemu64 warns that
        // the host lacks SSE3 (pni), so that one is switched off.
        "-cpu",
        "qemu64,pni=off",
        "-m",
        &format!("{mem_mib}M"),
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=4",
    ]
    .map(String::from)
    .to_vec()
}

fn executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `name` on PATH, if any.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| executable(p))
}

/// The peers in `$PODVMM_PEERS_DIR`, or why one named there cannot be used. Panics when the
/// variable names a directory that holds neither binary: a mistyped path must not pass as
/// "no peers".
pub fn peers_from_env() -> Vec<Vmm> {
    let Some(dir) = std::env::var_os(PEERS_DIR_ENV) else {
        return Vec::new();
    };
    let dir = PathBuf::from(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    let found: Vec<Vmm> = files
        .into_iter()
        .filter(|p| executable(p))
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?;
            let kind = if name.starts_with("cloud-hypervisor") {
                Kind::CloudHypervisor
            } else if name.starts_with("firecracker") {
                Kind::Firecracker
            } else {
                return None;
            };
            Some(Vmm::peer(kind, p))
        })
        .collect();
    assert!(
        !found.is_empty(),
        "podvmm-bench: {PEERS_DIR_ENV}={} holds no executable cloud-hypervisor or firecracker",
        dir.display()
    );
    found
}

/// The first line `program --version` prints.
pub fn version_of(program: &Path) -> String {
    Command::new(program)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .find(|l| !l.trim().is_empty())
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "unknown version".to_string())
}

/// What `/dev/kvm` is on this host, for the record.
pub fn host_kvm() -> &'static str {
    let module = |m: &str| Path::new("/sys/module").join(m).exists();
    if !Path::new("/dev/kvm").exists() {
        "absent"
    } else if module("kvm_pvm") {
        "pvm (software nested virtualization)"
    } else if module("kvm_intel") || module("kvm_amd") {
        "hardware"
    } else {
        "present"
    }
}
