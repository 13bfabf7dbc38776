//! virtio-fs end to end, on the guest kit's Linux with a real virtiofsd, through the REST API:
//!
//! - Kata's default `vm.create` (the Go runtime's body, with `fs` and `memory.shared`, for an
//!   initrd pod) boots; the agent mounts the share, reads a file the host wrote and writes one
//!   the host reads back, byte for byte; every podvmm thread, the device's included, runs under
//!   its seccomp filter; virtiofsd killed mid-run gives the guest I/O errors, podvmm stays up
//!   and says so (log line, `vm.counters`, `vm.info`);
//! - Kata's Rust runtime's default body, its `kataShared` share as the root: the kernel mounts
//!   it (`rootfstype=virtiofs root=kataShared`) and runs `/init` from the host directory (the
//!   kit's initramfs, unpacked); a second share added with `vm.add-fs` is mounted as a volume.
//!
//! Slow under software KVM (a boot is tens of seconds): two boots, one at a time.

use crate::api_support;
use crate::common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent::{Client, ExecRequest, ExecResult};
use api_support::Server;
use common::linux::{deadline, kit_file, one_boot_at_a_time, CMDLINE};
use common::virtiofsd::Virtiofsd;
use common::*;
use serde_json::{json, Value};

/// A VM served by podvmm's API, its console and its vsock socket.
struct Pod {
    server: Server,
    console: PathBuf,
    vsock: PathBuf,
}

impl Pod {
    fn context(&self) -> String {
        let console = std::fs::read_to_string(&self.console).unwrap_or_default();
        let tail: Vec<&str> = console.lines().rev().take(25).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "podvmm stderr:\n{}\nconsole tail:\n{}",
            self.server.stderr_text(),
            tail.join("\n")
        )
    }

    fn agent(&self) -> Client {
        let t = Instant::now();
        let c = Client::connect(&self.vsock, agent::AGENT_PORT, deadline())
            .unwrap_or_else(|e| panic!("connecting to the agent: {e}\n{}", self.context()));
        eprintln!(
            "agent answered {:.1} s after the connect",
            t.elapsed().as_secs_f64()
        );
        c
    }

    fn sh(&self, c: &mut Client, script: &str) -> ExecResult {
        c.exec(ExecRequest {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            ..ExecRequest::default()
        })
        .unwrap_or_else(|e| panic!("exec {script:?}: {e}\n{}", self.context()))
    }

    fn sh_ok(&self, c: &mut Client, script: &str) -> String {
        let r = self.sh(c, script);
        assert_eq!(
            r.exit_code,
            Some(0),
            "{script:?}: stdout {:?} stderr {:?}\n{}",
            r.stdout,
            r.stderr,
            self.context()
        );
        r.stdout
    }

    fn counters(&self) -> Value {
        serde_json::from_slice(&self.server.ok("GET", "vm.counters", None).body).unwrap()
    }
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Thread name → Seccomp field of every live thread of `pid`.
fn thread_filters(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        if !field("State:").starts_with('Z') {
            out.push((field("Name:"), field("Seccomp:")));
        }
    }
    out
}

