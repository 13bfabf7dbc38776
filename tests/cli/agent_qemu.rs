//! The guest agent in a real Linux guest on these machines: the guest kit booted by QEMU's
//! pure software emulator (TCG, the kit's oracle, `docs/guest.md`) with the agent as PID 1
//! (`rdinit=/sbin/podvmm-agent -- --console`), answering its protocol on the serial console.
//!
//! It checks the agent itself, apart from podvmm (`tests/linux/agent.rs` covers the path to it
//! over vsock; QEMU here has no vsock backend, `/dev/vhost-vsock` is absent): the
//! static binary starts as init, mounts proc/sys/dev, runs commands, reads the guest's facts,
//! and powers the VM off. Needs `qemu-system-x86_64` and the kit; says loudly when it cannot run.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

fn kit_file(name: &str) -> PathBuf {
    let dir = std::env::var_os("PODVMM_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/guest"));
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the guest kit first with scripts/build-guest.sh",
        p.display()
    );
    p
}

#[test]
#[ignore = "boots Linux under QEMU TCG (seconds); scripts/test.sh and CI run it with --include-ignored"]
fn agent_as_init_in_a_real_guest() {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!(
            "qemu-system-x86_64 is not installed, so the agent cannot be run in a real guest \
             here: scripts/setup.sh installs it (apt-get install qemu-system-x86)"
        );
    }
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-M",
            "microvm,acpi=off",
            "-m",
            "512",
            "-smp",
            "2",
        ])
        .args(["-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(kit_file("vmlinux"))
        .arg("-initrd")
        .arg(kit_file("initramfs.cpio"))
        .args([
            "-append",
            "console=ttyS0 reboot=t panic=-1 quiet rdinit=/sbin/podvmm-agent -- --console",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu");
    let mut input = qemu.stdin.take().expect("qemu stdin");
    let output = qemu.stdout.take().expect("qemu stdout");
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(output).lines() {
            let Ok(line) = line else { return };
            if tx.send(line.trim_end_matches('\r').to_string()).is_err() {
                return;
            }
        }
    });
    let mut console = Vec::new();
    let mut wait_for = |what: &str, pred: &dyn Fn(&str) -> bool| -> String {
        loop {
            match rx.recv_timeout(Duration::from_secs(120)) {
                Ok(line) => {
                    console.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(_) => panic!("agent-qemu: no {what}; console:\n{}", console.join("\n")),
            }
        }
    };
    wait_for("agent start", &|l| {
        l.contains("podvmm-agent: answering on the console")
    });
    // The console echoes what we type (a tty in canonical mode): answers are the lines with "ok".
    let mut call = |req: &str, id: u64| -> Value {
        input.write_all(req.as_bytes()).unwrap();
        input.write_all(b"\n").unwrap();
        input.flush().unwrap();
        // The agent's own log lines share the console and may be cut in two by an answer:
        // take the answer from where its object starts, wherever that is on the line.
        let start_tag = format!("{{\"id\":{id},\"ok\"");
        let line = wait_for("answer", &|l| l.contains(&start_tag));
        let start = line.find(&start_tag).unwrap_or(0);
        serde_json::Deserializer::from_str(&line[start..])
            .into_iter::<Value>()
            .next()
            .and_then(Result::ok)
            .unwrap_or_else(|| panic!("no JSON answer in: {line}"))
    };
    let pong = call(r#"{"id":1,"op":"ping"}"#, 1);
    assert_eq!(pong["result"]["pong"], true, "{pong}");
    let info = call(r#"{"id":2,"op":"info"}"#, 2);
    let r = &info["result"];
    assert!(
        r["kernel_release"]
            .as_str()
            .unwrap_or("")
            .starts_with("6.12"),
        "{info}"
    );
    assert_eq!(r["cpus_online"], 2, "{info}");
    assert!(
        r["mem_total_kib"].as_u64().unwrap_or(0) > 400 << 10,
        "{info}"
    );
    // PID 1 forked the agent proper; /proc/1 is the supervisor.
    let script = "tr '\\0' ' ' </proc/1/cmdline; grep -c -E ' /(proc|sys|dev) ' /proc/mounts; echo err >&2; exit 7";
    let req = serde_json::json!({"id": 3, "op": "exec", "argv": ["sh", "-c", script]});
    let init = call(&req.to_string(), 3);
    let r = &init["result"];
    assert_eq!(r["exit_code"], 7, "{init}");
    assert_eq!(r["stderr"], "err\n", "{init}");
    let out = r["stdout"].as_str().unwrap_or("");
    assert!(out.starts_with("/sbin/podvmm-agent"), "{init}");
    assert!(
        out.trim_end().ends_with('3'),
        "proc, sysfs, devtmpfs mounted: {init}"
    );
    let bad = call(r#"{"id":4,"op":"exec","argv":["/no/such"]}"#, 4);
    assert_eq!(bad["ok"], false, "{bad}");
    let off = call(r#"{"id":5,"op":"poweroff"}"#, 5);
    assert_eq!(off["result"]["action"], "restart", "{off}");
    // The agent restarts the guest (no ACPI): with -no-reboot, QEMU exits.
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = qemu.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "qemu did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    eprintln!("agent-qemu: the agent ran as init in the kit's kernel (QEMU TCG): ping, info, exec, poweroff OK");
}
