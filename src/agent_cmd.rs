//! `podvmm agent`: talk to the guest agent through a VM's hybrid vsock socket.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use agent::{Client, ExecRequest};
use clap::{Args, Subcommand};

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// The VM's vsock socket (the socket= of its --vsock).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// The agent's vsock port in the guest.
    #[arg(long, default_value_t = agent::AGENT_PORT, value_parser = parse_port)]
    port: u32,
    /// Seconds to wait for the connection (podvmm holds a CONNECT until the agent listens)
    /// and for each answer (exec: on top of the command's own limit).
    #[arg(long, value_name = "SECS", default_value_t = 40)]
    timeout: u64,
    #[command(subcommand)]
    op: AgentOp,
}

#[derive(Subcommand, Debug)]
enum AgentOp {
    /// Check that the agent answers; prints the round trip.
    Ping,
    /// Run a command in the guest: its output goes to stdout/stderr, its status is ours.
    Exec {
        /// Kill the command after this many milliseconds [default: 60000].
        #[arg(long, value_name = "MS")]
        timeout_ms: Option<u64>,
        /// The command and its arguments (after `--`).
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        argv: Vec<String>,
    },
    /// Guest facts (kernel, CPUs, memory) as JSON.
    Info,
    /// End the VM: the agent powers off (or, without ACPI, restarts; podvmm exits either way).
    Poweroff,
}

fn parse_port(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(p) if p != u32::MAX => Ok(p),
        _ => Err(format!("'{s}' is not a vsock port (0 to 4294967294)")),
    }
}

pub fn run(args: &AgentArgs) -> ExitCode {
    match run_inner(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("podvmm agent: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_inner(args: &AgentArgs) -> Result<ExitCode, agent::ClientError> {
    let start = Instant::now();
    let mut client = Client::connect(
        &args.socket,
        args.port,
        Duration::from_secs(args.timeout.max(1)),
    )?;
    let connected = start.elapsed();
    match &args.op {
        AgentOp::Ping => {
            let t = Instant::now();
            let pong = client.ping()?;
            println!(
                "pong from {} in {:.2} ms (connected in {:.2} ms, host port {})",
                pong.agent,
                t.elapsed().as_secs_f64() * 1e3,
                connected.as_secs_f64() * 1e3,
                client.host_port()
            );
            Ok(ExitCode::SUCCESS)
        }
        AgentOp::Exec { timeout_ms, argv } => {
            let r = client.exec(ExecRequest {
                argv: argv.clone(),
                timeout_ms: *timeout_ms,
                ..ExecRequest::default()
            })?;
            let _ = std::io::stdout().write_all(r.stdout.as_bytes());
            let _ = std::io::stderr().write_all(r.stderr.as_bytes());
            if r.stdout_truncated || r.stderr_truncated {
                eprintln!("podvmm agent: output truncated to 1 MiB per stream");
            }
            if r.timed_out {
                eprintln!("podvmm agent: the command timed out and was killed");
                return Ok(ExitCode::from(124));
            }
            let code = match (r.exit_code, r.signal) {
                (Some(c), _) => c,
                (None, Some(sig)) => {
                    eprintln!("podvmm agent: the command was killed by signal {sig}");
                    128 + sig
                }
                (None, None) => 1,
            };
            Ok(ExitCode::from(code.clamp(0, 255) as u8))
        }
        AgentOp::Info => {
            let info = client.info()?;
            let text = serde_json::to_string_pretty(&info).unwrap_or_else(|e| e.to_string());
            println!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        AgentOp::Poweroff => {
            let r = client.poweroff()?;
            println!("poweroff: the agent answered {:?}", r.action);
            Ok(ExitCode::SUCCESS)
        }
    }
}
