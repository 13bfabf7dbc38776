//! The REST API as a container-runtime shim drives it: Kata's call sequence, with a real TAP
//! device passed over the socket, against a tiny guest that keeps running.

use crate::api_support;
use crate::common;

use std::os::fd::AsRawFd;
use std::time::Duration;

use api_support::*;
use common::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What Kata's Go driver sends in `vm.create` (clh.go, with its generated client's
/// defaults), for a tiny guest: every Cloud Hypervisor field it sets is there.
fn kata_vm_create(kernel: &std::path::Path, serial: &std::path::Path) -> Value {
    json!({
        "payload": {"kernel": kernel, "cmdline": "kata tiny"},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1, "kvm_hyperv": false, "nested": true,
                 "topology": {"threads_per_core": 1, "cores_per_die": 1,
                              "dies_per_package": 1, "packages": 1}},
        "memory": {"size": 128u64 << 20, "hotplug_size": 1u64 << 30, "mergeable": false,
                   "hotplug_method": "Acpi", "shared": false, "hugepages": false,
                   "prefault": false, "thp": true},
        "rng": {"src": "/dev/urandom", "iommu": false},
        "serial": {"mode": "File", "file": serial},
        "console": {"mode": "Off", "iommu": false},
        "platform": {"num_pci_segments": 2, "tdx": false, "sev_snp": false},
        "iommu": false, "watchdog": false, "pvpanic": false, "landlock_enable": false
    })
}

/// What Kata's Go driver sends in `vm.add-net` (NetConfig with the client's defaults).
fn kata_add_net() -> String {
    json!({
        "mac": "02:00:ca:fe:00:01", "ip": "192.168.249.1", "mask": "255.255.255.0",
        "iommu": false, "num_queues": 2, "queue_size": 256, "vhost_user": false,
        "vhost_mode": "Client", "offload_tso": true, "offload_ufo": true,
        "offload_csum": true
    })
    .to_string()
}

