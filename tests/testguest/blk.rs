//! virtio-blk driven from inside a VM by the freestanding test guest (docs/testguest.md):
//! the guest talks to the device through its real MMIO registers and rings, from ring 3, so
//! these tests exercise the whole host path (ioeventfd, worker, io_uring, used ring) at
//! native guest speed even on software KVM.

use crate::common;

use common::testguest::*;
use common::TempDir;

const DISK_SIZE: u64 = 64 << 20;

fn disk(dir: &TempDir) -> std::path::PathBuf {
    let path = dir.path("disk.img");
    pattern_disk(&path, DISK_SIZE);
    path
}

#[test]
fn blk_reads_writes_flushes_and_reports_iops() {
    let dir = TempDir::new("tg-blk");
    let img = disk(&dir);
    let disk_arg = format!("path={},id=tg0", img.display());
    let run = run_testguest(
        "testguest.run=blk testguest.blk_ms=200",
        &["--disk", &disk_arg],
        60,
    );
    run.assert_passed("blk");
    assert_eq!(
        run.value("blk", "id").as_deref(),
        Some("tg0"),
        "{}",
        run.dump()
    );
    assert_eq!(run.num("blk", "read", "errors"), Some(0), "{}", run.dump());
    let iops = run.num("blk", "iops", "iops").expect("iops line");
    assert!(iops > 0, "{}", run.dump());
    eprintln!("in-VM 4 KiB random reads at queue depth 32: {iops} IOPS");

    // The guest's writes reached the file, and nothing else changed.
    let sector = run.num("blk", "write", "sector").expect("write line");
    let sectors = run.num("blk", "write", "sectors").expect("write line");
    assert!(sectors > 0);
    let bytes = std::fs::read(&img).unwrap();
    let (start, end) = ((sector * 512) as usize, ((sector + sectors) * 512) as usize);
    assert_eq!(
        first_mismatch(&bytes[start..end], start as u64, WRITE_KEY),
        None,
        "written area"
    );
    assert_eq!(
        first_mismatch(&bytes[..start], 0, DISK_KEY),
        None,
        "before the written area"
    );
    assert_eq!(
        first_mismatch(&bytes[end..], end as u64, DISK_KEY),
        None,
        "after the written area"
    );
}

#[test]
fn blk_readonly_disk_refuses_writes() {
    let dir = TempDir::new("tg-blk-ro");
    let img = disk(&dir);
    let disk_arg = format!("path={},readonly=on", img.display());
    let run = run_testguest(
        "testguest.run=blk testguest.blk_ms=50",
        &["--disk", &disk_arg],
        60,
    );
    run.assert_passed("blk");
    assert_eq!(
        run.value("blk", "ro").as_deref(),
        Some("1"),
        "{}",
        run.dump()
    );
    assert_eq!(
        run.num("blk", "readonly", "write_status"),
        Some(1),
        "{}",
        run.dump()
    );
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(
        first_mismatch(&bytes, 0, DISK_KEY),
        None,
        "a read-only disk changed"
    );
}

#[test]
fn blk_every_queue_of_a_multiqueue_disk_serves() {
    let dir = TempDir::new("tg-blk-mq");
    let img = disk(&dir);
    let disk_arg = format!("path={},num_queues=4,queue_size=64", img.display());
    let run = run_testguest(
        "testguest.run=blk testguest.blk_ms=50",
        &["--disk", &disk_arg],
        60,
    );
    run.assert_passed("blk");
    assert_eq!(
        run.value("blk", "queues").as_deref(),
        Some("4"),
        "{}",
        run.dump()
    );
    assert_eq!(
        run.value("blk", "queue_size").as_deref(),
        Some("64"),
        "{}",
        run.dump()
    );
}

#[test]
fn blk_hostile_rings_and_requests_are_refused_and_the_vmm_stays_up() {
    let dir = TempDir::new("tg-blk-hostile");
    let img = disk(&dir);
    let disk_arg = format!("path={}", img.display());
    let run = run_testguest("testguest.mode=hostile", &["--disk", &disk_arg], 120);
    run.assert_hostile_cases("blk_hostile", 40);
    assert!(run.stderr.contains("invalid request"), "{}", run.dump());
    // Hostile requests never wrote to the disk (the one hostile write is refused).
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(
        first_mismatch(&bytes, 0, DISK_KEY),
        None,
        "a hostile request changed the disk"
    );
}

#[test]
fn requested_test_without_its_device_says_so_and_fails() {
    let run = run_testguest("testguest.run=blk", &[], 30);
    assert_eq!(run.result("blk").as_deref(), Some("skip"), "{}", run.dump());
    assert_eq!(
        run.value("end", "status").as_deref(),
        Some("fail"),
        "{}",
        run.dump()
    );
    assert!(
        run.status.success(),
        "the guest still resets: {}",
        run.dump()
    );
}

#[test]
fn ring3_exception_is_reported_by_the_guest_handler() {
    let run = run_testguest("testguest.mode=fault", &[], 30);
    let exc = run.lines("exception");
    assert_eq!(exc.len(), 1, "{}", run.dump());
    assert_eq!(
        exc[0]["vector"],
        "0x000000000000000e",
        "a page fault: {}",
        run.dump()
    );
    assert_eq!(
        exc[0]["cs"],
        "0x0000000000000023",
        "raised in ring 3: {}",
        run.dump()
    );
    assert_eq!(exc[0]["cr2"], "0x00000007deadb000", "{}", run.dump());
    assert!(run.status.success(), "{}", run.dump());
}

/// Ring 3 against ring 0 for the same code (the guest's `ring` test). Under PVM, ring-0
/// code is emulated instruction by instruction, so a request loop run from ring 3 must be
/// much faster; on hardware virtualization both rings run natively and only sanity holds.
#[test]
fn ring3_runs_natively_and_beats_ring0_under_pvm() {
    let dir = TempDir::new("tg-ring");
    let img = disk(&dir);
    let disk_arg = format!("path={}", img.display());
    let run = run_testguest(
        "testguest.run=ring testguest.ring_ms=100",
        &["--disk", &disk_arg],
        90,
    );
    run.assert_passed("ring");
    let get = |sub: &str, key: &str| {
        run.num("ring", sub, key)
            .unwrap_or_else(|| panic!("no {sub} {key}\n{}", run.dump()))
    };
    let (loop3, loop0) = (
        get("loop", "ring3_centicycles_per_iter"),
        get("loop", "ring0_centicycles_per_iter"),
    );
    let (qd32_3, qd32_0) = (get("blk_qd32", "ring3_iops"), get("blk_qd32", "ring0_iops"));
    let (qd1_3, qd1_0) = (get("blk_qd1", "ring3_iops"), get("blk_qd1", "ring0_iops"));
    eprintln!(
        "loop: ring 3 {:.2} cycles/iter, ring 0 {:.2}; blk qd1: ring 3 {qd1_3} IOPS, ring 0 {qd1_0}; \
         blk qd32: ring 3 {qd32_3} IOPS, ring 0 {qd32_0}",
        loop3 as f64 / 100.0,
        loop0 as f64 / 100.0
    );
    assert!(
        qd32_3 > 0 && qd32_0 > 0 && qd1_3 > 0 && qd1_0 > 0,
        "{}",
        run.dump()
    );
    if hypervisor::kvm::is_pvm() {
        assert!(
            loop0 > 100 * loop3,
            "ring 0 is not emulated? {}",
            run.dump()
        );
        assert!(
            qd32_3 > 2 * qd32_0,
            "ring 3 should beat emulated ring 0: {}",
            run.dump()
        );
    }
}
