//! virtio-net over a TAP interface.
//!
//! One thread per queue pair ([`worker::QueuePair`]), each with its own TAP queue
//! (`IFF_MULTI_QUEUE` when there are several). The TAP is used with `IFF_VNET_HDR` and a
//! 12-byte header, so checksum and segmentation offloads pass through: the device offers
//! them, and once the driver has chosen, `TUNSETOFFLOAD` tells the TAP which ones it may use
//! towards the guest. Mergeable receive buffers let a 64 KiB segment land in the guest's
//! page-sized buffers. An optional per-interface egress deny list ([`filter`]) drops guest
//! frames to denied IPv4 destinations before they reach the host.

mod ctrl;
pub mod filter;
pub mod tap;
pub mod worker;

use std::net::Ipv4Addr;
use std::os::fd::RawFd;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;

use validated::{MacAddr, NetQueuePairs, NetQueueSize, Netmask};
use virtio_bindings::bindings::virtio_net as vn;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::ctrl::CtrlQueue;
pub use self::filter::{CidrError, EgressFilter, Ipv4Net};
pub use self::tap::{NetBackend, Tap, TapError, VNET_HDR_LEN};
pub use self::worker::{NetCounters, MAX_TX_CHAIN, RX_NEED_PLAIN};
use self::worker::{PairControl, PairEvents, PairSetup, QueuePair, SideQueue};
use super::{
    ActivateContext, ActivateError, VirtioDevice, TYPE_NET, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

const fn bit(b: u32) -> u64 {
    1 << b
}

/// virtio-net feature bits podvmm offers.
pub const F_CSUM: u64 = bit(vn::VIRTIO_NET_F_CSUM);
pub const F_GUEST_CSUM: u64 = bit(vn::VIRTIO_NET_F_GUEST_CSUM);
pub const F_MAC: u64 = bit(vn::VIRTIO_NET_F_MAC);
pub const F_GUEST_TSO4: u64 = bit(vn::VIRTIO_NET_F_GUEST_TSO4);
pub const F_GUEST_TSO6: u64 = bit(vn::VIRTIO_NET_F_GUEST_TSO6);
pub const F_GUEST_ECN: u64 = bit(vn::VIRTIO_NET_F_GUEST_ECN);
pub const F_GUEST_UFO: u64 = bit(vn::VIRTIO_NET_F_GUEST_UFO);
pub const F_HOST_TSO4: u64 = bit(vn::VIRTIO_NET_F_HOST_TSO4);
pub const F_HOST_TSO6: u64 = bit(vn::VIRTIO_NET_F_HOST_TSO6);
pub const F_HOST_ECN: u64 = bit(vn::VIRTIO_NET_F_HOST_ECN);
pub const F_HOST_UFO: u64 = bit(vn::VIRTIO_NET_F_HOST_UFO);
pub const F_MRG_RXBUF: u64 = bit(vn::VIRTIO_NET_F_MRG_RXBUF);
pub const F_STATUS: u64 = bit(vn::VIRTIO_NET_F_STATUS);
pub const F_CTRL_VQ: u64 = bit(vn::VIRTIO_NET_F_CTRL_VQ);
pub const F_MQ: u64 = bit(vn::VIRTIO_NET_F_MQ);

/// Most queue pairs per interface.
pub const MAX_QUEUE_PAIRS: u16 = validated::MAX_NET_QUEUE_PAIRS;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("net {id}: {source}")]
    Tap {
        id: String,
        #[source]
        source: TapError,
    },
    #[error("net {id}: {fds} TAP fds were received, but {pairs} queue pairs are configured (num_queues = 2 x fds)")]
    FdCount { id: String, fds: usize, pairs: u16 },
    #[error("net {id}: {got} host ends given for {pairs} queue pairs")]
    Backends { id: String, got: usize, pairs: u16 },
    #[error("net {id}: cannot make a random MAC address: {source}")]
    Random {
        id: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where the frames go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostEnd {
    /// A TAP opened (created if missing) by name; `None` lets the kernel name it.
    Name(Option<String>),
    /// TAP descriptors handed over by a client, one per queue pair (duplicated here).
    Fds(Vec<RawFd>),
}

/// What the VMM asks for (`api::ValidNet`, kept free of serde here): the numbers, the MAC and
/// the netmask were checked when the configuration arrived.
#[derive(Clone, Debug)]
pub struct NetDeviceConfig {
    pub id: String,
    pub host: HostEnd,
    /// The guest's MAC; a random locally administered one when `None`.
    pub mac: Option<MacAddr>,
    /// Address and netmask for the host side of the TAP, which is then brought up.
    pub host_addr: Option<(Ipv4Addr, Netmask)>,
    pub queue_pairs: NetQueuePairs,
    pub queue_size: NetQueueSize,
    /// Egress deny list.
    pub deny: Vec<Ipv4Net>,
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn random_mac(id: &str) -> Result<[u8; 6], NetError> {
    let mut mac = [0u8; 6];
    // SAFETY: getrandom writes at most `mac.len()` bytes into our buffer.
    let n = unsafe { libc::getrandom(mac.as_mut_ptr().cast(), mac.len(), 0) };
    if n != mac.len() as isize {
        return Err(NetError::Random {
            id: id.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    // Locally administered, unicast.
    mac[0] = (mac[0] & !0x01) | 0x02;
    Ok(mac)
}

/// The `TUN_F_*` offloads matching what the driver accepted: what the TAP may hand the guest.
pub fn tap_offload(acked: u64) -> u32 {
    let mut f = 0;
    // Every segmentation offload depends on checksum offload (virtio 5.1.3.1; and the TAP
    // refuses them without TUN_F_CSUM).
    if acked & F_GUEST_CSUM != 0 {
        f |= libc::TUN_F_CSUM;
        if acked & F_GUEST_TSO4 != 0 {
            f |= libc::TUN_F_TSO4;
        }
        if acked & F_GUEST_TSO6 != 0 {
            f |= libc::TUN_F_TSO6;
        }
        if acked & F_GUEST_ECN != 0 && f & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
            f |= libc::TUN_F_TSO_ECN;
        }
        if acked & F_GUEST_UFO != 0 {
            f |= libc::TUN_F_UFO;
        }
    }
    f
}

pub struct Net {
    id: String,
    mac: [u8; 6],
    queue_pairs: u16,
    queue_size: u16,
    backends: Vec<Arc<dyn NetBackend>>,
    tap_name: Option<String>,
    counters: Arc<NetCounters>,
    filter: Arc<EgressFilter>,
    workers: Vec<(EventFd, JoinHandle<()>)>,
}

impl Net {
    /// Opens the TAP (or takes the given fds), configures its host side if asked, and
    /// builds the device. On error nothing is left behind: a TAP created here vanishes
    /// with its descriptors, and a half-set address is removed.
    pub fn new(cfg: NetDeviceConfig) -> Result<Self, NetError> {
        let id = cfg.id.clone();
        let pairs = cfg.queue_pairs.get();
        let tap_err = |source| NetError::Tap {
            id: id.clone(),
            source,
        };
        let taps = match &cfg.host {
            HostEnd::Name(name) => Tap::open_named(name.as_deref().unwrap_or("podvmm%d"), pairs),
            HostEnd::Fds(fds) => {
                if fds.len() != usize::from(pairs) {
                    return Err(NetError::FdCount {
                        id,
                        fds: fds.len(),
                        pairs,
                    });
                }
                Tap::from_fds(fds)
            }
        }
        .map_err(tap_err)?;
        for t in &taps {
            // Until the driver says otherwise, the guest takes no offloads.
            t.set_offload(0).map_err(|source| {
                tap_err(TapError::Ioctl {
                    name: t.name().to_string(),
                    what: "clearing its offloads",
                    source,
                })
            })?;
        }
        if let (Some((ip, mask)), Some(first)) = (cfg.host_addr, taps.first()) {
            first.configure_host(ip, mask.addr()).map_err(tap_err)?;
        }
        let tap_name = taps.first().map(|t| t.name().to_string());
        let backends = taps
            .into_iter()
            .map(|t| Arc::new(t) as Arc<dyn NetBackend>)
            .collect();
        let mut net = Net::with_backends(cfg, backends)?;
        net.tap_name = tap_name;
        Ok(net)
    }

    /// Builds the device over host ends of any kind (tests use socketpairs), one per pair.
    pub fn with_backends(
        cfg: NetDeviceConfig,
        backends: Vec<Arc<dyn NetBackend>>,
    ) -> Result<Self, NetError> {
        let pairs = cfg.queue_pairs.get();
        if backends.len() != usize::from(pairs) {
            return Err(NetError::Backends {
                id: cfg.id,
                got: backends.len(),
                pairs,
            });
        }
        let mac = match cfg.mac {
            Some(mac) => mac.bytes(),
            None => random_mac(&cfg.id)?,
        };
        Ok(Net {
            id: cfg.id,
            mac,
            queue_pairs: pairs,
            queue_size: cfg.queue_size.get(),
            backends,
            tap_name: None,
            counters: Arc::default(),
            filter: Arc::new(EgressFilter::new(cfg.deny)),
            workers: Vec::new(),
        })
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The TAP interface's name (as the kernel named it), when the host end is a TAP.
    pub fn tap_name(&self) -> Option<&str> {
        self.tap_name.as_deref()
    }

    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    fn config_space(&self) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[0..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&(vn::VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c[8..10].copy_from_slice(&self.queue_pairs.to_le_bytes());
        c
    }

    fn stop_workers(&mut self) {
        for (kill, handle) in self.workers.drain(..) {
            let _ = kill.write(1);
            let _ = handle.join();
        }
    }

    fn start(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let io_err = |what| move |source| ActivateError::Io { what, source };
        let acked = ctx.acked_features;
        let pairs_used = if acked & F_MQ != 0 {
            usize::from(self.queue_pairs)
        } else {
            1
        };
        let has_ctrl = acked & F_CTRL_VQ != 0;
        let expected = pairs_used * 2 + usize::from(has_ctrl);
        if ctx.queues.len() != expected {
            return Err(ActivateError::BadQueue(ctx.queues.len().min(expected)));
        }
        let offload = tap_offload(acked);
        for b in &self.backends {
            b.set_offload(offload)
                .map_err(io_err("setting the TAP's offloads (TUNSETOFFLOAD)"))?;
        }
        // Only the first pair carries frames until the driver asks for more (virtio 5.1.6.5.5).
        let mut controls = Vec::new();
        for (i, b) in self.backends.iter().enumerate() {
            b.set_queue_enabled(i == 0)
                .map_err(io_err("attaching or detaching a TAP queue"))?;
            if i < pairs_used {
                controls.push(Arc::new(PairControl {
                    backend: b.clone(),
                    enabled: AtomicBool::new(i == 0),
                    wake: EventFd::new(EFD_NONBLOCK).map_err(io_err("creating an eventfd"))?,
                }));
            }
        }
        let gso = offload & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO) != 0;
        let rx_need = if gso { MAX_TX_CHAIN } else { RX_NEED_PLAIN };
        let mut queues = ctx.queues.into_iter();
        let mut pairs = Vec::new();
        for control in &controls {
            let (Some((rx, rx_evt)), Some((tx, tx_evt))) = (queues.next(), queues.next()) else {
                return Err(ActivateError::BadQueue(pairs.len() * 2));
            };
            pairs.push((rx, rx_evt, tx, tx_evt, control.clone()));
        }
        let mut side: Option<Box<dyn SideQueue>> = match queues.next() {
            Some((queue, evt)) => Some(Box::new(CtrlQueue {
                id: self.id.clone(),
                mem: ctx.mem.clone(),
                queue,
                evt,
                interrupt: ctx.interrupt.clone(),
                counters: self.counters.clone(),
                pairs: controls.clone(),
            })),
            None => None,
        };
        for (index, (rx, rx_evt, tx, tx_evt, control)) in pairs.into_iter().enumerate() {
            let kill = EventFd::new(EFD_NONBLOCK).map_err(io_err("creating an eventfd"))?;
            let events = PairEvents {
                rx: rx_evt,
                tx: tx_evt,
                kill: kill.try_clone().map_err(io_err("cloning an eventfd"))?,
                control: control.clone(),
                // Made here: the worker's filter allows no eventfd2.
                more: EventFd::new(EFD_NONBLOCK).map_err(io_err("creating an eventfd"))?,
            };
            let pair = QueuePair::new(PairSetup {
                id: self.id.clone(),
                mem: ctx.mem.clone(),
                rx,
                tx,
                backend: control.backend.clone(),
                interrupt: ctx.interrupt.clone(),
                counters: self.counters.clone(),
                filter: self.filter.clone(),
                mergeable: acked & F_MRG_RXBUF != 0,
                rx_need,
            });
            let side = side.take();
            let handle = super::worker::spawn(
                format!("net-{}-q{index}", self.id),
                seccomp::ThreadKind::Net,
                format!("net {}", self.id),
                ctx.interrupt.clone(),
                self.counters.worker_failures.clone(),
                move || pair.run(events, side),
            )
            .map_err(io_err("spawning a network worker"))?;
            self.workers.push((kill, handle));
        }
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop_workers();
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        let mut n = usize::from(self.queue_pairs) * 2;
        if self.queue_pairs > 1 {
            n += 1; // the control queue
        }
        vec![self.queue_size; n]
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | F_CSUM
            | F_GUEST_CSUM
            | F_GUEST_TSO4
            | F_GUEST_TSO6
            | F_GUEST_ECN
            | F_GUEST_UFO
            | F_HOST_TSO4
            | F_HOST_TSO6
            | F_HOST_ECN
            | F_HOST_UFO
            | F_MRG_RXBUF
            | F_MAC
            | F_STATUS;
        if self.queue_pairs > 1 {
            f |= F_CTRL_VQ | F_MQ;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_space(), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let result = self.start(ctx);
        if result.is_err() {
            self.stop_workers();
        }
        result
    }

    fn reset(&mut self) {
        self.stop_workers();
    }
}

#[cfg(test)]
mod tests;
