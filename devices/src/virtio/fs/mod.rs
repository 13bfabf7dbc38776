//! virtio-fs (virtio 1.x section 5.11) over vhost-user: the guest's FUSE requests are served
//! by a back-end process (virtiofsd) that maps guest memory and reads the vrings itself; podvmm
//! only sets the device up, relays its interrupts and watches it ([`worker`]).
//!
//! - [`frontend`]: the vhost-user protocol, through the rust-vmm `vhost` crate.
//! - [`worker`]: the device's thread while the driver is up.
//! - [`failover`]: `EIO` for every request once the back-end is gone.
//!
//! The back-end is connected and negotiated when the device is made (`vm.boot`), so a socket
//! that is no vhost-user back-end fails the boot with its reason. There is no DAX window:
//! it needs a shared-memory BAR that virtio-mmio does not have in Linux, and Kata's default
//! configuration does not use it (`virtio_fs_cache_size = 0`).

pub mod failover;
pub mod frontend;
mod worker;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use validated::{FsQueues, FsTag, QueueSize};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    ActivateContext, ActivateError, VirtioDevice, TYPE_FS, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use frontend::{Connection, FrontendError};

/// Bytes of the tag in the configuration space (`struct virtio_fs_config`).
pub const TAG_LEN: usize = validated::FS_TAG_MAX;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("fs {id}: {source}")]
    Backend {
        id: String,
        #[source]
        source: FrontendError,
    },
}

/// What the device is (`api::ValidFs`): the tag and the numbers were checked when the
/// configuration arrived.
#[derive(Clone, Debug)]
pub struct FsConfig {
    pub id: String,
    /// The name the guest mounts (`mount -t virtiofs TAG /mnt`).
    pub tag: FsTag,
    pub socket: PathBuf,
    pub request_queues: FsQueues,
    pub queue_size: QueueSize,
}

/// What the device did, for `vm.counters`.
#[derive(Debug, Default)]
pub struct FsCounters {
    /// 1 while the back-end holds the vrings.
    pub backend_connected: AtomicU64,
    /// Times the back-end went away (or refused the vrings).
    pub backend_lost: AtomicU64,
    /// Requests answered `EIO` by podvmm because the back-end was gone.
    pub failed_requests: AtomicU64,
    pub activations: AtomicU64,
    pub worker_failures: Arc<AtomicU64>,
}

impl crate::virtio::DeviceCounters for FsCounters {
    fn snapshot(&self) -> Vec<(&'static str, u64)> {
        crate::virtio::read_counters(&[
            ("backend_connected", &self.backend_connected),
            ("backend_lost", &self.backend_lost),
            ("failed_requests", &self.failed_requests),
            ("activations", &self.activations),
            ("worker_failures", &self.worker_failures),
        ])
    }
}

pub struct Fs {
    config: FsConfig,
    conn: Arc<Connection>,
    counters: Arc<FsCounters>,
    worker: Option<(EventFd, JoinHandle<()>)>,
}

impl Fs {
    /// Connects to the back-end and negotiates with it.
    pub fn new(config: FsConfig) -> Result<Self, FsError> {
        let queues = 1 + usize::from(config.request_queues.get());
        let conn =
            Connection::connect(&config.socket, queues).map_err(|source| FsError::Backend {
                id: config.id.clone(),
                source,
            })?;
        Ok(Fs {
            config,
            conn: Arc::new(conn),
            counters: Arc::default(),
            worker: None,
        })
    }

    pub fn counters(&self) -> Arc<FsCounters> {
        self.counters.clone()
    }

    pub fn config(&self) -> &FsConfig {
        &self.config
    }

    fn stop_worker(&mut self) {
        if let Some((kill, handle)) = self.worker.take() {
            let _ = kill.write(1);
            let _ = handle.join();
        }
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.config.queue_size.get(); 1 + usize::from(self.config.request_queues.get())]
    }

    fn features(&self) -> u64 {
        // What both the back-end and podvmm's own handling after a failure can do.
        self.conn.features()
            & (VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; TAG_LEN + 4];
        let tag = self.config.tag.as_str().as_bytes();
        config[..tag.len()].copy_from_slice(tag);
        let queues = u32::from(self.config.request_queues.get());
        config[TAG_LEN..].copy_from_slice(&queues.to_le_bytes());
        super::read_config_bytes(&config, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.stop_worker();
        let io_err = |what| move |source| ActivateError::Io { what, source };
        // The back-end is told each vring by its index: the driver must set up all of them.
        let wanted = 1 + usize::from(self.config.request_queues.get());
        if ctx.queues.len() != wanted {
            return Err(ActivateError::BadQueue(ctx.queues.len()));
        }
        let (queues, kicks): (Vec<_>, Vec<_>) = ctx.queues.into_iter().unzip();
        let calls = (0..wanted)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(io_err("creating the back-end's interrupt events"))?;
        let kill = EventFd::new(EFD_NONBLOCK).map_err(io_err("creating an eventfd"))?;
        let worker = worker::Worker::new(
            self.config.id.clone(),
            self.conn.clone(),
            ctx.mem,
            ctx.interrupt.clone(),
            queues,
            kicks,
            calls,
            kill.try_clone().map_err(io_err("cloning an eventfd"))?,
            ctx.acked_features,
            self.counters.clone(),
        );
        let handle = super::worker::spawn(
            format!("fs-{}", self.config.id),
            seccomp::ThreadKind::Fs,
            format!("fs {}", self.config.id),
            ctx.interrupt,
            self.counters.worker_failures.clone(),
            move || worker.run(),
        )
        .map_err(io_err("spawning the virtio-fs worker"))?;
        self.counters.activations.fetch_add(1, Ordering::Relaxed);
        self.worker = Some((kill, handle));
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
    }
}
