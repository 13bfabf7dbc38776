//! `podvmm`: boots a guest kernel directly on KVM (or MSHV), Cloud Hypervisor style options.

use std::path::PathBuf;
use std::process::ExitCode;

use api::{ConsoleConfig, CpusConfig, DiskConfig, MemoryConfig, PayloadConfig, VmConfig};
use clap::Parser;
use hypervisor::Selection;
use vmm::ExitReason;

#[derive(Parser, Debug)]
#[command(
    name = "podvmm",
    version,
    about = "A lean VMM for Kubernetes pod sandboxes"
)]
struct Cli {
    /// Guest kernel: a PVH ELF vmlinux or a bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Initramfs (cpio, optionally compressed) handed to the kernel.
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,
    /// Kernel command line [default: "console=ttyS0 reboot=k"].
    #[arg(long, value_name = "STRING")]
    cmdline: Option<String>,
    /// vCPUs: boot=N[,max=N] [default: boot=1].
    #[arg(long, value_name = "boot=N", value_parser = |s: &str| CpusConfig::parse(s).map_err(|e| e.to_string()))]
    cpus: Option<CpusConfig>,
    /// Guest memory: size=SIZE with a K/M/G suffix [default: size=2G].
    #[arg(long, value_name = "size=SIZE", value_parser = |s: &str| MemoryConfig::parse(s).map_err(|e| e.to_string()))]
    memory: Option<MemoryConfig>,
    /// Serial console (COM1): tty, off, null or file=PATH.
    #[arg(long, value_name = "MODE", default_value = "tty", value_parser = |s: &str| ConsoleConfig::parse(s).map_err(|e| e.to_string()))]
    serial: ConsoleConfig,
    /// virtio console: only off (podvmm has no virtio-console device).
    #[arg(long, value_name = "MODE", default_value = "off", value_parser = |s: &str| ConsoleConfig::parse(s).map_err(|e| e.to_string()))]
    console: ConsoleConfig,
    /// A virtio-blk disk: path=FILE[,readonly=on][,direct=on][,num_queues=N][,queue_size=N][,id=NAME] (repeatable).
    #[arg(long, value_name = "path=FILE,...", value_parser = |s: &str| DiskConfig::parse(s).map_err(|e| e.to_string()))]
    disk: Vec<DiskConfig>,
    /// Hypervisor backend: auto (/dev/mshv if present, else /dev/kvm), kvm or mshv.
    #[arg(long, value_name = "auto|kvm|mshv", default_value = "auto")]
    hypervisor: Selection,
}

impl Cli {
    fn vm_config(&self) -> VmConfig {
        VmConfig {
            payload: PayloadConfig {
                kernel: Some(self.kernel.clone()),
                initramfs: self.initramfs.clone(),
                cmdline: self.cmdline.clone(),
            },
            cpus: self.cpus.clone().unwrap_or_default(),
            memory: self.memory.clone().unwrap_or_default(),
            serial: self.serial.clone(),
            console: self.console.clone(),
            disks: (!self.disk.is_empty()).then(|| self.disk.clone()),
            net: None,
            vsock: None,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match vmm::run(&cli.vm_config(), cli.hypervisor) {
        Ok(ExitReason::Reset) | Ok(ExitReason::Shutdown) => ExitCode::SUCCESS,
        Ok(ExitReason::TripleFault) => {
            eprintln!("podvmm: guest stopped: triple fault (the guest crashed, or rebooted with reboot=t)");
            ExitCode::from(3)
        }
        Ok(ExitReason::GuestError(msg)) => {
            eprintln!("podvmm: guest stopped: {msg}");
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("podvmm: error: {e}");
            ExitCode::FAILURE
        }
    }
}