#[test]
fn kata_sequence_over_the_socket() {
    let dir = TempDir::new("api-kata");
    let kernel_bytes = pvh_elf(&hold_guest_code());
    let kernel = dir.write("tiny.elf", &kernel_bytes);
    let serial = dir.path("serial.log");

    // exec → poll vmm.ping.
    let mut server = Server::start(&dir, &[]);
    eprintln!("vmm.ping answered {:?} after exec", server.ready_after);
    let ping: Value = serde_json::from_slice(&server.ok("GET", "vmm.ping", None).body).unwrap();
    assert!(
        ping["version"].is_string() && ping["pid"].as_u64() == Some(u64::from(server.child.id()))
    );
    // The socket is private.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&server.socket).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    // vm.create → vm.info (Created).
    let create = kata_vm_create(&kernel, &serial).to_string();
    assert_eq!(server.ok("PUT", "vm.create", Some(&create)).status, 204);
    let info = server.info();
    assert_eq!(info["state"], "Created");
    assert_eq!(info["config"]["cpus"]["boot_vcpus"], 1);
    assert_eq!(info["config"]["cpus"]["max_vcpus"], 1);
    assert_eq!(info["config"]["memory"]["size"], 128u64 << 20);
    assert_eq!(info["memory_actual_size"], 128u64 << 20);
    let ignored = info["ignored_fields"].as_array().unwrap();
    assert!(info["config"]["memory"]["hotplug_size"].is_u64(), "{info}");
    assert_eq!(info["config"]["cpus"]["max_phys_bits"], 46);
    assert_eq!(
        info["config"]["rng"]["src"], "/dev/urandom",
        "virtio-rng is provided"
    );
    for f in ["cpus.topology", "platform.num_pci_segments"] {
        assert!(ignored.contains(&json!(f)), "{f} not in {ignored:?}");
    }
    assert!(info.get("boot_digests").is_none());

    // vm.add-net with a real TAP descriptor, on its own connection, in one sendmsg.
    let tap_name = format!("pvk{}", std::process::id() % 100_000);
    let tap = create_tap(&tap_name);
    let mut c = server.client();
    let r = c
        .request_with_fds(
            "PUT",
            "vm.add-net",
            Some(kata_add_net().as_bytes()),
            &[tap.as_raw_fd()],
        )
        .unwrap();
    // Cloud Hypervisor's PciDeviceInfo, which Kata decodes (bdf: the virtio-mmio slot).
    assert_eq!(r.status, 200, "{}", r.error_message());
    let dev: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(dev["id"], "net0", "{dev}");
    assert!(
        dev["bdf"]
            .as_str()
            .is_some_and(|b| b.starts_with("0000:00:")),
        "{dev}"
    );
    let info = server.info();
    assert_eq!(info["config"]["net"][0]["mac"], "02:00:ca:fe:00:01");
    assert!(
        info["config"]["net"][0].get("fds").is_none(),
        "descriptors are not JSON"
    );
    // The VMM holds its own copy of the descriptor: the TAP outlives ours.
    drop(tap);
    assert!(
        std::path::Path::new(&format!("/sys/class/net/{tap_name}")).exists(),
        "the VMM must keep the TAP open"
    );

    // vm.boot, with the NIC over the shim's TAP (virtio-net). Should the device be refused
    // (a build without it said "not implemented yet"), the failure must be a clean 4xx that
    // changes nothing; then the test goes on without the NIC.
    let r = server.call("PUT", "vm.boot", None);
    eprintln!(
        "vm.boot with the TAP NIC: {} {}",
        r.status,
        r.error_message()
    );
    let booted_with_nic = r.is_success();
    if !booted_with_nic {
        let msg = r.error_message();
        assert!(
            (400..500).contains(&r.status)
                && msg.contains("virtio-net")
                && msg.contains("not implemented"),
            "{} {msg}",
            r.status
        );
        assert_eq!(
            server.state(),
            "Created",
            "a failed boot leaves the VM as it was"
        );
        // Start over without the NIC: delete releases the TAP.
        server.ok("PUT", "vm.delete", None);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::path::Path::new(&format!("/sys/class/net/{tap_name}")).exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "vm.delete must close the TAP"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        server.ok("PUT", "vm.create", Some(&create));
        server.ok("PUT", "vm.boot", None);
    }

    // vm.info (Running), with what was booted.
    let info = server.info();
    assert_eq!(info["state"], "Running");
    let digests = &info["boot_digests"];
    assert_eq!(digests["kernel_sha256"], sha256_hex(&kernel_bytes));
    // The command line the guest got: the configured one, plus what podvmm appended
    // (virtio-mmio device entries, the CPUID workaround on PVM hosts).
    let cmdline = digests["cmdline"].as_str().unwrap();
    assert!(cmdline.starts_with("kata tiny"), "{cmdline}");
    assert!(cmdline.ends_with(&guest_cmdline("")[..]), "{cmdline}");
    assert_eq!(digests["cmdline_sha256"], sha256_hex(cmdline.as_bytes()));
    assert!(digests.get("initramfs_sha256").is_none());
    wait_for_output(
        &serial,
        &format!("READY {cmdline}\n"),
        Duration::from_secs(20),
    );
    if booted_with_nic {
        // The NIC is there, over the TAP the shim passed.
        let counters: Value =
            serde_json::from_slice(&server.ok("GET", "vm.counters", None).body).unwrap();
        assert!(counters["net0"]["rx_bytes"].is_u64(), "{counters}");
    }
    // The guest halts and stays up: still Running a moment later.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(server.state(), "Running");

    // vmm.shutdown: answered, then the process exits 0 and removes its socket.
    assert_eq!(server.ok("PUT", "vmm.shutdown", None).status, 204);
    let status = server.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status}: {}", server.stderr_text());
    assert!(!server.socket.exists(), "the socket file must be removed");
}

#[test]
fn command_line_vm_with_api_socket_boots_at_start_up() {
    let dir = TempDir::new("api-cli");
    let kernel = dir.write("tiny.elf", &pvh_elf(&hold_guest_code()));
    let serial = dir.path("serial.log");
    let serial_arg = format!("file={}", path_str(&serial));
    let server = Server::start(
        &dir,
        &[
            "--kernel",
            path_str(&kernel),
            "--cmdline",
            "cli boot",
            "--serial",
            &serial_arg,
            "--pod-limits",
            "cpu=1500m,memory=100Mi",
            "--pod-limits",
            "memory=28Mi",
            "--memory",
            "size=128M",
        ],
    );
    // As Cloud Hypervisor: created and booted.
    let info = server.info();
    assert_eq!(info["state"], "Running");
    // Pod sizing: 3 vCPUs from 1.5 CPU; the explicit --memory wins over 2048+128 MiB.
    assert_eq!(info["config"]["cpus"]["boot_vcpus"], 3);
    assert_eq!(info["config"]["memory"]["size"], 128u64 << 20);
    let sizing = &info["sizing"];
    assert_eq!(sizing["vcpus_from"], "pod");
    assert_eq!(sizing["memory_from"], "explicit");
    assert_eq!(sizing["pod"]["cpu_limits_millis"], 1500);
    assert_eq!(sizing["pod"]["memory_limits_mib"], 128);
    assert_eq!(sizing["pod"]["memory_mib"], 2048 + 128);
    assert_eq!(info["config"]["pod"]["containers"][0]["cpu"], "1500m");
    wait_for_output(&serial, "READY", Duration::from_secs(20));
}