#[test]
#[ignore = "boots Linux: minutes under PVM; scripts/test.sh and CI run it with --include-ignored"]
fn kata_default_pod_shares_files_through_virtiofs_and_survives_its_death() {
    let _one = one_boot_at_a_time();
    let dir = TempDir::new("linux-fs-kata");
    let share = dir.path("share");
    std::fs::create_dir(&share).unwrap();
    let from_host = pattern(256 << 10, 1);
    std::fs::write(share.join("from-host.bin"), &from_host).unwrap();
    std::fs::write(
        share.join("never-read.txt"),
        b"the guest never opened this\n",
    )
    .unwrap();
    let mut virtiofsd = Virtiofsd::start(
        &share,
        &dir.path("virtiofsd.sock"),
        &dir.path("virtiofsd.log"),
    );

    // Kata's Go runtime's default body, as it sends it for an initrd pod: `payload.initramfs`
    // set and no `disks` (tests/data/kata/README.md); our kernel, console and command line.
    let console = dir.path("console.log");
    let vsock = dir.path("kata.vsock");
    let mut config = kata_body(
        "go-create-default.json",
        &virtiofsd.socket,
        &vsock,
        &console,
        CMDLINE,
    );
    config["payload"]["initramfs"] = json!(path_str(&kit_file("initramfs.cpio")));

    let server = Server::start(&dir, &[]);
    let pod = Pod {
        server,
        console,
        vsock,
    };
    pod.server.ok("PUT", "vm.create", Some(&config.to_string()));
    pod.server.ok("PUT", "vm.boot", None);
    let mut c = pod.agent();

    // The share: mounted by tag, a host file read, a guest file written.
    pod.sh_ok(
        &mut c,
        "mkdir -p /mnt/s && mount -t virtiofs kataShared /mnt/s && grep ' /mnt/s virtiofs ' /proc/mounts",
    );
    let sum = pod.sh_ok(&mut c, "sha256sum /mnt/s/from-host.bin");
    assert_eq!(
        sum.split_whitespace().next(),
        Some(sha256_hex(&from_host).as_str())
    );
    let guest_sum = pod.sh_ok(
        &mut c,
        "dd if=/dev/urandom of=/mnt/s/from-guest.bin bs=4096 count=48 2>/dev/null && sync \
         && sha256sum /mnt/s/from-guest.bin",
    );
    let written = std::fs::read(share.join("from-guest.bin")).unwrap();
    assert_eq!(written.len(), 48 * 4096);
    assert_eq!(
        guest_sum.split_whitespace().next(),
        Some(sha256_hex(&written).as_str()),
        "the host reads what the guest wrote"
    );

    // Every thread filtered, the virtio-fs device's own among them.
    let threads = thread_filters(pod.server.child.id());
    assert!(
        threads.iter().any(|(name, _)| name == "fs-fs0"),
        "no fs-fs0 thread: {threads:?}"
    );
    for (name, seccomp) in &threads {
        assert_eq!(seccomp, "2", "thread {name} is not filtered: {threads:?}");
    }
    let counters = pod.counters();
    assert_eq!(counters["fs0"]["backend_connected"], 1, "{counters}");
    assert_eq!(counters["fs0"]["backend_lost"], 0, "{counters}");

    // virtiofsd dies: the guest gets errors, not a hang; podvmm stays up and says so.
    virtiofsd.kill();
    let r = pod.sh(&mut c, "cat /mnt/s/never-read.txt; echo rc=$?");
    assert!(
        r.stdout.contains("rc=1") && r.stderr.contains("Input/output error"),
        "reading a share whose back-end died: stdout {:?} stderr {:?}\n{}",
        r.stdout,
        r.stderr,
        pod.context()
    );
    let r = pod.sh(&mut c, "echo x > /mnt/s/new.txt; echo rc=$?");
    assert!(!r.stdout.contains("rc=0"), "a write succeeded: {r:?}");
    assert_eq!(pod.sh_ok(&mut c, "echo still here"), "still here\n");
    let counters = pod.counters();
    assert_eq!(counters["fs0"]["backend_connected"], 0, "{counters}");
    assert_eq!(counters["fs0"]["backend_lost"], 1, "{counters}");
    assert!(
        counters["fs0"]["failed_requests"].as_u64().unwrap() >= 1,
        "{counters}"
    );
    let stderr = pod.server.stderr_text();
    assert_eq!(
        stderr.matches("went away").count(),
        1,
        "one line about the back-end: {stderr}"
    );
    let info: Value = serde_json::from_slice(&pod.server.ok("GET", "vm.info", None).body).unwrap();
    assert_eq!(info["state"], "Running");
    pod.server.ok("PUT", "vmm.shutdown", None);
}

/// Unpacks a newc cpio archive (the kit's initramfs) into `dest`: directories, files,
/// symbolic links and character devices.
fn unpack_cpio(archive: &[u8], dest: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut at = 0;
    let field = |at: usize, i: usize| {
        let s = std::str::from_utf8(&archive[at + 6 + i * 8..at + 14 + i * 8]).unwrap();
        u32::from_str_radix(s, 16).unwrap() as usize
    };
    let pad4 = |n: usize| (n + 3) & !3;
    loop {
        assert_eq!(
            &archive[at..at + 6],
            b"070701",
            "not a newc archive at {at}"
        );
        let mode = field(at, 1);
        let size = field(at, 6);
        let (rmaj, rmin) = (field(at, 9), field(at, 10));
        let namesize = field(at, 11);
        let name = std::str::from_utf8(&archive[at + 110..at + 110 + namesize - 1]).unwrap();
        let data_at = pad4(at + 110 + namesize);
        let data = &archive[data_at..data_at + size];
        at = pad4(data_at + size);
        if name == "TRAILER!!!" {
            return;
        }
        let path = dest.join(name.trim_start_matches('/'));
        match mode & 0o170000 {
            0o040000 => std::fs::create_dir_all(&path).unwrap(),
            0o100000 => {
                std::fs::write(&path, data).unwrap();
                std::fs::set_permissions(
                    &path,
                    std::fs::Permissions::from_mode(mode as u32 & 0o7777),
                )
                .unwrap();
            }
            0o120000 => std::os::unix::fs::symlink(
                std::str::from_utf8(data).unwrap().trim_end_matches('\0'),
                &path,
            )
            .unwrap(),
            0o020000 => {
                let c = std::ffi::CString::new(path_str(&path)).unwrap();
                let dev = libc::makedev(rmaj as u32, rmin as u32);
                // SAFETY: a NUL-terminated path; mknod only creates the node.
                let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, dev) };
                assert_eq!(rc, 0, "mknod {name}: {}", std::io::Error::last_os_error());
            }
            other => panic!("{name}: cpio entry of type {other:o}"),
        }
    }
}

