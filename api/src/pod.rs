//! Pod sizing: the VM is sized from its pod's containers' resource limits, by the rules
//! Kata Containers' shim applies with static sandbox resource management.
//!
//! The configuration carries the limits as Kubernetes quantity strings:
//!
//! ```json
//! "pod": {"containers": [{"name": "app", "cpu": "1500m", "memory": "1Gi"}, {"memory": "256Mi"}]}
//! ```
//!
//! and on the command line `--pod-limits cpu=1500m,memory=1Gi`, once per container. Then
//!
//! - `vcpus = ceil(1 + Σ cpu)`, each CPU limit rounded up to a millicore (Kubernetes'
//!   `MilliValue`, which is what the kubelet turns into a CFS quota);
//! - `memory MiB = 2048 + Σ floor(bytes / MiB)`, each memory limit rounded up to a byte
//!   (Kubernetes' `Value`).
//!
//! A container without a CPU (or memory) limit adds nothing to that resource, as in Kata.
//! `cpus` or `memory` given explicitly (present in the JSON, or `--cpus`/`--memory`) win over
//! the pod rule for that resource.

use serde::{Deserialize, Serialize};

use crate::options::{OptionError, OptionMap};
use crate::quantity::{Quantity, QuantityError};
use crate::{CpusConfig, VmConfig, DEFAULT_MEMORY_SIZE, DEFAULT_VCPUS};

/// Most vCPUs a VM can have (the MP table's limit, `boot::mptable::MAX_CPUS`).
pub const MAX_VCPUS: u32 = 254;
/// Most memory the pod rule may ask for: 16 TiB. The host's RAM is checked when the VM is built.
pub const MAX_POD_MEMORY_MIB: u64 = 16 << 20;
/// Most containers a pod description may list.
pub const MAX_CONTAINERS: usize = 1024;
const MIB: u128 = 1 << 20;

/// The `pod` section of a VM configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodConfig {
    #[serde(default)]
    pub containers: Vec<ContainerLimits>,
}

/// One container's limits, as Kubernetes quantities (`"1500m"`, `"1Gi"`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerLimits {
    /// For people reading `vm.info`; not used by the sizing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
}

impl ContainerLimits {
    /// `cpu=QUANTITY[,memory=QUANTITY][,name=NAME]`, checked.
    pub fn parse(s: &str) -> Result<Self, OptionError> {
        let m = OptionMap::parse(s, &["cpu", "memory", "name"])?;
        let quantity = |key| {
            m.parse_with(key, |v| {
                Quantity::parse(v)
                    .map(|_| v.to_string())
                    .map_err(|e| e.to_string())
            })
        };
        let limits = ContainerLimits {
            name: m.get("name").map(str::to_string),
            cpu: quantity("cpu")?,
            memory: quantity("memory")?,
        };
        if limits.cpu.is_none() && limits.memory.is_none() {
            return Err(OptionError::Missing("cpu or memory".into()));
        }
        Ok(limits)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PodError {
    #[error("pod.containers[{index}].{resource}: {source}")]
    Quantity {
        index: usize,
        resource: &'static str,
        #[source]
        source: QuantityError,
    },
    #[error("pod.containers[{index}].{resource}: '{value}' is too large for a limit")]
    Absurd {
        index: usize,
        resource: &'static str,
        value: String,
    },
    #[error("the pod lists {0} containers; at most {MAX_CONTAINERS} are accepted")]
    TooManyContainers(usize),
    #[error("the pod's CPU limits add up to {millis}m, which sizes the VM to more than {MAX_VCPUS} vCPUs (the most podvmm supports)")]
    TooManyVcpus { millis: u128 },
    #[error("the pod's memory limits add up to {mib} MiB, which sizes the VM past {MAX_POD_MEMORY_MIB} MiB (16 TiB)")]
    TooMuchMemory { mib: u128 },
}

/// What the pod's limits add up to, and the VM size the pod rule gives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodTotals {
    /// Σ CPU limits, in millicores.
    pub cpu_limits_millis: u64,
    /// Σ floor(memory limit / MiB).
    pub memory_limits_mib: u64,
    /// ceil(1 + Σ cpu).
    pub vcpus: u32,
    /// 2048 + Σ floor(memory / MiB).
    pub memory_mib: u64,
}

impl PodConfig {
    /// Adds up the limits and applies Kata's static sizing rule.
    pub fn totals(&self) -> Result<PodTotals, PodError> {
        if self.containers.len() > MAX_CONTAINERS {
            return Err(PodError::TooManyContainers(self.containers.len()));
        }
        let mut millis: u128 = 0;
        let mut mib: u128 = 0;
        for (index, c) in self.containers.iter().enumerate() {
            let parse = |resource, v: &str| {
                Quantity::parse(v).map_err(|source| PodError::Quantity {
                    index,
                    resource,
                    source,
                })
            };
            let absurd = |resource, v: &str| PodError::Absurd {
                index,
                resource,
                value: v.to_string(),
            };
            if let Some(cpu) = &c.cpu {
                let m = parse("cpu", cpu)?
                    .milli_ceil()
                    .ok_or_else(|| absurd("cpu", cpu))?;
                millis = millis.checked_add(m).ok_or_else(|| absurd("cpu", cpu))?;
            }
            if let Some(memory) = &c.memory {
                let bytes = parse("memory", memory)?
                    .value_ceil()
                    .ok_or_else(|| absurd("memory", memory))?;
                mib = mib
                    .checked_add(bytes / MIB)
                    .ok_or_else(|| absurd("memory", memory))?;
            }
        }
        // ceil(1 + millis / 1000) = 1 + ceil(millis / 1000).
        let vcpus = u128::from(DEFAULT_VCPUS) + millis.div_ceil(1000);
        if vcpus > u128::from(MAX_VCPUS) {
            return Err(PodError::TooManyVcpus { millis });
        }
        let memory_mib = u128::from(DEFAULT_MEMORY_SIZE >> 20) + mib;
        if memory_mib > u128::from(MAX_POD_MEMORY_MIB) {
            return Err(PodError::TooMuchMemory { mib });
        }
        // The bounds above keep every value within u64 (and vcpus within u32).
        Ok(PodTotals {
            cpu_limits_millis: millis as u64,
            memory_limits_mib: mib as u64,
            vcpus: vcpus as u32,
            memory_mib: memory_mib as u64,
        })
    }
}

/// Which of `cpus` and `memory` the user gave explicitly (these win over the pod rule).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Explicit {
    pub cpus: bool,
    pub memory: bool,
}

