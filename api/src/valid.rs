//! The one place a configuration is checked: [`VmConfig::validated`] turns what was parsed
//! (from JSON or the command line) into a [`ValidVmConfig`] whose device parts hold
//! [`validated`] values, which the VMM hands to the devices; each mistake is one
//! [`ValidationError`], and [`From<ValidationError> for ApiError`](ApiError) is where those
//! become HTTP statuses. What needs the host (files, sockets, TAP descriptors, the host's
//! memory) is checked by the VMM, once, where it opens them.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use validated::{
    DiskQueues, FsQueues, FsTag, GuestCid, MacAddr, MemorySize, NetQueuePairs, NetQueueSize,
    Netmask, QueueSize, ValueError,
};

use crate::config::{ConsoleOutputMode, VmConfig, HUGEPAGE_SIZES};
use crate::devices::{
    DiskConfig, FsConfig, ImageType, Ipv4Cidr, NetConfig, VsockConfig, VSOCK_CONNECT_TIMEOUT_RANGE,
};
use crate::messages::ApiError;
use crate::pod::MAX_VCPUS;

/// What is wrong with a configuration. All are the client's mistakes: 400, except a device id
/// or tag taken by a device already added (409); see `From<ValidationError> for ApiError`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ValidationError {
    #[error("no kernel given (payload.kernel / --kernel)")]
    NoKernel,
    #[error("boot_vcpus must be at least 1")]
    NoVcpus,
    #[error("max_vcpus ({max}) must be at least boot_vcpus ({boot})")]
    MaxVcpus { boot: u32, max: u32 },
    #[error("{0} vCPUs requested; podvmm supports at most {MAX_VCPUS}")]
    TooManyVcpus(u32),
    #[error(transparent)]
    Memory(ValueError),
    #[error("device id {0} is used twice")]
    DuplicateId(String),
    #[error("console mode {0:?} is not supported (podvmm has no virtio-console; use off)")]
    Console(ConsoleOutputMode),
    #[error("serial mode File needs a file path")]
    SerialFile,
    #[error("memory hugepage_size {0} needs hugepages=true")]
    HugepageSizeAlone(u64),
    #[error("memory hugepage_size {0} is not one x86 offers (2 MiB: 2097152, 1 GiB: 1073741824)")]
    HugepageSize(u64),
    #[error("memory size {size} is not a multiple of the hugepage size {page}")]
    HugepageAlignment { size: u64, page: u64 },
    #[error("fs tag {0} is used twice")]
    DuplicateTag(String),
    #[error(
        "fs {0}: a vhost-user back-end maps guest memory, so it must be shared: set \
         memory.shared=true (--memory shared=on)"
    )]
    FsNeedsSharedMemory(String),
    /// A device's value (`device` says which: `disk PATH`, `net ID`, `vsock`, `fs TAG`).
    #[error("{device}: {source}")]
    Value {
        device: String,
        #[source]
        source: ValueError,
    },
    #[error("fs {0}")]
    FsTag(#[source] ValueError),
    #[error("net {id}: mac {mac}: {source}")]
    Mac {
        id: String,
        mac: String,
        #[source]
        source: ValueError,
    },
    #[error("net {0}: mask given without ip")]
    MaskWithoutIp(String),
    #[error(
        "net {id}: {fds} TAP fds were received, but num_queues is {queues} (num_queues = 2 x \
         fds)"
    )]
    NetFds { id: String, fds: usize, queues: u32 },
    #[error("{0}: socket path is empty")]
    EmptySocket(String),
    #[error(
        "vsock connect_timeout={secs}: must be {} to {} seconds",
        VSOCK_CONNECT_TIMEOUT_RANGE.start(),
        VSOCK_CONNECT_TIMEOUT_RANGE.end()
    )]
    ConnectTimeout { secs: u64 },
    /// `vm.add-*`: the id is taken by a device added before.
    #[error("device id {0} is already in use")]
    IdInUse(String),
    /// `vm.add-fs`: the tag is taken by a share added before.
    #[error("fs tag {0} is already in use")]
    TagInUse(String),
}

/// The one mapping of configuration mistakes to HTTP statuses.
impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> ApiError {
        let msg = e.to_string();
        match e {
            ValidationError::IdInUse(_) | ValidationError::TagInUse(_) => ApiError::Conflict(msg),
            _ => ApiError::BadRequest(msg),
        }
    }
}

/// A disk whose numbers were checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidDisk {
    pub id: String,
    pub path: PathBuf,
    pub readonly: bool,
    pub direct: bool,
    pub num_queues: DiskQueues,
    pub queue_size: QueueSize,
    pub image_type: ImageType,
    pub disable_io_uring: bool,
}

