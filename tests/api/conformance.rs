//! podvmm against Cloud Hypervisor v53's own OpenAPI file, driven by schemathesis (PyPI):
//! every operation podvmm serves, with generated requests, must never answer 5xx, and every
//! answer must match that file's schema (status, content type, body); every operation it does
//! not serve must answer 501. schemathesis speaks TCP, so a loopback bridge
//! (`tests/conformance/bridge.py`) carries its connections to the API's Unix socket.
//!
//! The same runs against podvmm's own `api/openapi.yaml`, so that file stays true.
//!
//! The peer's file is not part of this repository: it is read from `PODVMM_PEER_SPEC`, or from
//! `../shared/reference/peer-specs/cloud-hypervisor-v53.0.yaml` next to the checkout (where CI
//! has it). The Python environment is made by `scripts/conformance-venv.sh` (once). Bounded:
//! about two minutes (`PODVMM_CONFORMANCE_SECONDS` sets the fuzzing budget of each run).

use crate::api_support;
use crate::common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use api_support::*;
use common::*;

/// The operations podvmm serves (everything else in the file must be 501).
const SERVED: &[&str] = &[
    "/vmm.ping",
    "/vmm.shutdown",
    "/vm.info",
    "/vm.counters",
    "/vm.create",
    "/vm.delete",
    "/vm.boot",
    "/vm.pause",
    "/vm.resume",
    "/vm.shutdown",
    "/vm.resize",
    "/vm.add-disk",
    "/vm.add-net",
    "/vm.add-vsock",
    "/vm.add-fs",
];

fn peer_spec() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let candidates = [
        std::env::var_os("PODVMM_PEER_SPEC").map(PathBuf::from),
        Some(root.join("../shared/reference/peer-specs/cloud-hypervisor-v53.0.yaml")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "Cloud Hypervisor's OpenAPI file was not found: set PODVMM_PEER_SPEC or put \
                 shared/reference/peer-specs/cloud-hypervisor-v53.0.yaml next to the checkout"
            )
        })
}

fn python() -> PathBuf {
    let out = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/conformance-venv.sh"
    ))
    .stderr(Stdio::inherit())
    .output()
    .expect("run scripts/conformance-venv.sh");
    assert!(out.status.success(), "scripts/conformance-venv.sh failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

struct Bridge(Child);

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the bridge on a free loopback port; returns it and the API's base URL.
fn bridge(python: &Path, socket: &Path) -> (Bridge, String) {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child = Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/conformance/bridge.py"
        ))
        .arg(socket)
        .arg(port.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the bridge");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready", "the bridge did not start");
    (Bridge(child), format!("http://127.0.0.1:{port}/api/v1"))
}

fn schemathesis(python: &Path, spec: &Path, url: &str, paths: &[&str], seconds: u64) {
    let regex = format!(
        "^({})$",
        paths
            .iter()
            .map(|p| p.replace('.', "\\."))
            .collect::<Vec<_>>()
            .join("|")
    );
    let exe = python.with_file_name("schemathesis");
    let out = Command::new("timeout")
        .arg((seconds + 120).to_string())
        .arg(&exe)
        .arg("run")
        .arg(spec)
        .args(["--url", url])
        .args([
            "--checks",
            "not_a_server_error,response_schema_conformance,content_type_conformance",
        ])
        .args(["--include-path-regex", &regex])
        .args(["--max-time", &seconds.to_string(), "-w", "1"])
        .args(["--suppress-health-check", "all"])
        .env("NO_COLOR", "1")
        .output()
        .expect("run schemathesis");
    let text = String::from_utf8_lossy(&out.stdout);
    let summary: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("generated") || l.contains("passed") || l.contains("failed"))
        .collect();
    eprintln!("conformance: {paths:?}: {}", summary.join(" | "));
    assert!(
        out.status.success(),
        "schemathesis found answers that break Cloud Hypervisor's schema:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "installs schemathesis from PyPI and runs for minutes; scripts/test.sh and CI run it with --include-ignored"]
fn podvmm_answers_as_cloud_hypervisors_openapi_file_says() {
    let spec = peer_spec();
    let python = python();
    let seconds: u64 = std::env::var("PODVMM_CONFORMANCE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let dir = TempDir::new("conformance");
    let kernel = dir.write("tiny.elf", &pvh_elf(&hold_guest_code()));
    let serial = dir.path("serial.log");
    // A running VM, so vm.info and vm.counters answer with whole bodies to check.
    let mut server = Server::start(
        &dir,
        &[
            "--kernel",
            path_str(&kernel),
            "--memory",
            "size=64M",
            "--serial",
            &format!("file={}", path_str(&serial)),
        ],
    );
    assert_eq!(server.state(), "Running");
    let (_bridge, url) = bridge(&python, &server.socket);
    schemathesis(
        &python,
        &spec,
        &url,
        &["/vmm.ping", "/vm.info", "/vm.counters"],
        seconds / 4,
    );
    // Everything else podvmm serves, but vmm.shutdown (it would end the run), with generated
    // bodies: the VM may be paused, shut down, deleted and created again along the way.
    let rest: Vec<&str> = SERVED
        .iter()
        .copied()
        .filter(|p| *p != "/vmm.shutdown")
        .collect();
    schemathesis(&python, &spec, &url, &rest, seconds);
    let out = Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/conformance/unserved.py"
        ))
        .arg(&spec)
        .arg(&url)
        .args(SERVED)
        .output()
        .expect("run unserved.py");
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("conformance: {}", text.trim());
    assert!(out.status.success(), "{text}");
    // And podvmm's own description of its API (api/openapi.yaml) stays true.
    let own = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/api/openapi.yaml"));
    schemathesis(&python, &own, &url, &rest, seconds / 4);
    // Through all that, the VMM is still there and ends cleanly.
    server.ok("GET", "vmm.ping", None);
    server.ok("PUT", "vmm.shutdown", None);
    assert!(server.wait_exit(Duration::from_secs(10)).success());
    assert!(
        !server.stderr_text().contains("panicked"),
        "{}",
        server.stderr_text()
    );
}
