//! virtio-blk driven exactly as a driver would: descriptor chains written into guest memory
//! (laid out by the shared test driver, `virtio::testing`), the avail index bumped, the worker
//! run, then the used ring, the status bytes and the host file checked. Every I/O test runs
//! on both engines (io_uring, where the kernel allows it, and the synchronous one).
//!
//! The hostile-guest tests (`hostile_*`) feed what a broken or malicious driver could: loops,
//! buffers outside guest memory, wrong directions and lengths, lying headers, malformed
//! indirect tables, avail indexes that jump. Each must end in an error status (or none, when
//! there is nowhere trustworthy to write one) or NEEDS_RESET, be counted, and leave the
//! other queues working.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::engine::{Engine, EngineKind, SyncEngine, UringEngine};
use super::request::{
    ID_BYTES, S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES,
};
use super::{Block, BlockConfig, BlockCounters, OpenDisk, Worker};
use crate::virtio::testing::{
    write_desc, DriverQueue, F_INDIRECT, F_NEXT, F_WRITE, USED_F_NO_NOTIFY,
};
use crate::virtio::{Interrupt, VirtioDevice, INT_USED_RING};

const MEM_SIZE: usize = 16 << 20;
const QSIZE: u16 = 16;
/// Scratch areas in guest memory (the queue itself sits at 0x1000).
const HDR: u64 = 0x10_000; // 16-byte headers, 0x100 apart
const STATUS: u64 = 0x20_000; // status bytes, 0x10 apart
const DATA: u64 = 0x100_000; // data buffers
const DISK_SECTORS: u64 = 2048; // 1 MiB

static UNIQUE: AtomicU32 = AtomicU32::new(0);

/// A disk image in the temp directory, removed on drop.
struct TestFile(PathBuf);

impl TestFile {
    fn new(len: usize, fill: impl Fn(usize) -> u8) -> Self {
        let path = std::env::temp_dir().join(format!(
            "podvmm-blk-{}-{}.img",
            std::process::id(),
            UNIQUE.fetch_add(1, Ordering::Relaxed)
        ));
        let bytes: Vec<u8> = (0..len).map(fill).collect();
        std::fs::write(&path, bytes).unwrap();
        TestFile(path)
    }

    fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }
}

impl Drop for TestFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn pattern(seed: u8) -> impl Fn(usize) -> u8 {
    move |i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i >> 9) as u8)
}

fn new_mem() -> Arc<GuestMemoryMmap> {
    Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap())
}

fn engines() -> Vec<EngineKind> {
    match EngineKind::detect() {
        EngineKind::IoUring => vec![EngineKind::IoUring, EngineKind::Sync],
        // io_uring is the engine podvmm uses wherever it can: a host without it would leave
        // it untested, so that is a failure unless asked for by name.
        EngineKind::Sync if std::env::var_os("PODVMM_TEST_SYNC_ENGINE_ONLY").is_some() => {
            vec![EngineKind::Sync]
        }
        EngineKind::Sync => panic!(
            "io_uring is not available to this process (kernel, seccomp or \
             /proc/sys/kernel/io_uring_disabled), so the default engine cannot be tested; set \
             PODVMM_TEST_SYNC_ENGINE_ONLY=1 to test the synchronous engine alone"
        ),
    }
}

/// The virtio_blk driver on one queue: the shared driver queue, plus where its requests'
/// headers, status bytes and data go.
struct Driver<'a> {
    q: DriverQueue<&'a GuestMemoryMmap>,
    mem: &'a GuestMemoryMmap,
    /// Where this driver's headers/status bytes/data go (distinct per queue).
    area: u64,
    requests: u64,
}

impl<'a> std::ops::Deref for Driver<'a> {
    type Target = DriverQueue<&'a GuestMemoryMmap>;
    fn deref(&self) -> &Self::Target {
        &self.q
    }
}

impl std::ops::DerefMut for Driver<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.q
    }
}

impl<'a> Driver<'a> {
    fn new(mem: &'a GuestMemoryMmap, queue_addr: u64, area: u64) -> Self {
        Driver {
            q: DriverQueue::new(mem, queue_addr, QSIZE),
            mem,
            area,
            requests: 0,
        }
    }

    /// A header address, status address (preset to 0xff) and data area (128 KiB), reused
    /// after 32 requests.
    fn slot(&mut self) -> (u64, u64, u64) {
        let n = self.requests % 32;
        self.requests += 1;
        let status = self.area + STATUS + 0x10 * n;
        self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        (
            self.area + HDR + 0x100 * n,
            status,
            self.area + DATA + 0x2_0000 * n,
        )
    }

    fn header(&self, at: u64, t: u32, sector: u64) {
        self.mem.write_obj(t, GuestAddress(at)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    /// A request laid out as Linux does: header, data buffers, status byte.
    /// Returns (head, status address, data address).
    fn request(&mut self, t: u32, sector: u64, data_lens: &[u32]) -> (u16, u64, u64) {
        let (hdr, status, data) = self.slot();
        self.header(hdr, t, sector);
        let device_writes = t == T_IN || t == T_GET_ID;
        let mut descs = vec![(hdr, 16, false)];
        let mut at = data;
        for &len in data_lens {
            descs.push((at, len, device_writes));
            at += u64::from(len);
        }
        descs.push((status, 1, true));
        let head = self.chain(&descs);
        self.submit(head);
        (head, status, data)
    }

    fn status(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }
}

struct Rig {
    worker: Worker,
    interrupt: Arc<Interrupt>,
    irq: EventFd,
    counters: Arc<BlockCounters>,
}

fn rig_with(
    mem: &Arc<GuestMemoryMmap>,
    queue: Queue,
    block: &Block,
    kind: EngineKind,
    interrupt: Option<(Arc<Interrupt>, EventFd)>,
) -> Rig {
    let (interrupt, irq) = interrupt.unwrap_or_else(|| {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        (Arc::new(Interrupt::new(irq.try_clone().unwrap())), irq)
    });
    let engine: Box<dyn Engine> = match kind {
        EngineKind::IoUring => {
            Box::new(UringEngine::new(block.file.clone(), queue.size()).unwrap())
        }
        EngineKind::Sync => Box::new(SyncEngine::new(block.file.clone())),
    };
    let counters = block.counters();
    let worker = Worker::new(
        queue,
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
        mem.clone(),
        interrupt.clone(),
        engine,
        OpenDisk {
            capacity: block.capacity,
            readonly: block.cfg.readonly,
            id: block.cfg.id.clone(),
            file: block.file.clone(),
        },
        counters.clone(),
        // The rig drives the worker pass by pass, as the notifications would.
        Duration::ZERO,
    );
    Rig {
        worker,
        interrupt,
        irq,
        counters,
    }
}

fn block(path: &Path, readonly: bool, kind: EngineKind) -> Block {
    Block::new(BlockConfig {
        path: path.to_owned(),
        readonly,
        direct: false,
        num_queues: validated::DiskQueues::new(1).unwrap(),
        queue_size: validated::QueueSize::new(QSIZE.into()).unwrap(),
        id: "test-disk-id".into(),
        engine: Some(kind),
    })
    .unwrap()
}

impl Rig {
    /// What the worker does on a notification, then waits (on the engine's completion fd,
    /// for io_uring) until every submitted request is back in the used ring.
    fn run(&mut self) {
        self.worker.process_queue();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.worker.engine.in_flight() > 0 {
            assert!(Instant::now() < deadline, "requests never completed");
            if let Some(fd) = self.worker.engine.completion_fd() {
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, 1000) };
            }
            self.worker.complete();
        }
    }