/// A network interface whose numbers, MAC and host address were checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidNet {
    pub id: String,
    pub tap: Option<String>,
    /// TAP descriptors received with `vm.add-net`, one per queue pair (or none).
    pub fds: Vec<i32>,
    pub mac: Option<MacAddr>,
    pub host_addr: Option<(Ipv4Addr, Netmask)>,
    pub queue_pairs: NetQueuePairs,
    pub queue_size: NetQueueSize,
    pub deny: Vec<Ipv4Cidr>,
}

/// A vsock device whose context id and hold time were checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidVsock {
    pub id: String,
    pub cid: GuestCid,
    pub socket: PathBuf,
    pub connect_timeout: Option<Duration>,
}

/// A virtio-fs share whose tag and numbers were checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidFs {
    pub id: String,
    pub tag: FsTag,
    pub socket: PathBuf,
    pub request_queues: FsQueues,
    pub queue_size: QueueSize,
}

/// What the VMM builds the VM from, checked: guest memory and the devices (with their ids,
/// defaulted as `vm.add-*` answered them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidVmConfig {
    pub memory: MemorySize,
    pub disks: Vec<ValidDisk>,
    pub nets: Vec<ValidNet>,
    pub vsock: Option<ValidVsock>,
    pub fs: Vec<ValidFs>,
}

impl DiskConfig {
    /// The id the disk has: its own, or `disk{index}`.
    pub fn device_id(&self, index: usize) -> String {
        self.id.clone().unwrap_or_else(|| format!("disk{index}"))
    }

    /// Checks what can be checked without the host; `index` is the disk's place in the VM.
    pub fn validate(&self, index: usize) -> Result<ValidDisk, ValidationError> {
        let value = |source| ValidationError::Value {
            device: format!("disk {}", self.path.display()),
            source,
        };
        Ok(ValidDisk {
            id: self.device_id(index),
            path: self.path.clone(),
            readonly: self.readonly,
            direct: self.direct,
            num_queues: DiskQueues::new(self.num_queues).map_err(value)?,
            queue_size: QueueSize::new(self.queue_size.into()).map_err(value)?,
            image_type: self.image_type,
            disable_io_uring: self.disable_io_uring,
        })
    }
}

impl NetConfig {
    /// The id the interface has: its own, or `net{index}`.
    pub fn device_id(&self, index: usize) -> String {
        self.id.clone().unwrap_or_else(|| format!("net{index}"))
    }

    /// Checks what can be checked without the host (whether the fds are TAPs is the VMM's).
    pub fn validate(&self, index: usize) -> Result<ValidNet, ValidationError> {
        let id = self.device_id(index);
        let value = |source| ValidationError::Value {
            device: format!("net {id}"),
            source,
        };
        let mac = self
            .mac
            .as_deref()
            .map(|mac| {
                mac.parse::<MacAddr>()
                    .map_err(|source| ValidationError::Mac {
                        id: id.clone(),
                        mac: mac.to_string(),
                        source,
                    })
            })
            .transpose()?;
        // With TAP fds, the fds say how many queue pairs there are (num_queues, default 2,
        // may be left out).
        let fds = self.fds.len();
        let queues = match u32::try_from(fds) {
            Ok(n) if n > 0 && self.num_queues == 2 => n.saturating_mul(2),
            _ => self.num_queues,
        };
        let queue_pairs = NetQueuePairs::from_queues(queues).map_err(value)?;
        if fds > 0 && fds != usize::from(queue_pairs.get()) {
            return Err(ValidationError::NetFds {
                id,
                fds,
                queues: self.num_queues,
            });
        }
        let host_addr = match (self.ip, self.mask) {
            (Some(ip), mask) => Some((
                ip,
                Netmask::new(mask.unwrap_or(Ipv4Addr::new(255, 255, 255, 0))).map_err(value)?,
            )),
            (None, Some(_)) => return Err(ValidationError::MaskWithoutIp(id)),
            (None, None) => None,
        };
        Ok(ValidNet {
            queue_size: NetQueueSize::new(self.queue_size.into()).map_err(value)?,
            id,
            tap: self.tap.clone(),
            fds: self.fds.clone(),
            mac,
            host_addr,
            queue_pairs,
            deny: self.deny.clone(),
        })
    }
}

/// The hold time's range, in seconds.
pub(crate) fn check_connect_timeout(t: u64) -> Result<Duration, ValidationError> {
    if VSOCK_CONNECT_TIMEOUT_RANGE.contains(&t) {
        Ok(Duration::from_secs(t))
    } else {
        Err(ValidationError::ConnectTimeout { secs: t })
    }
}

impl VsockConfig {
    /// The id the device has: its own, or `vsock`.
    pub fn device_id(&self) -> String {
        self.id.clone().unwrap_or_else(|| "vsock".into())
    }

