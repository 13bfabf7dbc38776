//! virtio-blk IOPS through the device's whole data path, next to fio on the same file.
//!
//! The "guest" is this process: it lays out split virtqueues in guest memory, brings the
//! device up through its virtio-mmio registers as Linux's drivers do (features, queues,
//! DRIVER_OK), and then acts as the guest's virtio_blk driver on one thread: every request is
//! an indirect descriptor (header, 4 KiB buffer, status byte, as Linux lays them out) put in
//! the avail ring; a notification is the write of the queue's eventfd (the ioeventfd KVM
//! would signal) when the device's avail_event asks for one; completions arrive through the
//! interrupt eventfd (the irqfd), are acknowledged in the InterruptStatus/InterruptAck
//! registers, read from the used ring (with event-index interrupt suppression), checked
//! (status byte) and immediately replaced by a new request, keeping the queue depth
//! constant. On the device side everything is the real thing: the transport, the worker
//! thread per queue with its epoll, request parsing, the io_uring engine with O_DIRECT, the
//! used ring and the interrupt.
//!
//! fio (Debian's `fio`, `scripts/setup.sh` installs it) runs the same pattern on the same
//! file for the same time: `--rw=randread|randwrite --bs=4k --iodepth=32 --direct=1
//! --ioengine=io_uring [--numjobs=4]`. Device and fio take turns, so drift hits both.
//!
//! The file: 1 GiB, fully written (reads of holes or unwritten extents never reach the disk),
//! created once at `/var/tmp/podvmm-bench/blk_iops-1G.img` (or `$PODVMM_BLK_BENCH_FILE`) and
//! reused. The write runs overwrite random blocks of it with random data.
//!
//! One more comparison reads from the host page cache (`--direct=0` for fio) with a driver
//! that polls its used ring and asks for no interrupts, as the test guest does: there the
//! device's own path is the whole cost; `iops_ratio_cached_vs_host=` is the device over fio.
//! Every one-queue read comparison also runs the device with its workers' polling off, in the
//! same round: `poll_gain=` (page cache) and `<id> ... poll_gain=` are on over off.
//!
//! Reports (criterion): `blk_iops/{randread,randwrite}_4k_qd32_{1,4}q`, per-request time and
//! throughput. Then the interleaved comparison; the closing lines are
//! `podvmm-bench: blk_iops=`, `fio_iops=` and `iops_ratio_vs_host=` for 1 queue, 4 KiB random
//! reads at QD32, after the same for 4 queues and for writes.
//!
//! Environment: `PODVMM_BENCH_QUICK=1` (or criterion's `--quick`) runs each comparison once
//! for 2 s and shortens criterion's sampling, for CI.

#[path = "support/mod.rs"]
mod support;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{mode_from_args, quick_requested, Mode};

use criterion::{Criterion, SamplingMode, Throughput};
use devices::virtio::block::engine::EngineKind;
use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::MmioTransport;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const FILE_SIZE: u64 = 1 << 30;
const BLOCK: u64 = 4096;
/// Request slots laid out per queue: the deepest comparison's queue depth.
const QUEUE_DEPTH: u16 = 32;
/// What podvmm offers by default.
const QUEUE_SIZE: u16 = 128;
/// Guest memory for each queue's rings, tables and buffers.
const QUEUE_AREA: u64 = 8 << 20;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;

use devices::virtio::mmio::reg;
use devices::virtio::testing::{
    bring_up, reg_read, reg_write, write_table, DriverQueue, F_INDIRECT,
};
use devices::virtio::VIRTIO_RING_F_EVENT_IDX;

/// xorshift64*: cheap, deterministic per queue.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// One virtqueue as the guest's virtio_blk driver sees it: the shared driver queue, plus the
/// request slots laid out behind it.
struct BlkQueue {
    q: DriverQueue<Arc<GuestMemoryMmap>>,
    /// Per request slot k: indirect table, header, status byte, 4 KiB buffer.
    tables: u64,
    headers: u64,
    statuses: u64,
    buffers: u64,
    in_flight: u32,
    rng: Rng,
    /// The driver polls the used ring and asks for no interrupts (as the test guest does).
    polled: bool,
}

