//! `VmConfig` and its parts, in Cloud Hypervisor's JSON schema.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::options::{parse_count, parse_size, OptionError, OptionMap};

/// The pod default: 1 vCPU.
pub const DEFAULT_VCPUS: u32 = 1;
/// The pod default: 2 GiB of memory.
pub const DEFAULT_MEMORY_SIZE: u64 = 2 << 30;
/// Command line used when none is given: console on the serial port, and `reboot=k` so a
/// guest reboot goes through the i8042 reset the VMM turns into a clean exit.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpusConfig {
    pub boot_vcpus: u32,
    /// Recorded and reported; the VM runs `boot_vcpus` (vCPU hotplug is not provided, so a
    /// resize to more gets a 400).
    pub max_vcpus: u32,
    /// Guest physical address bits, as Cloud Hypervisor reports them (its default 46); the
    /// guest's address space is what the memory map says.
    #[serde(default = "default_max_phys_bits")]
    pub max_phys_bits: u8,
}

/// Cloud Hypervisor's default `max_phys_bits`.
pub const DEFAULT_MAX_PHYS_BITS: u8 = 46;

fn default_max_phys_bits() -> u8 {
    DEFAULT_MAX_PHYS_BITS
}

impl Default for CpusConfig {
    fn default() -> Self {
        CpusConfig {
            boot_vcpus: DEFAULT_VCPUS,
            max_vcpus: DEFAULT_VCPUS,
            max_phys_bits: DEFAULT_MAX_PHYS_BITS,
        }
    }
}

impl CpusConfig {
    /// `boot=N[,max=N]`: `max` (at least `boot`) is recorded; the VM runs `boot` vCPUs.
    pub fn parse(s: &str) -> Result<Self, OptionError> {
        let m = OptionMap::parse(s, &["boot", "max"])?;
        let boot = m
            .parse_with("boot", parse_count)?
            .ok_or_else(|| OptionError::Missing("boot".into()))?;
        let max = m.parse_with("max", parse_count)?.unwrap_or(boot);
        if max < boot {
            return Err(OptionError::InvalidValue {
                key: "max".into(),
                value: max.to_string(),
                reason: format!("must be at least boot ({boot})"),
            });
        }
        Ok(CpusConfig {
            boot_vcpus: boot,
            max_vcpus: max,
            max_phys_bits: DEFAULT_MAX_PHYS_BITS,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Guest RAM in bytes.
    pub size: u64,
    /// Recorded and reported (Kata sizes its memory requests by it); the VM has `size` (memory
    /// hotplug is not provided, so a resize to more gets a 400).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug_size: Option<u64>,
    /// Back guest RAM with a memfd mapped shared, so a vhost-user back-end can map it too;
    /// still populated only as the guest touches it.
    #[serde(default)]
    pub shared: bool,
    /// Back guest RAM with hugepages the host has reserved (hugetlbfs): reserved when the VM
    /// is built, not as the guest touches it.
    #[serde(default)]
    pub hugepages: bool,
    /// Bytes per hugepage (2 MiB or 1 GiB on x86); absent: the host's default size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugepage_size: Option<u64>,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            size: DEFAULT_MEMORY_SIZE,
            hotplug_size: None,
            shared: false,
            hugepages: false,
            hugepage_size: None,
        }
    }
}

/// The hugepage sizes x86 hosts offer.
pub const HUGEPAGE_SIZES: [u64; 2] = [2 << 20, 1 << 30];

impl MemoryConfig {
    /// `size=SIZE[,shared=on|off][,hugepages=on|off][,hugepage_size=SIZE]` with a K/M/G/T
    /// suffix, e.g. `size=512M,shared=on`.
    pub fn parse(s: &str) -> Result<Self, OptionError> {
        let m = OptionMap::parse(s, &["size", "shared", "hugepages", "hugepage_size"])?;
        let size = m
            .parse_with("size", |v| {
                parse_size(v).and_then(|n| match n {
                    0 => Err("memory size must be greater than zero".into()),
                    n => Ok(n),
                })
            })?
            .ok_or_else(|| OptionError::Missing("size".into()))?;
        let on_off = |v: &str| match v {
            "on" | "true" => Ok(true),
            "off" | "false" => Ok(false),
            _ => Err("expected on or off".to_string()),
        };
        Ok(MemoryConfig {
            size,
            hotplug_size: None,
            shared: m.parse_with("shared", on_off)?.unwrap_or(false),
            hugepages: m.parse_with("hugepages", on_off)?.unwrap_or(false),
            hugepage_size: m.parse_with("hugepage_size", parse_size)?,
        })
    }
}

/// Where a console's output goes (Cloud Hypervisor's `ConsoleOutputMode`, the modes we serve).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleOutputMode {
    Off,
    Tty,
    File,
    Null,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    pub mode: ConsoleOutputMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
}

