//! `podvmm`: boots a guest kernel directly on KVM (or MSHV), Cloud Hypervisor style options.

mod agent_cmd;
mod logger;
mod remote;
mod serve;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use api::pod::Explicit;
use api::{
    ConsoleConfig, ContainerLimits, CpusConfig, DiskConfig, FsConfig, MemoryConfig, NetConfig,
    PayloadConfig, RngConfig, VmConfig, VsockConfig,
};
use clap::{Parser, Subcommand};
use hypervisor::{HypervisorKind, Selection};
use vmm::ExitReason;

#[derive(Parser, Debug)]
#[command(
    name = "podvmm",
    version,
    about = "A lean VMM for Kubernetes pod sandboxes",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Guest kernel: a PVH ELF vmlinux or a bzImage (required unless --api-socket is given).
    #[arg(long, value_name = "PATH", required_unless_present = "api_socket")]
    kernel: Option<PathBuf>,
    /// Initramfs (cpio, optionally compressed) handed to the kernel.
    #[arg(long, value_name = "PATH", requires = "kernel")]
    initramfs: Option<PathBuf>,
    /// Kernel command line [default: "console=ttyS0 reboot=k"].
    #[arg(long, value_name = "STRING", requires = "kernel")]
    cmdline: Option<String>,
    /// vCPUs: boot=N[,max=N] [default: boot=1, or sized from --pod-limits].
    #[arg(long, value_name = "boot=N", requires = "kernel", value_parser = |s: &str| CpusConfig::parse(s).map_err(|e| e.to_string()))]
    cpus: Option<CpusConfig>,
    /// Guest memory: size=SIZE with a K/M/G suffix [default: size=2G, or sized from --pod-limits].
    #[arg(long, value_name = "size=SIZE", requires = "kernel", value_parser = |s: &str| MemoryConfig::parse(s).map_err(|e| e.to_string()))]
    memory: Option<MemoryConfig>,
    /// Serial console (COM1): tty, off, null or file=PATH.
    #[arg(long, value_name = "MODE", default_value = "tty", value_parser = |s: &str| ConsoleConfig::parse(s).map_err(|e| e.to_string()))]
    serial: ConsoleConfig,
    /// virtio console: only off (podvmm has no virtio-console device).
    #[arg(long, value_name = "MODE", default_value = "off", value_parser = |s: &str| ConsoleConfig::parse(s).map_err(|e| e.to_string()))]
    console: ConsoleConfig,
    /// A virtio-blk disk: path=FILE[,readonly=on][,direct=on][,num_queues=N][,queue_size=N][,id=NAME] (repeatable).
    #[arg(long, value_name = "path=FILE,...", requires = "kernel", value_parser = |s: &str| DiskConfig::parse(s).map_err(|e| e.to_string()))]
    disk: Vec<DiskConfig>,
    /// A virtio-net interface over a TAP: tap=NAME[,mac=MAC][,ip=IP,mask=MASK][,num_queues=N]
    /// [,queue_size=N][,id=NAME][,deny=CIDR]... (repeatable; deny may repeat too).
    #[arg(long, value_name = "tap=NAME,...", requires = "kernel", value_parser = |s: &str| NetConfig::parse(s).map_err(|e| e.to_string()))]
    net: Vec<NetConfig>,
    /// One container's resource limits as Kubernetes quantities, cpu=1500m,memory=1Gi
    /// (repeatable): the VM gets ceil(1 + Σcpu) vCPUs and 2048 MiB + Σmemory, unless
    /// --cpus/--memory say otherwise.
    #[arg(long = "pod-limits", value_name = "cpu=Q,memory=Q", requires = "kernel", value_parser = |s: &str| ContainerLimits::parse(s).map_err(|e| e.to_string()))]
    pod_limits: Vec<ContainerLimits>,
    /// A virtio-vsock device, hybrid vsock over a Unix socket: cid=N,socket=PATH[,id=NAME].
    /// The host reaches guest port P by connecting to PATH and writing "CONNECT P\n";
    /// guest connections to host port N go to PATH_N (docs/vsock.md).
    #[arg(long, value_name = "cid=N,socket=PATH", requires = "kernel", value_parser = |s: &str| VsockConfig::parse(s).map_err(|e| e.to_string()))]
    vsock: Option<VsockConfig>,
    /// A virtio-fs share served by a running vhost-user back-end (virtiofsd):
    /// tag=NAME,socket=PATH[,num_queues=N][,queue_size=N][,id=NAME] (repeatable). Needs
    /// --memory ...,shared=on. The guest mounts it with `mount -t virtiofs NAME DIR`.
    #[arg(long, value_name = "tag=NAME,socket=PATH", requires = "kernel", value_parser = |s: &str| FsConfig::parse(s).map_err(|e| e.to_string()))]
    fs: Vec<FsConfig>,
    /// A virtio-rng device (the guest's /dev/hwrng) filled from src=PATH, e.g. /dev/urandom.
    #[arg(long, value_name = "src=PATH", requires = "kernel", value_parser = |s: &str| RngConfig::parse(s).map_err(|e| e.to_string()))]
    rng: Option<RngConfig>,
    /// Write timestamped VMM and guest events (booted, agent ready...) as JSON lines: path=FILE.
    #[arg(long = "event-monitor", value_name = "path=FILE", value_parser = |s: &str| vmm::event_monitor::parse_option(s).map_err(|e| e.to_string()))]
    event_monitor: Option<PathBuf>,
    /// Serve Cloud Hypervisor's REST API on this Unix socket (mode 0600). Alone, the VMM
    /// waits for vm.create; with --kernel, the VM is created and booted at start-up.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Hypervisor backend: auto (/dev/mshv if present, else /dev/kvm), kvm or mshv.
    #[arg(long, value_name = "auto|kvm|mshv", default_value = "auto")]
    hypervisor: Selection,
    /// System call filters on every thread: true (a forbidden call stops the VMM), log
    /// (the kernel logs it and lets it run) or false (docs/security.md).
    #[arg(long, value_name = "true|false|log", default_value = "true")]
    seccomp: seccomp::Mode,
    /// More log output: warnings by default, -v info, -vv debug, -vvv trace.
    #[arg(short = 'v', long = "verbose", action = clap::ArgAction::Count)]
    verbose: u8,
    /// Append log records to this file instead of stderr.
    #[arg(long = "log-file", value_name = "PATH")]
    log_file: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Talk to a running podvmm's API socket (like Cloud Hypervisor's ch-remote).
    Remote(remote::RemoteArgs),
    /// Talk to the guest agent through a VM's vsock socket: ping, exec, info, poweroff.
    Agent(agent_cmd::AgentArgs),
}

