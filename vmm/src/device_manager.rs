//! Creates the virtio devices a configuration asks for and wires each one up: an MMIO
//! window on the bus, an irqfd for its interrupt, an ioeventfd per queue, and the
//! `virtio_mmio.device=` command-line entry through which the guest finds it (no PCI scan).

use std::sync::{Arc, Mutex};

use api::{ValidDisk, ValidFs, ValidNet, ValidVmConfig, ValidVsock, VmConfig};
use devices::virtio::block::engine::EngineKind;
use devices::virtio::block::{Block, BlockConfig, BlockCounters, BlockError};
use devices::virtio::mmio::{MMIO_WINDOW, NOTIFY_OFFSET};
use devices::virtio::net::{
    format_mac, CidrError, HostEnd, Ipv4Net, Net, NetCounters, NetDeviceConfig, NetError,
};
use devices::virtio::vsock::{
    EventSink, Vsock, VsockConfig as VsockDeviceConfig, VsockError, VsockEvent, VsockHandle,
    VsockOptions,
};
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
const VIRTIO_IRQS: &[u32] = &[
    5, 6, 7, 9, 10, 11, 12, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23,
];

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error("too many virtio devices: at most {0}")]
    TooMany(usize),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error(transparent)]
    Rng(#[from] devices::virtio::rng::RngError),
    #[error(transparent)]
    Fs(#[from] devices::virtio::fs::FsError),
    #[error("vsock: only one vsock device per VM")]
    SecondVsock,
    #[error("net {id}: deny: {source}")]
    Deny {
        id: String,
        #[source]
        source: CidrError,
    },
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

/// A virtio-fs share as the VMM reports it.
pub struct FsInfo {
    pub id: String,
    pub counters: Arc<devices::virtio::fs::FsCounters>,
}

/// A network interface as the VMM reports it.
pub struct NetInfo {
    pub id: String,
    /// The TAP's name on the host (as the kernel named it).
    pub tap: Option<String>,
    /// The guest's MAC address.
    pub mac: String,
    pub counters: Arc<NetCounters>,
}

#[derive(Default)]
pub struct DeviceManager {
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    cmdline: Vec<String>,
    pub disks: Vec<DiskInfo>,
    pub nets: Vec<NetInfo>,
    pub fs: Vec<FsInfo>,
    /// The vsock device: its socket (removed when this is dropped) and the agent's ready time.
    pub vsock: Option<VsockHandle>,
    /// The virtio-rng device's counters.
    pub rng: Option<Arc<devices::virtio::rng::RngCounters>>,
}

impl DeviceManager {
    /// The devices of `valid` (what `config` said, checked) and `config`'s rng.
    pub fn new(
        vm: &dyn hypervisor::Vm,
        mem: &Arc<GuestMemoryMmap>,
        mmio: &Bus,
        config: &VmConfig,
        valid: &ValidVmConfig,
    ) -> Result<Self> {
        let mut dm = DeviceManager::default();
        for disk in &valid.disks {
            let block = Block::new(block_config(disk)).map_err(DeviceError::from)?;
            if block.engine() != EngineKind::IoUring {
                log::warn!(
                    "disk {}: io_uring is not available here (kernel, seccomp or \
                     io_uring_disabled); using synchronous I/O, one request at a time per queue",
                    block.path().display()
                );
            }
            dm.disks.push(DiskInfo {
                id: disk.id.clone(),
                engine: block.engine().name(),
                counters: block.counters(),
            });
            dm.add(vm, mem, mmio, Box::new(block))?;
        }
        for net in &valid.nets {
            dm.add_net(vm, mem, mmio, net)?;
        }
        if let Some(vsock) = &valid.vsock {
            dm.add_vsock(vm, mem, mmio, vsock)?;
        }
        for fs in &valid.fs {
            let device = devices::virtio::fs::Fs::new(fs_config(fs)).map_err(DeviceError::from)?;
            dm.fs.push(FsInfo {
                id: device.config().id.clone(),
                counters: device.counters(),
            });
            dm.add(vm, mem, mmio, Box::new(device))?;
        }
        // Last: the slots of disks, nets, vsock and shares (what vm.add-* answered) stay as
        // they were.
        if let Some(rng) = &config.rng {
            let device = devices::virtio::rng::Rng::new(&rng.src).map_err(DeviceError::from)?;
            dm.rng = Some(device.counters());
            dm.add(vm, mem, mmio, Box::new(device))?;
        }
        Ok(dm)
    }

    /// Binds the hybrid vsock socket (so it exists before the guest runs) and wires a
    /// virtio-vsock device for it. Its events go to the event monitor.
    pub fn add_vsock(
        &mut self,
        vm: &dyn hypervisor::Vm,
        mem: &Arc<GuestMemoryMmap>,
        mmio: &Bus,
        cfg: &ValidVsock,
    ) -> Result<()> {
        if self.vsock.is_some() {
            return Err(DeviceError::SecondVsock.into());
        }
        let cid = cfg.cid.get();
        let events: EventSink = Arc::new(move |e| match e {
            VsockEvent::DriverReady => crate::event_monitor::emit(
                "vsock",
                "device_activated",
                serde_json::json!({"device": "vsock", "cid": cid}),
            ),
            VsockEvent::AgentReady { first } => crate::event_monitor::emit(
                "vsock",
                "agent_ready",
                serde_json::json!({"first": first, "port": devices::virtio::vsock::AGENT_PORT}),
            ),
            VsockEvent::ConnectRefused { port } => crate::event_monitor::emit(
                "vsock",
                "vsock_connect_refused",
                serde_json::json!({"port": port, "retrying": true}),
            ),
        });
        let (device, handle) = Vsock::new(VsockDeviceConfig {
            cid: cfg.cid,
            socket: cfg.socket.clone(),
            options: VsockOptions {
                boot_connect_timeout: cfg
                    .connect_timeout
                    .unwrap_or(devices::virtio::vsock::DEFAULT_BOOT_CONNECT_TIMEOUT),
                ..VsockOptions::default()
            },
            events: Some(events),
        })
        .map_err(DeviceError::from)?;
        self.add(vm, mem, mmio, Box::new(device))?;
        self.vsock = Some(handle);
        Ok(())
    }

    /// Opens the interface's TAP (or takes its fds) and wires a virtio-net device for it.
    pub fn add_net(
        &mut self,
        vm: &dyn hypervisor::Vm,
        mem: &Arc<GuestMemoryMmap>,
        mmio: &Bus,
        net: &ValidNet,
    ) -> Result<()> {
        let device = Net::new(net_config(net)?).map_err(DeviceError::from)?;
        let info = NetInfo {
            id: net.id.clone(),
            tap: device.tap_name().map(str::to_string),
            mac: format_mac(&device.mac()),
            counters: device.counters(),
        };
        self.add(vm, mem, mmio, Box::new(device))?;
        self.nets.push(info);
        Ok(())
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

fn block_config(disk: &ValidDisk) -> BlockConfig {
    BlockConfig {
        path: disk.path.clone(),
        readonly: disk.readonly,
        direct: disk.direct,
        num_queues: disk.num_queues,
        queue_size: disk.queue_size,
        id: disk.id.clone(),
        engine: disk.disable_io_uring.then_some(EngineKind::Sync),
    }
}

fn net_config(net: &ValidNet) -> Result<NetDeviceConfig> {
    // `api::Ipv4Cidr` refused host bits and long prefixes when it was parsed; its fields are
    // public, so the filter's own type is still made through its check.
    let deny = net
        .deny
        .iter()
        .map(|c| {
            Ipv4Net::new(c.addr, c.prefix).map_err(|source| DeviceError::Deny {
                id: net.id.clone(),
                source,
            })
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let host = if net.fds.is_empty() {
        HostEnd::Name(net.tap.clone())
    } else {
        HostEnd::Fds(net.fds.clone())
    };
    Ok(NetDeviceConfig {
        id: net.id.clone(),
        host,
        mac: net.mac,
        host_addr: net.host_addr,
        queue_pairs: net.queue_pairs,
        queue_size: net.queue_size,
        deny,
    })
}

fn fs_config(fs: &ValidFs) -> devices::virtio::fs::FsConfig {
    devices::virtio::fs::FsConfig {
        id: fs.id.clone(),
        tag: fs.tag.clone(),
        socket: fs.socket.clone(),
        request_queues: fs.request_queues,
        queue_size: fs.queue_size,
    }
}
