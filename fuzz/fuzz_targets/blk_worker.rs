//! virtio-blk end to end: every chain a hostile driver put in the ring (the layout of
//! `ring.rs`) goes through the queue worker, is run by a real I/O engine (synchronous or
//! io_uring) against a 64 KiB disk in a memfd, and is answered. What must hold besides no
//! panic and no sanitizer report: the disk never grows (nothing is written past its end), a
//! read-only disk is never changed, the engine finishes every request it was given, and
//! every chain the worker took is returned to the used ring exactly once.
//!
//! The ring's free byte picks a read-only disk (bit 0) and the io_uring engine (bit 1).
#![no_main]

#[path = "ring.rs"]
mod ring;

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, OnceLock};

use devices::virtio::block::engine::EngineKind;
use devices::virtio::block::fuzzing::Harness;
use libfuzzer_sys::fuzz_target;

const DISK: usize = 64 << 10;

fn disk() -> File {
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    let pattern: Vec<u8> = (0..DISK).map(|i| (i / 512) as u8 ^ i as u8).collect();
    file.write_all_at(&pattern, 0).expect("fill the disk");
    file
}

/// io_uring where the kernel offers it with restrictions; said once where it does not (the
/// synchronous engine then runs those inputs too).
fn uring() -> EngineKind {
    static KIND: OnceLock<EngineKind> = OnceLock::new();
    *KIND.get_or_init(|| {
        let kind = EngineKind::detect();
        if kind != EngineKind::IoUring {
            eprintln!("blk_worker: no io_uring here; the synchronous engine runs every input");
        }
        kind
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((mem, queue, choice)) = ring::build(data) else {
        return;
    };
    let readonly = choice & 1 != 0;
    let kind = if choice & 2 != 0 {
        uring()
    } else {
        EngineKind::Sync
    };
    let file = Arc::new(disk());
    let mut before = vec![0u8; DISK];
    file.read_exact_at(&mut before, 0).expect("read the disk");
    let mut harness = Harness::new(Arc::new(mem), queue, file.clone(), readonly, kind)
        .expect("setting up the worker");
    harness.serve().expect("the engine finished every request");

    let len = file.metadata().expect("disk metadata").len();
    assert_eq!(len, DISK as u64, "the disk changed size");
    if readonly {
        let mut after = vec![0u8; DISK];
        file.read_exact_at(&mut after, 0).expect("read the disk");
        assert!(before == after, "a read-only disk was written");
    }
    if !harness.is_broken() {
        assert_eq!(
            harness.next_used(),
            harness.next_avail(),
            "chains taken and chains answered differ"
        );
    }
});