impl Cli {
    fn vm_config(&self) -> VmConfig {
        VmConfig {
            payload: PayloadConfig {
                kernel: self.kernel.clone(),
                initramfs: self.initramfs.clone(),
                cmdline: self.cmdline.clone(),
            },
            cpus: self.cpus.clone().unwrap_or_default(),
            memory: self.memory.clone().unwrap_or_default(),
            serial: self.serial.clone(),
            console: self.console.clone(),
            disks: (!self.disk.is_empty()).then(|| self.disk.clone()),
            net: (!self.net.is_empty()).then(|| self.net.clone()),
            vsock: self.vsock.clone(),
            fs: (!self.fs.is_empty()).then(|| self.fs.clone()),
            rng: self.rng.clone(),
            pod: (!self.pod_limits.is_empty()).then(|| api::PodConfig {
                containers: self.pod_limits.clone(),
            }),
        }
    }

    /// The files this process writes besides the VM's own: no VM may use them.
    fn process_outputs(&self) -> Vec<vmm::outputs::Named> {
        let mut v = Vec::new();
        if let Some(p) = &self.event_monitor {
            v.push(("event monitor".to_string(), p.clone()));
        }
        if let Some(p) = &self.log_file {
            v.push(("log file".to_string(), p.clone()));
        }
        if let Some(p) = &self.api_socket {
            v.push(("API socket".to_string(), p.clone()));
        }
        v
    }