    /// Checks what can be checked without the host: the context id, the socket's path, the
    /// hold time.
    pub fn validate(&self) -> Result<ValidVsock, ValidationError> {
        let cid = GuestCid::new(self.cid.into()).map_err(|source| ValidationError::Value {
            device: "vsock".into(),
            source,
        })?;
        if self.socket.as_os_str().is_empty() {
            return Err(ValidationError::EmptySocket("vsock".into()));
        }
        Ok(ValidVsock {
            id: self.device_id(),
            cid,
            socket: self.socket.clone(),
            connect_timeout: self
                .connect_timeout
                .map(check_connect_timeout)
                .transpose()?,
        })
    }
}

impl FsConfig {
    /// The id the share has: its own, or `fs{index}`.
    pub fn device_id(&self, index: usize) -> String {
        self.id.clone().unwrap_or_else(|| format!("fs{index}"))
    }

    /// Checks what can be checked without the host: the tag's length, the queue numbers, the
    /// socket's path (whether a back-end listens there is the VMM's).
    pub fn validate(&self, index: usize) -> Result<ValidFs, ValidationError> {
        let tag = FsTag::new(&self.tag).map_err(ValidationError::FsTag)?;
        let value = |source| ValidationError::Value {
            device: format!("fs {tag}"),
            source,
        };
        let request_queues = FsQueues::new(self.num_queues).map_err(value)?;
        let queue_size = QueueSize::new(self.queue_size.into()).map_err(value)?;
        if self.socket.as_os_str().is_empty() {
            return Err(ValidationError::EmptySocket(format!("fs {tag}")));
        }
        Ok(ValidFs {
            id: self.device_id(index),
            tag,
            socket: self.socket.clone(),
            request_queues,
            queue_size,
        })
    }
}

impl VmConfig {
    /// Checks what can be checked without the host, and returns what the VMM builds from.
    /// Limits that need the hypervisor and the host are checked by the VMM.
    pub fn validated(&self) -> Result<ValidVmConfig, ValidationError> {
        if self.payload.kernel.is_none() {
            return Err(ValidationError::NoKernel);
        }
        let cpus = &self.cpus;
        if cpus.boot_vcpus == 0 {
            return Err(ValidationError::NoVcpus);
        }
        if cpus.max_vcpus < cpus.boot_vcpus {
            return Err(ValidationError::MaxVcpus {
                boot: cpus.boot_vcpus,
                max: cpus.max_vcpus,
            });
        }
        if cpus.boot_vcpus > MAX_VCPUS {
            return Err(ValidationError::TooManyVcpus(cpus.boot_vcpus));
        }
        let memory = MemorySize::new(self.memory.size).map_err(ValidationError::Memory)?;
        if !matches!(
            self.console.mode,
            ConsoleOutputMode::Off | ConsoleOutputMode::Null
        ) {
            return Err(ValidationError::Console(self.console.mode));
        }
        if self.serial.mode == ConsoleOutputMode::File && self.serial.file.is_none() {
            return Err(ValidationError::SerialFile);
        }
        if let Some(page) = self.memory.hugepage_size {
            if !self.memory.hugepages {
                return Err(ValidationError::HugepageSizeAlone(page));
            }
            if !HUGEPAGE_SIZES.contains(&page) {
                return Err(ValidationError::HugepageSize(page));
            }
            if !self.memory.size.is_multiple_of(page) {
                return Err(ValidationError::HugepageAlignment {
                    size: self.memory.size,
                    page,
                });
            }
        }
        let mut tags = BTreeSet::new();
        let mut fs = Vec::new();
        for (i, share) in self.fs.iter().flatten().enumerate() {
            let valid = share.validate(i)?;
            if !tags.insert(share.tag.as_str()) {
                return Err(ValidationError::DuplicateTag(share.tag.clone()));
            }
            if !self.memory.shared {
                return Err(ValidationError::FsNeedsSharedMemory(share.tag.clone()));
            }
            fs.push(valid);
        }
        let mut seen = BTreeSet::new();
        for id in self.device_ids() {
            if !seen.insert(id) {
                return Err(ValidationError::DuplicateId(id.to_string()));
            }
        }
        Ok(ValidVmConfig {
            memory,
            disks: (self.disks.iter().flatten().enumerate())
                .map(|(i, d)| d.validate(i))
                .collect::<Result<_, _>>()?,
            nets: (self.net.iter().flatten().enumerate())
                .map(|(i, n)| n.validate(i))
                .collect::<Result<_, _>>()?,
            vsock: self.vsock.as_ref().map(VsockConfig::validate).transpose()?,
            fs,
        })
    }

    /// [`VmConfig::validated`], for callers that only want the verdict.
    pub fn validate(&self) -> Result<(), ValidationError> {
        self.validated().map(drop)
    }

