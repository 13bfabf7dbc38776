//! The virtio-fs front-end against a vhost-user back-end built on the rust-vmm
//! `vhost-user-backend` crate (`devices/examples/vhost_user_echo_fs.rs`, which `cargo test`
//! builds), run as a child process so that a test can kill it as virtiofsd would die. The
//! back-end answers each FUSE request with its `nodeid` as the reply's body, and holds (never
//! answers) a request of opcode [`HOLD`].

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::QueueT;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::virtio::testing::DriverQueue;
use crate::virtio::{Interrupt, INT_USED_RING};

const MEM: usize = 0x80_0000;
/// The opcode the back-end holds (`vhost_user_echo_fs.rs`).
const HOLD: u32 = 0xdead;
const QUEUE_SIZE: u16 = 16;
/// Where each test queue's rings go.
const RING_AT: [u64; 2] = [0x1_0000, 0x2_0000];

const FEATURES_ENV: &str = "ECHO_FS_FEATURES";

struct Backend {
    child: Child,
    socket: PathBuf,
}

impl Backend {
    fn start(name: &str, env: &[(&str, String)]) -> Backend {
        let socket =
            std::env::temp_dir().join(format!("podvmm-fs-{name}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        // target/<profile>/deps/devices-HASH -> target/<profile>/examples/
        let exe = std::env::current_exe().unwrap();
        let example = exe
            .parent()
            .and_then(Path::parent)
            .unwrap()
            .join("examples/vhost_user_echo_fs");
        assert!(
            example.is_file(),
            "{} is missing: `cargo test` builds it (or: cargo build -p devices --example \
             vhost_user_echo_fs)",
            example.display()
        );
        let mut cmd = Command::new(example);
        cmd.arg(&socket);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "the back-end never listened");
            std::thread::sleep(Duration::from_millis(10));
        }
        Backend { child, socket }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn config(id: &str, socket: &Path) -> FsConfig {
    FsConfig {
        id: id.into(),
        tag: validated::FsTag::new("kataShared").unwrap(),
        socket: socket.to_owned(),
        request_queues: validated::FsQueues::new(1).unwrap(),
        queue_size: validated::QueueSize::new(QUEUE_SIZE.into()).unwrap(),
    }
}

/// Guest memory a back-end can map: a memfd.
fn shared_memory() -> Arc<GuestMemoryMmap> {
    use std::os::fd::FromRawFd;
    // SAFETY: a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"podvmm-fs-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor nobody else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(MEM as u64).unwrap();
    Arc::new(
        GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            MEM,
            Some(FileOffset::new(file, 0)),
        )])
        .unwrap(),
    )
}

/// The driver's side: two queues (high priority, one request queue) in guest memory.
struct Driver {
    mem: Arc<GuestMemoryMmap>,
    rings: Vec<DriverQueue<Arc<GuestMemoryMmap>>>,
    interrupt: Arc<Interrupt>,
}

impl Driver {
    fn new(mem: Arc<GuestMemoryMmap>) -> (Driver, ActivateContext, Vec<EventFd>) {
        let rings: Vec<_> = RING_AT
            .iter()
            .map(|&at| DriverQueue::new(mem.clone(), at, QUEUE_SIZE))
            .collect();
        let mut queues = Vec::new();
        let mut kicks = Vec::new();
        for r in &rings {
            let mut q = r.queue();
            // As the transport does when the driver accepted it.
            q.set_event_idx(true);
            let kick = EventFd::new(EFD_NONBLOCK).unwrap();
            kicks.push(kick.try_clone().unwrap());
            queues.push((q, kick));
        }
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let ctx = ActivateContext {
            mem: mem.clone(),
            queues,
            interrupt: interrupt.clone(),
            acked_features: VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX,
        };
        let driver = Driver {
            mem,
            rings,
            interrupt,
        };
        (driver, ctx, kicks)
    }

    /// Posts a request (a 40-byte FUSE header, then a 64-byte reply buffer) on queue `q`.
    fn post(&mut self, q: usize, slot: u16, opcode: u32, unique: u64, nodeid: u64) {
        let base = 0x10_0000 + u64::from(slot) * 0x1000 + q as u64 * 0x8_0000;
        let mut header = [0u8; 40];
        header[0..4].copy_from_slice(&40u32.to_le_bytes());
        header[4..8].copy_from_slice(&opcode.to_le_bytes());
        header[8..16].copy_from_slice(&unique.to_le_bytes());
        header[16..24].copy_from_slice(&nodeid.to_le_bytes());
        self.mem.write_slice(&header, GuestAddress(base)).unwrap();
        self.mem
            .write_slice(&[0xaa; 64], GuestAddress(base + 0x800))
            .unwrap();
        let head = self.rings[q].chain(&[(base, 40, false), (base + 0x800, 64, true)]);
        self.rings[q].submit(head);
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.rings[q].used_idx()
    }