impl ConsoleConfig {
    pub fn off() -> Self {
        ConsoleConfig {
            mode: ConsoleOutputMode::Off,
            file: None,
        }
    }

    pub fn tty() -> Self {
        ConsoleConfig {
            mode: ConsoleOutputMode::Tty,
            file: None,
        }
    }

    /// `off`, `null`, `tty` or `file=PATH`.
    pub fn parse(s: &str) -> Result<Self, OptionError> {
        let mode = |mode| ConsoleConfig { mode, file: None };
        match s {
            "off" => Ok(mode(ConsoleOutputMode::Off)),
            "null" => Ok(mode(ConsoleOutputMode::Null)),
            "tty" => Ok(mode(ConsoleOutputMode::Tty)),
            _ => {
                let m = OptionMap::parse(s, &["file"])?;
                let file = m.get("file").filter(|f| !f.is_empty()).ok_or_else(|| {
                    OptionError::InvalidValue {
                        key: "mode".into(),
                        value: s.into(),
                        reason: "expected off, null, tty or file=PATH".into(),
                    }
                })?;
                Ok(ConsoleConfig {
                    mode: ConsoleOutputMode::File,
                    file: Some(PathBuf::from(file)),
                })
            }
        }
    }
}

fn default_serial() -> ConsoleConfig {
    ConsoleConfig::tty()
}

fn default_console() -> ConsoleConfig {
    ConsoleConfig::off()
}

/// A whole VM description. Built by the CLI or received as JSON by the API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub payload: PayloadConfig,
    #[serde(default)]
    pub cpus: CpusConfig,
    #[serde(default)]
    pub memory: MemoryConfig,
    #[serde(default = "default_serial")]
    pub serial: ConsoleConfig,
    /// The virtio console. Not provided by podvmm; only `Off` and `Null` are accepted.
    #[serde(default = "default_console")]
    pub console: ConsoleConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks: Option<Vec<crate::DiskConfig>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<Vec<crate::NetConfig>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<crate::VsockConfig>,
    /// virtio-fs shares, each served by a vhost-user back-end (needs `memory.shared`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs: Option<Vec<crate::FsConfig>>,
    /// virtio-rng: the guest's `/dev/hwrng`, filled from `src`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng: Option<crate::RngConfig>,
    /// The pod's containers' resource limits; the VM is sized from them (`crate::pod`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<crate::PodConfig>,
}

impl VmConfig {
    /// The ids given to devices (disks, NICs, vsock, shares), in that order.
    pub fn device_ids(&self) -> impl Iterator<Item = &str> {
        self.disks
            .iter()
            .flatten()
            .filter_map(|d| d.id.as_deref())
            .chain(self.net.iter().flatten().filter_map(|n| n.id.as_deref()))
            .chain(self.vsock.iter().filter_map(|v| v.id.as_deref()))
            .chain(self.fs.iter().flatten().filter_map(|f| f.id.as_deref()))
    }