impl BlkQueue {
    /// Queue `index`'s rings (the used ring on a page of its own) and request slots, with
    /// the fixed parts written: one main descriptor per slot pointing at its indirect table
    /// of three (header, data, status).
    fn new(mem: &Arc<GuestMemoryMmap>, index: u64, write: bool) -> Self {
        let base = index * QUEUE_AREA;
        let q =
            DriverQueue::with_layout(mem.clone(), QUEUE_SIZE, base, base + 0x800, base + 0x1000);
        let dq = BlkQueue {
            q,
            tables: base + 0x2000,
            headers: base + 0x4000,
            statuses: base + 0x5000,
            buffers: base + 0x10_0000,
            in_flight: 0,
            rng: Rng(0x9e37_79b9_7f4a_7c15 ^ (index + 1)),
            polled: false,
        };
        for k in 0..u64::from(QUEUE_DEPTH) {
            let table = dq.tables + 64 * k;
            dq.q.set_desc(k as u16, table, 48, F_INDIRECT, 0);
            write_table(
                mem,
                table,
                &[
                    (dq.headers + 16 * k, 16, false),
                    (dq.buffers + BLOCK * k, BLOCK as u32, !write),
                    (dq.statuses + k, 1, true),
                ],
            );
            let t = if write { T_OUT } else { T_IN };
            mem.write_obj(t, GuestAddress(dq.headers + 16 * k))
                .expect("header");
            mem.write_obj(0u32, GuestAddress(dq.headers + 16 * k + 4))
                .expect("header");
            if write {
                let fill: Vec<u8> = (0..BLOCK).map(|i| (i * 7 + k) as u8).collect();
                mem.write_slice(&fill, GuestAddress(dq.buffers + BLOCK * k))
                    .expect("data");
            }
        }
        dq
    }

    /// Puts slot `k` in the avail ring with a new random block (not yet published).
    fn queue_request(&mut self, k: u16) {
        let block = self.rng.next() % (FILE_SIZE / BLOCK);
        let sector = block * (BLOCK / 512);
        let k64 = u64::from(k);
        let mem = self.q.mem();
        mem.write_obj(sector, GuestAddress(self.headers + 16 * k64 + 8))
            .expect("header");
        mem.write_obj(0xffu8, GuestAddress(self.statuses + k64))
            .expect("status");
        self.q.push_avail(k);
        self.in_flight += 1;
    }

    /// Takes every completion (checking its status), re-arms the interrupt at the next one
    /// (used_event), and resubmits each finished slot unless `refill` is false. Returns the
    /// completions and whether the device asked for a notification (event index).
    fn reap(&mut self, refill: bool) -> (u64, bool) {
        let old_avail = self.q.avail_idx();
        let mut done = 0;
        loop {
            while let Some((id, _)) = self.q.pop_used() {
                let k = u16::try_from(id)
                    .ok()
                    .filter(|&k| k < QUEUE_DEPTH)
                    .expect("used id");
                let status: u8 = self
                    .q
                    .mem()
                    .read_obj(GuestAddress(self.statuses + u64::from(k)))
                    .expect("status");
                assert_eq!(status, 0, "request failed with status {status}");
                self.in_flight -= 1;
                done += 1;
                if refill {
                    self.queue_request(k);
                }
            }
            // virtqueue_enable_cb: interrupt me at the next completion, then check again.
            if self.polled || !self.q.enable_cb() {
                break;
            }
        }
        let notify = self.q.avail_idx() != old_avail && self.q.publish();
        (done, notify)
    }
}

/// A disk device driven by a guest driver on this thread.
struct Rig {
    /// Requests kept in flight per queue (at most QUEUE_DEPTH).
    depth: u16,
    mem: Arc<GuestMemoryMmap>,
    transport: Mutex<MmioTransport>,
    notify: Vec<EventFd>,
    irq: EventFd,
    queues: Vec<BlkQueue>,
    engine: EngineKind,
    polled: bool,
}

/// How one side of a comparison drives the device.
#[derive(Clone, Copy)]
struct Driving {
    /// O_DIRECT (the disk) or the host page cache.
    direct: bool,
    /// The device's workers may poll before they sleep (podvmm's default).
    device_polls: bool,
    /// The driver polls the used ring instead of waiting for interrupts.
    polled: bool,
}

/// The disk through O_DIRECT, a driver that waits for interrupts (Linux's virtio_blk).
const DISK: Driving = Driving {
    direct: true,
    device_polls: true,
    polled: false,
};

