//! The VMM thread's request handling, without a guest.

use super::*;
use api::pod::Explicit;

fn create_request(json: &str) -> ApiRequest {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    ApiRequest::VmCreate(Box::new(CreateVm {
        explicit: Explicit::from_json(&v),
        config: serde_json::from_value(v).unwrap(),
        ignored: BTreeSet::new(),
    }))
}

fn kernel_file() -> (tempfile::Dir, String) {
    let dir = tempfile::Dir::new("ctl");
    let k = dir.0.join("k");
    // Not really a kernel; a sector long, so it serves as a disk image too.
    std::fs::write(&k, [0x5a; 4096]).unwrap();
    let s = k.display().to_string();
    (dir, s)
}

mod tempfile {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> Self {
            let d = std::env::temp_dir().join(format!(
                "podvmm-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            Dir(d)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn status(r: ApiResult) -> u16 {
    match r {
        Ok(_) => 200,
        Err(e) => e.status(),
    }
}

#[test]
fn states_without_a_vm() {
    let mut vmm = Vmm::new(Selection::Kvm).unwrap();
    assert!(matches!(
        vmm.handle(ApiRequest::VmmPing),
        Ok(ApiReply::Ping(_))
    ));
    for r in [
        ApiRequest::VmBoot,
        ApiRequest::VmInfo,
        ApiRequest::VmShutdown,
        ApiRequest::VmPause,
        ApiRequest::VmResume,
        ApiRequest::VmCounters,
    ] {
        let name = r.name();
        assert_eq!(status(vmm.handle(r)), 404, "{name}");
    }
    assert!(vmm.handle(ApiRequest::VmDelete).is_ok());
}

#[test]
fn create_sizes_and_checks() {
    let (_dir, k) = kernel_file();
    let mut vmm = Vmm::new(Selection::Kvm).unwrap();
    let r = vmm.handle(create_request(&format!(
        r#"{{"payload":{{"kernel":"{k}"}},"pod":{{"containers":[{{"cpu":"1500m","memory":"1Gi"}}]}}}}"#
    )));
    assert!(r.is_ok(), "{r:?}");
    let Ok(ApiReply::Info(info)) = vmm.handle(ApiRequest::VmInfo) else {
        panic!("no info");
    };
    assert_eq!(info.state, VmState::Created);
    assert_eq!(info.config.cpus.boot_vcpus, 3);
    assert_eq!(info.memory_actual_size, 3072 << 20);
    assert_eq!(info.sizing.pod.as_ref().unwrap().cpu_limits_millis, 1500);
    assert!(info.boot_digests.is_none());
    // Wrong-state calls.
    assert_eq!(
        status(vmm.handle(create_request(&format!(
            r#"{{"payload":{{"kernel":"{k}"}}}}"#
        )))),
        409
    );
    assert_eq!(status(vmm.handle(ApiRequest::VmPause)), 409);
    assert_eq!(status(vmm.handle(ApiRequest::VmResume)), 409);
    assert_eq!(status(vmm.handle(ApiRequest::VmShutdown)), 409);
    assert_eq!(status(vmm.handle(ApiRequest::VmCounters)), 409);
    // Cold-adding devices, and refusing bad ones.
    let disk = |path: &str, id: Option<&str>| {
        ApiRequest::VmAddDisk(Box::new(AddDevice {
            config: DiskConfig::parse(&match id {
                Some(id) => format!("path={path},id={id}"),
                None => format!("path={path}"),
            })
            .unwrap(),
            fds: vec![],
            ignored: BTreeSet::new(),
        }))
    };
    assert_eq!(status(vmm.handle(disk(&k, Some("d0")))), 200);
    assert_eq!(status(vmm.handle(disk(&k, Some("d0")))), 409);
    assert_eq!(status(vmm.handle(disk("/nonexistent/disk.img", None))), 400);
    let vsock = |cid| {
        ApiRequest::VmAddVsock(Box::new(AddDevice {
            config: VsockConfig {
                cid,
                socket: "/tmp/v.sock".into(),
                id: None,
                connect_timeout: None,
            },
            fds: vec![],
            ignored: BTreeSet::new(),
        }))
    };
    assert_eq!(status(vmm.handle(vsock(2))), 400);
    assert_eq!(status(vmm.handle(vsock(3))), 200);
    assert_eq!(status(vmm.handle(vsock(4))), 409);
    // A descriptor that is not a TAP device.
    let not_tap = std::fs::File::open(&k).unwrap();
    let r = vmm.handle(ApiRequest::VmAddNet(Box::new(AddDevice {
        config: NetConfig::parse("mac=02:00:00:00:00:01").unwrap(),
        fds: vec![not_tap.into()],
        ignored: BTreeSet::new(),
    })));
    assert_eq!(status(r), 400);
    assert!(vmm.handle(ApiRequest::VmDelete).is_ok());
    assert_eq!(vmm.state(), None);
}

#[test]
fn bad_configurations_are_400() {
    let (_dir, k) = kernel_file();
    let mut vmm = Vmm::new(Selection::Kvm).unwrap();
    for body in [
        r#"{"payload":{}}"#.to_string(),
        r#"{"payload":{"kernel":"/nonexistent/vmlinux"}}"#.into(),
        format!(r#"{{"payload":{{"kernel":"{k}","initramfs":"/nonexistent"}}}}"#),
        r#"{"payload":{"kernel":"/"}}"#.to_string(),
        format!(r#"{{"payload":{{"kernel":"{k}"}},"cpus":{{"boot_vcpus":0,"max_vcpus":0}}}}"#),
        format!(r#"{{"payload":{{"kernel":"{k}"}},"cpus":{{"boot_vcpus":300,"max_vcpus":300}}}}"#),
        format!(r#"{{"payload":{{"kernel":"{k}"}},"memory":{{"size":1}}}}"#),
        format!(r#"{{"payload":{{"kernel":"{k}"}},"memory":{{"size":18446744073709551615}}}}"#),
        format!(r#"{{"payload":{{"kernel":"{k}"}},"pod":{{"containers":[{{"cpu":"-1"}}]}}}}"#),
        format!(r#"{{"payload":{{"kernel":"{k}"}},"pod":{{"containers":[{{"memory":"1e30"}}]}}}}"#),
        format!(r#"{{"payload":{{"kernel":"{k}"}},"pod":{{"containers":[{{"cpu":"300"}}]}}}}"#),
        format!(r#"{{"payload":{{"kernel":"{k}"}},"net":[{{"mac":"01:00:00:00:00:01"}}]}}"#),
        format!(r#"{{"payload":{{"kernel":"{k}"}},"vsock":{{"cid":1,"socket":"/s"}}}}"#),
    ] {
        let r = vmm.handle(create_request(&body));
        assert_eq!(status(r), 400, "{body}");
        assert_eq!(vmm.state(), None, "{body}");
    }
}

#[test]
fn max_vcpus_agrees_with_the_mp_table() {
    assert_eq!(pod::MAX_VCPUS, boot::mptable::MAX_CPUS);
}

#[test]
fn digests_are_sha256_hex() {
    assert_eq!(
        hex(&Sha256::digest(b"abc")),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}