    fn invalid(&self) -> u64 {
        self.counters.invalid_requests.load(Ordering::Relaxed)
    }
}

/// Reads `len` bytes of the host file at `offset`.
fn host_read(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

fn guest_read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

#[test]
fn reads_and_writes_match_the_host_file() {
    for kind in engines() {
        let disk = TestFile::new(1 << 20, pattern(7));
        let blk = block(&disk.0, false, kind);
        assert_eq!(blk.capacity(), DISK_SECTORS);
        let mem = new_mem();
        let mut d = Driver::new(&mem, 0x1000, 0);
        let mut rig = rig_with(&mem, d.queue(), &blk, kind, None);

        // IN: 4 KiB from sector 8 into two buffers (1 KiB + 3 KiB).
        let (h_in, st_in, data_in) = d.request(T_IN, 8, &[1024, 3072]);
        // OUT: 6 KiB of a new pattern to sector 100, as three buffers.
        let out: Vec<u8> = (0..6144).map(pattern(99)).collect();
        let (h_out, st_out, data_out) = {
            let (hdr, status, data) = d.slot();
            d.header(hdr, T_OUT, 100);
            mem.write_slice(&out, GuestAddress(data)).unwrap();
            let head = d.chain(&[
                (hdr, 16, false),
                (data, 512, false),
                (data + 512, 4096, false),
                (data + 4608, 1536, false),
                (status, 1, true),
            ]);
            d.submit(head);
            (head, status, data)
        };
        rig.run();

        let mut used = d.take_used();
        used.sort();
        let mut want = vec![(u32::from(h_in), 4096 + 1), (u32::from(h_out), 1)];
        want.sort();
        assert_eq!(used, want, "{kind:?}");
        assert_eq!(d.status(st_in), S_OK);
        assert_eq!(d.status(st_out), S_OK);
        assert_eq!(
            guest_read(&mem, data_in, 4096),
            host_read(&disk.0, 8 * 512, 4096),
            "{kind:?}: guest read differs from the host file"
        );
        assert_eq!(guest_read(&mem, data_out, 6144), out);
        assert_eq!(host_read(&disk.0, 100 * 512, 6144), out, "{kind:?}");
        // Nothing else changed.
        let all = disk.contents();
        let orig: Vec<u8> = (0..1 << 20).map(pattern(7)).collect();
        assert_eq!(all[..100 * 512], orig[..100 * 512]);
        assert_eq!(all[100 * 512 + 6144..], orig[100 * 512 + 6144..]);

        // And back: the host changes the file, the guest reads the change.
        let host_bytes: Vec<u8> = (0..512).map(pattern(3)).collect();
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&disk.0)
                .unwrap();
            f.write_all_at(&host_bytes, 2047 * 512).unwrap();
        }
        let (_, st, data) = d.request(T_IN, 2047, &[512]);
        rig.run();
        assert_eq!(d.take_used().len(), 1);
        assert_eq!(d.status(st), S_OK);
        assert_eq!(guest_read(&mem, data, 512), host_bytes, "{kind:?}");

        let c = &rig.counters;
        assert_eq!(c.reads.load(Ordering::Relaxed), 2);
        assert_eq!(c.writes.load(Ordering::Relaxed), 1);
        assert_eq!(c.read_bytes.load(Ordering::Relaxed), 4096 + 512);
        assert_eq!(c.write_bytes.load(Ordering::Relaxed), 6144);
        assert_eq!(rig.invalid(), 0);
        assert_eq!(c.io_errors.load(Ordering::Relaxed), 0);
        // Without event index every completion batch interrupts.
        assert_ne!(rig.interrupt.status() & INT_USED_RING, 0);
        assert!(rig.irq.read().unwrap() >= 1);
    }
}

#[test]
fn any_framing_is_accepted() {
    // Header, data and status in fewer or more descriptors than Linux uses (2.7.4).
    for kind in engines() {
        let disk = TestFile::new(1 << 20, pattern(1));
        let blk = block(&disk.0, false, kind);
        let mem = new_mem();
        let mut d = Driver::new(&mem, 0x1000, 0);
        let mut rig = rig_with(&mem, d.queue(), &blk, kind, None);

        // OUT: header and the first 512 bytes of data in one descriptor; header split 10+6.
        let (hdr, status, _) = d.slot();
        let buf = hdr + 0x1000; // header followed by data, contiguous
        let payload: Vec<u8> = (0..1024).map(pattern(5)).collect();
        d.header(buf, T_OUT, 4);
        mem.write_slice(&payload, GuestAddress(buf + 16)).unwrap();
        let head = d.chain(&[
            (buf, 10, false),
            (buf + 10, 6 + 512, false),
            (buf + 16 + 512, 512, false),
            (status, 1, true),
        ]);
        d.submit(head);
        rig.run();
        assert_eq!(d.take_used(), vec![(u32::from(head), 1)]);
        assert_eq!(d.status(status), S_OK);
        assert_eq!(host_read(&disk.0, 4 * 512, 1024), payload);

        // IN: data and status in one device-writable descriptor (513 bytes).
        let (hdr, _, data) = d.slot();
        d.header(hdr, T_IN, 4);
        mem.write_obj(0xffu8, GuestAddress(data + 512)).unwrap();
        let head = d.chain(&[(hdr, 16, false), (data, 513, true)]);
        d.submit(head);
        rig.run();
        assert_eq!(d.take_used(), vec![(u32::from(head), 513)]);
        assert_eq!(d.status(data + 512), S_OK, "status is the last byte");
        assert_eq!(guest_read(&mem, data, 512), payload[..512]);
    }
}

#[test]
fn flush_syncs_before_the_used_entry_appears() {
    for kind in engines() {
        let disk = TestFile::new(1 << 20, pattern(2));
        let blk = block(&disk.0, false, kind);
        let mem = new_mem();
        let mut d = Driver::new(&mem, 0x1000, 0);
        let mut rig = rig_with(&mem, d.queue(), &blk, kind, None);

        let (_, st, data) = d.request(T_OUT, 0, &[4096]);
        mem.write_slice(&[0xab; 4096], GuestAddress(data)).unwrap();
        rig.run();
        assert_eq!(d.status(st), S_OK);
        assert_eq!(rig.counters.syncs.load(Ordering::Acquire), 0);

        // Nothing in the used ring yet: no sync either.
        let (head, st, _) = d.request(T_FLUSH, 0, &[]);
        assert_eq!(d.used_idx(), 1);
        rig.worker.process_queue();
        // Poll the used ring as a driver does; whenever the FLUSH shows up there, the
        // fdatasync must already have returned.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let idx = d.used_idx();
            let synced = rig.counters.syncs.load(Ordering::Acquire);
            if idx == 2 {
                assert_eq!(synced, 1, "{kind:?}: FLUSH acknowledged before fdatasync");
                break;
            }
            assert!(Instant::now() < deadline);
            rig.worker.complete();
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(d.take_used().last(), Some(&(u32::from(head), 1)));
        assert_eq!(d.status(st), S_OK);
        assert_eq!(rig.counters.flushes.load(Ordering::Relaxed), 1);
    }
}