/// IOPS and CPU per request of one side of a comparison.
struct Figures {
    iops: f64,
    /// Seconds of CPU per completed request, where known.
    cpu_per_request: Option<f64>,
}

/// One timed run of the rig.
struct Run {
    ios: u64,
    time: Duration,
    /// CPU of the device side (transport, workers, io_uring submission in their context):
    /// the process's CPU less this thread's, which plays the guest.
    device_cpu: Duration,
}

/// The process's and the calling thread's CPU clocks.
struct DeviceCpu {
    process: Duration,
    thread: Duration,
}

impl DeviceCpu {
    fn clock(id: libc::clockid_t) -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec we own.
        let r = unsafe { libc::clock_gettime(id, &mut ts) };
        assert_eq!(r, 0, "clock_gettime");
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    fn now() -> Self {
        DeviceCpu {
            process: Self::clock(libc::CLOCK_PROCESS_CPUTIME_ID),
            thread: Self::clock(libc::CLOCK_THREAD_CPUTIME_ID),
        }
    }

    /// The CPU every other thread of the process used since `self`.
    fn elapsed(&self) -> Duration {
        let now = Self::now();
        (now.process - self.process).saturating_sub(now.thread - self.thread)
    }
}

enum Stop {
    Count(u64),
    Time(Duration),
}

impl Rig {
    fn new(path: &Path, num_queues: u16, write: bool, depth: u16, how: Driving) -> Rig {
        assert!((1..=QUEUE_DEPTH).contains(&depth), "depth {depth}");
        let mem = Arc::new(
            GuestMemoryMmap::from_ranges(&[(
                GuestAddress(0),
                (QUEUE_AREA * u64::from(num_queues)) as usize,
            )])
            .expect("guest memory"),
        );
        let mut block = Block::new(BlockConfig {
            path: path.to_owned(),
            readonly: false,
            direct: how.direct,
            num_queues: api::validated::DiskQueues::new(num_queues.into()).expect("queues"),
            queue_size: api::validated::QueueSize::new(QUEUE_SIZE.into()).expect("queue size"),
            // The worker threads' names (blk-<id>-q<n>) tell the two sides apart in a
            // profile (scripts/io-counts.sh).
            id: if how.device_polls { "bench" } else { "nopoll" }.into(),
            engine: None,
        })
        .expect("open the bench file");
        if !how.device_polls {
            block.set_poll_max(Duration::ZERO);
        }
        let engine = block.engine();
        let irq = EventFd::new(0).expect("eventfd");
        let transport = MmioTransport::new(
            Box::new(block),
            mem.clone(),
            irq.try_clone().expect("eventfd"),
        )
        .expect("transport");
        let notify = transport
            .queue_events()
            .iter()
            .map(|e| e.try_clone().expect("eventfd"))
            .collect();
        let mut transport = transport;
        let mut queues = Vec::new();
        for q in 0..num_queues {
            let mut dq = BlkQueue::new(&mem, u64::from(q), write);
            dq.polled = how.polled;
            queues.push(dq);
        }
        // As Linux's virtio_mmio + virtio_blk bring a device up, accepting all it offers.
        let rings: Vec<_> = queues.iter().map(|dq| &dq.q).collect();
        let features = bring_up(&mut transport, u64::MAX, &rings);
        assert_ne!(
            features & VIRTIO_RING_F_EVENT_IDX,
            0,
            "the device must offer event index"
        );
        let t = Mutex::new(transport);
        Rig {
            depth,
            mem,
            transport: t,
            notify,
            irq,
            queues,
            engine,
            polled: how.polled,
        }
    }

