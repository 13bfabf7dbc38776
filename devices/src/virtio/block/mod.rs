//! virtio-blk: a raw disk image served from a host file.
//!
//! One worker thread per queue, each with its own I/O engine (an io_uring by default). The
//! data path of one request: the driver's notify write hits the queue's ioeventfd in the
//! hypervisor, which wakes the worker's epoll; the worker pops the chain, validates it
//! (`request::parse`), submits it to its engine, and on completion writes the status byte,
//! adds the chain to the used ring and, if the driver wants it, raises the irqfd.

pub mod engine;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod image;
mod lock;
pub mod request;
#[cfg(test)]
mod tests;
mod worker;

use worker::OpenDisk;
pub use worker::{Worker, POLL_MAX};

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use validated::{DiskQueues, QueueSize};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::engine::{Engine, EngineKind, SyncEngine, UringEngine};
use self::request::{SECTOR_SHIFT, SECTOR_SIZE};
use super::{
    ActivateContext, ActivateError, VirtioDevice, TYPE_BLOCK, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// virtio-blk feature bits (virtio-bindings' bit numbers, as masks).
const F_SEG_MAX: u64 = 1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_SEG_MAX;
const F_RO: u64 = 1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_RO;
const F_BLK_SIZE: u64 = 1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_BLK_SIZE;
const F_FLUSH: u64 = 1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;
const F_MQ: u64 = 1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_MQ;
const F_DISCARD: u64 = 1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_DISCARD;
const F_WRITE_ZEROES: u64 = 1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_WRITE_ZEROES;

/// Most data segments per request we advertise (seg_max).
const SEG_MAX: u32 = 128;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("disk {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {0} is not a regular file or block device")]
    NotAFile(PathBuf),
    #[error("disk {0} is {1} bytes: smaller than one 512-byte sector")]
    Empty(PathBuf, u64),
    #[error("disk {0}: {1}")]
    Locked(PathBuf, String),
}

/// What the VMM asks for (`api::ValidDisk`, kept free of serde here); the numbers were
/// checked when the configuration arrived.
#[derive(Clone, Debug)]
pub struct BlockConfig {
    pub path: PathBuf,
    pub readonly: bool,
    pub direct: bool,
    pub num_queues: DiskQueues,
    pub queue_size: QueueSize,
    pub id: String,
    /// Force an engine; None picks io_uring when available.
    pub engine: Option<EngineKind>,
}

/// Per-disk counters, shared with the workers.
#[derive(Debug, Default)]
pub struct BlockCounters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    /// Requests refused because the guest's descriptors were invalid.
    pub invalid_requests: AtomicU64,
    /// Requests the host file failed.
    pub io_errors: AtomicU64,
    /// fdatasync calls that completed (each before its FLUSH reached the used ring).
    pub syncs: AtomicU64,
    /// Workers that stopped on their own (an error or a panic): the device then needs a reset.
    pub worker_failures: Arc<AtomicU64>,
    /// Interrupts raised for used buffers (fewer than completions when the driver's
    /// event index suppresses them).
    pub interrupts: AtomicU64,
}

impl super::DeviceCounters for BlockCounters {
    fn snapshot(&self) -> Vec<(&'static str, u64)> {
        super::read_counters(&[
            ("read_ops", &self.reads),
            ("write_ops", &self.writes),
            ("flush_ops", &self.flushes),
            ("read_bytes", &self.read_bytes),
            ("write_bytes", &self.write_bytes),
            ("invalid_requests", &self.invalid_requests),
            ("io_errors", &self.io_errors),
            ("syncs", &self.syncs),
            ("interrupts", &self.interrupts),
            ("worker_failures", &self.worker_failures),
        ])
    }
}

pub struct Block {
    file: Arc<File>,
    cfg: BlockConfig,
    capacity: u64,
    engine: EngineKind,
    counters: Arc<BlockCounters>,
    workers: Vec<(EventFd, JoinHandle<()>)>,
    /// Each queue worker's longest poll before it sleeps.
    poll_max: Duration,
}

/// Opens a disk image or block device and checks it from the descriptor: a regular file or
/// block device of at least one sector. Returns it (blocking again) and its size in bytes.
/// The device opens its disks this way, and the VMM checks a configuration's disks with it.
pub fn open_checked(path: &Path, write: bool, direct: bool) -> Result<(File, u64), BlockError> {
    let err = |source| BlockError::Open {
        path: path.to_owned(),
        source,
    };
    let mut opts = OpenOptions::new();
    opts.read(true).write(write);
    // O_NONBLOCK: a FIFO put where the disk was must not hang the open (it is refused below
    // from the descriptor itself, so a path swapped after a check cannot slip through); it
    // changes nothing for files and block devices.
    let mut flags = libc::O_NONBLOCK | libc::O_NOCTTY;
    if direct {
        flags |= libc::O_DIRECT;
    }
    opts.custom_flags(flags);
    // Never create or truncate: the file is the user's data.
    let file = opts.open(path).map_err(err)?;
    let ft = file.metadata().map_err(err)?.file_type();
    if !(ft.is_file() || ft.is_block_device()) {
        return Err(BlockError::NotAFile(path.to_owned()));
    }
    // Back to blocking: io_uring answers EAGAIN instead of waiting on an O_NONBLOCK file.
    clear_nonblock(&file).map_err(err)?;
    let size = disk_size(&file).map_err(err)?;
    if size < SECTOR_SIZE {
        return Err(BlockError::Empty(path.to_owned(), size));
    }
    Ok((file, size))
}