    /// The `n`th used entry of queue `q`: (head, len).
    fn used(&self, q: usize, n: u16) -> (u16, u32) {
        let (id, len) = self.rings[q].used_elem(n);
        (id as u16, len)
    }

    /// The reply written for the request in `slot` of queue `q`: its 24 bytes.
    fn reply(&self, q: usize, slot: u16) -> (u32, i32, u64, u64) {
        let base = 0x10_0000 + u64::from(slot) * 0x1000 + q as u64 * 0x8_0000 + 0x800;
        let mut b = [0u8; 24];
        self.mem.read_slice(&mut b, GuestAddress(base)).unwrap();
        (
            u32::from_le_bytes(b[0..4].try_into().unwrap()),
            i32::from_le_bytes(b[4..8].try_into().unwrap()),
            u64::from_le_bytes(b[8..16].try_into().unwrap()),
            u64::from_le_bytes(b[16..24].try_into().unwrap()),
        )
    }

    /// The used ring's `avail_event`: the driver kicks again only once it passes it.
    fn avail_event(&self, q: usize) -> u16 {
        self.rings[q].avail_event()
    }

    fn wait_used(&self, q: usize, n: u16) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.used_idx(q) < n {
            assert!(
                Instant::now() < deadline,
                "queue {q}: used index {} never reached {n}",
                self.used_idx(q)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn wait_for(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "{what} never happened");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn requests_go_through_the_backend_and_fail_with_eio_once_it_dies() {
    let mut backend = Backend::start("echo", &[]);
    let mut fs = Fs::new(config("fs0", &backend.socket)).unwrap();
    assert_eq!(fs.device_type(), TYPE_FS);
    assert_eq!(fs.queue_max_sizes(), vec![QUEUE_SIZE; 2]);
    // The back-end's features, less the protocol bit and what podvmm does not drive.
    assert_eq!(fs.features(), VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
    let mut cfg = [0u8; 40];
    fs.read_config(0, &mut cfg);
    assert_eq!(&cfg[..10], b"kataShared");
    assert!(cfg[10..36].iter().all(|&b| b == 0));
    assert_eq!(u32::from_le_bytes(cfg[36..40].try_into().unwrap()), 1);

    let (mut driver, ctx, kicks) = Driver::new(shared_memory());
    fs.activate(ctx).unwrap();
    let counters = fs.counters();
    wait_for("the back-end taking the vrings", || {
        counters.backend_connected.load(Ordering::Relaxed) == 1
    });

    // Two requests answered by the back-end, the second one in a second kick.
    driver.post(1, 0, 1, 100, 0x1111);
    kicks[1].write(1).unwrap();
    driver.wait_used(1, 1);
    assert_eq!(driver.used(1, 0), (0, 24));
    assert_eq!(driver.reply(1, 0), (24, 0, 100, 0x1111));
    wait_for("the used-buffer interrupt", || {
        driver.interrupt.status() & INT_USED_RING != 0
    });
    driver.interrupt.ack(INT_USED_RING);
    driver.post(1, 1, 1, 101, 0x2222);
    kicks[1].write(1).unwrap();
    driver.wait_used(1, 2);
    assert_eq!(driver.reply(1, 1), (24, 0, 101, 0x2222));

    // One request the back-end takes and never answers; then it dies.
    driver.post(1, 2, HOLD, 102, 0);
    kicks[1].write(1).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(driver.used_idx(1), 2);
    backend.child.kill().unwrap();
    backend.child.wait().unwrap();

    // The held request fails with EIO, and so do new ones, on both queues.
    driver.wait_used(1, 3);
    assert_eq!(driver.used(1, 2), (4, 16));
    assert_eq!(driver.reply(1, 2).0, 16);
    assert_eq!(driver.reply(1, 2).1, -5);
    assert_eq!(driver.reply(1, 2).2, 102);
    driver.post(1, 3, 1, 103, 0x3333);
    driver.post(0, 0, 2, 104, 0);
    kicks[1].write(1).unwrap();
    kicks[0].write(1).unwrap();
    driver.wait_used(1, 4);
    driver.wait_used(0, 1);
    assert_eq!(driver.reply(1, 3).1, -5);
    assert_eq!(driver.reply(0, 0).1, -5);
    // The driver is asked to kick for its next request (event index), on both queues.
    wait_for("the event index to move", || {
        driver.avail_event(1) == 4 && driver.avail_event(0) == 1
    });
    assert_eq!(counters.backend_lost.load(Ordering::Relaxed), 1);
    assert_eq!(counters.backend_connected.load(Ordering::Relaxed), 0);
    assert_eq!(counters.failed_requests.load(Ordering::Relaxed), 3);
    assert_eq!(counters.worker_failures.load(Ordering::Relaxed), 0);
    assert!(!driver.interrupt.needs_reset());

    // A driver reset and a new activation with the back-end gone: still EIO, no hang.
    fs.reset();
    let (mut driver, ctx, kicks) = Driver::new(shared_memory());
    fs.activate(ctx).unwrap();
    driver.post(1, 0, 1, 200, 0x4444);
    kicks[1].write(1).unwrap();
    driver.wait_used(1, 1);
    assert_eq!(driver.reply(1, 0).1, -5);
    assert_eq!(counters.backend_lost.load(Ordering::Relaxed), 2);
    drop(fs);
}

#[test]
fn a_driver_reset_takes_the_vrings_back_and_the_backend_serves_again() {
    let backend = Backend::start("reset", &[]);
    let mut fs = Fs::new(config("fs0", &backend.socket)).unwrap();
    for round in 0..2u64 {
        let (mut driver, ctx, kicks) = Driver::new(shared_memory());
        fs.activate(ctx).unwrap();
        driver.post(1, 0, 1, round, 0x5000 + round);
        kicks[1].write(1).unwrap();
        driver.wait_used(1, 1);
        assert_eq!(driver.reply(1, 0), (24, 0, round, 0x5000 + round));
        fs.reset();
    }
    assert_eq!(fs.counters().backend_lost.load(Ordering::Relaxed), 0);
    assert_eq!(fs.counters().activations.load(Ordering::Relaxed), 2);
}

#[test]
fn private_memory_is_refused_and_the_guest_gets_eio() {
    let backend = Backend::start("private", &[]);
    let mut fs = Fs::new(config("fs0", &backend.socket)).unwrap();
    let private = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap());
    let (mut driver, ctx, kicks) = Driver::new(private);
    fs.activate(ctx).unwrap();
    driver.post(1, 0, 1, 7, 0);
    kicks[1].write(1).unwrap();
    driver.wait_used(1, 1);
    assert_eq!(driver.reply(1, 0).1, -5);
    assert_eq!(fs.counters().backend_lost.load(Ordering::Relaxed), 1);
}

#[test]
fn a_bad_backend_or_config_is_a_clear_error() {
    let err = |r: Result<Fs, FsError>| match r {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    // No socket.
    let missing = std::env::temp_dir().join("podvmm-fs-no-such.sock");
    let e = err(Fs::new(config("a", &missing)));
    assert!(
        e.contains("connecting") && e.contains("No such file"),
        "{e}"
    );

    // A bad tag or queue number cannot reach the device: `validated` refuses to make one.

    // A peer that answers garbage, and one that accepts and says nothing.
    let dir = std::env::temp_dir();
    for (name, garbage) in [("garbage", true), ("silent", false)] {
        let path = dir.join(format!("podvmm-fs-{name}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf);
            if garbage {
                let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\nnot vhost-user at all");
            }
            std::thread::sleep(frontend::REPLY_TIMEOUT + Duration::from_secs(1));
        });
        let t = Instant::now();
        let e = err(Fs::new(config("c", &path)));
        assert!(
            e.contains("vhost-user back-end at") && e.contains("failed"),
            "{e}"
        );
        assert!(t.elapsed() < frontend::REPLY_TIMEOUT + Duration::from_secs(3));
        server.join().unwrap();
        let _ = std::fs::remove_file(&path);
    }

    // A back-end without VIRTIO_F_VERSION_1, and one serving too few queues.
    let b = Backend::start("legacy", &[(FEATURES_ENV, (1u64 << 30).to_string())]);
    let e = err(Fs::new(config("d", &b.socket)));
    assert!(e.contains("without VIRTIO_F_VERSION_1"), "{e}");
    drop(b);
    let b = Backend::start("fewq", &[]);
    let mut c = config("e", &b.socket);
    c.request_queues = validated::FsQueues::new(4).unwrap();
    let e = err(Fs::new(c));
    assert!(e.contains("serves 2 queues and the device needs 5"), "{e}");
}