    /// Keeps `depth` requests in flight on every queue until `stop`; returns the
    /// completions counted, the time they took and the CPU the device side used meanwhile.
    /// Requests still in flight then are drained untimed.
    fn run(&mut self, stop: Stop) -> Run {
        let depth = self.depth;
        for (q, dq) in self.queues.iter_mut().enumerate() {
            for k in 0..depth {
                dq.queue_request(k);
            }
            if dq.q.publish() {
                self.notify[q].write(1).expect("notify");
            }
        }
        let start = Instant::now();
        let cpu_start = DeviceCpu::now();
        let mut done = 0u64;
        let mut elapsed;
        let mut refill = true;
        loop {
            self.wait_completion();
            for (q, dq) in self.queues.iter_mut().enumerate() {
                let (n, notify) = dq.reap(refill);
                if refill {
                    done += n;
                }
                if notify {
                    self.notify[q].write(1).expect("notify");
                }
            }
            elapsed = start.elapsed();
            if refill {
                refill = match stop {
                    Stop::Count(n) => done < n,
                    Stop::Time(d) => elapsed < d,
                };
                if !refill {
                    // The measurement ends here; what is in flight is drained untimed.
                    let device_cpu = cpu_start.elapsed();
                    self.drain();
                    return Run {
                        ios: done,
                        time: elapsed,
                        device_cpu,
                    };
                }
            }
        }
    }

    fn drain(&mut self) {
        while self.queues.iter().any(|q| q.in_flight > 0) {
            self.wait_completion();
            for dq in &mut self.queues {
                dq.reap(false);
            }
        }
    }

    /// Until a completion may be there: the interrupt, or (a polling driver) a used index
    /// that moved.
    fn wait_completion(&self) {
        if !self.polled {
            return self.wait_interrupt();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self
                .queues
                .iter()
                .any(|dq| dq.in_flight > 0 && dq.q.has_used())
            {
                return;
            }
            std::hint::spin_loop();
            assert!(Instant::now() < deadline, "no completion in 10 s");
        }
    }

    /// The guest's interrupt handler: the irqfd fires, the handler reads and acknowledges
    /// InterruptStatus (two MMIO exits in a real guest).
    fn wait_interrupt(&self) {
        let mut pfd = libc::pollfd {
            fd: self.irq.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 10_000) };
        assert!(n == 1, "no interrupt from the device in 10 s");
        let _ = self.irq.read();
        let mut t = self.transport.lock().expect("transport");
        let status = reg_read(&mut *t, reg::INTERRUPT_STATUS);
        reg_write(&mut *t, reg::INTERRUPT_ACK, status);
    }

    /// Reads blocks through the device and compares them with the file (before timing).
    fn verify_reads(&mut self, path: &Path) {
        use std::os::unix::fs::FileExt;
        let file = File::open(path).expect("open");
        let mem = self.mem.clone();
        let dq = &mut self.queues[0];
        for k in 0..self.depth {
            dq.queue_request(k);
        }
        if dq.q.publish() {
            self.notify[0].write(1).expect("notify");
        }
        self.drain();
        let dq = &self.queues[0];
        for k in 0..u64::from(self.depth) {
            let sector: u64 = mem
                .read_obj(GuestAddress(dq.headers + 16 * k + 8))
                .expect("header");
            let mut want = vec![0u8; BLOCK as usize];
            file.read_exact_at(&mut want, sector * 512).expect("pread");
            let mut got = vec![0u8; BLOCK as usize];
            mem.read_slice(&mut got, GuestAddress(dq.buffers + BLOCK * k))
                .expect("buffer");
            assert!(
                got == want,
                "block at sector {sector} read through the device differs from the file"
            );
        }
    }
}

/// The bench file: created once (1 GiB of random data, every block allocated), then reused.
fn bench_file() -> PathBuf {
    let path = std::env::var_os("PODVMM_BLK_BENCH_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/podvmm-bench/blk_iops-1G.img"));
    let ready = std::fs::metadata(&path)
        .is_ok_and(|m| m.len() == FILE_SIZE && m.blocks() * 512 >= FILE_SIZE);
    if ready {
        return path;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("create the bench directory");
    }
    println!(
        "podvmm-bench: writing the 1 GiB bench file {} (once)",
        path.display()
    );
    let start = Instant::now();
    let tmp = path.with_extension("partial");
    let mut f = File::create(&tmp).expect("create the bench file");
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..FILE_SIZE >> 20 {
        for word in chunk.chunks_exact_mut(8) {
            word.copy_from_slice(&rng.next().to_le_bytes());
        }
        f.write_all(&chunk).expect("write the bench file");
    }
    f.sync_all().expect("sync the bench file");
    std::fs::rename(&tmp, &path).expect("rename the bench file");
    println!(
        "podvmm-bench: bench file written in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    path
}

