//! Bad input over the socket: each gets a 4xx that says what was wrong, the server stays up,
//! and a running VM carries on as if nothing happened.

use crate::api_support;
use crate::common;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use api_support::*;
use common::*;
use serde_json::json;

#[test]
fn bad_configurations_are_refused_before_any_vm_exists() {
    let dir = TempDir::new("api-badcfg");
    let kernel = dir.write("tiny.elf", &pvh_elf(&hold_guest_code()));
    let k = path_str(&kernel);
    let disk_data: Vec<u8> = (0..8192u32).map(|i| (i * 3) as u8).collect();
    let disk = dir.write("disk.img", &disk_data);
    let disk = path_str(&disk);
    let server = Server::start(&dir, &[]);
    let cases: Vec<(String, u16, &str)> = vec![
        // Malformed JSON, and JSON that is not an object.
        (r#"{"payload": {"kernel": "#.into(), 400, "malformed JSON"),
        ("null".into(), 400, "JSON object"),
        (String::new(), 400, "needs a JSON body"),
        // Unknown fields, at the top and inside a section.
        (
            json!({"payload": {"kernel": k}, "gpus": 1}).to_string(),
            400,
            "unknown field `gpus`",
        ),
        (
            json!({"payload": {"kernel": k, "bootloader": "x"}}).to_string(),
            400,
            "unknown field `bootloader`",
        ),
        // Cloud Hypervisor fields asking for what podvmm does not do.
        (
            json!({"payload": {"kernel": k}, "memory": {"size": 1u64 << 30, "mergeable": true}})
                .to_string(),
            400,
            "memory.mergeable",
        ),
        // A hugepage size x86 does not have.
        (
            json!({"payload": {"kernel": k}, "memory": {"size": 1u64 << 30, "hugepages": true,
                "hugepage_size": 4u64 << 20}})
            .to_string(),
            400,
            "not one x86 offers",
        ),
        // An output on an input: refused before anything is written.
        (
            json!({"payload": {"kernel": k}, "disks": [{"path": disk, "readonly": true}],
                   "serial": {"mode": "File", "file": disk}})
            .to_string(),
            400,
            "podvmm would overwrite it",
        ),
        (
            json!({"payload": {"kernel": k}, "serial": {"mode": "File", "file": k}}).to_string(),
            400,
            "is the VM's kernel",
        ),
        (
            json!({"payload": {"kernel": k}, "serial": {"mode": "File", "file": &server.socket}})
                .to_string(),
            400,
            "API socket",
        ),
        (
            json!({"payload": {"kernel": k}, "memory": {"size": 17825793}}).to_string(),
            400,
            "multiple of 4 KiB",
        ),
        (
            json!({"payload": {"kernel": "/dev/zero"}}).to_string(),
            400,
            "character device",
        ),
        (
            json!({"payload": {"kernel": k}, "fs": [{"tag": "t", "socket": "/s"}]}).to_string(),
            400,
            "memory.shared=true",
        ),
        // Sizes that do not parse or make no sense.
        (
            json!({"payload": {"kernel": k}, "memory": {"size": "2G"}}).to_string(),
            400,
            "invalid type",
        ),
        (
            json!({"payload": {"kernel": k}, "memory": {"size": -1}}).to_string(),
            400,
            "invalid value",
        ),
        (
            json!({"payload": {"kernel": k}, "memory": {"size": 0}}).to_string(),
            400,
            "memory size",
        ),
        (
            json!({"payload": {"kernel": k}, "memory": {"size": 1u64 << 62}}).to_string(),
            400,
            "more than the host has",
        ),
        (
            json!({"payload": {"kernel": k}, "cpus": {"boot_vcpus": 0, "max_vcpus": 0}})
                .to_string(),
            400,
            "at least 1",
        ),
        (
            json!({"payload": {"kernel": k}, "cpus": {"boot_vcpus": 4, "max_vcpus": 2}})
                .to_string(),
            400,
            "at least boot_vcpus",
        ),
        (
            json!({"payload": {"kernel": k}, "memory": {"size": 17825793}}).to_string(),
            400,
            "multiple of 4 KiB",
        ),
        (
            json!({"payload": {"kernel": k}, "cpus": {"boot_vcpus": 1000, "max_vcpus": 1000}})
                .to_string(),
            400,
            "at most 254",
        ),
        (
            json!({"payload": {"kernel": k}, "cpus": {"boot_vcpus": 1.5, "max_vcpus": 1}})
                .to_string(),
            400,
            "invalid type",
        ),
        // Pod limits: malformed, negative, absurd.
        (
            json!({"payload": {"kernel": k}, "pod": {"containers": [{"cpu": "1.5.5"}]}})
                .to_string(),
            400,
            "pod.containers[0].cpu",
        ),
        (
            json!({"payload": {"kernel": k}, "pod": {"containers": [{"memory": "12GB"}]}})
                .to_string(),
            400,
            "suffix",
        ),
        (
            json!({"payload": {"kernel": k}, "pod": {"containers": [{}, {"cpu": "-1"}]}})
                .to_string(),
            400,
            "negative",
        ),
        (
            json!({"payload": {"kernel": k}, "pod": {"containers": [{"cpu": "300"}]}}).to_string(),
            400,
            "vCPUs",
        ),
        (
            json!({"payload": {"kernel": k}, "pod": {"containers": [{"memory": "1e40"}]}})
                .to_string(),
            400,
            "too large",
        ),
        (
            json!({"payload": {"kernel": k}, "pod": {"containers": [{"memory": "17Ti"}]}})
                .to_string(),
            400,
            "16 TiB",
        ),
        (
            json!({"payload": {"kernel": k}, "pod": {"containers": [{"cpu": 2}]}}).to_string(),
            400,
            "invalid type",
        ),
        (
            json!({"payload": {"kernel": k}, "pod": {"containers": [{"gpu": "1"}]}}).to_string(),
            400,
            "unknown field `gpu`",
        ),
        // Paths that do not exist.
        (
            json!({"payload": {"kernel": "/nonexistent/vmlinux"}}).to_string(),
            400,
            "/nonexistent/vmlinux",
        ),
        (
            json!({"payload": {"kernel": k, "initramfs": "/nonexistent/initrd"}}).to_string(),
            400,
            "/nonexistent/initrd",
        ),
        (
            json!({"payload": {"kernel": "/"}}).to_string(),
            400,
            "not a regular file",
        ),
        (
            json!({"payload": {"kernel": k}, "disks": [{"path": "/nonexistent/disk"}]}).to_string(),
            400,
            "/nonexistent/disk",
        ),
        (json!({"payload": {}}).to_string(), 400, "no kernel"),
        (
            json!({"payload": {"kernel": k}, "net": [{"mac": "zz:00:00:00:00:01"}]}).to_string(),
            400,
            "mac",
        ),
        (
            json!({"payload": {"kernel": k}, "vsock": {"cid": 2, "socket": "/s"}}).to_string(),
            400,
            "reserved",
        ),
    ];
    for (body, status, needle) in &cases {
        let msg = server.refused("PUT", "vm.create", Some(body), *status);
        assert!(msg.contains(needle), "{body}: {msg}");
        // Nothing was created.
        server.refused("GET", "vm.info", None, 404);
    }
    assert_eq!(std::fs::read(disk).unwrap(), disk_data, "the disk changed");
    // Wrong-state calls with no VM: 404 with a message.
    for ep in [
        "vm.boot",
        "vm.pause",
        "vm.resume",
        "vm.shutdown",
        "vm.add-vsock",
    ] {
        let body = (ep == "vm.add-vsock").then_some(r#"{"cid":3,"socket":"/tmp/v"}"#);
        assert!(server
            .refused("PUT", ep, body, 404)
            .contains("vm.create first"));
    }
    server.refused("GET", "vm.counters", None, 404);

    // In state Created: device mistakes.
    let serial = dir.path("serial.log");
    server.ok(
        "PUT",
        "vm.create",
        Some(&vm_config(&kernel, "x", &serial).to_string()),
    );
    let msg = server.refused(
        "PUT",
        "vm.add-disk",
        Some(r#"{"path":"/nonexistent/d.img"}"#),
        400,
    );
    assert!(msg.contains("/nonexistent/d.img"), "{msg}");
    server.refused(
        "PUT",
        "vm.add-disk",
        Some(r#"{"path":"/x","vhost_user":true}"#),
        400,
    );
    // /proc files call themselves regular files of 0 bytes; a 6-byte image has no sector.
    let msg = server.refused(
        "PUT",
        "vm.add-disk",
        Some(r#"{"path":"/proc/self/mem"}"#),
        400,
    );
    assert!(msg.contains("smaller than one 512-byte sector"), "{msg}");
    let tiny = dir.write("tiny.img", b"abcdef");
    let msg = server.refused(
        "PUT",
        "vm.add-disk",
        Some(&json!({ "path": tiny }).to_string()),
        400,
    );
    assert!(
        msg.contains("is 6 bytes: smaller than one 512-byte sector"),
        "{msg}"
    );
    // A qcow2 image, said to be Unknown: probed and refused by name.
    let mut q = vec![0u8; 4096];
    q[..4].copy_from_slice(b"QFI\xfb");
    let qcow = dir.write("x.qcow2", &q);
    let msg = server.refused(
        "PUT",
        "vm.add-disk",
        Some(&json!({ "path": qcow, "image_type": "Unknown" }).to_string()),
        400,
    );
    assert!(msg.contains("the image is qcow2"), "{msg}");
    server.refused(
        "PUT",
        "vm.add-net",
        Some(r#"{"mac":"01:00:00:00:00:01"}"#),
        400,
    );
    server.refused("PUT", "vm.add-net", Some(r#"{"num_queues":3}"#), 400);
    // A descriptor that is not a TAP device.
    let mut c = server.client();
    let r = c
        .request_with_fds(
            "PUT",
            "vm.add-net",
            Some(b"{}"),
            &[kernel_file_fd(&kernel).as_raw_fd()],
        )
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(
        r.error_message().contains("not a TAP"),
        "{}",
        r.error_message()
    );
    let vsock = json!({"cid": 3, "socket": dir.path("vsock.sock")}).to_string();
    server.ok("PUT", "vm.add-vsock", Some(&vsock));
    assert!(server
        .refused(
            "PUT",
            "vm.add-vsock",
            Some(r#"{"cid":4,"socket":"/tmp/w"}"#),
            409
        )
        .contains("already has a vsock"));
    server.refused(
        "PUT",
        "vm.create",
        Some(&vm_config(&kernel, "y", &serial).to_string()),
        409,
    );
    // Booting with a device podvmm does not have yet is a clean error, not a crash.
    let r = server.call("PUT", "vm.boot", None);
    if !r.is_success() {
        assert!((400..600).contains(&r.status));
        assert!(r.error_message().contains("vsock"), "{}", r.error_message());
        assert_eq!(server.state(), "Created");
    }
    server.ok("GET", "vmm.ping", None);
}

fn kernel_file_fd(path: &std::path::Path) -> std::fs::File {
    std::fs::File::open(path).unwrap()
}

#[test]
fn abuse_of_a_running_vmm_leaves_the_guest_running() {
    let dir = TempDir::new("api-abuse");
    let kernel = dir.write("ticker.elf", &pvh_elf(&ticker_guest_code()));
    let serial = dir.path("serial.log");
    let server = Server::start(&dir, &[]);
    let config = vm_config(&kernel, "abuse", &serial).to_string();
    server.ok("PUT", "vm.create", Some(&config));
    server.ok("PUT", "vm.boot", None);
    wait_for_output(&serial, "012", Duration::from_secs(20));
    let info_before = server.info();

    // Calls that make no sense while Running.
    assert!(server
        .refused("PUT", "vm.boot", None, 409)
        .contains("already running"));
    assert!(server
        .refused("PUT", "vm.resume", None, 409)
        .contains("not paused"));
    assert!(server
        .refused("PUT", "vm.create", Some(&config), 409)
        .contains("already exists"));
    for (ep, body) in [
        ("vm.add-disk", json!({"path": path_str(&kernel)})),
        ("vm.add-net", json!({"mac": "02:00:00:00:00:09"})),
        ("vm.add-vsock", json!({"cid": 3, "socket": "/tmp/x.sock"})),
    ] {
        let msg = server.refused("PUT", ep, Some(&body.to_string()), 409);
        assert!(msg.contains("hotplug"), "{ep}: {msg}");
    }
    // Transport-level abuse.
    let sock = &server.socket;
    assert_eq!(
        status_of(&raw_exchange(sock, b"\x00\x01garbage\r\n\r\n")),
        400
    );
    assert_eq!(
        status_of(&raw_exchange(sock, b"GET /api/v1/vm.info HTTP/9.9\r\n\r\n")),
        400
    );
    assert_eq!(
        status_of(&raw_exchange(
            sock,
            b"GET /api/v2/vm.info HTTP/1.1\r\nConnection: close\r\n\r\n"
        )),
        404
    );
    assert_eq!(
        status_of(&raw_exchange(
            sock,
            b"POST /api/v1/vm.boot HTTP/1.1\r\nConnection: close\r\n\r\n"
        )),
        405
    );
    assert_eq!(
        status_of(&raw_exchange(
            sock,
            b"PUT /api/v1/vm.snapshot HTTP/1.1\r\nConnection: close\r\n\r\n"
        )),
        501
    );
    // A body of megabytes: refused from its length.
    let big = format!(
        "PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        8 << 20
    );
    let resp = raw_exchange(sock, big.as_bytes());
    assert_eq!(status_of(&resp), 413, "{resp}");
    // ... and when it is actually sent.
    let mut c = server.client();
    let r = c
        .request("PUT", "vm.create", Some(&vec![b' '; 3 << 20]))
        .unwrap();
    assert_eq!(r.status, 413);
    // A client that disconnects mid-request, one that stalls, many that sit idle.
    let mut gone = UnixStream::connect(sock).unwrap();
    gone.write_all(b"PUT /api/v1/vm.shutdown HTTP/1.1\r\nContent-Length: 50\r\n\r\n{")
        .unwrap();
    drop(gone);
    let mut stalled = UnixStream::connect(sock).unwrap();
    stalled.write_all(b"PUT /api/v1/vm.shut").unwrap();
    let mut idle: Vec<UnixStream> = (0..70)
        .map(|_| UnixStream::connect(sock).unwrap())
        .collect();
    // Past the connection cap (64) with clients that send nothing: a new call still gets in
    // at once (one of the silent connections is closed to make room), again and again.
    for _ in 0..20 {
        let t = Instant::now();
        let resp = raw_exchange(
            sock,
            b"GET /api/v1/vmm.ping HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(status_of(&resp), 200, "{resp}");
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        idle.push(UnixStream::connect(sock).unwrap());
    }
    drop(idle);
    // Slots come back as soon as the idle clients go.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let resp = raw_exchange(
            sock,
            b"GET /api/v1/vmm.ping HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        if status_of(&resp) == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "{resp}");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Served at once while the stalled client still holds its connection.
    let t = Instant::now();
    server.ok("GET", "vm.info", None);
    assert!(t.elapsed() < Duration::from_millis(500));
    drop(stalled);

    // Through all that: the server answers, the VM is Running, its config unchanged, and the
    // guest still counts.
    server.ok("GET", "vmm.ping", None);
    let info = server.info();
    assert_eq!(info["state"], "Running");
    assert_eq!(info["config"], info_before["config"]);
    let len = read_lossy(&serial).len();
    let deadline = Instant::now() + Duration::from_secs(10);
    while read_lossy(&serial).len() < len + 8 {
        assert!(Instant::now() < deadline, "the guest stopped");
        std::thread::sleep(Duration::from_millis(5));
    }
    let stderr = server.stderr_text();
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// virtio-fs mistakes: each a 4xx that names the share and says why, before anything is made;
/// a socket that is no vhost-user back-end fails `vm.boot` the same way, and the VM stays
/// Created with nothing started.
#[test]
fn virtio_fs_mistakes_are_refused_with_their_reason() {
    use std::io::Read;
    let dir = TempDir::new("api-fs");
    let kernel = dir.write("tiny.elf", &pvh_elf(&hold_guest_code()));
    let serial = dir.path("serial.log");
    let server = Server::start(&dir, &[]);
    // A listener that answers anything with bytes that are not vhost-user.
    let fake = dir.path("not-vhost.sock");
    let listener = std::os::unix::net::UnixListener::bind(&fake).unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let regular = dir.write("regular-file", b"x");
    let mut base = vm_config(&kernel, "x", &serial);
    base["memory"]["shared"] = json!(true);
    let with_fs = |fs: serde_json::Value, shared: bool| {
        let mut c = base.clone();
        c["fs"] = fs;
        c["memory"]["shared"] = json!(shared);
        c.to_string()
    };
    let sock = path_str(&fake);
    let cases = [
        (
            with_fs(json!([{"tag": "t".repeat(37), "socket": sock}]), true),
            "1 to 36 bytes",
        ),
        (
            with_fs(json!([{"tag": "", "socket": sock}]), true),
            "1 to 36 bytes",
        ),
        (
            with_fs(
                json!([{"tag": "a", "socket": sock}, {"tag": "a", "socket": sock}]),
                true,
            ),
            "fs tag a is used twice",
        ),
        (
            with_fs(json!([{"tag": "a", "socket": sock}]), false),
            "memory.shared=true",
        ),
        (
            with_fs(json!([{"tag": "a", "socket": sock, "num_queues": 0}]), true),
            "num_queues must be 1 to 64",
        ),
        (
            with_fs(
                json!([{"tag": "a", "socket": sock, "queue_size": 1000}]),
                true,
            ),
            "power of two",
        ),
        (
            with_fs(
                json!([{"tag": "a", "socket": path_str(&dir.path("none.sock"))}]),
                true,
            ),
            "start the vhost-user back-end",
        ),
        (
            with_fs(json!([{"tag": "a", "socket": path_str(&regular)}]), true),
            "is not a Unix socket",
        ),
    ];
    for (body, needle) in &cases {
        let msg = server.refused("PUT", "vm.create", Some(body), 400);
        assert!(msg.contains(needle), "{body}: {msg}");
        server.refused("GET", "vm.info", None, 404);
    }
    // vm.add-fs: the same checks, and a tag already in use is a conflict.
    server.ok("PUT", "vm.create", Some(&base.to_string()));
    let added = server.ok(
        "PUT",
        "vm.add-fs",
        Some(&json!({"tag": "share", "socket": sock}).to_string()),
    );
    let added: serde_json::Value = serde_json::from_slice(&added.body).unwrap();
    assert_eq!(added["id"], "fs0");
    let msg = server.refused(
        "PUT",
        "vm.add-fs",
        Some(&json!({"tag": "share", "socket": sock}).to_string()),
        409,
    );
    assert!(msg.contains("already in use"), "{msg}");
    server.refused(
        "PUT",
        "vm.add-fs",
        Some(&json!({"tag": "x".repeat(40), "socket": sock}).to_string()),
        400,
    );
    // Not a vhost-user back-end: vm.boot says which share and which step failed.
    let msg = server.refused("PUT", "vm.boot", None, 400);
    assert!(
        msg.contains("fs fs0") && msg.contains("not-vhost.sock") && msg.contains("failed"),
        "{msg}"
    );
    assert_eq!(server.state(), "Created");
    server.ok("GET", "vmm.ping", None);
}
