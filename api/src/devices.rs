//! Device sections of `VmConfig` (disks, network interfaces, vsock), in Cloud Hypervisor's
//! schema, and their command-line forms (`--disk path=...,readonly=on`).

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::options::{parse_count, OptionError, OptionMap};

fn parse_bool(v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err("expected on or off".into()),
    }
}

fn parse_queue_size(v: &str) -> Result<u16, String> {
    let n = parse_count(v)?;
    validated::QueueSize::new(n)
        .map(validated::QueueSize::get)
        .map_err(|e| e.to_string())
}

fn default_one() -> u32 {
    1
}
fn default_queue_size() -> u16 {
    128
}
fn default_net_queues() -> u32 {
    2
}
fn default_net_queue_size() -> u16 {
    256
}

/// `image_type`, Cloud Hypervisor's names. podvmm serves raw images only: `Unknown` (what
/// Kata's Rust runtime sends) has the image probed and a non-raw one refused; the other
/// formats are refused by name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageType {
    #[default]
    Raw,
    Unknown,
    Qcow2,
    FixedVhd,
    Vhdx,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
    /// Open with O_DIRECT (bypass the host page cache).
    #[serde(default)]
    pub direct: bool,
    #[serde(default = "default_one")]
    pub num_queues: u32,
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default)]
    pub image_type: ImageType,
    /// Serve the disk with synchronous I/O instead of io_uring.
    #[serde(default)]
    pub disable_io_uring: bool,
}