/// What fio reported for one run.
struct FioRun {
    iops: f64,
    /// fio's own CPU (user + system) per completed request, in seconds (one job only: fio
    /// reports CPU per job).
    cpu_per_request: Option<f64>,
}

/// fio's figures for the same pattern, or None when fio is missing.
fn fio(
    path: &Path,
    num_jobs: u16,
    write: bool,
    secs: u64,
    depth: u16,
    direct: bool,
) -> Option<FioRun> {
    let rw = if write { "randwrite" } else { "randread" };
    let out = Command::new("fio")
        .args([
            "--name=podvmm-bench",
            "--thread",
            "--group_reporting",
            "--minimal",
        ])
        .arg(format!("--filename={}", path.display()))
        .arg(format!("--rw={rw}"))
        .args([
            "--bs=4k",
            &format!("--iodepth={depth}"),
            &format!("--direct={}", u8::from(direct)),
            // fio drops the file's cached pages at start by default.
            if direct {
                "--invalidate=1"
            } else {
                "--invalidate=0"
            },
            "--ioengine=io_uring",
        ])
        .arg(format!("--numjobs={num_jobs}"))
        .arg(format!("--runtime={secs}"))
        .args(["--time_based", "--randrepeat=0", "--norandommap"])
        .output()
        .ok()?;
    assert!(
        out.status.success(),
        "fio failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Terse format v3 (1-based): field 8 is read IOPS, 49 write IOPS, 88 and 89 the user
    // and system CPU in percent of the run.
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("3;"))
        .expect("fio terse line");
    let fields: Vec<&str> = line.split(';').collect();
    let number = |i: usize| -> Option<f64> { fields.get(i)?.trim_end_matches('%').parse().ok() };
    let iops = number(if write { 48 } else { 7 })?;
    let cpu_share = (number(87)? + number(88)?) / 100.0;
    Some(FioRun {
        iops,
        cpu_per_request: (num_jobs == 1 && iops > 0.0).then(|| cpu_share / iops),
    })
}