#[test]
fn get_id_returns_the_disk_id() {
    for kind in engines() {
        let disk = TestFile::new(1 << 20, pattern(0));
        let blk = block(&disk.0, false, kind);
        let mem = new_mem();
        let mut d = Driver::new(&mem, 0x1000, 0);
        let mut rig = rig_with(&mem, d.queue(), &blk, kind, None);
        let mut want = [0u8; ID_BYTES as usize];
        want[..12].copy_from_slice(b"test-disk-id");

        let (head, st, data) = d.request(T_GET_ID, 0, &[ID_BYTES]);
        rig.run();
        assert_eq!(d.take_used(), vec![(u32::from(head), ID_BYTES + 1)]);
        assert_eq!(d.status(st), S_OK);
        assert_eq!(guest_read(&mem, data, 20), want);

        // Split over two buffers.
        let (_, st, data) = d.request(T_GET_ID, 0, &[7, 13]);
        rig.run();
        assert_eq!(d.take_used().len(), 1);
        assert_eq!(d.status(st), S_OK);
        assert_eq!(guest_read(&mem, data, 20), want);

        // Too small a buffer: an error, nothing written.
        let (_, st, data) = d.request(T_GET_ID, 0, &[8]);
        mem.write_slice(&[0u8; 8], GuestAddress(data)).unwrap();
        rig.run();
        assert_eq!(d.take_used().len(), 1);
        assert_eq!(d.status(st), S_IOERR);
        assert_eq!(guest_read(&mem, data, 8), [0u8; 8]);
    }
}

/// One discard/write-zeroes segment.
fn segment(mem: &GuestMemoryMmap, at: u64, sector: u64, num: u32, flags: u32) {
    mem.write_obj(sector, GuestAddress(at)).unwrap();
    mem.write_obj(num, GuestAddress(at + 8)).unwrap();
    mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
}

#[test]
fn discard_and_write_zeroes() {
    for kind in engines() {
        let disk = TestFile::new(1 << 20, pattern(4));
        let orig = disk.contents();
        let blk = block(&disk.0, false, kind);
        let mem = new_mem();
        let mut d = Driver::new(&mem, 0x1000, 0);
        let mut rig = rig_with(&mem, d.queue(), &blk, kind, None);

        let (_, st_wz, data) = d.request(T_WRITE_ZEROES, 0, &[16]);
        segment(&mem, data, 16, 8, 0);
        let (_, st_wz_unmap, data) = d.request(T_WRITE_ZEROES, 0, &[16]);
        segment(&mem, data, 40, 8, 1);
        let (_, st_dis, data) = d.request(T_DISCARD, 0, &[16]);
        segment(&mem, data, 1024, 16, 0);
        rig.run();
        assert_eq!(d.take_used().len(), 3);
        // Unknown flags: unsupported. Past the end: an error.
        let (_, st_flags, data) = d.request(T_DISCARD, 0, &[16]);
        segment(&mem, data, 0, 8, 2);
        let (_, st_range, data) = d.request(T_WRITE_ZEROES, 0, &[16]);
        segment(&mem, data, DISK_SECTORS - 4, 8, 0);
        let (_, st_short, _) = d.request(T_DISCARD, 0, &[8]);
        rig.run();
        assert_eq!(d.take_used().len(), 3);
        assert_eq!(d.status(st_wz), S_OK);
        assert_eq!(d.status(st_wz_unmap), S_OK);
        assert_eq!(d.status(st_dis), S_OK);
        assert_eq!(d.status(st_flags), S_UNSUPP);
        assert_eq!(d.status(st_range), S_IOERR);
        assert_eq!(d.status(st_short), S_IOERR);

        let now = disk.contents();
        let zeroed = |s: usize, n: usize| s * 512..(s + n) * 512;
        for range in [zeroed(16, 8), zeroed(40, 8), zeroed(1024, 16)] {
            assert!(
                now[range.clone()].iter().all(|&b| b == 0),
                "{kind:?} {range:?}"
            );
        }
        let mut expect = orig.clone();
        for range in [zeroed(16, 8), zeroed(40, 8), zeroed(1024, 16)] {
            expect[range].fill(0);
        }
        assert!(now == expect, "{kind:?}: bytes outside the ranges changed");
        assert_eq!(rig.invalid(), 3);
    }
}

#[test]
fn readonly_disk_refuses_writes_and_never_changes_the_file() {
    for kind in engines() {
        let disk = TestFile::new(1 << 20, pattern(9));
        let before = disk.contents();
        // An old mtime, so any write would show.
        let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        File::options()
            .write(true)
            .open(&disk.0)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let blk = block(&disk.0, true, kind);
        assert_ne!(blk.features() & super::F_RO, 0);
        assert_eq!(
            blk.features() & (super::F_DISCARD | super::F_WRITE_ZEROES),
            0
        );
        let mem = new_mem();
        let mut d = Driver::new(&mem, 0x1000, 0);
        let mut rig = rig_with(&mem, d.queue(), &blk, kind, None);

        let (_, st_out, data) = d.request(T_OUT, 0, &[4096]);
        mem.write_slice(&[0x55; 4096], GuestAddress(data)).unwrap();
        let (_, st_dis, data) = d.request(T_DISCARD, 0, &[16]);
        segment(&mem, data, 0, 8, 0);
        let (_, st_wz, data) = d.request(T_WRITE_ZEROES, 0, &[16]);
        segment(&mem, data, 0, 8, 0);
        let (_, st_flush, _) = d.request(T_FLUSH, 0, &[]);
        let (_, st_in, data_in) = d.request(T_IN, 0, &[512]);
        rig.run();
        assert_eq!(d.take_used().len(), 5);
        assert_eq!(d.status(st_out), S_IOERR, "{kind:?}");
        assert_eq!(d.status(st_dis), S_IOERR);
        assert_eq!(d.status(st_wz), S_IOERR);
        assert_eq!(d.status(st_flush), S_OK);
        assert_eq!(d.status(st_in), S_OK);
        assert_eq!(guest_read(&mem, data_in, 512), before[..512]);
        drop(rig);
        drop(blk);
        assert!(
            disk.contents() == before,
            "{kind:?}: read-only disk changed"
        );
        let mtime = std::fs::metadata(&disk.0).unwrap().modified().unwrap();
        assert_eq!(mtime, old, "{kind:?}: read-only disk's mtime changed");
    }
}

