//! Configuration values that cannot hold a bad value: queue sizes and counts, the guest's vsock
//! context id, MAC addresses, netmasks, virtio-fs tags and the guest memory size.
//!
//! Each is made once, by its `new` (or `FromStr`), which says what is wrong with a bad value
//! ([`ValueError`]); the `api` crate builds them when a configuration arrives and the devices
//! take them, so a device cannot be given a value nobody checked and checks nothing again.
//! This crate sits below both (`api` must not depend on `devices`, nor `devices` on `api`).

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

#[cfg(test)]
mod tests;

/// The largest virtqueue the transport allows (virtio 1.x: `QueueNumMax` is at most 2^15).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Smallest guest the memory layout supports (`boot::layout::MIN_MEMORY`, which a test keeps
/// equal): the fixed tables plus room for a kernel.
pub const MIN_MEMORY: u64 = 16 << 20;
const MIN_MEMORY_MIB: u64 = MIN_MEMORY >> 20;
/// Most request queues of one disk.
pub const MAX_DISK_QUEUES: u16 = 64;
/// Most request queues of one virtio-fs device (besides its high-priority queue).
pub const MAX_FS_QUEUES: u16 = 64;
/// Most queue pairs of one network interface.
pub const MAX_NET_QUEUE_PAIRS: u16 = 16;
/// Most queues of one network interface.
const MAX_NET_QUEUES: u16 = 2 * MAX_NET_QUEUE_PAIRS;
/// Longest virtio-fs tag (`struct virtio_fs_config`).
pub const FS_TAG_MAX: usize = 36;

/// What is wrong with a value. The caller adds which device it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("queue_size must be a power of two {}, not {got}", size_range(*min))]
    QueueSize { got: u32, min: u16 },
    #[error("num_queues must be 1 to {max}, not {got}")]
    QueueCount { got: u32, max: u16 },
    #[error(
        "num_queues must be an even number from 2 to {MAX_NET_QUEUES} (a receive and a \
         transmit queue per pair), not {0}"
    )]
    NetQueues(u32),
    #[error("cid {0}: context ids 0-2 and 4294967295 are reserved")]
    Cid(u64),
    #[error("expected six hex bytes separated by ':'")]
    MacFormat,
    #[error("'{0}' is not a hex byte")]
    MacHexByte(String),
    #[error("a multicast address cannot be a NIC's address")]
    MacMulticast,
    #[error("the all-zero address cannot be a NIC's address")]
    MacZero,
    #[error("mask {0} is not a netmask (ones then zeroes)")]
    Netmask(Ipv4Addr),
    #[error("tag {tag:?}: must be 1 to {FS_TAG_MAX} bytes without NUL, not {len}")]
    FsTag { tag: String, len: usize },
    #[error("memory size must be greater than zero")]
    NoMemory,
    #[error("memory size {0} is not a multiple of 4 KiB (4096 bytes)")]
    MemoryAlignment(u64),
    #[error("memory size {0} bytes is below the minimum of {MIN_MEMORY_MIB} MiB")]
    MemoryTooSmall(u64),
}

fn size_range(min: u16) -> String {
    match min {
        0 | 1 => format!("up to {MAX_QUEUE_SIZE}"),
        _ => format!("from {min} to {MAX_QUEUE_SIZE}"),
    }
}

/// A virtqueue size: a power of two from `MIN` to 32768.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QueueSizeMin<const MIN: u16>(u16);

/// A virtqueue size: a power of two up to 32768.
pub type QueueSize = QueueSizeMin<1>;
/// A network queue's size: at least 2 (a receive queue needs room for a frame's header and
/// its data).
pub type NetQueueSize = QueueSizeMin<2>;

impl<const MIN: u16> QueueSizeMin<MIN> {
    pub fn new(n: u32) -> Result<Self, ValueError> {
        match u16::try_from(n) {
            Ok(v) if v.is_power_of_two() && v >= MIN && v <= MAX_QUEUE_SIZE => Ok(QueueSizeMin(v)),
            _ => Err(ValueError::QueueSize { got: n, min: MIN }),
        }
    }

    pub const fn get(self) -> u16 {
        self.0
    }
}

/// How many queues of one kind a device has: 1 to `MAX`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QueueCount<const MAX: u16>(u16);

/// A disk's request queues.
pub type DiskQueues = QueueCount<MAX_DISK_QUEUES>;
/// A virtio-fs device's request queues.
pub type FsQueues = QueueCount<MAX_FS_QUEUES>;