fn fio_version() -> Option<String> {
    let out = Command::new("fio").arg("--version").output().ok()?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

struct Config {
    id: &'static str,
    queues: u16,
    write: bool,
    depth: u16,
    how: Driving,
}

const fn config(id: &'static str, queues: u16, write: bool, depth: u16) -> Config {
    Config {
        id,
        queues,
        write,
        depth,
        how: DISK,
    }
}

/// Reads from the host page cache by a driver that polls its used ring (the test guest; a
/// busy Linux guest comes close): the device's own path is the whole cost, and its polling
/// is compared with none, side by side.
const CACHED: &str = "randread_4k_qd32_1q_cached";

const CONFIGS: [Config; 6] = [
    config("randread_4k_qd32_1q", 1, false, 32),
    config("randread_4k_qd32_4q", 4, false, 32),
    config("randwrite_4k_qd32_1q", 1, true, 32),
    config("randwrite_4k_qd32_4q", 4, true, 32),
    config("randread_4k_qd1_1q", 1, false, 1),
    Config {
        id: CACHED,
        queues: 1,
        write: false,
        depth: 32,
        how: Driving {
            direct: false,
            device_polls: true,
            polled: true,
        },
    },
];

fn main() {
    let mode = mode_from_args();
    let quick = quick_requested();
    let (sample_size, measurement, warm_up, rounds, secs) = match (mode, quick) {
        (Mode::Test, _) => (
            10,
            Duration::from_millis(200),
            Duration::from_millis(50),
            1,
            1,
        ),
        (_, true) => (10, Duration::from_secs(1), Duration::from_millis(300), 1, 2),
        (_, false) => (10, Duration::from_secs(4), Duration::from_secs(1), 5, 5),
    };
    let mut criterion = Criterion::default()
        .sample_size(sample_size)
        .measurement_time(measurement)
        .warm_up_time(warm_up)
        .configure_from_args();

    if mode == Mode::List {
        let mut group = criterion.benchmark_group("blk_iops");
        for c in &CONFIGS {
            group.bench_function(c.id, |b| b.iter(|| ()));
        }
        group.finish();
        return;
    }

    let path = bench_file();
    {
        let mut rig = Rig::new(&path, 1, false, QUEUE_DEPTH, DISK);
        println!(
            "podvmm-bench: engine={} file={} size=1GiB direct=on queue_size={QUEUE_SIZE} depth={QUEUE_DEPTH} (indirect descriptors, event index)",
            rig.engine.name(),
            path.display()
        );
        rig.verify_reads(&path);
        println!("podvmm-bench: verified: 32 random 4 KiB reads through the device equal the file");
    }

    let mut group = criterion.benchmark_group("blk_iops");
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Elements(1));
    for c in &CONFIGS {
        let mut rig = Rig::new(&path, c.queues, c.write, c.depth, c.how);
        group.bench_function(c.id, |b| {
            b.iter_custom(|iters| rig.run(Stop::Count(iters)).time)
        });
    }
    group.finish();
    criterion.final_summary();

    let fio_version = fio_version();
    let loadavg = || {
        std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    println!(
        "podvmm-bench: host cpus={} load average {} (other work on the host slows both sides)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );
    match &fio_version {
        Some(v) => {
            println!("podvmm-bench: fio={v}, {rounds} round(s) of {secs} s each, taking turns")
        }
        None => println!("podvmm-bench: fio=absent (apt-get install fio): no host comparison"),
    }
    // PODVMM_BLK_BENCH_ONLY=<id>[,<id>...]: only those comparisons (for profiling).
    let only = std::env::var("PODVMM_BLK_BENCH_ONLY").ok();
    let selected: Vec<&Config> = CONFIGS
        .iter()
        .filter(|c| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|id| id == c.id))
        })
        .collect();
    let mut results = Vec::new();
    for c in &selected {
        let (mut dev_ios, mut dev_time, mut dev_cpu, mut dev_rounds) =
            (0u64, 0f64, 0f64, Vec::new());
        let mut fio_runs = Vec::new();
        let (mut nopoll_ios, mut nopoll_time) = (0u64, 0f64);
        if !c.how.direct {
            // Both sides read from the page cache: put the whole file in it.
            let _ = std::fs::read(&path);
        }
        // Taking turns: device, fio, device, fio...
        for _ in 0..rounds {
            let mut rig = Rig::new(&path, c.queues, c.write, c.depth, c.how);
            let run = rig.run(Stop::Time(Duration::from_secs(secs)));
            drop(rig);
            dev_ios += run.ios;
            dev_time += run.time.as_secs_f64();
            dev_cpu += run.device_cpu.as_secs_f64();
            dev_rounds.push(run.ios as f64 / run.time.as_secs_f64());
            if !c.write && c.queues == 1 {
                // The same with the device's polling off.
                let how = Driving {
                    device_polls: false,
                    ..c.how
                };
                let mut rig = Rig::new(&path, c.queues, c.write, c.depth, how);
                let run = rig.run(Stop::Time(Duration::from_secs(secs)));
                nopoll_ios += run.ios;
                nopoll_time += run.time.as_secs_f64();
            }
            if fio_version.is_some() {
                fio_runs.extend(fio(&path, c.queues, c.write, secs, c.depth, c.how.direct));
            }
        }
        if nopoll_ios > 0 {
            let nopoll = nopoll_ios as f64 / nopoll_time;
            println!(
                "podvmm-bench: {} nopoll_iops={nopoll:.0} poll_gain={:.3} (the device's polling on / off)",
                c.id,
                dev_ios as f64 / dev_time / nopoll
            );
            if c.id == CACHED {
                println!(
                    "podvmm-bench: poll_gain={:.3}",
                    dev_ios as f64 / dev_time / nopoll
                );
            }
        }
        let dev = Figures {
            iops: dev_ios as f64 / dev_time,
            cpu_per_request: (dev_ios > 0).then(|| dev_cpu / dev_ios as f64),
        };
        let fio_iops: Vec<f64> = fio_runs.iter().map(|f| f.iops).collect();
        let host = (!fio_runs.is_empty()).then(|| {
            let n = fio_runs.len() as f64;
            let cpu: Vec<f64> = fio_runs.iter().filter_map(|f| f.cpu_per_request).collect();
            Figures {
                iops: fio_iops.iter().sum::<f64>() / n,
                cpu_per_request: (cpu.len() == fio_runs.len()).then(|| cpu.iter().sum::<f64>() / n),
            }
        });
        let list = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.0}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let us = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{:.2}", v * 1e6));
        println!(
            "podvmm-bench: {} device_iops={:.0} fio_iops={} ratio={} cpu_us_per_request device={} fio={} (rounds: device {} fio {})",
            c.id,
            dev.iops,
            host.as_ref().map_or("n/a".into(), |h| format!("{:.0}", h.iops)),
            host.as_ref().map_or("n/a".into(), |h| format!("{:.3}", dev.iops / h.iops)),
            us(dev.cpu_per_request),
            us(host.as_ref().and_then(|h| h.cpu_per_request)),
            list(&dev_rounds),
            list(&fio_iops),
        );
        // Totals, for per-request counts (scripts/io-counts.sh).
        println!(
            "podvmm-bench: {} requests: blk-bench-q0={dev_ios} blk-nopoll-q0={nopoll_ios} fio={:.0}",
            c.id,
            fio_iops.iter().sum::<f64>() * secs as f64
        );
        results.push((c.id, dev, host));
    }
    println!("podvmm-bench: load average after {}", loadavg());
    let get = |id: &str| {
        results
            .iter()
            .find(|r| r.0 == id)
            .map(|r| (r.1.iops, r.2.as_ref().map(|h| h.iops)))
    };
    let fmt = |v: f64| format!("{v:.0}");
    // QD1: the time one request takes, next to fio's (both run one request at a time).
    if let Some((_, dev, host)) = results.iter().find(|r| r.0 == "randread_4k_qd1_1q") {
        let dev_us = 1e6 / dev.iops;
        println!("podvmm-bench: blk_qd1_latency_us={dev_us:.1}");
        match host {
            Some(h) => {
                let fio_us = 1e6 / h.iops;
                println!("podvmm-bench: fio_qd1_latency_us={fio_us:.1}");
                println!(
                    "podvmm-bench: qd1_latency_ratio_vs_host={:.3}",
                    dev_us / fio_us
                );
            }
            None => println!("podvmm-bench: qd1_latency_ratio_vs_host=n/a"),
        }
    }
    // CPU per request at QD32, 1 queue: the device side against fio's own.
    if let Some((_, dev, host)) = results.iter().find(|r| r.0 == "randread_4k_qd32_1q") {
        let host_cpu = host.as_ref().and_then(|h| h.cpu_per_request);
        let us = |v: f64| format!("{:.2}", v * 1e6);
        if let Some(d) = dev.cpu_per_request {
            println!("podvmm-bench: blk_cpu_us_per_request={}", us(d));
        }
        if let Some(h) = host_cpu {
            println!("podvmm-bench: fio_cpu_us_per_request={}", us(h));
        }
        match (dev.cpu_per_request, host_cpu) {
            (Some(d), Some(h)) if h > 0.0 => {
                println!("podvmm-bench: cpu_per_request_ratio_vs_host={:.3}", d / h)
            }
            _ => println!("podvmm-bench: cpu_per_request_ratio_vs_host=n/a"),
        }
    }
    // The headline (1 queue, reads) last.
    for (id, suffix, ratio_name) in [
        (CACHED, "_cached", "iops_ratio_cached_vs_host"),
        ("randread_4k_qd32_4q", "_4q", "iops_ratio_4q_vs_host"),
        ("randwrite_4k_qd32_1q", "_write", "iops_ratio_write_vs_host"),
        (
            "randwrite_4k_qd32_4q",
            "_write_4q",
            "iops_ratio_write_4q_vs_host",
        ),
        ("randread_4k_qd32_1q", "", "iops_ratio_vs_host"),
    ] {
        let Some((dev, host)) = get(id) else { continue };
        let (blk_name, fio_name) = match suffix {
            "_write" => ("blk_write_iops".to_string(), "fio_write_iops".to_string()),
            "_write_4q" => (
                "blk_write_iops_4q".to_string(),
                "fio_write_iops_4q".to_string(),
            ),
            "_cached" => ("blk_cached_iops".to_string(), "fio_cached_iops".to_string()),
            s => (format!("blk_iops{s}"), format!("fio_iops{s}")),
        };
        println!("podvmm-bench: {blk_name}={}", fmt(dev));
        println!(
            "podvmm-bench: {fio_name}={}",
            host.map_or("n/a".into(), fmt)
        );
        println!(
            "podvmm-bench: {ratio_name}={}",
            host.map_or("n/a".into(), |h| format!("{:.3}", dev / h))
        );
    }
}