    /// Which sizes were given on the command line (they win over --pod-limits).
    fn explicit(&self) -> Explicit {
        Explicit {
            cpus: self.cpus.is_some(),
            memory: self.memory.is_some(),
        }
    }
}

/// The end of a run cut short by SIGTERM or SIGINT: the guest has been stopped and the
/// sockets removed by now; the status says which signal (128 + its number, as a shell does).
pub(crate) fn terminated(sig: i32) -> ExitCode {
    let name = vmm::signals::name(sig);
    eprintln!("podvmm: stopped by {name}: the guest was stopped and podvmm's sockets removed");
    vmm::event_monitor::emit("vmm", "shutdown", serde_json::json!({ "reason": name }));
    ExitCode::from((128 + sig).clamp(0, 255) as u8)
}

fn main() -> ExitCode {
    vmm::event_monitor::mark_start();
    let cli = Cli::parse();
    if let Some(Command::Remote(args)) = &cli.command {
        return remote::run(args);
    }
    if let Some(Command::Agent(args)) = &cli.command {
        return agent_cmd::run(args);
    }
    // Nothing is opened for writing before it is known that no output is one of the VM's
    // inputs (a --serial file= naming the disk image would truncate it) or another output.
    let process_outputs = cli.process_outputs();
    if let Err(e) = vmm::outputs::check(&cli.vm_config(), &process_outputs) {
        eprintln!("podvmm: error: {e}");
        return ExitCode::FAILURE;
    }
    // Before any thread starts: every thread then has the handlers (a signal may land on any).
    if let Err(e) = vmm::signals::install() {
        eprintln!("podvmm: error: installing the SIGTERM/SIGINT handlers: {e}");
        return ExitCode::FAILURE;
    }
    if let Err(e) = logger::init(cli.verbose, cli.log_file.as_deref()) {
        eprintln!(
            "podvmm: error: --log-file {}: {e}",
            cli.log_file.as_deref().unwrap_or(Path::new("")).display()
        );
        return ExitCode::FAILURE;
    }
    if let Some(path) = &cli.event_monitor {
        if let Err(e) = vmm::event_monitor::start(path) {
            eprintln!("podvmm: error: {e}");
            return ExitCode::FAILURE;
        }
    }
    let backend = match hypervisor::resolve(cli.hypervisor, |p| Path::new(p).exists()) {
        Ok(HypervisorKind::Mshv) => seccomp::Backend::Mshv,
        // An unusable selection is reported when the VM is built.
        _ => seccomp::Backend::Kvm,
    };
    if let Err(e) = seccomp::init(cli.seccomp, backend) {
        eprintln!("podvmm: error: {e}");
        return ExitCode::FAILURE;
    }
    if let Some(socket) = &cli.api_socket {
        let initial = cli
            .kernel
            .is_some()
            .then(|| (cli.vm_config(), cli.explicit()));
        return serve::run(socket, initial, cli.hypervisor, process_outputs);
    }
    if let Err(e) = seccomp::apply(seccomp::ThreadKind::Vmm) {
        eprintln!("podvmm: error: {e}");
        return ExitCode::FAILURE;
    }
    let mut config = cli.vm_config();
    if let Err(e) = api::pod::apply(&mut config, cli.explicit()) {
        eprintln!("podvmm: error: {e}");
        return ExitCode::FAILURE;
    }
    match vmm::run(&config, cli.hypervisor) {
        Ok(ExitReason::Reset) | Ok(ExitReason::Shutdown) => ExitCode::SUCCESS,
        Ok(ExitReason::TripleFault) => {
            eprintln!("podvmm: guest stopped: triple fault (the guest crashed, or rebooted with reboot=t)");
            ExitCode::from(3)
        }
        Ok(ExitReason::GuestError(msg)) => {
            eprintln!("podvmm: guest stopped: {msg}");
            ExitCode::from(3)
        }
        Ok(ExitReason::Terminated(sig)) => terminated(sig),
        Err(e) => {
            eprintln!("podvmm: error: {e}");
            ExitCode::FAILURE
        }
    }
}
