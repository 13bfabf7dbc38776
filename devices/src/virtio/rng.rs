//! virtio-rng (entropy device, virtio 1.x section 5.4): one queue of device-writable buffers,
//! each filled from a host source (`/dev/urandom` by default). The guest sees `/dev/hwrng` and
//! feeds its own RNG from it early in boot. Kata asks for it in every `vm.create`
//! (`rng: {src: /dev/urandom}`).
//!
//! One worker thread per activation waits on the queue's notify event. A chain gets at most
//! [`MAX_PER_CHAIN`] bytes, so one request cannot keep the worker reading for long; a chain the
//! driver got wrong (a descriptor the device may not write, an address outside guest memory)
//! is returned with the bytes written so far, and counted.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    ActivateContext, ActivateError, Interrupt, VirtioDevice, TYPE_RNG, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_INDIRECT_DESC,
};

/// The one queue's size.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes given for one chain.
pub const MAX_PER_CHAIN: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("rng source {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("rng source {0}: not a character device or regular file")]
    NotASource(PathBuf),
}

/// What the device did, for `vm.counters`.
#[derive(Debug, Default)]
pub struct RngCounters {
    /// Workers that stopped on their own (an error or a panic): the device then needs a reset.
    pub worker_failures: Arc<AtomicU64>,
    pub bytes: AtomicU64,
    pub requests: AtomicU64,
    /// Chains the driver got wrong.
    pub invalid_requests: AtomicU64,
    /// Reads of the source that failed or ended (a regular file read to its end).
    pub source_errors: AtomicU64,
}

impl super::DeviceCounters for RngCounters {
    fn snapshot(&self) -> Vec<(&'static str, u64)> {
        super::read_counters(&[
            ("bytes", &self.bytes),
            ("requests", &self.requests),
            ("invalid_requests", &self.invalid_requests),
            ("source_errors", &self.source_errors),
            ("worker_failures", &self.worker_failures),
        ])
    }
}

pub struct Rng {
    source: Arc<File>,
    path: PathBuf,
    counters: Arc<RngCounters>,
    worker: Option<(EventFd, JoinHandle<()>)>,
}

impl Rng {
    /// Opens `path` (without blocking: a FIFO put there is refused, not waited on).
    pub fn new(path: &Path) -> Result<Self, RngError> {
        let err = |source| RngError::Open {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
            .map_err(err)?;
        let ft = file.metadata().map_err(err)?.file_type();
        if !(ft.is_char_device() || ft.is_file()) {
            return Err(RngError::NotASource(path.to_owned()));
        }
        Ok(Rng {
            source: Arc::new(file),
            path: path.to_owned(),
            counters: Arc::default(),
            worker: None,
        })
    }

    pub fn counters(&self) -> Arc<RngCounters> {
        self.counters.clone()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn stop_worker(&mut self) {
        if let Some((kill, handle)) = self.worker.take() {
            let _ = kill.write(1);
            let _ = handle.join();
        }
    }
}

impl Drop for Rng {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // No configuration space.
        data.fill(0);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.stop_worker();
        let io_err = |what| move |source| ActivateError::Io { what, source };
        let Some((queue, evt)) = ctx.queues.into_iter().next() else {
            return Err(ActivateError::BadQueue(0));
        };
        let kill = EventFd::new(EFD_NONBLOCK).map_err(io_err("creating an eventfd"))?;
        let ctx_interrupt = ctx.interrupt.clone();
        let worker = Worker {
            queue,
            evt,
            kill: kill.try_clone().map_err(io_err("cloning an eventfd"))?,
            mem: ctx.mem,
            interrupt: ctx.interrupt,
            source: self.source.clone(),
            counters: self.counters.clone(),
            buf: vec![0; MAX_PER_CHAIN],
            broken: false,
            outcome: None,
        };
        let handle = super::worker::spawn(
            "rng".into(),
            seccomp::ThreadKind::Rng,
            "rng".into(),
            ctx_interrupt,
            self.counters.worker_failures.clone(),
            move || worker.run(),
        )
        .map_err(io_err("spawning the rng worker"))?;
        self.worker = Some((kill, handle));
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
    }
}

const QUEUE: u32 = 0;
const KILL: u32 = 1;

struct Worker {
    queue: Queue,
    evt: EventFd,
    kill: EventFd,
    mem: Arc<GuestMemoryMmap>,
    interrupt: Arc<Interrupt>,
    source: Arc<File>,
    counters: Arc<RngCounters>,
    buf: Vec<u8>,
    broken: bool,
    outcome: Option<Result<(), String>>,
}

impl Worker {
    fn run(self) -> Result<(), String> {
        super::worker::event_loop(self)
    }
}

impl super::worker::DeviceLoop for Worker {
    fn outcome(&mut self) -> Option<Result<(), String>> {
        self.outcome.take()
    }
}

impl event_manager::MutEventSubscriber for Worker {
    fn init(&mut self, ops: &mut event_manager::EventOps) {
        for (fd, data) in [(&self.evt, QUEUE), (&self.kill, KILL)] {
            if let Err(e) = ops.add(event_manager::Events::with_data(fd, data, EventSet::IN)) {
                self.outcome = Some(Err(format!("watching its events: {e}")));
                return;
            }
        }
        // Buffers may be waiting already (a driver that notified before we started).
        self.process();
    }