fn open_disk(cfg: &BlockConfig) -> Result<(File, u64), BlockError> {
    let (file, size) = open_checked(&cfg.path, !cfg.readonly, cfg.direct)?;
    lock::lock(&file, cfg.readonly).map_err(|e| BlockError::Locked(cfg.path.clone(), e))?;
    Ok((file, size))
}

fn clear_nonblock(file: &File) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: F_SETFL with flags read from the same descriptor.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The size in bytes of a disk image or block device (where `metadata().len()` is 0).
pub fn disk_size(file: &File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let meta = file.metadata()?;
    if meta.is_file() {
        // What the file system says (0 for /proc files, which cannot seek to their end).
        return Ok(meta.len());
    }
    // A block device: its metadata says 0; its end is its size.
    let mut f = file;
    f.seek(SeekFrom::End(0))
}

impl Block {
    pub fn new(cfg: BlockConfig) -> Result<Self, BlockError> {
        let (file, size) = open_disk(&cfg)?;
        let engine = cfg.engine.unwrap_or_else(EngineKind::detect);
        Ok(Block {
            file: Arc::new(file),
            capacity: size >> SECTOR_SHIFT,
            engine,
            cfg,
            counters: Arc::default(),
            workers: Vec::new(),
            poll_max: POLL_MAX,
        })
    }

    /// Sets how long each queue worker may poll before it sleeps (zero: never; the default
    /// is [`POLL_MAX`]). For comparisons; takes effect at the next activation.
    pub fn set_poll_max(&mut self, poll_max: Duration) {
        self.poll_max = poll_max;
    }

    /// Capacity in 512-byte sectors (a trailing partial sector is not exposed).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn engine(&self) -> EngineKind {
        self.engine
    }

    pub fn counters(&self) -> Arc<BlockCounters> {
        self.counters.clone()
    }

    pub fn path(&self) -> &Path {
        &self.cfg.path
    }

    fn config_space(&self) -> Vec<u8> {
        let mut c = vec![0u8; 64];
        c[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c[34..36].copy_from_slice(&self.cfg.num_queues.get().to_le_bytes());
        // Discard and write-zeroes limits (sectors) and segment counts.
        let max = (u32::MAX >> SECTOR_SHIFT).to_le_bytes();
        c[36..40].copy_from_slice(&max); // max_discard_sectors
        c[40..44].copy_from_slice(&1u32.to_le_bytes()); // max_discard_seg
        c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        c[48..52].copy_from_slice(&max); // max_write_zeroes_sectors
        c[52..56].copy_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
        c
    }

    fn stop_workers(&mut self) {
        for (kill, handle) in self.workers.drain(..) {
            let _ = kill.write(1);
            let _ = handle.join();
        }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.stop_workers();
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.cfg.queue_size.get(); usize::from(self.cfg.num_queues.get())]
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | F_SEG_MAX
            | F_BLK_SIZE
            | F_FLUSH;
        if self.cfg.readonly {
            f |= F_RO;
        } else {
            f |= F_DISCARD | F_WRITE_ZEROES;
        }
        if self.cfg.num_queues.get() > 1 {
            f |= F_MQ;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_space(), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.stop_workers();
        let result = self.start_workers(ctx);
        if result.is_err() {
            // The transport will not call reset() after a failed activation.
            self.stop_workers();
        }
        result
    }

    fn reset(&mut self) {
        self.stop_workers();
    }
}

impl Block {
    fn start_workers(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let io_err = |what| move |source| ActivateError::Io { what, source };
        for (index, (queue, evt)) in ctx.queues.into_iter().enumerate() {
            let engine: Box<dyn Engine> = match self.engine {
                EngineKind::IoUring => {
                    let (file, depth) = (self.file.clone(), queue.size());
                    let ring = seccomp::setup(move || UringEngine::new(file, depth))
                        .and_then(|r| r)
                        .map_err(io_err("creating an io_uring"))?;
                    Box::new(ring)
                }
                EngineKind::Sync => Box::new(SyncEngine::new(self.file.clone())),
            };
            let kill = EventFd::new(EFD_NONBLOCK).map_err(io_err("creating an eventfd"))?;
            let worker = Worker::new(
                queue,
                evt,
                kill.try_clone().map_err(io_err("cloning an eventfd"))?,
                ctx.mem.clone(),
                ctx.interrupt.clone(),
                engine,
                OpenDisk {
                    capacity: self.capacity,
                    readonly: self.cfg.readonly,
                    id: self.cfg.id.clone(),
                    file: self.file.clone(),
                },
                self.counters.clone(),
                self.poll_max,
            );
            let handle = super::worker::spawn(
                format!("blk-{}-q{index}", self.cfg.id),
                seccomp::ThreadKind::Block,
                format!("disk {}", self.cfg.id),
                ctx.interrupt.clone(),
                self.counters.worker_failures.clone(),
                move || worker.run(),
            )
            .map_err(io_err("spawning a disk worker"))?;
            self.workers.push((kill, handle));
        }
        Ok(())
    }
}