impl Explicit {
    /// Reads presence from a JSON `VmConfig` object before it is deserialized.
    pub fn from_json(v: &serde_json::Value) -> Self {
        Explicit {
            cpus: v.get("cpus").is_some_and(|c| !c.is_null()),
            memory: v.get("memory").is_some_and(|m| !m.is_null()),
        }
    }
}

/// Where a resource's size came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SizeSource {
    /// `cpus`/`memory` given in the configuration.
    Explicit,
    /// The pod rule.
    Pod,
    /// Neither: the pod defaults (1 vCPU, 2 GiB).
    Default,
}

/// How the VM was sized: shown by `vm.info`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sizing {
    pub vcpus: u32,
    /// Guest RAM in bytes.
    pub memory_size: u64,
    pub vcpus_from: SizeSource,
    pub memory_from: SizeSource,
    /// The pod rule's inputs' totals and result, when the configuration has a `pod` section.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodTotals>,
}

/// Sizes `config` from its `pod` section (if any), leaving explicit `cpus`/`memory` alone.
pub fn apply(config: &mut VmConfig, explicit: Explicit) -> Result<Sizing, PodError> {
    let totals = config.pod.as_ref().map(PodConfig::totals).transpose()?;
    let source = |given| match (given, &totals) {
        (true, _) => SizeSource::Explicit,
        (false, Some(_)) => SizeSource::Pod,
        (false, None) => SizeSource::Default,
    };
    if let Some(t) = &totals {
        if !explicit.cpus {
            config.cpus = CpusConfig {
                boot_vcpus: t.vcpus,
                max_vcpus: t.vcpus,
                ..config.cpus.clone()
            };
        }
        if !explicit.memory {
            config.memory.size = t.memory_mib << 20;
        }
    }
    Ok(Sizing {
        vcpus: config.cpus.boot_vcpus,
        memory_size: config.memory.size,
        vcpus_from: source(explicit.cpus),
        memory_from: source(explicit.memory),
        pod: totals,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(limits: &[(Option<&str>, Option<&str>)]) -> PodConfig {
        PodConfig {
            containers: limits
                .iter()
                .map(|(cpu, memory)| ContainerLimits {
                    name: None,
                    cpu: cpu.map(str::to_string),
                    memory: memory.map(str::to_string),
                })
                .collect(),
        }
    }

    fn totals(limits: &[(Option<&str>, Option<&str>)]) -> (u32, u64) {
        let t = pod(limits).totals().unwrap();
        (t.vcpus, t.memory_mib)
    }

    #[test]
    fn kata_static_rules() {
        // The shim contract's example: 1500m and 1Gi → 3 vCPUs, 3072 MiB.
        assert_eq!(totals(&[(Some("1500m"), Some("1Gi"))]), (3, 3072));
        assert_eq!(totals(&[]), (1, 2048));
        assert_eq!(totals(&[(Some("1"), None)]), (2, 2048));
        assert_eq!(totals(&[(Some("2"), None)]), (3, 2048));
        assert_eq!(totals(&[(Some("1m"), None)]), (2, 2048), "any CPU adds one");
        assert_eq!(totals(&[(Some("0"), Some("0"))]), (1, 2048));
        // Σ then ceil: 0.5 + 0.5 = 1 → 2 vCPUs, not 3.
        assert_eq!(
            totals(&[(Some("500m"), None), (Some("0.5"), None)]),
            (2, 2048)
        );
        assert_eq!(
            totals(&[(Some("250m"), Some("100Mi")), (Some("1.1"), Some("1G"))]),
            (3, 2048 + 100 + 953)
        );
        // Memory below a MiB adds nothing (floor per container).
        assert_eq!(
            totals(&[(None, Some("1048575")), (None, Some("1Mi"))]),
            (1, 2049)
        );
        assert_eq!(totals(&[(Some("1e0"), Some("1e9"))]), (2, 2048 + 953));
        // At the limits.
        assert_eq!(totals(&[(Some("253"), None)]).0, MAX_VCPUS);
        let t = pod(&[(Some("1500m"), Some("1Gi"))]).totals().unwrap();
        assert_eq!((t.cpu_limits_millis, t.memory_limits_mib), (1500, 1024));
    }

    #[test]
    fn bad_and_absurd_limits() {
        let err = |limits: &[(Option<&str>, Option<&str>)]| pod(limits).totals().unwrap_err();
        assert!(matches!(
            err(&[(Some("-1"), None)]),
            PodError::Quantity {
                index: 0,
                resource: "cpu",
                source: QuantityError::Negative(_)
            }
        ));
        assert!(matches!(
            err(&[(None, None), (None, Some("1GB"))]),
            PodError::Quantity {
                index: 1,
                resource: "memory",
                ..
            }
        ));
        assert!(matches!(
            err(&[(Some("253.001"), None)]),
            PodError::TooManyVcpus { .. }
        ));
        assert!(matches!(
            err(&[(Some("1e9"), None)]),
            PodError::TooManyVcpus { .. }
        ));
        assert!(matches!(
            err(&[(Some("1e40"), None)]),
            PodError::Absurd { .. }
        ));
        assert!(matches!(
            err(&[(None, Some("17Ti"))]),
            PodError::TooMuchMemory { .. }
        ));
        assert!(matches!(
            err(&[(None, Some("1e40"))]),
            PodError::Absurd { .. }
        ));
        let many = vec![(Some("0"), None); MAX_CONTAINERS + 1];
        assert!(matches!(err(&many), PodError::TooManyContainers(_)));
        let msg = err(&[(None, Some("12 Gi"))]).to_string();
        assert!(
            msg.contains("pod.containers[0].memory") && msg.contains("12 Gi"),
            "{msg}"
        );
    }

    #[test]
    fn explicit_sizes_win() {
        let mut cfg: VmConfig = serde_json::from_str(
            r#"{"payload":{"kernel":"/k"},"cpus":{"boot_vcpus":2,"max_vcpus":2},
                "pod":{"containers":[{"cpu":"1500m","memory":"1Gi"}]}}"#,
        )
        .unwrap();
        let s = apply(
            &mut cfg,
            Explicit {
                cpus: true,
                memory: false,
            },
        )
        .unwrap();
        assert_eq!(cfg.cpus.boot_vcpus, 2);
        assert_eq!(cfg.memory.size, 3072 << 20);
        assert_eq!(s.vcpus_from, SizeSource::Explicit);
        assert_eq!(s.memory_from, SizeSource::Pod);
        assert_eq!(s.pod.unwrap().vcpus, 3);

        let mut plain: VmConfig = serde_json::from_str(r#"{"payload":{"kernel":"/k"}}"#).unwrap();
        let s = apply(&mut plain, Explicit::default()).unwrap();
        assert_eq!((s.vcpus, s.memory_size), (1, 2 << 30));
        assert_eq!(s.vcpus_from, SizeSource::Default);
        assert!(s.pod.is_none());
    }

    #[test]
    fn explicit_presence_from_json() {
        let v: serde_json::Value =
            serde_json::from_str(r#"{"payload":{},"memory":{"size":1}}"#).unwrap();
        assert_eq!(
            Explicit::from_json(&v),
            Explicit {
                cpus: false,
                memory: true
            }
        );
    }

    #[test]
    fn command_line_form() {
        let c = ContainerLimits::parse("cpu=1500m,memory=1Gi").unwrap();
        assert_eq!(c.cpu.as_deref(), Some("1500m"));
        assert_eq!(c.memory.as_deref(), Some("1Gi"));
        assert!(ContainerLimits::parse("memory=64Mi,name=sidecar").is_ok());
        for bad in [
            "",
            "cpu=",
            "cpu=-1",
            "memory=1GB",
            "gpu=1",
            "cpu=1,cpu=2",
            "1500m",
        ] {
            assert!(ContainerLimits::parse(bad).is_err(), "{bad}");
        }
        let err = ContainerLimits::parse("cpu=lots").unwrap_err().to_string();
        assert!(err.contains("lots") && err.contains("cpu"), "{err}");
    }

    #[test]
    fn json_shape() {
        let p: PodConfig =
            serde_json::from_str(r#"{"containers":[{"name":"a","cpu":"1","memory":"1Gi"}]}"#)
                .unwrap();
        assert_eq!(p.containers[0].name.as_deref(), Some("a"));
        assert!(serde_json::from_str::<PodConfig>(r#"{"containers":[{"gpu":"1"}]}"#).is_err());
        assert!(serde_json::from_str::<PodConfig>(r#"{"containers":[{"cpu":1.5}]}"#).is_err());
    }
}