#[test]
fn queues_have_their_own_rings() {
    for kind in engines() {
        let disk = TestFile::new(1 << 20, pattern(6));
        let blk = block(&disk.0, false, kind);
        let mem = new_mem();
        let mut d0 = Driver::new(&mem, 0x1000, 0);
        let mut d1 = Driver::new(&mem, 0x3000, 0x80_0000);
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let shared = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
        let mut q0 = rig_with(
            &mem,
            d0.queue(),
            &blk,
            kind,
            Some((shared.clone(), irq.try_clone().unwrap())),
        );
        let mut q1 = rig_with(&mem, d1.queue(), &blk, kind, Some((shared, irq)));

        // Each queue writes its own sectors, then reads the other's.
        let (_, s0, b0) = d0.request(T_OUT, 10, &[1024]);
        mem.write_slice(&[0x10; 1024], GuestAddress(b0)).unwrap();
        let (_, s1, b1) = d1.request(T_OUT, 20, &[1024]);
        mem.write_slice(&[0x11; 1024], GuestAddress(b1)).unwrap();
        q0.run();
        assert_eq!(d0.take_used().len(), 1);
        assert_eq!(
            d1.used_idx(),
            0,
            "queue 1's ring was touched by queue 0's worker"
        );
        q1.run();
        assert_eq!(d1.take_used().len(), 1);
        assert_eq!((d0.status(s0), d1.status(s1)), (S_OK, S_OK));
        let (_, s0, r0) = d0.request(T_IN, 20, &[1024]);
        let (_, s1, r1) = d1.request(T_IN, 10, &[1024]);
        q1.run();
        q0.run();
        assert_eq!((d0.take_used().len(), d1.take_used().len()), (1, 1));
        assert_eq!((d0.status(s0), d1.status(s1)), (S_OK, S_OK));
        assert_eq!(guest_read(&mem, r0, 1024), [0x11; 1024]);
        assert_eq!(guest_read(&mem, r1, 1024), [0x10; 1024]);
    }
}

#[test]
fn event_index_suppresses_interrupts_the_driver_does_not_want() {
    for kind in engines() {
        let disk = TestFile::new(1 << 20, pattern(0));
        let blk = block(&disk.0, false, kind);
        let mem = new_mem();
        let mut d = Driver::new(&mem, 0x1000, 0);
        let mut q = d.queue();
        q.set_event_idx(true);
        let mut rig = rig_with(&mem, q, &blk, kind, None);

        // The driver wants an interrupt only after the 4th completion (used_event = 3).
        d.set_used_event(3);
        for i in 0..3 {
            d.request(T_IN, i, &[512]);
        }
        rig.run();
        assert_eq!(d.take_used().len(), 3);
        assert_eq!(
            rig.counters.interrupts.load(Ordering::Relaxed),
            0,
            "{kind:?}"
        );
        assert!(
            rig.irq.read().is_err(),
            "interrupt raised against used_event"
        );
        d.request(T_IN, 3, &[512]);
        rig.run();
        assert_eq!(d.take_used().len(), 1);
        assert_eq!(
            rig.counters.interrupts.load(Ordering::Relaxed),
            1,
            "{kind:?}"
        );
        assert_eq!(rig.irq.read().unwrap(), 1);
        // The device asks to be notified from its next avail entry on (avail_event).
        assert_eq!(d.avail_event(), 4);
    }
}

// ---- hostile guest ----------------------------------------------------------------------

