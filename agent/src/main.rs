//! `podvmm-agent`: the guest agent. As PID 1 (`rdinit=/sbin/podvmm-agent`) it mounts proc,
//! sysfs and devtmpfs and supervises itself; started by an init (the guest kit's `/init` does)
//! it just serves.

use std::process::ExitCode;
use std::sync::Arc;

use agent::protocol::{AGENT_PORT, HOST_CID, READY_PORT};
use agent::server::{serve, Agent, SystemPower};
use agent::vsock::{announce, ConsoleStream, Stream, VsockListener, VsockStream};

const USAGE: &str = "usage: podvmm-agent [--port N] [--ready-port N | --no-ready] [--console]
  --port N        vsock port to listen on (default 1024)
  --ready-port N  host port to announce readiness to (default 1023; podvmm records it)
  --no-ready      do not announce readiness
  --console       also answer the protocol on the console (stdin/stdout), for debugging
                  a guest without vsock; as init: rdinit=/sbin/podvmm-agent -- --console
  --connect N     instead of serving: connect to host vsock port N (podvmm: the Unix socket
                  <socket>_N), send stdin, then print what the host sends until it closes";

struct Args {
    port: u32,
    ready_port: Option<u32>,
    console: bool,
    connect: Option<u32>,
}

fn parse(args: &[String], lenient: bool) -> Result<Args, String> {
    let mut a = Args {
        port: AGENT_PORT,
        ready_port: Some(READY_PORT),
        console: false,
        connect: None,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut number = |name: &str| -> Result<u32, String> {
            let v = it.next().ok_or_else(|| format!("{name} needs a value"))?;
            v.parse::<u32>()
                .ok()
                .filter(|&p| p != u32::MAX)
                .ok_or_else(|| format!("{name}: '{v}' is not a port number"))
        };
        match arg.as_str() {
            "--port" => a.port = number("--port")?,
            "--ready-port" => a.ready_port = Some(number("--ready-port")?),
            "--no-ready" => a.ready_port = None,
            "--console" => a.console = true,
            "--connect" => a.connect = Some(number("--connect")?),
            "-h" | "--help" => return Err(String::new()),
            "-V" | "--version" => {
                println!("{}", agent::protocol::agent_version());
                std::process::exit(0);
            }
            // As init, the kernel hands over command-line words it did not know: ignore them.
            other if lenient => eprintln!("podvmm-agent: ignoring argument '{other}'"),
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    Ok(a)
}

/// `--connect N`: a guest program reaching a host service over vsock (a `nc` for vsock).
fn connect(port: u32) -> i32 {
    use std::io::{Read, Write};
    let mut s = match VsockStream::connect(HOST_CID, port) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("podvmm-agent: {e}");
            return 1;
        }
    };
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut input) {
        eprintln!("podvmm-agent: reading stdin: {e}");
        return 1;
    }
    if let Err(e) = s.write_all(&input).and_then(|_| s.shutdown_write()) {
        eprintln!("podvmm-agent: sending to host port {port}: {e}");
        return 1;
    }
    let mut out = Vec::new();
    if let Err(e) = s.read_to_end(&mut out) {
        eprintln!("podvmm-agent: reading from host port {port}: {e}");
        return 1;
    }
    match std::io::stdout().write_all(&out) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

fn run(args: &Args) -> i32 {
    let agent = Arc::new(Agent::new(Arc::new(SystemPower)));
    let listener = match VsockListener::bind(args.port) {
        Ok(l) => Some(l),
        Err(e) => {
            eprintln!("podvmm-agent: {e}");
            None
        }
    };
    let console = args.console.then(|| {
        let a = agent.clone();
        eprintln!("podvmm-agent: answering on the console");
        std::thread::spawn(move || a.handle(ConsoleStream::default()))
    });
    let Some(listener) = listener else {
        // No vsock: only the console, if asked for.
        return match console {
            Some(t) => {
                let _ = t.join();
                0
            }
            None => 1,
        };
    };
    eprintln!("podvmm-agent: listening on vsock port {}", args.port);
    if let Some(port) = args.ready_port {
        if let Err(e) = announce(HOST_CID, port) {
            eprintln!("podvmm-agent: {e} (serving anyway)");
        }
    }
    match serve(listener, agent) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("podvmm-agent: accepting connections: {e}");
            1
        }
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let is_init = std::process::id() == 1;
    let args = match parse(&argv, is_init) {
        Ok(a) => a,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("podvmm-agent: {msg}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(if msg.is_empty() { 0 } else { 2 });
        }
    };
    if let Some(port) = args.connect {
        return ExitCode::from(connect(port) as u8);
    }
    if is_init {
        for e in agent::init::mount_basics() {
            eprintln!("podvmm-agent: {e}");
        }
        // Commands run through exec find busybox's applets.
        std::env::set_var("PATH", "/bin:/sbin:/usr/bin:/usr/sbin");
        agent::init::supervise(|| run(&args));
    }
    ExitCode::from(run(&args).clamp(0, 255) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn arguments() {
        let a = parse(&s(&[]), false).unwrap();
        assert_eq!((a.port, a.ready_port), (1024, Some(1023)));
        let a = parse(&s(&["--port", "5000", "--no-ready", "--console"]), false).unwrap();
        assert_eq!((a.port, a.ready_port, a.console), (5000, None, true));
        assert_eq!(
            parse(&s(&["--connect", "7"]), false).unwrap().connect,
            Some(7)
        );
        for bad in [
            &["--port"][..],
            &["--port", "x"],
            &["--port", "4294967295"],
            &["--bogus"],
        ] {
            assert!(parse(&s(bad), false).is_err(), "{bad:?}");
        }
        // As init, stray words from the kernel command line are ignored.
        assert!(parse(&s(&["quiet", "splash"]), true).is_ok());
    }
}