#[test]
fn a_live_socket_is_refused_a_stale_one_replaced() {
    let dir = TempDir::new("api-sock");
    let server = Server::start(&dir, &[]);
    // A second VMM on the same path: refused, exit 1, the first one unaffected.
    let out = run_podvmm(&["--api-socket", path_str(&server.socket)], 10);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use"), "{err}");
    assert_eq!(server.call("GET", "vmm.ping", None).status, 200);
    drop(server);
    // The killed VMM left its socket file: the next one replaces it.
    assert!(dir.path("api.sock").exists());
    let server = Server::start(&dir, &[]);
    assert_eq!(server.call("GET", "vmm.ping", None).status, 200);
    // A path that is not a socket is left alone.
    let file = dir.write("not-a-socket", b"data");
    let out = run_podvmm(&["--api-socket", path_str(&file)], 10);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a socket"));
    assert_eq!(std::fs::read(&file).unwrap(), b"data");
    // A bad VM on the command line: a clean error exit, and no socket left behind.
    let other = TempDir::new("api-sock-bad");
    let sock = other.path("api.sock");
    let missing = other.path("missing-kernel");
    let out = run_podvmm(
        &[
            "--api-socket",
            path_str(&sock),
            "--kernel",
            path_str(&missing),
        ],
        10,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("No such file") && !err.contains("panicked"),
        "{err}"
    );
    assert!(!sock.exists());
}

/// `podvmm remote`, as a person or a script uses it.
#[test]
fn remote_client() {
    let dir = TempDir::new("api-remote");
    let kernel = dir.write("tiny.elf", &pvh_elf(&hold_guest_code()));
    let serial = dir.path("serial.log");
    let mut server = Server::start(&dir, &[]);
    let sock = path_str(&server.socket).to_string();
    let remote = |args: &[&str]| {
        let mut all = vec!["remote", "--api-socket", &sock];
        all.extend_from_slice(args);
        run_podvmm(&all, 30)
    };
    let out = remote(&["ping"]);
    assert!(out.status.success());
    let ping: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(ping["version"].is_string());

    let config = dir.write(
        "vm.json",
        vm_config(&kernel, "remote", &serial).to_string().as_bytes(),
    );
    assert!(remote(&["create", path_str(&config)]).status.success());
    let disk = dir.write("disk.img", &[0u8; 4096]);
    let out = remote(&["add-disk", &format!("path={},readonly=on", path_str(&disk))]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A server error: exit 1 with the server's message.
    let out = remote(&["add-disk", "path=/nonexistent/disk.img"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/disk.img") && err.contains("400"),
        "{err}"
    );
    // A client-side mistake: refused before sending.
    let out = remote(&["add-disk", "readonly=on"]);
    assert_eq!(out.status.code(), Some(1));
    let out = remote(&["info"]);
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["state"], "Created");
    assert_eq!(info["config"]["disks"][0]["readonly"], true);
    let out = remote(&["boot"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for_output(&serial, "READY", Duration::from_secs(20));
    assert!(remote(&["pause"]).status.success());
    let out = remote(&["pause"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already paused"));
    assert!(remote(&["resume"]).status.success());
    let out = remote(&["counters"]);
    let counters: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(counters["disk0"]["read_ops"].is_u64(), "{counters}");
    assert!(remote(&["shutdown"]).status.success());
    let out = remote(&["info"]);
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["state"], "Created");
    assert!(remote(&["delete"]).status.success());
    assert!(remote(&["shutdown-vmm"]).status.success());
    assert!(server.wait_exit(Duration::from_secs(10)).success());
    // Nobody there any more.
    let out = remote(&["ping"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("connecting"));
}