impl<const MAX: u16> QueueCount<MAX> {
    pub fn new(n: u32) -> Result<Self, ValueError> {
        match u16::try_from(n) {
            Ok(v) if (1..=MAX).contains(&v) => Ok(QueueCount(v)),
            _ => Err(ValueError::QueueCount { got: n, max: MAX }),
        }
    }

    pub const fn get(self) -> u16 {
        self.0
    }
}

/// A network interface's queue pairs (one receive and one transmit queue each): 1 to 16.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NetQueuePairs(u16);

impl NetQueuePairs {
    /// From the number of queues (`num_queues`, Cloud Hypervisor's count): even, 2 to 32.
    pub fn from_queues(queues: u32) -> Result<Self, ValueError> {
        match u16::try_from(queues / 2) {
            Ok(pairs) if queues.is_multiple_of(2) && (1..=MAX_NET_QUEUE_PAIRS).contains(&pairs) => {
                Ok(NetQueuePairs(pairs))
            }
            _ => Err(ValueError::NetQueues(queues)),
        }
    }

    pub const fn get(self) -> u16 {
        self.0
    }
}

/// A guest's vsock context id: 0-2 (hypervisor, local, host) and `u32::MAX` (any) are
/// reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GuestCid(u32);

impl GuestCid {
    pub fn new(cid: u64) -> Result<Self, ValueError> {
        match u32::try_from(cid) {
            Ok(c) if c >= 3 && c != u32::MAX => Ok(GuestCid(c)),
            _ => Err(ValueError::Cid(cid)),
        }
    }

    /// As the device's configuration space holds it (`guest_cid`, le64).
    pub const fn get(self) -> u64 {
        self.0 as u64
    }
}

/// A NIC's MAC address: unicast, not all zeroes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr([u8; 6]);

impl MacAddr {
    pub fn new(bytes: [u8; 6]) -> Result<Self, ValueError> {
        if bytes[0] & 1 == 1 {
            return Err(ValueError::MacMulticast);
        }
        if bytes == [0; 6] {
            return Err(ValueError::MacZero);
        }
        Ok(MacAddr(bytes))
    }

    pub const fn bytes(self) -> [u8; 6] {
        self.0
    }
}

/// `aa:bb:cc:dd:ee:ff`.
impl FromStr for MacAddr {
    type Err = ValueError;

    fn from_str(v: &str) -> Result<Self, ValueError> {
        let parts: Vec<&str> = v.split(':').collect();
        if parts.len() != 6 {
            return Err(ValueError::MacFormat);
        }
        let mut mac = [0u8; 6];
        for (b, p) in mac.iter_mut().zip(parts) {
            if p.len() != 2 {
                return Err(ValueError::MacFormat);
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| ValueError::MacHexByte(p.into()))?;
        }
        MacAddr::new(mac)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// An IPv4 netmask: ones, then zeroes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Netmask(Ipv4Addr);

impl Netmask {
    pub fn new(mask: Ipv4Addr) -> Result<Self, ValueError> {
        let m = u32::from(mask);
        // Ones then zeroes: the inverted mask plus one is a power of two (or zero for /0).
        if (!m).wrapping_add(1) & !m != 0 {
            return Err(ValueError::Netmask(mask));
        }
        Ok(Netmask(mask))
    }

    pub const fn addr(self) -> Ipv4Addr {
        self.0
    }
}

/// What the guest mounts (`mount -t virtiofs TAG DIR`): 1 to 36 bytes without NUL.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FsTag(String);

impl FsTag {
    pub fn new(tag: &str) -> Result<Self, ValueError> {
        if tag.is_empty() || tag.len() > FS_TAG_MAX || tag.contains('\0') {
            return Err(ValueError::FsTag {
                tag: tag.into(),
                len: tag.len(),
            });
        }
        Ok(FsTag(tag.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for FsTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Guest RAM in bytes: whole 4 KiB pages, at least [`MIN_MEMORY`]. Whether the host has
/// that much is checked where the host is known (the VMM).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MemorySize(u64);

impl MemorySize {
    pub fn new(bytes: u64) -> Result<Self, ValueError> {
        if bytes == 0 {
            return Err(ValueError::NoMemory);
        }
        if !bytes.is_multiple_of(4096) {
            return Err(ValueError::MemoryAlignment(bytes));
        }
        if bytes < MIN_MEMORY {
            return Err(ValueError::MemoryTooSmall(bytes));
        }
        Ok(MemorySize(bytes))
    }

    pub const fn get(self) -> u64 {
        self.0
    }
}
