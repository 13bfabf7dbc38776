//! `podvmm remote`: a client for the API socket, for people and scripts (like ch-remote).
//!
//! Prints the server's JSON answer (nothing for an empty one) and exits 0; on an error prints
//! the server's message on stderr and exits 1.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use api::client::{Client, Response};
use api::{DiskConfig, FsConfig, NetConfig, VsockConfig};
use clap::{Args, Subcommand};

#[derive(Args, Debug)]
pub struct RemoteArgs {
    /// The VMM's API socket.
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    /// Give up on an answer after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    timeout: u64,
    #[command(subcommand)]
    command: RemoteCommand,
}

#[derive(Subcommand, Debug)]
enum RemoteCommand {
    /// Is the VMM there? (vmm.ping)
    Ping,
    /// Create the VM from a JSON VmConfig file, or - for standard input (vm.create).
    Create { file: PathBuf },
    /// Boot the created VM (vm.boot).
    Boot,
    /// The VM's configuration, state, sizing and boot digests (vm.info).
    Info,
    /// Pause the VM's vCPUs (vm.pause).
    Pause,
    /// Resume a paused VM (vm.resume).
    Resume,
    /// Shut the VM down; it can be booted again (vm.shutdown).
    Shutdown,
    /// Delete the VM (vm.delete).
    Delete,
    /// Stop the VMM process (vmm.shutdown).
    ShutdownVmm,
    /// Device counters (vm.counters).
    Counters,
    /// Add a disk before boot: path=FILE[,readonly=on][,direct=on][,num_queues=N][,queue_size=N][,id=NAME].
    AddDisk { spec: String },
    /// Add a network device before boot: tap=NAME[,mac=MAC][,ip=IP,mask=MASK][,num_queues=N][,queue_size=N][,id=NAME].
    AddNet { spec: String },
    /// Add the vsock device before boot: cid=N,socket=PATH[,id=NAME].
    AddVsock { spec: String },
    /// Add a virtio-fs share before boot: tag=NAME,socket=PATH[,num_queues=N][,queue_size=N][,id=NAME].
    AddFs { spec: String },
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("podvmm remote: {msg}");
    ExitCode::FAILURE
}

/// The request a command makes: method, endpoint, body.
fn request(cmd: &RemoteCommand) -> Result<(&'static str, &'static str, Option<Vec<u8>>), String> {
    let json = |v: Result<Vec<u8>, serde_json::Error>| v.map_err(|e| e.to_string());
    Ok(match cmd {
        RemoteCommand::Ping => ("GET", "vmm.ping", None),
        RemoteCommand::Create { file } => {
            let mut body = Vec::new();
            let read = if file.as_os_str() == "-" {
                std::io::stdin().read_to_end(&mut body).map(|_| ())
            } else {
                std::fs::read(file).map(|b| body = b)
            };
            read.map_err(|e| format!("{}: {e}", file.display()))?;
            ("PUT", "vm.create", Some(body))
        }
        RemoteCommand::Boot => ("PUT", "vm.boot", None),
        RemoteCommand::Info => ("GET", "vm.info", None),
        RemoteCommand::Pause => ("PUT", "vm.pause", None),
        RemoteCommand::Resume => ("PUT", "vm.resume", None),
        RemoteCommand::Shutdown => ("PUT", "vm.shutdown", None),
        RemoteCommand::Delete => ("PUT", "vm.delete", None),
        RemoteCommand::ShutdownVmm => ("PUT", "vmm.shutdown", None),
        RemoteCommand::Counters => ("GET", "vm.counters", None),
        RemoteCommand::AddDisk { spec } => {
            let d = DiskConfig::parse(spec).map_err(|e| e.to_string())?;
            ("PUT", "vm.add-disk", Some(json(serde_json::to_vec(&d))?))
        }
        RemoteCommand::AddNet { spec } => {
            let n = NetConfig::parse(spec).map_err(|e| e.to_string())?;
            ("PUT", "vm.add-net", Some(json(serde_json::to_vec(&n))?))
        }
        RemoteCommand::AddVsock { spec } => {
            let v = VsockConfig::parse(spec).map_err(|e| e.to_string())?;
            ("PUT", "vm.add-vsock", Some(json(serde_json::to_vec(&v))?))
        }
        RemoteCommand::AddFs { spec } => {
            let f = FsConfig::parse(spec).map_err(|e| e.to_string())?;
            ("PUT", "vm.add-fs", Some(json(serde_json::to_vec(&f))?))
        }
    })
}

pub fn run(args: &RemoteArgs) -> ExitCode {
    let (method, endpoint, body) = match request(&args.command) {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    let mut client = match Client::connect(&args.api_socket) {
        Ok(c) => c,
        Err(e) => return fail(&e.to_string()),
    };
    if let Err(e) = client.set_timeout(Some(Duration::from_secs(args.timeout.max(1)))) {
        return fail(&e.to_string());
    }
    match client.request(method, endpoint, body.as_deref()) {
        Ok(r) if r.is_success() => {
            print_body(&r);
            ExitCode::SUCCESS
        }
        Ok(r) => fail(&format!("{endpoint}: {} ({})", r.error_message(), r.status)),
        Err(e) => fail(&format!("{endpoint}: {e}")),
    }
}

fn print_body(r: &Response) {
    if r.body.is_empty() {
        return;
    }
    match serde_json::from_slice::<serde_json::Value>(&r.body) {
        Ok(v) => println!(
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_else(|_| r.body_text())
        ),
        Err(_) => println!("{}", r.body_text()),
    }
}