    fn process(&mut self, events: event_manager::Events, _ops: &mut event_manager::EventOps) {
        match events.data() {
            KILL => self.outcome = Some(Ok(())),
            _ => {
                let _ = self.evt.read();
                self.process();
            }
        }
    }
}

impl Worker {
    /// Fills every available chain.
    fn process(&mut self) {
        if self.broken {
            return;
        }
        let mem = self.mem.clone();
        let mut used = false;
        loop {
            let chain = match self.queue.iter(mem.as_ref()) {
                Ok(mut it) => it.next(),
                Err(_) => return self.broken_queue(),
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let mut written = 0u32;
            let mut budget = MAX_PER_CHAIN;
            let mut bad = false;
            for desc in chain {
                if !desc.is_write_only() {
                    bad = true;
                    break;
                }
                let want = (desc.len() as usize).min(budget);
                if want == 0 {
                    continue;
                }
                // Checked before reading, so a bad address costs the source nothing.
                if !mem.check_range(desc.addr(), want, vm_memory::Permissions::Write) {
                    bad = true;
                    break;
                }
                let got = self.read_source(want);
                if got == 0 {
                    break;
                }
                if mem.write_slice(&self.buf[..got], desc.addr()).is_err() {
                    bad = true;
                    break;
                }
                written += got as u32;
                budget -= got;
                if got < want || budget == 0 {
                    break;
                }
            }
            if bad {
                self.counters
                    .invalid_requests
                    .fetch_add(1, Ordering::Relaxed);
            }
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            self.counters
                .bytes
                .fetch_add(u64::from(written), Ordering::Relaxed);
            if self.queue.add_used(mem.as_ref(), head, written).is_err() {
                return self.broken_queue();
            }
            used = true;
        }
        if used {
            match self.queue.needs_notification(mem.as_ref()) {
                Ok(true) => self.interrupt.signal_used(),
                Ok(false) => {}
                Err(_) => self.broken_queue(),
            }
        }
    }

    /// Reads up to `want` bytes of the source into the buffer; 0 when it has none to give.
    fn read_source(&mut self, want: usize) -> usize {
        let mut done = 0;
        while done < want {
            match (&*self.source).read(&mut self.buf[done..want]) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        if done < want {
            self.counters.source_errors.fetch_add(1, Ordering::Relaxed);
        }
        done
    }

    /// The rings are corrupt: nothing more is served until the driver resets the device.
    fn broken_queue(&mut self) {
        if !self.broken {
            self.broken = true;
            self.counters
                .invalid_requests
                .fetch_add(1, Ordering::Relaxed);
            self.interrupt.signal_needs_reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::DriverQueue;
    use std::io::Write;
    use std::time::{Duration, Instant};
    use vm_memory::GuestAddress;

    const MEM: usize = 0x40_0000;

    #[test]
    fn fills_chains_from_the_source_and_survives_bad_ones() {
        // A regular file as the source: its bytes are known, and it runs out.
        let pattern: Vec<u8> = (0..70_000u32).map(|i| (i * 7 + 3) as u8).collect();
        let path = std::env::temp_dir().join(format!("podvmm-rng-{}", std::process::id()));
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&pattern)
            .unwrap();
        let mut rng = Rng::new(&path).unwrap();
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap());
        let mut vq = DriverQueue::new(mem.as_ref(), 0, 16);
        // A: one 4 KiB buffer. B: 16 bytes then 100000 (capped at 64 KiB in all). C: a
        // descriptor the device may not write. D: outside guest memory. E: what the file has left.
        let chains: [&[(u64, u32, bool)]; 5] = [
            &[(0x10_0000, 4096, true)],
            &[(0x11_0000, 16, true), (0x12_0000, 100_000, true)],
            &[(0x20_0000, 64, false)],
            &[(MEM as u64 + 0x1000, 64, true)],
            &[(0x30_0000, 1000, true)],
        ];
        for c in chains {
            let head = vq.chain(c);
            vq.push_avail(head);
        }
        vq.publish();
        let queue = vq.queue();
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        rng.activate(ActivateContext {
            mem: mem.clone(),
            queues: vec![(queue, kick.try_clone().unwrap())],
            interrupt: interrupt.clone(),
            acked_features: VIRTIO_F_VERSION_1,
        })
        .unwrap();
        kick.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while vq.used_idx() < 5 {
            assert!(
                Instant::now() < deadline,
                "the device did not answer every chain"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let lens: Vec<u32> = (0..5).map(|i| vq.used_elem(i).1).collect();
        assert_eq!(lens, [4096, 65536, 0, 0, 70_000 - 4096 - 65536]);
        let mut got = vec![0u8; 4096];
        mem.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(got, pattern[..4096]);
        let mut got = vec![0u8; 16];
        mem.read_slice(&mut got, GuestAddress(0x11_0000)).unwrap();
        assert_eq!(got, pattern[4096..4112]);
        let mut got = vec![0u8; 65520];
        mem.read_slice(&mut got, GuestAddress(0x12_0000)).unwrap();
        assert_eq!(got, pattern[4112..4096 + 65536]);
        assert_ne!(interrupt.status() & super::super::INT_USED_RING, 0);
        let c = rng.counters();
        assert_eq!(c.requests.load(Ordering::Relaxed), 5);
        assert_eq!(c.invalid_requests.load(Ordering::Relaxed), 2);
        assert_eq!(c.bytes.load(Ordering::Relaxed), 70_000);
        assert!(c.source_errors.load(Ordering::Relaxed) >= 1);
        assert!(!interrupt.needs_reset());
        rng.reset();
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn refuses_a_source_it_could_hang_on() {
        let dir = std::env::temp_dir().join(format!("podvmm-rng-fifo-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let c = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = Rng::new(&dir).err().unwrap().to_string();
        assert!(err.contains("not a character device"), "{err}");
        let _ = std::fs::remove_file(&dir);
        assert!(Rng::new(Path::new("/nonexistent/rng")).is_err());
        assert!(Rng::new(Path::new("/dev/urandom")).is_ok());
    }
}