    /// The command line the guest gets.
    pub fn cmdline(&self) -> &str {
        self.payload.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ValidationError;

    #[test]
    fn cpus_option() {
        assert_eq!(
            CpusConfig::parse("boot=2").unwrap(),
            CpusConfig {
                boot_vcpus: 2,
                max_vcpus: 2,
                max_phys_bits: 46
            }
        );
        assert_eq!(CpusConfig::parse("boot=2,max=4").unwrap().max_vcpus, 4);
        assert!(CpusConfig::parse("boot=2,max=1").is_err());
        assert!(CpusConfig::parse("boot=0").is_err());
        assert_eq!(
            CpusConfig::parse("max=2").unwrap_err(),
            OptionError::Missing("boot".into())
        );
    }

    #[test]
    fn memory_option() {
        assert_eq!(MemoryConfig::parse("size=512M").unwrap().size, 512 << 20);
        let m = MemoryConfig::parse("size=1G,shared=on").unwrap();
        assert!(m.shared && m.size == 1 << 30);
        for bad in [
            "size=banana",
            "size=0",
            "size=",
            "shared=on",
            "512M",
            "size=1G,shared=yes",
        ] {
            assert!(MemoryConfig::parse(bad).is_err(), "{bad}");
        }
        let err = MemoryConfig::parse("size=banana").unwrap_err().to_string();
        assert!(err.contains("banana"), "{err}");
        let m = MemoryConfig::parse("size=1G,hugepages=on,hugepage_size=2M").unwrap();
        assert!(m.hugepages && m.hugepage_size == Some(2 << 20) && !m.shared);
        assert!(MemoryConfig::parse("size=1G,hugepages=maybe").is_err());
    }

    #[test]
    fn hugepage_sizes_are_checked() {
        let vm = |memory: &str| VmConfig {
            payload: PayloadConfig {
                kernel: Some("/k".into()),
                initramfs: None,
                cmdline: None,
            },
            memory: MemoryConfig::parse(memory).unwrap(),
            ..serde_json::from_str(r#"{"payload":{}}"#).unwrap()
        };
        assert!(vm("size=1G,hugepages=on").validate().is_ok());
        assert!(vm("size=1G,hugepages=on,hugepage_size=1G")
            .validate()
            .is_ok());
        for (memory, want) in [
            ("size=1G,hugepage_size=2M", "needs hugepages=true"),
            (
                "size=1G,hugepages=on,hugepage_size=4M",
                "not one x86 offers",
            ),
            ("size=17M,hugepages=on,hugepage_size=2M", "not a multiple"),
        ] {
            let err = vm(memory).validate().unwrap_err().to_string();
            assert!(err.contains(want), "{memory}: {err}");
        }
    }

    #[test]
    fn serial_option() {
        assert_eq!(
            ConsoleConfig::parse("off").unwrap().mode,
            ConsoleOutputMode::Off
        );
        assert_eq!(
            ConsoleConfig::parse("tty").unwrap().mode,
            ConsoleOutputMode::Tty
        );
        let f = ConsoleConfig::parse("file=/tmp/x").unwrap();
        assert_eq!(f.file.unwrap(), PathBuf::from("/tmp/x"));
        assert!(ConsoleConfig::parse("pty").is_err());
        assert!(ConsoleConfig::parse("file=").is_err());
    }

    #[test]
    fn json_uses_cloud_hypervisor_names_and_defaults() {
        let cfg: VmConfig = serde_json::from_str(
            r#"{"payload":{"kernel":"/k","cmdline":"console=ttyS0"},
                "cpus":{"boot_vcpus":2,"max_vcpus":2},"memory":{"size":1073741824},
                "serial":{"mode":"Tty"},"console":{"mode":"Off"}}"#,
        )
        .unwrap();
        assert_eq!(cfg.cpus.boot_vcpus, 2);
        assert_eq!(cfg.memory.size, 1 << 30);
        cfg.validate().unwrap();
        let minimal: VmConfig = serde_json::from_str(r#"{"payload":{"kernel":"/k"}}"#).unwrap();
        assert_eq!(minimal.cpus.boot_vcpus, DEFAULT_VCPUS);
        assert_eq!(minimal.memory.size, DEFAULT_MEMORY_SIZE);
        assert_eq!(minimal.cmdline(), DEFAULT_CMDLINE);
    }

    #[test]
    fn unknown_json_fields_are_rejected() {
        let err = serde_json::from_str::<VmConfig>(r#"{"payload":{"kernel":"/k"},"gpu":{}}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("gpu"), "{err}");
    }

    #[test]
    fn validation() {
        let mut cfg: VmConfig = serde_json::from_str(r#"{"payload":{}}"#).unwrap();
        assert_eq!(cfg.validate(), Err(ValidationError::NoKernel));
        cfg.payload.kernel = Some("/k".into());
        cfg.console = ConsoleConfig::tty();
        assert!(matches!(cfg.validate(), Err(ValidationError::Console(_))));
        cfg.console = ConsoleConfig::off();
        cfg.cpus.max_vcpus = 4;
        assert_eq!(cfg.validate(), Ok(()));
        cfg.cpus.boot_vcpus = 5;
        assert!(matches!(
            cfg.validate(),
            Err(ValidationError::MaxVcpus { .. })
        ));
        cfg.cpus.boot_vcpus = 1;
        cfg.memory.size = 17825793;
        assert_eq!(
            cfg.validate(),
            Err(ValidationError::Memory(
                validated::ValueError::MemoryAlignment(17825793)
            ))
        );
        cfg.memory.size = 8 << 20;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("below the minimum of 16 MiB"), "{err}");
        cfg.memory.size = 1 << 30;
        cfg.cpus.boot_vcpus = 300;
        cfg.cpus.max_vcpus = 300;
        assert_eq!(cfg.validate(), Err(ValidationError::TooManyVcpus(300)));
    }
}