    /// `vm.add-*`: refuses an id some device already has (a conflict, not a bad request).
    pub fn check_new_id(&self, id: Option<&str>) -> Result<(), ValidationError> {
        match id {
            Some(id) if self.device_ids().any(|used| used == id) => {
                Err(ValidationError::IdInUse(id.into()))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> NetConfig {
        NetConfig::parse(s).unwrap()
    }

    #[test]
    fn nets_are_checked_once_with_their_id() {
        let n = net("tap=t,mac=02:00:00:00:00:01,ip=10.0.0.1")
            .validate(1)
            .unwrap();
        assert_eq!(n.id, "net1");
        assert_eq!((n.queue_pairs.get(), n.queue_size.get()), (1, 256));
        assert_eq!(
            n.host_addr.unwrap().1.addr(),
            Ipv4Addr::new(255, 255, 255, 0)
        );
        let refused = |c: NetConfig, want: &str| {
            let e = c.validate(0).unwrap_err().to_string();
            assert!(e.contains(want), "{c:?}: {e}");
        };
        refused(
            net("tap=t,mask=255.255.255.0"),
            "net net0: mask given without ip",
        );
        refused(
            net("tap=t,ip=10.0.0.1,mask=255.0.255.0"),
            "is not a netmask",
        );
        let mut c = net("tap=t");
        c.mac = Some("00:00:00:00:00:00".into());
        refused(c, "net net0: mac 00:00:00:00:00:00: the all-zero address");
        refused(net("tap=t,queue_size=1"), "from 2 to 32768");
        // With TAP fds, the fds give the pairs unless num_queues says otherwise.
        let mut c = net("tap=t");
        c.fds = vec![7, 8, 9];
        assert_eq!(c.validate(0).unwrap().queue_pairs.get(), 3);
        c.num_queues = 4;
        let e = c.validate(0).unwrap_err().to_string();
        assert!(
            e.contains("3 TAP fds") && e.contains("num_queues is 4"),
            "{e}"
        );
        c.num_queues = 34;
        c.fds.clear();
        assert!(c.validate(0).unwrap_err().to_string().contains("2 to 32"));
    }

    #[test]
    fn disks_vsock_and_shares() {
        let mut d = DiskConfig::parse("path=/d,num_queues=4").unwrap();
        assert_eq!(d.validate(2).unwrap().id, "disk2");
        d.num_queues = 65;
        let e = d.validate(0).unwrap_err().to_string();
        assert_eq!(e, "disk /d: num_queues must be 1 to 64, not 65");
        d.num_queues = 1;
        d.queue_size = 100;
        assert!(d
            .validate(0)
            .unwrap_err()
            .to_string()
            .contains("power of two"));
        let mut v = VsockConfig::parse("cid=3,socket=/s,connect_timeout=5").unwrap();
        let valid = v.validate().unwrap();
        assert_eq!((valid.id.as_str(), valid.cid.get()), ("vsock", 3));
        assert_eq!(valid.connect_timeout, Some(Duration::from_secs(5)));
        v.cid = u32::MAX;
        assert!(v.validate().unwrap_err().to_string().contains("reserved"));
        v.cid = 3;
        v.socket = PathBuf::new();
        assert_eq!(
            v.validate().unwrap_err().to_string(),
            "vsock: socket path is empty"
        );
        let mut f = FsConfig::parse("tag=kataShared,socket=/s").unwrap();
        assert_eq!(f.validate(0).unwrap().request_queues.get(), 1);
        f.num_queues = 0;
        let e = f.validate(0).unwrap_err().to_string();
        assert_eq!(e, "fs kataShared: num_queues must be 1 to 64, not 0");
        f.tag = "t".repeat(37);
        assert!(f
            .validate(0)
            .unwrap_err()
            .to_string()
            .starts_with("fs tag \""));
    }

    #[test]
    fn statuses_are_decided_in_one_place() {
        let status = |e: ValidationError| ApiError::from(e).status();
        assert_eq!(status(ValidationError::NoKernel), 400);
        assert_eq!(status(ValidationError::DuplicateId("a".into())), 400);
        assert_eq!(status(ValidationError::IdInUse("a".into())), 409);
        assert_eq!(status(ValidationError::TagInUse("a".into())), 409);
        let cfg: VmConfig =
            serde_json::from_str(r#"{"payload":{"kernel":"/k"},"disks":[{"path":"/d","id":"x"}]}"#)
                .unwrap();
        assert_eq!(
            cfg.check_new_id(Some("x")),
            Err(ValidationError::IdInUse("x".into()))
        );
        assert_eq!(cfg.check_new_id(Some("y")), Ok(()));
        assert_eq!(cfg.validated().unwrap().disks[0].id, "x");
    }
}