impl DiskConfig {
    /// `path=FILE[,readonly=on][,direct=on][,num_queues=N][,queue_size=N][,id=NAME]
    /// [,_disable_io_uring=on]` (Cloud Hypervisor spells the last with its underscore)
    pub fn parse(s: &str) -> Result<Self, OptionError> {
        let m = OptionMap::parse(
            s,
            &[
                "path",
                "readonly",
                "direct",
                "num_queues",
                "queue_size",
                "id",
                "_disable_io_uring",
            ],
        )?;
        let path = m
            .get("path")
            .filter(|p| !p.is_empty())
            .ok_or_else(|| OptionError::Missing("path".into()))?;
        Ok(DiskConfig {
            path: PathBuf::from(path),
            readonly: m.parse_with("readonly", parse_bool)?.unwrap_or(false),
            direct: m.parse_with("direct", parse_bool)?.unwrap_or(false),
            num_queues: m.parse_with("num_queues", parse_count)?.unwrap_or(1),
            queue_size: m
                .parse_with("queue_size", parse_queue_size)?
                .unwrap_or(default_queue_size()),
            id: m.get("id").map(str::to_string),
            image_type: ImageType::Raw,
            disable_io_uring: m
                .parse_with("_disable_io_uring", parse_bool)?
                .unwrap_or(false),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<Ipv4Addr>,
    /// Guest MAC address, `aa:bb:cc:dd:ee:ff`; random when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default = "default_net_queues")]
    pub num_queues: u32,
    #[serde(default = "default_net_queue_size")]
    pub queue_size: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// TAP file descriptors received over the API socket (SCM_RIGHTS); never from JSON.
    #[serde(skip)]
    pub fds: Vec<i32>,
    /// Egress deny list (a podvmm extension): guest IPv4 frames to these networks are
    /// dropped and counted in the VMM, e.g. `["169.254.169.254/32"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<Ipv4Cidr>,
}

/// An IPv4 network `a.b.c.d/n`, written as that string in JSON. Host bits must be zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl std::str::FromStr for Ipv4Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("'{s}' is not a.b.c.d/n"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("'{addr}' is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("prefix '{prefix}' is not 0 to 32"))?;
        let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        let network = Ipv4Addr::from(u32::from(addr) & mask);
        if network != addr {
            return Err(format!(
                "{s} has host bits set (did you mean {network}/{prefix}?)"
            ));
        }
        Ok(Ipv4Cidr { addr, prefix })
    }
}

impl TryFrom<String> for Ipv4Cidr {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Ipv4Cidr> for String {
    fn from(c: Ipv4Cidr) -> String {
        c.to_string()
    }
}

impl std::fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Parses a MAC address `aa:bb:cc:dd:ee:ff` (a NIC's: unicast, not all zeroes).
pub fn parse_mac(v: &str) -> Result<[u8; 6], String> {
    v.parse::<validated::MacAddr>()
        .map(validated::MacAddr::bytes)
        .map_err(|e| e.to_string())
}

impl NetConfig {
    /// `tap=NAME[,mac=MAC][,ip=IP,mask=MASK][,num_queues=N][,queue_size=N][,id=NAME]`
    /// `[,deny=CIDR]...` (`deny` may repeat).
    pub fn parse(s: &str) -> Result<Self, OptionError> {
        // `deny` is the one key that may repeat: take it out before the key=value map.
        let (deny, rest): (Vec<&str>, Vec<&str>) =
            s.split(',').partition(|p| p.starts_with("deny="));
        let deny = deny
            .into_iter()
            .map(|p| {
                let v = &p["deny=".len()..];
                v.parse::<Ipv4Cidr>()
                    .map_err(|reason| OptionError::InvalidValue {
                        key: "deny".into(),
                        value: v.to_string(),
                        reason,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let m = OptionMap::parse(
            &rest.join(","),
            &[
                "tap",
                "mac",
                "ip",
                "mask",
                "num_queues",
                "queue_size",
                "id",
                "deny",
            ],
        )?;
        let ip = |k| m.parse_with(k, |v| v.parse::<Ipv4Addr>().map_err(|e| e.to_string()));
        m.parse_with("mac", parse_mac)?;
        let num_queues = m
            .parse_with("num_queues", |v| {
                let n = parse_count(v)?;
                validated::NetQueuePairs::from_queues(n)
                    .map(|_| n)
                    .map_err(|e| e.to_string())
            })?
            .unwrap_or(2);
        Ok(NetConfig {
            tap: m.get("tap").map(str::to_string),
            ip: ip("ip")?,
            mask: ip("mask")?,
            mac: m.get("mac").map(str::to_string),
            num_queues,
            queue_size: m
                .parse_with("queue_size", parse_queue_size)?
                .unwrap_or(default_net_queue_size()),
            id: m.get("id").map(str::to_string),
            fds: Vec::new(),
            deny,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// Guest context id; 0-2 are reserved (hypervisor, local, host).
    pub cid: u32,
    /// Unix socket the host side listens on (hybrid vsock).
    pub socket: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// podvmm's own: seconds a host `CONNECT` is held while the guest boots (before the agent
    /// announces itself); default 600. See docs/vsock.md.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<u64>,
}

/// Bounds of [`VsockConfig::connect_timeout`], in seconds.
pub const VSOCK_CONNECT_TIMEOUT_RANGE: std::ops::RangeInclusive<u64> = 1..=86_400;

impl VsockConfig {
    /// `cid=N,socket=PATH[,id=NAME][,connect_timeout=SECONDS]`
    pub fn parse(s: &str) -> Result<Self, OptionError> {
        let m = OptionMap::parse(s, &["cid", "socket", "id", "connect_timeout"])?;
        let cid = m
            .parse_with("cid", |v| {
                let n: u32 = v.parse().map_err(|_| "expected a number".to_string())?;
                validated::GuestCid::new(n.into())
                    .map(|_| n)
                    .map_err(|e| e.to_string())
            })?
            .ok_or_else(|| OptionError::Missing("cid".into()))?;
        let socket = m
            .get("socket")
            .filter(|p| !p.is_empty())
            .ok_or_else(|| OptionError::Missing("socket".into()))?;
        let connect_timeout = m.parse_with("connect_timeout", |v| {
            let n: u64 = v.parse().map_err(|_| "expected seconds".to_string())?;
            crate::valid::check_connect_timeout(n)
                .map(|_| n)
                .map_err(|e| e.to_string())
        })?;
        Ok(VsockConfig {
            cid,
            socket: PathBuf::from(socket),
            id: m.get("id").map(str::to_string),
            connect_timeout,
        })
    }
}

/// `fs`: a virtio-fs device served by a vhost-user back-end (virtiofsd) listening on `socket`.
/// Cloud Hypervisor's `FsConfig`: `num_queues` counts the request queues (the device has one
/// high-priority queue besides).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// What the guest mounts: `mount -t virtiofs TAG DIR`. 1 to 36 bytes.
    pub tag: String,
    pub socket: PathBuf,
    #[serde(default = "default_one")]
    pub num_queues: u32,
    #[serde(default = "default_fs_queue_size")]
    pub queue_size: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

fn default_fs_queue_size() -> u16 {
    1024
}

impl FsConfig {
    /// `tag=NAME,socket=PATH[,num_queues=N][,queue_size=N][,id=NAME]` (Cloud Hypervisor's
    /// `--fs`).
    pub fn parse(s: &str) -> Result<Self, OptionError> {
        let m = OptionMap::parse(s, &["tag", "socket", "num_queues", "queue_size", "id"])?;
        let tag = m
            .get("tag")
            .ok_or_else(|| OptionError::Missing("tag".into()))?;
        let socket = m
            .get("socket")
            .filter(|p| !p.is_empty())
            .ok_or_else(|| OptionError::Missing("socket".into()))?;
        let fs = FsConfig {
            tag: tag.to_string(),
            socket: PathBuf::from(socket),
            num_queues: m.parse_with("num_queues", parse_count)?.unwrap_or(1),
            queue_size: m
                .parse_with("queue_size", parse_queue_size)?
                .unwrap_or(default_fs_queue_size()),
            id: m.get("id").map(str::to_string),
        };
        fs.validate(0).map_err(|e| OptionError::InvalidValue {
            key: "fs".into(),
            value: s.to_string(),
            reason: e.to_string(),
        })?;
        Ok(fs)
    }
}

/// `rng`: a virtio-rng device whose buffers are filled from `src`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngConfig {
    pub src: PathBuf,
}

impl RngConfig {
    /// `src=PATH` (Cloud Hypervisor's `--rng`).
    pub fn parse(s: &str) -> Result<Self, OptionError> {
        let m = OptionMap::parse(s, &["src"])?;
        let src = m
            .get("src")
            .filter(|p| !p.is_empty())
            .ok_or_else(|| OptionError::Missing("src".into()))?;
        Ok(RngConfig {
            src: PathBuf::from(src),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_option() {
        let d = DiskConfig::parse("path=/d.img,readonly=on,num_queues=4,queue_size=256,id=root")
            .unwrap();
        assert_eq!(d.path, PathBuf::from("/d.img"));
        assert!(d.readonly && !d.direct);
        assert_eq!((d.num_queues, d.queue_size), (4, 256));
        assert_eq!(d.id.as_deref(), Some("root"));
        for bad in [
            "readonly=on",
            "path=",
            "path=/d,readonly=maybe",
            "path=/d,queue_size=100",
            "path=/d,num_queues=0",
            "path=/d,cache=none",
        ] {
            assert!(DiskConfig::parse(bad).is_err(), "{bad}");
        }
        let json: DiskConfig = serde_json::from_str(r#"{"path":"/x","readonly":true}"#).unwrap();
        assert_eq!((json.num_queues, json.queue_size), (1, 128));
    }

    #[test]
    fn net_option() {
        let n = NetConfig::parse("tap=tap0,mac=02:00:00:00:00:01,ip=10.0.0.1,mask=255.255.255.0")
            .unwrap();
        assert_eq!(n.tap.as_deref(), Some("tap0"));
        assert_eq!(n.ip, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(n.num_queues, 2);
        for bad in [
            "tap=t,mac=zz:00:00:00:00:01",
            "tap=t,mac=01:00:00:00:00:01",
            "tap=t,mac=02:00:00:00:00",
            "tap=t,ip=10.0.0.300",
            "tap=t,num_queues=3",
        ] {
            assert!(NetConfig::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_mac("02:ab:CD:00:00:01").unwrap()[1], 0xab);
    }

    #[test]
    fn net_deny_list() {
        let n = NetConfig::parse("tap=t,deny=169.254.169.254/32,id=n,deny=10.96.0.0/12").unwrap();
        let shown: Vec<String> = n.deny.iter().map(|c| c.to_string()).collect();
        assert_eq!(shown, ["169.254.169.254/32", "10.96.0.0/12"]);
        assert_eq!(n.id.as_deref(), Some("n"));
        for bad in [
            "tap=t,deny=169.254.169.254",
            "tap=t,deny=10.0.0.1/8",
            "tap=t,deny=10.0.0.0/33",
            "tap=t,deny=fe80::/10",
            "tap=t,deny=",
        ] {
            let e = NetConfig::parse(bad).unwrap_err().to_string();
            assert!(e.contains("deny"), "{bad}: {e}");
        }
        let json: NetConfig =
            serde_json::from_str(r#"{"tap":"t","deny":["169.254.169.254/32"]}"#).unwrap();
        assert_eq!(json.deny, n.deny[..1]);
        assert!(serde_json::from_str::<NetConfig>(r#"{"deny":["1.2.3.4/8"]}"#).is_err());
        let back = serde_json::to_string(&json).unwrap();
        assert!(back.contains(r#""deny":["169.254.169.254/32"]"#), "{back}");
        let plain = serde_json::to_string(&NetConfig::parse("tap=t").unwrap()).unwrap();
        assert!(!plain.contains("deny"), "{plain}");
    }

    #[test]
    fn vsock_option() {
        let v = VsockConfig::parse("cid=3,socket=/run/v.sock").unwrap();
        assert_eq!((v.cid, v.socket), (3, PathBuf::from("/run/v.sock")));
        assert_eq!(v.connect_timeout, None);
        let v = VsockConfig::parse("cid=3,socket=/s,connect_timeout=900").unwrap();
        assert_eq!(v.connect_timeout, Some(900));
        assert!(v.validate().is_ok());
        assert!(VsockConfig::parse("cid=4294967295,socket=/s").is_err());
        for bad in [
            "cid=2,socket=/s",
            "cid=x,socket=/s",
            "socket=/s",
            "cid=3",
            "cid=3,socket=/s,connect_timeout=0",
            "cid=3,socket=/s,connect_timeout=86401",
            "cid=3,socket=/s,connect_timeout=-1",
        ] {
            assert!(VsockConfig::parse(bad).is_err(), "{bad}");
        }
        let json: VsockConfig =
            serde_json::from_str(r#"{"cid":3,"socket":"/s","connect_timeout":0}"#).unwrap();
        let err = json.validate().unwrap_err().to_string();
        assert!(err.contains("connect_timeout=0"), "{err}");
    }
}
