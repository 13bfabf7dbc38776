//! Creates the virtio devices a configuration asks for and wires each one up: an MMIO
//! window on the bus, an irqfd for its interrupt, an ioeventfd per queue, and the
//! `virtio_mmio.device=` command-line entry through which the guest finds it (no PCI scan).

use std::sync::{Arc, Mutex};

use api::{DiskConfig, VmConfig};
use devices::virtio::block::{Block, BlockConfig, BlockCounters, BlockError};
use devices::virtio::mmio::{MMIO_WINDOW, NOTIFY_OFFSET};
use devices::virtio::{MmioTransport, VirtioDevice};
use devices::Bus;
use hypervisor::IoEventAddress;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::Result;

/// First virtio-mmio window, inside the MMIO hole below 4 GiB.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;

/// Legacy interrupt lines free for virtio devices: not the PIT (0), keyboard (1),
/// cascade (2), COM2/COM1 (3, 4), RTC (8) or the FPU (13).
const VIRTIO_IRQS: &[u32] = &[5, 6, 7, 9, 10, 11, 12, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23];

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error("too many virtio devices: at most {0}")]
    TooMany(usize),
    #[error("disk {path}: {what}")]
    DiskOption { path: String, what: String },
    #[error("wiring a virtio device: {0}")]
    Hypervisor(#[source] hypervisor::Error),
    #[error("virtio transport: {0}")]
    Transport(#[source] std::io::Error),
}

/// A disk as the VMM reports it.
pub struct DiskInfo {
    pub id: String,
    pub engine: &'static str,
    pub counters: Arc<BlockCounters>,
}

#[derive(Default)]
pub struct DeviceManager {
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    cmdline: Vec<String>,
    pub disks: Vec<DiskInfo>,
}

impl DeviceManager {
    pub fn new(
        vm: &dyn hypervisor::Vm,
        mem: &Arc<GuestMemoryMmap>,
        mmio: &Bus,
        config: &VmConfig,
    ) -> Result<Self> {
        let mut dm = DeviceManager::default();
        for (i, disk) in config.disks.iter().flatten().enumerate() {
            let block = Block::new(block_config(disk, i)?).map_err(DeviceError::from)?;
            dm.disks.push(DiskInfo {
                id: disk.id.clone().unwrap_or_else(|| format!("disk{i}")),
                engine: block.engine().name(),
                counters: block.counters(),
            });
            dm.add(vm, mem, mmio, Box::new(block))?;
        }
        Ok(dm)
    }

    /// Kernel parameters announcing the devices.
    pub fn cmdline(&self) -> String {
        self.cmdline.join(" ")
    }

    fn add(
        &mut self,
        vm: &dyn hypervisor::Vm,
        mem: &Arc<GuestMemoryMmap>,
        mmio: &Bus,
        device: Box<dyn VirtioDevice>,
    ) -> Result<()> {
        let index = self.transports.len();
        let irq = *VIRTIO_IRQS
            .get(index)
            .ok_or(DeviceError::TooMany(VIRTIO_IRQS.len()))?;
        let base = VIRTIO_MMIO_BASE + index as u64 * MMIO_WINDOW;
        let irq_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::Transport)?;
        vm.register_irqfd(&irq_evt, irq)
            .map_err(DeviceError::Hypervisor)?;
        let transport =
            MmioTransport::new(device, mem.clone(), irq_evt).map_err(DeviceError::Transport)?;
        for (q, evt) in transport.queue_events().iter().enumerate() {
            vm.register_ioevent(
                evt,
                IoEventAddress::Mmio(base + NOTIFY_OFFSET),
                Some(q as u32),
            )
            .map_err(DeviceError::Hypervisor)?;
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(transport.clone(), base, MMIO_WINDOW)?;
        self.cmdline
            .push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
        self.transports.push(transport);
        Ok(())
    }
}

fn block_config(disk: &DiskConfig, index: usize) -> Result<BlockConfig> {
    let bad = |what: String| DeviceError::DiskOption {
        path: disk.path.display().to_string(),
        what,
    };
    let num_queues = u16::try_from(disk.num_queues)
        .ok()
        .filter(|n| (1..=64).contains(n))
        .ok_or_else(|| bad(format!("num_queues must be 1 to 64, not {}", disk.num_queues)))?;
    if !disk.queue_size.is_power_of_two() {
        return Err(bad(format!(
            "queue_size must be a power of two, not {}",
            disk.queue_size
        ))
        .into());
    }
    Ok(BlockConfig {
        path: disk.path.clone(),
        readonly: disk.readonly,
        direct: disk.direct,
        num_queues,
        queue_size: disk.queue_size,
        id: disk.id.clone().unwrap_or_else(|| format!("disk{index}")),
        engine: None,
    })
}