/// One malformed request and what must come of it.
struct Case {
    name: &'static str,
    /// Builds the chain (already published) and returns its status address, if any.
    build: fn(&mut Driver, &GuestMemoryMmap) -> Option<u64>,
    /// Expected status byte (None: the status byte must be left as the driver set it).
    status: Option<u8>,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "chain loops back to its head",
            build: |d, _| {
                let (hdr, status, data) = d.slot();
                d.header(hdr, T_IN, 0);
                d.set_desc(0, hdr, 16, F_NEXT, 1);
                d.set_desc(1, data, 512, F_NEXT | F_WRITE, 2);
                d.set_desc(2, status, 1, F_NEXT | F_WRITE, 0);
                d.submit(0);
                None
            },
            status: None,
        },
        Case {
            name: "chain loops on its data descriptors (all writable, would look valid)",
            build: |d, _| {
                let (hdr, status, data) = d.slot();
                d.header(hdr, T_IN, 0);
                d.set_desc(0, hdr, 16, F_NEXT, 1);
                d.set_desc(1, data, 512, F_NEXT | F_WRITE, 2);
                d.set_desc(2, status, 1, F_NEXT | F_WRITE, 1);
                d.submit(0);
                None
            },
            status: None,
        },
        Case {
            name: "next index outside the descriptor table",
            build: |d, _| {
                let (hdr, status, _) = d.slot();
                d.header(hdr, T_FLUSH, 0);
                d.set_desc(0, hdr, 16, F_NEXT, 200);
                d.set_desc(1, status, 1, F_WRITE, 0);
                d.submit(0);
                None
            },
            status: None,
        },
        Case {
            name: "data buffer outside guest memory",
            build: |d, _| {
                let (hdr, status, _) = d.slot();
                d.header(hdr, T_IN, 0);
                let head = d.chain(&[(hdr, 16, false), (1 << 40, 512, true), (status, 1, true)]);
                d.submit(head);
                Some(status)
            },
            status: Some(S_IOERR),
        },
        Case {
            name: "data buffer running past the end of guest memory",
            build: |d, _| {
                let (hdr, status, _) = d.slot();
                d.header(hdr, T_OUT, 0);
                let head = d.chain(&[
                    (hdr, 16, false),
                    (MEM_SIZE as u64 - 512, 1024, false),
                    (status, 1, true),
                ]);
                d.submit(head);
                Some(status)
            },
            status: Some(S_IOERR),
        },
        Case {
            name: "data address that wraps around 2^64",
            build: |d, _| {
                let (hdr, status, _) = d.slot();
                d.header(hdr, T_IN, 0);
                let head = d.chain(&[
                    (hdr, 16, false),
                    (u64::MAX - 255, 512, true),
                    (status, 1, true),
                ]);
                d.submit(head);
                Some(status)
            },
            status: Some(S_IOERR),
        },
        Case {
            name: "header outside guest memory",
            build: |d, _| {
                let (_, status, data) = d.slot();
                let head = d.chain(&[(1 << 40, 16, false), (data, 512, true), (status, 1, true)]);
                d.submit(head);
                Some(status)
            },
            status: Some(S_IOERR),
        },
        Case {
            name: "status byte outside guest memory",
            build: |d, _| {
                let (hdr, _, data) = d.slot();
                d.header(hdr, T_IN, 0);
                let head = d.chain(&[(hdr, 16, false), (data, 512, true), (1 << 40, 1, true)]);
                d.submit(head);
                None
            },
            status: None,
        },
        Case {
            name: "IN with a device-readable data buffer",
            build: |d, _| {
                let (hdr, status, data) = d.slot();
                d.header(hdr, T_IN, 0);
                let head = d.chain(&[(hdr, 16, false), (data, 512, false), (status, 1, true)]);
                d.submit(head);
                Some(status)
            },
            status: Some(S_IOERR),
        },
        Case {
            name: "OUT with a device-writable data buffer",
            build: |d, _| {
                let (hdr, status, data) = d.slot();
                d.header(hdr, T_OUT, 0);
                let head = d.chain(&[(hdr, 16, false), (data, 512, true), (status, 1, true)]);
                d.submit(head);
                Some(status)
            },
            status: Some(S_IOERR),
        },
        Case {
            name: "device-writable header",
            build: |d, _| {
                let (hdr, status, data) = d.slot();
                d.header(hdr, T_IN, 0);
                let head = d.chain(&[(hdr, 16, true), (data, 512, true), (status, 1, true)]);
                d.submit(head);
                Some(status)
            },
            status: Some(S_IOERR),
        },
        Case {
            name: "readable descriptor after a writable one",
            build: |d, _| {
                let (hdr, status, data) = d.slot();
                d.header(hdr, T_OUT, 0);
                let head = d.chain(&[
                    (hdr, 16, false),
                    (data, 512, true),
                    (data + 512, 512, false),
                    (status, 1, true),
                ]);
                d.submit(head);
                Some(status)
            },
            status: Some(S_IOERR),
        },
        Case {
            name: "header shorter than 16 bytes",
            build: |d, _| {
                let (hdr, status, data) = d.slot();
                d.header(hdr, T_IN, 0);
                let head = d.chain(&[(hdr, 8, false), (data, 512, true), (status, 1, true)]);
                d.submit(head);
                Some(status)
            },
            status: Some(S_IOERR),
        },
        Case {
            name: "header alone (no status descriptor)",
            build: |d, _| {
                let (hdr, _, _) = d.slot();
                d.header(hdr, T_FLUSH, 0);
                let head = d.chain(&[(hdr, 16, false)]);
                d.submit(head);
                None
            },
            status: None,
        },
        Case {
            name: "status descriptor of length 0",
            build: |d, _| {
                let (hdr, status, data) = d.slot();
                d.header(hdr, T_IN, 0);
                let head = d.chain(&[(hdr, 16, false), (data, 512, true), (status, 0, true)]);
                d.submit(head);
                None
            },
            status: None,
        },
        Case {
            name: "read-only status descriptor",
            build: |d, _| {
                let (hdr, status, _) = d.slot();
                d.header(hdr, T_FLUSH, 0);
                let head = d.chain(&[(hdr, 16, false), (status, 1, false)]);
                d.submit(head);
                None
            },
            status: None,
        },
        Case {
            name: "data length not a multiple of 512",
            build: |d, _| {
                let (hdr, status, data) = d.slot();
                d.header(hdr, T_IN, 0);
                let head = d.chain(&[(hdr, 16, false), (data, 511, true), (status, 1, true)]);
                d.submit(head);
                Some(status)
            },
            status: Some(S_IOERR),
        },
        Case {
            name: "sector at the capacity",
            build: |d, _| d.request(T_IN, DISK_SECTORS, &[512]).1.into(),
            status: Some(S_IOERR),
        },
        Case {
            name: "request running past the capacity",
            build: |d, _| d.request(T_OUT, DISK_SECTORS - 1, &[1024]).1.into(),
            status: Some(S_IOERR),
        },
        Case {
            name: "sector + count overflowing u64",
            build: |d, _| d.request(T_OUT, u64::MAX, &[512]).1.into(),
            status: Some(S_IOERR),
        },
        Case {
            name: "sector whose byte offset overflows",
            build: |d, _| d.request(T_IN, u64::MAX >> 8, &[512]).1.into(),
            status: Some(S_IOERR),
        },
        Case {
            name: "huge data length",
            build: |d, _| {
                let (hdr, status, data) = d.slot();
                d.header(hdr, T_IN, 0);
                // As large as a chain may be (4 GiB - 1 in all), far beyond guest memory.
                let len = u32::MAX - 16 - 1;
                let head = d.chain(&[(hdr, 16, false), (data, len, true), (status, 1, true)]);
                d.submit(head);
                Some(status)
            },
            status: Some(S_IOERR),
        },
        Case {
            name: "chain longer than 4 GiB in total",
            build: |d, _| {
                let (hdr, status, data) = d.slot();
                d.header(hdr, T_IN, 0);
                let head = d.chain(&[
                    (hdr, 16, false),
                    (data, 0x8000_0000, true),
                    (data, 0x8000_0000, true),
                    (status, 1, true),
                ]);
                d.submit(head);
                None
            },
            status: None,
        },
        Case {
            name: "unknown request type",
            build: |d, _| d.request(0x7777, 0, &[]).1.into(),
            status: Some(S_UNSUPP),
        },
        Case {
            name: "indirect table of length 0",
            build: |d, _| indirect(d, 0, |_, _| {}),
            status: None,
        },
        Case {
            name: "indirect table length not a multiple of 16",
            build: |d, _| indirect(d, 17, |_, _| {}),
            status: None,
        },
        Case {
            name: "indirect table outside guest memory",
            build: |d, _| {
                d.set_desc(0, 1 << 40, 48, F_INDIRECT, 0);
                d.submit(0);
                None
            },
            status: None,
        },
        Case {
            name: "indirect table inside an indirect table",
            build: |d, _| {
                indirect(d, 32, |d, table| {
                    let (hdr, _, _) = d.slot();
                    d.header(hdr, T_FLUSH, 0);
                    put(d, table, 0, hdr, 16, F_NEXT, 1);
                    put(d, table, 1, table, 32, F_INDIRECT, 0);
                })
            },
            status: None,
        },
        Case {
            name: "indirect entry whose next leaves the table",
            build: |d, _| {
                indirect(d, 32, |d, table| {
                    let (hdr, _, _) = d.slot();
                    d.header(hdr, T_FLUSH, 0);
                    put(d, table, 0, hdr, 16, F_NEXT, 9);
                })
            },
            status: None,
        },
        Case {
            name: "indirect chain that loops",
            build: |d, _| {
                indirect(d, 48, |d, table| {
                    let (hdr, status, _) = d.slot();
                    d.header(hdr, T_FLUSH, 0);
                    put(d, table, 0, hdr, 16, F_NEXT, 1);
                    put(d, table, 1, status, 1, F_NEXT | F_WRITE, 0);
                })
            },
            status: None,
        },
    ]
}

/// A head descriptor (index 0) pointing at an indirect table of `len` bytes that `fill`
/// writes.
fn indirect(d: &mut Driver, len: u32, fill: impl Fn(&mut Driver, u64)) -> Option<u64> {
    let table = d.area + 0x80_000 + 0x1000 * d.requests;
    fill(d, table);
    d.set_desc(0, table, len, F_INDIRECT, 0);
    d.submit(0);
    None
}

fn put(d: &Driver, table: u64, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
    write_desc(d.mem, table + 16 * i, addr, len, flags, next);
}

