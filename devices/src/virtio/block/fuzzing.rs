//! A virtio-blk queue worker driven in place, without its thread: for the fuzz targets (cargo
//! feature `fuzzing`), which need every request a ring holds parsed, run by the real I/O
//! engine and answered inside the call that built the ring.

use std::fs::File;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::engine::{Engine, EngineKind, SyncEngine, UringEngine};
use super::request::SECTOR_SHIFT;
use super::{BlockCounters, OpenDisk, Worker};
use crate::virtio::Interrupt;

pub struct Harness {
    worker: Worker,
    counters: Arc<BlockCounters>,
}

impl Harness {
    /// A worker serving `queue` in `mem` from `file` (whose length, in whole sectors, is the
    /// capacity) with an engine of `kind`.
    pub fn new(
        mem: Arc<GuestMemoryMmap>,
        queue: Queue,
        file: Arc<File>,
        readonly: bool,
        kind: EngineKind,
    ) -> std::io::Result<Self> {
        let capacity = file.metadata()?.len() >> SECTOR_SHIFT;
        let engine: Box<dyn Engine> = match kind {
            EngineKind::IoUring => Box::new(UringEngine::new(file.clone(), queue.size())?),
            EngineKind::Sync => Box::new(SyncEngine::new(file.clone())),
        };
        let counters = Arc::new(BlockCounters::default());
        let worker = Worker::new(
            queue,
            EventFd::new(EFD_NONBLOCK)?,
            EventFd::new(EFD_NONBLOCK)?,
            mem,
            Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK)?)),
            engine,
            OpenDisk {
                capacity,
                readonly,
                id: "fuzz".into(),
                file,
            },
            counters.clone(),
            // Deterministic: the harness drives the worker pass by pass.
            std::time::Duration::ZERO,
        );
        Ok(Harness { worker, counters })
    }

    /// Serves every chain the ring offers and waits until the engine finished them all.
    pub fn serve(&mut self) -> std::io::Result<()> {
        self.worker.process_queue();
        let mut fired = Vec::new();
        let mut idle_waits = 0;
        while self.worker.engine.in_flight() > 0 {
            let before = self.worker.engine.in_flight();
            self.worker.engine.wait(&mut fired, true)?;
            self.worker.complete();
            if self.worker.engine.in_flight() >= before {
                idle_waits += 1;
                if idle_waits == 1000 {
                    return Err(std::io::Error::other(
                        "the engine stopped finishing requests",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The avail-ring position the worker reached (chains it took).
    pub fn next_avail(&self) -> u16 {
        self.worker.queue.next_avail()
    }

    /// How many chains the worker returned to the used ring.
    pub fn next_used(&self) -> u16 {
        self.worker.queue.next_used()
    }

    /// Whether the worker gave up on a corrupt ring.
    pub fn is_broken(&self) -> bool {
        self.worker.broken
    }

    pub fn counters(&self) -> &BlockCounters {
        &self.counters
    }
}