/// Kata's body for `name` with our kernel, sockets and console, an initrd pod's shape (no
/// `disks`), and `cmdline`.
fn kata_body(name: &str, fs_socket: &Path, vsock: &Path, console: &Path, cmdline: &str) -> Value {
    let body = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/kata")
            .join(name),
    )
    .unwrap()
    .replace("@KERNEL@", path_str(&kit_file("vmlinux")))
    .replace("@FSSOCK@", path_str(fs_socket))
    .replace("@VSOCK@", path_str(vsock))
    .replace("@MAXVCPUS@", "1")
    .replace("@HOTPLUG@", &(8u64 << 30).to_string());
    let mut config: Value = serde_json::from_str(&body).unwrap();
    config.as_object_mut().unwrap().remove("disks");
    config["payload"]["cmdline"] = json!(cmdline);
    config["serial"] = json!({"mode": "File", "file": path_str(console)});
    assert_eq!(config["memory"]["shared"], true);
    assert_eq!(config["fs"][0]["tag"], "kataShared");
    config
}

#[test]
#[ignore = "boots Linux: minutes under PVM; scripts/test.sh and CI run it with --include-ignored"]
fn the_kernel_mounts_a_virtiofs_root_and_runs_init_from_it() {
    let _one = one_boot_at_a_time();
    let dir = TempDir::new("linux-fs-root");
    let root = dir.path("root");
    std::fs::create_dir(&root).unwrap();
    unpack_cpio(&std::fs::read(kit_file("initramfs.cpio")).unwrap(), &root);
    assert!(root.join("init").is_file() && root.join("sbin/podvmm-agent").is_file());
    std::fs::write(root.join("host-note.txt"), b"written by the host\n").unwrap();
    let volume = dir.path("volume");
    std::fs::create_dir(&volume).unwrap();
    std::fs::write(volume.join("data.txt"), b"a volume's data\n").unwrap();
    let root_fsd = Virtiofsd::start(&root, &dir.path("root.sock"), &dir.path("root-fsd.log"));
    let volume_fsd = Virtiofsd::start(
        &volume,
        &dir.path("volume.sock"),
        &dir.path("volume-fsd.log"),
    );

    // Kata's Rust runtime's default body; its share is the root (no initramfs at all).
    let console = dir.path("console.log");
    let vsock = dir.path("root.vsock");
    let config = kata_body(
        "rs-create-default.json",
        &root_fsd.socket,
        &vsock,
        &console,
        &format!("{CMDLINE} rootfstype=virtiofs root=kataShared rw init=/init"),
    );
    assert!(config["payload"]["initramfs"].is_null());
    let server = Server::start(&dir, &[]);
    let pod = Pod {
        server,
        console,
        vsock,
    };
    pod.server.ok("PUT", "vm.create", Some(&config.to_string()));
    // A volume cold-plugged through vm.add-fs, as Kata does for a pod's volumes.
    let added = pod.server.ok(
        "PUT",
        "vm.add-fs",
        Some(
            &json!({"tag": "volume", "socket": path_str(&volume_fsd.socket), "num_queues": 1,
            "queue_size": 1024, "id": null, "pci_segment": 0})
            .to_string(),
        ),
    );
    let added: Value = serde_json::from_slice(&added.body).unwrap();
    assert_eq!(added["id"], "fs1");
    pod.server.ok("PUT", "vm.boot", None);
    let mut c = pod.agent();
    let mounts = pod.sh_ok(&mut c, "cat /proc/mounts");
    assert!(
        mounts
            .lines()
            .any(|l| l.starts_with("kataShared / virtiofs ")),
        "root is not the virtio-fs share: {mounts}"
    );
    assert_eq!(
        pod.sh_ok(&mut c, "cat /host-note.txt"),
        "written by the host\n"
    );
    pod.sh_ok(
        &mut c,
        "echo written by the guest > /guest-note.txt && sync",
    );
    assert_eq!(
        std::fs::read_to_string(root.join("guest-note.txt")).unwrap(),
        "written by the guest\n"
    );
    assert_eq!(
        pod.sh_ok(
            &mut c,
            "mkdir -p /mnt/v && mount -t virtiofs volume /mnt/v && cat /mnt/v/data.txt"
        ),
        "a volume's data\n"
    );
    let counters = pod.counters();
    for fs in ["fs0", "fs1"] {
        assert_eq!(counters[fs]["backend_connected"], 1, "{counters}");
    }
    c.poweroff()
        .unwrap_or_else(|e| panic!("poweroff: {e}\n{}", pod.context()));
    let deadline = Instant::now() + Duration::from_secs(120);
    while pod.server.state() != "Shutdown" {
        assert!(Instant::now() < deadline, "no shutdown\n{}", pod.context());
        std::thread::sleep(Duration::from_millis(100));
    }
    pod.server.ok("PUT", "vmm.shutdown", None);
}