#[test]
fn hostile_chains_fail_alone_and_are_counted() {
    for kind in engines() {
        let disk = TestFile::new(1 << 20, pattern(8));
        let before = disk.contents();
        let blk = block(&disk.0, false, kind);
        let mem = new_mem();
        for case in cases() {
            let mut d = Driver::new(&mem, 0x1000, 0);
            // A fresh queue per case (the chains reuse descriptor 0).
            mem.write_slice(&[0u8; 0x1000], GuestAddress(0x1000))
                .unwrap();
            let mut rig = rig_with(&mem, d.queue(), &blk, kind, None);
            let status = (case.build)(&mut d, &mem);
            rig.run();
            let used = d.take_used();
            assert_eq!(
                used.len(),
                1,
                "{kind:?} {}: not returned to the driver",
                case.name
            );
            assert_eq!(rig.invalid(), 1, "{kind:?} {}: not counted", case.name);
            assert!(
                !rig.interrupt.needs_reset(),
                "{}: one bad chain must not break the device",
                case.name
            );
            match (case.status, status) {
                (Some(want), Some(addr)) => {
                    assert_eq!(d.status(addr), want, "{kind:?} {}", case.name);
                    assert_eq!(
                        used[0].1, 1,
                        "{}: used length counts only the status",
                        case.name
                    );
                }
                (None, _) => assert_eq!(used[0].1, 0, "{}: nothing may be written", case.name),
                (Some(_), None) => unreachable!("case {} lacks its status address", case.name),
            }
            // The queue still serves a good request afterwards.
            let (_, st, data) = d.request(T_IN, 1, &[512]);
            rig.run();
            assert_eq!(d.take_used().len(), 1, "{}", case.name);
            assert_eq!(d.status(st), S_OK, "{kind:?} after {}", case.name);
            assert_eq!(guest_read(&mem, data, 512), before[512..1024]);
            assert_eq!(rig.invalid(), 1);
            rig.counters.invalid_requests.store(0, Ordering::Relaxed);
        }
        drop(blk);
        assert!(
            disk.contents() == before,
            "{kind:?}: a hostile request changed the disk"
        );
    }
}

#[test]
fn hostile_status_byte_untouched_when_there_is_none() {
    // A looping chain whose would-be status byte the device must not write.
    let disk = TestFile::new(1 << 20, pattern(8));
    let blk = block(&disk.0, false, EngineKind::Sync);
    let mem = new_mem();
    let mut d = Driver::new(&mem, 0x1000, 0);
    let mut rig = rig_with(&mem, d.queue(), &blk, EngineKind::Sync, None);
    let (hdr, status, data) = d.slot();
    mem.write_obj(0x5au8, GuestAddress(status)).unwrap();
    mem.write_slice(&[0x77; 512], GuestAddress(data)).unwrap();
    d.header(hdr, T_IN, 0);
    d.set_desc(0, hdr, 16, F_NEXT, 1);
    d.set_desc(1, data, 512, F_NEXT | F_WRITE, 2);
    d.set_desc(2, status, 1, F_NEXT | F_WRITE, 1);
    d.submit(0);
    rig.run();
    assert_eq!(d.take_used(), vec![(0, 0)]);
    assert_eq!(d.status(status), 0x5a);
    assert_eq!(
        guest_read(&mem, data, 512),
        [0x77; 512],
        "data read for a looping chain"
    );
    assert_eq!(rig.counters.reads.load(Ordering::Relaxed), 0);
}

#[test]
fn hostile_avail_index_jump_needs_reset_and_other_queues_keep_working() {
    for kind in engines() {
        let disk = TestFile::new(1 << 20, pattern(3));
        let blk = block(&disk.0, false, kind);
        let mem = new_mem();
        let mut d0 = Driver::new(&mem, 0x1000, 0);
        let mut d1 = Driver::new(&mem, 0x3000, 0x80_0000);
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let shared = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
        let mut q0 = rig_with(
            &mem,
            d0.queue(),
            &blk,
            kind,
            Some((shared.clone(), irq.try_clone().unwrap())),
        );
        let mut q1 = rig_with(&mem, d1.queue(), &blk, kind, Some((shared.clone(), irq)));

        // Queue 0: the avail index claims 17 new entries in a 16-entry ring.
        d0.set_avail_idx(QSIZE + 1);
        q0.run();
        assert!(
            shared.needs_reset(),
            "{kind:?}: corrupt avail ring not flagged"
        );
        assert_ne!(shared.status() & crate::virtio::INT_CONFIG, 0);
        assert_eq!(q0.invalid(), 1);
        assert_eq!(d0.used_idx(), 0);
        // Further notifications on the broken queue change nothing and count nothing more.
        q0.run();
        q0.run();
        assert_eq!(q0.invalid(), 1, "logged and counted once per breakage");

        // Queue 1 still serves a read.
        let (_, st, data) = d1.request(T_IN, 2, &[1024]);
        q1.run();
        assert_eq!(d1.take_used().len(), 1);
        assert_eq!(
            d1.status(st),
            S_OK,
            "{kind:?}: queue 1 stopped with queue 0"
        );
        assert_eq!(guest_read(&mem, data, 1024), host_read(&disk.0, 1024, 1024));
    }
}

#[test]
fn hostile_head_index_outside_the_table_needs_reset() {
    let disk = TestFile::new(1 << 20, pattern(3));
    let blk = block(&disk.0, false, EngineKind::Sync);
    let mem = new_mem();
    let mut d = Driver::new(&mem, 0x1000, 0);
    let mut rig = rig_with(&mem, d.queue(), &blk, EngineKind::Sync, None);
    d.submit(QSIZE + 3);
    rig.run();
    assert!(rig.interrupt.needs_reset());
    assert_eq!(d.used_idx(), 0);
    assert!(rig.invalid() >= 1);
}

#[test]
fn valid_indirect_chain_is_served() {
    for kind in engines() {
        let disk = TestFile::new(1 << 20, pattern(12));
        let blk = block(&disk.0, false, kind);
        let mem = new_mem();
        let mut d = Driver::new(&mem, 0x1000, 0);
        let mut rig = rig_with(&mem, d.queue(), &blk, kind, None);
        let (hdr, status, data) = d.slot();
        d.header(hdr, T_IN, 6);
        let table = 0x90_000;
        put(&d, table, 0, hdr, 16, F_NEXT, 1);
        put(&d, table, 1, data, 2048, F_NEXT | F_WRITE, 2);
        put(&d, table, 2, status, 1, F_WRITE, 0);
        d.set_desc(5, table, 48, F_INDIRECT, 0);
        d.submit(5);
        rig.run();
        assert_eq!(d.take_used(), vec![(5, 2049)]);
        assert_eq!(d.status(status), S_OK);
        assert_eq!(
            guest_read(&mem, data, 2048),
            host_read(&disk.0, 6 * 512, 2048)
        );
    }
}

/// Guest memory with inaccessible guard pages on both sides: if the device touched a byte
/// outside guest memory, the test would die with SIGSEGV.
struct GuardedMem {
    base: *mut libc::c_void,
    len: usize,
    mem: Arc<GuestMemoryMmap>,
}

