//! virtio devices and their virtio-mmio (version 2) transport.
//!
//! A device implements [`VirtioDevice`]: its identity, features, configuration space, and
//! what to do once the driver has set it up ([`VirtioDevice::activate`]). The transport in
//! [`mmio`] owns the register file, the queues' set-up and the interrupt status; the VMM puts
//! it on the MMIO bus, registers each queue's notify `EventFd` as an ioeventfd and the
//! interrupt `EventFd` as an irqfd, so a request costs no exit to user space on the vCPU.

pub mod block;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod rng;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod vsock;
pub mod worker;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use mmio::MmioTransport;

use virtio_bindings::{virtio_config, virtio_ids, virtio_mmio, virtio_ring};

/// Feature bits common to every device (virtio-bindings' bit numbers, as masks).
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_config::VIRTIO_F_VERSION_1;
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    use virtio_bindings::virtio_config as c;
    pub const ACKNOWLEDGE: u32 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    pub const DRIVER: u32 = c::VIRTIO_CONFIG_S_DRIVER;
    pub const DRIVER_OK: u32 = c::VIRTIO_CONFIG_S_DRIVER_OK;
    pub const FEATURES_OK: u32 = c::VIRTIO_CONFIG_S_FEATURES_OK;
    pub const DEVICE_NEEDS_RESET: u32 = c::VIRTIO_CONFIG_S_NEEDS_RESET;
    pub const FAILED: u32 = c::VIRTIO_CONFIG_S_FAILED;
}

/// Device type ids.
pub const TYPE_NET: u32 = virtio_ids::VIRTIO_ID_NET;
pub const TYPE_BLOCK: u32 = virtio_ids::VIRTIO_ID_BLOCK;
pub const TYPE_RNG: u32 = virtio_ids::VIRTIO_ID_RNG;
pub const TYPE_VSOCK: u32 = virtio_ids::VIRTIO_ID_VSOCK;
pub const TYPE_FS: u32 = virtio_ids::VIRTIO_ID_FS;

/// Interrupt status bits (MMIO `InterruptStatus`).
pub const INT_USED_RING: u32 = virtio_mmio::VIRTIO_MMIO_INT_VRING;
pub const INT_CONFIG: u32 = virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// The device's interrupt line: a status word the driver reads and acknowledges, and the
/// `EventFd` the VMM wired to the guest interrupt controller.
pub struct Interrupt {
    status: AtomicU32,
    evt: EventFd,
    /// Set by a device that met input it cannot recover from; the transport shows it as
    /// DEVICE_NEEDS_RESET.
    needs_reset: std::sync::atomic::AtomicBool,
}

impl Interrupt {
    pub fn new(evt: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            evt,
            needs_reset: Default::default(),
        }
    }

    /// Tells the driver that used buffers are available.
    pub fn signal_used(&self) {
        self.raise(INT_USED_RING);
    }

    /// Tells the driver the device needs a reset (a configuration-change interrupt).
    pub fn signal_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.raise(INT_CONFIG);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        // Fails only if the counter would overflow: an interrupt is pending anyway.
        let _ = self.evt.write(1);
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct ActivateContext {
    pub mem: Arc<GuestMemoryMmap>,
    /// The queues the driver enabled, in order, each with its notify event.
    pub queues: Vec<(Queue, EventFd)>,
    pub interrupt: Arc<Interrupt>,
    /// Features the driver accepted.
    pub acked_features: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {0} is not ready or not valid")]
    BadQueue(usize),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Features offered to the driver (must include VIRTIO_F_VERSION_1).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space (most devices ignore writes).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts serving the queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops serving (driver reset); the device must be ready to be activated again.
    fn reset(&mut self);
}

/// A device's counters as `vm.counters` reports them: each name with its value now.
pub trait DeviceCounters: Send + Sync {
    fn snapshot(&self) -> Vec<(&'static str, u64)>;
}

/// Reads each named counter.
pub(crate) fn read_counters(entries: &[(&'static str, &AtomicU64)]) -> Vec<(&'static str, u64)> {
    entries
        .iter()
        .map(|(k, v)| (*k, v.load(Ordering::Relaxed)))
        .collect()
}

/// Copies the bytes of `config` at `offset` into `data`, or zeroes where out of range.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

#[cfg(test)]
mod counter_tests {
    use super::DeviceCounters;

    fn names(c: &dyn DeviceCounters) -> Vec<&'static str> {
        c.snapshot().into_iter().map(|(k, _)| k).collect()
    }

    /// The names are `vm.counters`' API: clients read them.
    #[test]
    fn counter_names_are_the_api_s() {
        let disk = super::block::BlockCounters::default();
        disk.reads
            .fetch_add(3, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(disk.snapshot()[0], ("read_ops", 3));
        assert_eq!(
            names(&disk),
            [
                "read_ops",
                "write_ops",
                "flush_ops",
                "read_bytes",
                "write_bytes",
                "invalid_requests",
                "io_errors",
                "syncs",
                "interrupts",
                "worker_failures"
            ]
        );
        assert_eq!(
            names(&super::net::NetCounters::default()),
            [
                "rx_frames",
                "rx_bytes",
                "tx_frames",
                "tx_bytes",
                "tx_invalid",
                "rx_invalid",
                "tx_denied",
                "tx_errors",
                "rx_dropped",
                "rx_stalls",
                "ctrl_errors",
                "worker_failures"
            ]
        );
        assert_eq!(
            names(&super::rng::RngCounters::default()),
            [
                "bytes",
                "requests",
                "invalid_requests",
                "source_errors",
                "worker_failures"
            ]
        );
        assert_eq!(
            names(&super::fs::FsCounters::default()),
            [
                "backend_connected",
                "backend_lost",
                "failed_requests",
                "activations",
                "worker_failures"
            ]
        );
    }
}