impl GuardedMem {
    fn new(guest_len: usize) -> Self {
        let page = 4096;
        let len = guest_len + 2 * page;
        // SAFETY: a fresh anonymous mapping; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        // SAFETY: the middle of the mapping made above.
        let guest = unsafe { (base as *mut u8).add(page) };
        // SAFETY: `guest..guest+guest_len` lies inside our mapping.
        let rc = unsafe {
            libc::mprotect(
                guest as *mut libc::c_void,
                guest_len,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        assert_eq!(rc, 0);
        // SAFETY: the range is a valid read/write private anonymous mapping that outlives the
        // region (it is unmapped in drop, after `mem`'s last user is gone).
        let region = unsafe {
            MmapRegion::build_raw(
                guest,
                guest_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            )
        }
        .unwrap();
        let region = GuestRegionMmap::new(region, GuestAddress(0)).unwrap();
        let mem = Arc::new(GuestMemoryMmap::from_regions(vec![region]).unwrap());
        GuardedMem { base, len, mem }
    }
}

impl Drop for GuardedMem {
    fn drop(&mut self) {
        assert_eq!(Arc::strong_count(&self.mem), 1, "guest memory still in use");
        // SAFETY: our own mapping; no region refers to it any more once `mem` is the last
        // reference, which is dropped right after this (its region does not unmap).
        unsafe { libc::munmap(self.base, self.len) };
    }
}

#[test]
fn hostile_buffers_at_the_edge_of_guest_memory_never_reach_past_it() {
    for kind in engines() {
        let disk = TestFile::new(1 << 20, pattern(5));
        let blk = block(&disk.0, false, kind);
        let guarded = GuardedMem::new(MEM_SIZE);
        {
            let mem = &guarded.mem;
            let end = MEM_SIZE as u64;
            let mut d = Driver::new(mem, 0x1000, 0);
            let mut rig = rig_with(mem, d.queue(), &blk, kind, None);
            let edge_cases: [(u32, u64, u32, u64); 5] = [
                // (type, data address, length, status address)
                (T_IN, end - 512, 1024, STATUS), // data crosses the end
                (T_OUT, end - 256, 512, STATUS + 0x10), // data crosses the end
                (T_IN, end, 512, STATUS + 0x20), // data starts at the end
                (T_IN, DATA, 512, end),          // status just past the end
                (T_GET_ID, end - 8, 20, STATUS + 0x30), // id buffer crosses the end
            ];
            for (i, &(t, data, len, status)) in edge_cases.iter().enumerate() {
                let hdr = HDR + 0x100 * i as u64;
                d.header(hdr, t, 0);
                if status < end {
                    mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
                }
                let head = d.chain(&[
                    (hdr, 16, false),
                    (data, len, t == T_IN || t == T_GET_ID),
                    (status, 1, true),
                ]);
                d.submit(head);
            }
            rig.run();
            let used = d.take_used();
            assert_eq!(used.len(), 5);
            assert_eq!(used[3].1, 0, "status past the end of memory was 'written'");
            for s in [STATUS, STATUS + 0x10, STATUS + 0x20, STATUS + 0x30] {
                assert_eq!(d.status(s), S_IOERR, "{kind:?} {s:#x}");
            }
            // The header just below the end, the status in the last byte: a valid request.
            let (hdr, status) = (end - 32, end - 1);
            d.header(hdr, T_IN, 0);
            mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
            let data = end - 4096 - 512;
            let head = d.chain(&[(hdr, 16, false), (data, 512, true), (status, 1, true)]);
            d.submit(head);
            rig.run();
            assert_eq!(d.status(status), S_OK, "{kind:?} {:?}", rig.counters);
            assert_eq!(d.take_used(), vec![(u32::from(head), 513)]);
            assert_eq!(guest_read(mem, data, 512), host_read(&disk.0, 0, 512));
            assert_eq!(rig.invalid(), 5);
        }
    }
}

// ---- through the transport, with the real worker threads ---------------------------------

mod transport {
    use super::*;
    use crate::virtio::mmio::MmioTransport;
    use crate::virtio::testing;

    pub use crate::virtio::testing::{reg_read as r, reg_write as w};

    /// Brings the device up as Linux's virtio_mmio + virtio_blk drivers do, with one
    /// queue per driver in `drivers`, accepting everything offered but event index (so
    /// every completion interrupts).
    pub fn bring_up(t: &mut MmioTransport, drivers: &[&Driver]) {
        let queues: Vec<_> = drivers.iter().map(|d| &d.q).collect();
        testing::bring_up(t, !crate::virtio::VIRTIO_RING_F_EVENT_IDX, &queues);
    }

    pub fn transport(
        path: &Path,
        mem: &Arc<GuestMemoryMmap>,
        num_queues: u16,
        engine: Option<EngineKind>,
    ) -> (MmioTransport, EventFd, Arc<BlockCounters>) {
        let blk = Block::new(BlockConfig {
            path: path.to_owned(),
            readonly: false,
            direct: false,
            num_queues: validated::DiskQueues::new(num_queues.into()).unwrap(),
            queue_size: validated::QueueSize::new(QSIZE.into()).unwrap(),
            id: "t".into(),
            engine,
        })
        .unwrap();
        let counters = blk.counters();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(Box::new(blk), mem.clone(), irq.try_clone().unwrap()).unwrap();
        (t, irq, counters)
    }
}

#[test]
fn worker_threads_serve_notifications_and_stop_on_reset() {
    for kind in engines() {
        worker_threads(kind);
    }
}

fn worker_threads(kind: EngineKind) {
    let disk = TestFile::new(1 << 20, pattern(11));
    let mem = new_mem();
    let mut d0 = Driver::new(&mem, 0x1000, 0);
    let mut d1 = Driver::new(&mem, 0x3000, 0x80_0000);
    let (mut t, irq, counters) = transport::transport(&disk.0, &mem, 2, Some(kind));
    transport::bring_up(&mut t, &[&d0, &d1]);

    let (_, st0, b0) = d0.request(T_IN, 0, &[4096]);
    let (_, st1, b1) = d1.request(T_IN, 8, &[4096]);
    // The notify writes (an ioeventfd in a VM).
    t.queue_events()[0].write(1).unwrap();
    t.queue_events()[1].write(1).unwrap();
    d0.wait_used(&irq, 1);
    d1.wait_used(&irq, 1);
    assert_eq!((d0.status(st0), d1.status(st1)), (S_OK, S_OK));
    assert_eq!(guest_read(&mem, b0, 4096), host_read(&disk.0, 0, 4096));
    assert_eq!(guest_read(&mem, b1, 4096), host_read(&disk.0, 4096, 4096));
    assert_eq!(counters.reads.load(Ordering::Relaxed), 2);
    // The driver acknowledges the interrupt.
    assert_ne!(transport::r(&mut t, 0x60) & INT_USED_RING, 0);
    transport::w(&mut t, 0x64, INT_USED_RING);
    assert_eq!(transport::r(&mut t, 0x60), 0);

    // Reset: the workers stop; a request published now is not served.
    transport::w(&mut t, 0x70, 0);
    assert_eq!(t.counters().resets, 1);
    d0.request(T_IN, 0, &[512]);
    let _ = t.queue_events()[0].write(1);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(d0.take_used().len(), 0, "served after reset");
    assert_eq!(counters.reads.load(Ordering::Relaxed), 2);
}

/// A worker polls the avail ring after a pass, with the driver's notifications off: a
/// driver that notifies only when the device asks (VRING_USED_F_NO_NOTIFY clear) must still
/// get every request served, through bursts and idle gaps, and an idle worker must always end
/// up asking for notifications again (else the next request would wait forever).
#[test]
fn a_polling_worker_serves_requests_it_was_not_notified_of_and_listens_when_idle() {
    for kind in engines() {
        let disk = TestFile::new(1 << 20, pattern(5));
        let mem = new_mem();
        let mut d = Driver::new(&mem, 0x1000, 0);
        let (mut t, _irq, counters) = transport::transport(&disk.0, &mem, 1, Some(kind));
        transport::bring_up(&mut t, &[&d]);
        let (mut notifies, mut done, total) = (0u64, 0u64, 2000u64);
        let mut inflight = 0usize;
        let deadline = Instant::now() + Duration::from_secs(30);
        // Reaps until at most `most` requests are in flight.
        let mut reap_to = |d: &mut Driver, inflight: &mut usize, most: usize| {
            while *inflight > most {
                assert!(
                    Instant::now() < deadline,
                    "{kind:?}: requests never completed"
                );
                let n = d.take_used().len();
                *inflight -= n;
                done += n as u64;
            }
        };
        for i in 0..total {
            // Idle gaps: everything back, then nothing for a while.
            if i % 500 == 499 {
                reap_to(&mut d, &mut inflight, 0);
                // An idle worker listens again (within its poll window, or once scheduled).
                while d.used_flags() & USED_F_NO_NOTIFY != 0 {
                    assert!(Instant::now() < deadline, "{kind:?}: idle, and still deaf");
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
            reap_to(&mut d, &mut inflight, 3);
            let sector = (i * 8) % 2040;
            let (_, status, buf) = d.request(T_IN, sector, &[4096]);
            inflight += 1;
            if d.used_flags() & USED_F_NO_NOTIFY == 0 {
                notifies += 1;
                t.queue_events()[0].write(1).unwrap();
            }
            if i % 97 == 0 {
                // Check one request's data once it is back.
                while d.used_idx() != d.avail_idx() {
                    assert!(
                        Instant::now() < deadline,
                        "{kind:?}: request {i} never completed"
                    );
                }
                assert_eq!(d.status(status), S_OK);
                assert_eq!(
                    guest_read(&mem, buf, 4096),
                    host_read(&disk.0, sector * 512, 4096)
                );
            }
        }
        reap_to(&mut d, &mut inflight, 0);
        assert_eq!(done, total);
        assert_eq!(counters.reads.load(Ordering::Relaxed), total);
        assert_eq!(counters.invalid_requests.load(Ordering::Relaxed), 0);
        // How many notifies the worker's polling saved (timing-dependent: reported only).
        eprintln!("{kind:?}: {notifies} notifies for {total} requests");
        transport::w(&mut t, 0x70, 0);
    }
}

// ---- kill -9 after an acknowledged FLUSH ------------------------------------------------

const KILL9_ENV: &str = "PODVMM_BLK_KILL9_DISK";
const KILL9_FLUSHED: &str = "podvmm-kill9: flushed";

/// Bytes the child writes and flushes: 64 KiB from sector 64.
fn kill9_data() -> Vec<u8> {
    (0..64 << 10).map(pattern(0x42)).collect()
}

/// The child half of `kill9_after_an_acknowledged_flush_loses_nothing`: does nothing unless
/// that test started this executable with the disk path in the environment. Then it is the
/// "VMM": the real device, its worker thread and io_uring, driven through guest memory.
#[test]
fn kill9_child() {
    let Some(path) = std::env::var_os(KILL9_ENV) else {
        return;
    };
    let mem = new_mem();
    let mut d = Driver::new(&mem, 0x1000, 0);
    let (mut t, irq, counters) = transport::transport(Path::new(&path), &mem, 1, None);
    transport::bring_up(&mut t, &[&d]);
    let data = kill9_data();
    // 16 writes of 4 KiB, 4 in flight at a time (a 16-entry queue holds 5 such chains).
    for (batch, chunks) in data.chunks(4 * 4096).enumerate() {
        let mut statuses = Vec::new();
        for (i, chunk) in chunks.chunks(4096).enumerate() {
            let sector = 64 + 8 * (4 * batch + i) as u64;
            let (_, st, buf) = d.request(T_OUT, sector, &[4096]);
            mem.write_slice(chunk, GuestAddress(buf)).unwrap();
            statuses.push(st);
        }
        t.queue_events()[0].write(1).unwrap();
        d.wait_used(&irq, statuses.len());
        let got: Vec<u8> = statuses.iter().map(|&s| d.status(s)).collect();
        assert!(got.iter().all(|&s| s == S_OK), "{got:?} {:?}", counters);
    }
    // Now the FLUSH, as Linux issues it: after the writes completed.
    let (_, st, _) = d.request(T_FLUSH, 0, &[]);
    t.queue_events()[0].write(1).unwrap();
    d.wait_used(&irq, 1);
    assert_eq!(d.status(st), S_OK);
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{KILL9_FLUSHED} syncs={} writes={}",
        counters.syncs.load(Ordering::Acquire),
        counters.writes.load(Ordering::Relaxed)
    )
    .unwrap();
    out.flush().unwrap();
    drop(out);
    // More writes, never flushed, one in flight at a time, until the parent kills us.
    loop {
        let (_, _, buf) = d.request(T_OUT, 1024, &[4096]);
        mem.write_slice(&[0xee; 4096], GuestAddress(buf)).unwrap();
        let _ = t.queue_events()[0].write(1);
        d.wait_used(&irq, 1);
    }
}

#[test]
fn kill9_after_an_acknowledged_flush_loses_nothing() {
    let disk = TestFile::new(1 << 20, |_| 0);
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "virtio::block::tests::kill9_child",
            "--nocapture",
        ])
        .args(["--test-threads", "1"])
        .env(KILL9_ENV, &disk.0)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    let flushed = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            // libtest prints "test <name> ... " on the same line.
            Ok(line) => match line.split_once(KILL9_FLUSHED) {
                Some((_, rest)) => break Some(rest.to_string()),
                None => seen.push(line),
            },
            Err(_) => break None, // the child ended, or 60 s passed
        }
    };
    // Let the unflushed writes run a moment, then SIGKILL, as `kill -9`: no destructors, no
    // exit handlers, io_uring requests in flight.
    std::thread::sleep(Duration::from_millis(50));
    child.kill().unwrap();
    let status = child.wait().unwrap();
    let flushed = flushed.unwrap_or_else(|| panic!("child never flushed ({status:?}): {seen:?}"));
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "child ended before the kill"
    );
    // The FLUSH was acknowledged only after an fdatasync returned.
    assert!(flushed.contains("syncs=1"), "{flushed}");
    assert!(flushed.contains("writes=16"), "{flushed}");
    assert_eq!(host_read(&disk.0, 64 * 512, 64 << 10), kill9_data());
}
