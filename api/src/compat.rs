//! Cloud Hypervisor fields that podvmm does not model, in JSON bodies sent to the API.
//!
//! Our configuration types reject unknown fields (`deny_unknown_fields`), so a typo or a field
//! from another schema is a 400 naming the field. But Cloud Hypervisor clients built from its
//! OpenAPI spec send many fields podvmm does not model, at their default values: Kata's Go
//! driver sends `iommu: false`, `cpus.topology`, `memory.thp: true`, `rng`, `platform` and more
//! in every `vm.create`. Before a body is deserialized, this module goes through it once:
//!
//! - a field our types model is left alone;
//! - a Cloud Hypervisor field at its default (or `null`, or an empty list) is dropped: it asks
//!   for nothing;
//! - a Cloud Hypervisor field podvmm can safely do without (`cpus.topology`, `rng`,
//!   `memory.hotplug_size`, a NIC's offload flags...) is dropped whatever its value, and its
//!   path is listed in `vm.info`'s `ignored_fields`;
//! - a Cloud Hypervisor field that asks for something podvmm does not do (`memory.prefault:
//!   true`, `pmem: [...]`, `iommu: true`...) is a 400 that names the field and says why;
//! - anything else stays and is refused by the type (`unknown field`), a 400.

use std::collections::BTreeSet;

use serde::de::{self, Deserialize, Deserializer, Visitor};
use serde_json::{Map, Value};

use crate::{ConsoleConfig, CpusConfig, DiskConfig, MemoryConfig, NetConfig, PayloadConfig};
use crate::{FsConfig, RngConfig, VmConfig, VsockConfig};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompatError {
    #[error("{path} = {value} is not supported: {reason}")]
    Unsupported {
        path: String,
        value: String,
        reason: &'static str,
    },
    #[error("{path} must be {expected}")]
    Shape {
        path: String,
        expected: &'static str,
    },
}

/// What value of a Cloud Hypervisor field means "nothing asked for".
#[derive(Clone, Copy)]
enum Inert {
    Null,
    False,
    True,
    Zero,
    EmptyList,
    OneOf(&'static [&'static str]),
}

impl Inert {
    fn matches(self, v: &Value) -> bool {
        v.is_null()
            || match self {
                Inert::Null => false,
                Inert::False => v == &Value::Bool(false),
                Inert::True => v == &Value::Bool(true),
                Inert::Zero => v.as_u64() == Some(0),
                Inert::EmptyList => v.as_array().is_some_and(Vec::is_empty),
                Inert::OneOf(names) => v.as_str().is_some_and(|s| names.contains(&s)),
            }
    }
}

/// What to do with a Cloud Hypervisor field at a value other than its inert one.
#[derive(Clone, Copy)]
enum Otherwise {
    /// podvmm can do without it: drop it and list it in `ignored_fields`.
    Ignore,
    /// It asks for something podvmm does not do.
    Reject(&'static str),
    /// An object of Cloud Hypervisor fields, each with its own rule; dropped after the check.
    Walk(&'static [Rule]),
}

struct Rule {
    name: &'static str,
    inert: Inert,
    otherwise: Otherwise,
}

const fn rule(name: &'static str, inert: Inert, otherwise: Otherwise) -> Rule {
    Rule {
        name,
        inert,
        otherwise,
    }
}

use Inert::*;
use Otherwise::*;

const NO_IOMMU: &str = "podvmm has no virtual IOMMU";
const NO_VHOST_USER: &str = "vhost-user devices are not supported";

const VM_RULES: &[Rule] = &[
    rule("iommu", False, Reject(NO_IOMMU)),
    rule("watchdog", False, Reject("podvmm has no watchdog device")),
    rule("pvpanic", False, Reject("podvmm has no pvpanic device")),
    rule(
        "landlock_enable",
        False,
        Reject("Landlock is not supported"),
    ),
    rule(
        "landlock_rules",
        EmptyList,
        Reject("Landlock is not supported"),
    ),
    rule("balloon", Null, Ignore),
    rule("platform", Null, Walk(PLATFORM_RULES)),
    rule("pmem", EmptyList, Reject("virtio-pmem is not supported")),
    rule(
        "devices",
        EmptyList,
        Reject("device passthrough (VFIO) is not supported"),
    ),
    rule(
        "user_devices",
        EmptyList,
        Reject("vfio-user devices are not supported"),
    ),
    rule("vdpa", EmptyList, Reject("vDPA devices are not supported")),
    rule("generic_vhost_user", EmptyList, Reject(NO_VHOST_USER)),
    rule(
        "numa",
        EmptyList,
        Reject("guest NUMA topologies are not supported"),
    ),
    rule("rate_limit_groups", EmptyList, Ignore),
    rule("pci_segments", EmptyList, Ignore),
    rule("debug_console", Null, Walk(DEBUG_CONSOLE_RULES)),
    rule("tpm", Null, Reject("podvmm has no TPM")),
    rule("sgx_epc", EmptyList, Reject("SGX is not supported")),
    rule("rtc", Null, Ignore),
];

const PLATFORM_RULES: &[Rule] = &[
    rule(
        "tdx",
        False,
        Reject("confidential guests (TDX) are not supported"),
    ),
    rule(
        "sev_snp",
        False,
        Reject("confidential guests (SEV-SNP) are not supported"),
    ),
    rule("iommufd", False, Reject(NO_IOMMU)),
    rule("iommu_segments", EmptyList, Reject(NO_IOMMU)),
    // podvmm's devices are virtio-mmio: there is no PCI segment to size.
    rule("num_pci_segments", Null, Ignore),
    rule("iommu_address_width_bits", Null, Ignore),
    rule("vfio_p2p_dma", True, Ignore),
    rule("serial_number", Null, Ignore),
    rule("uuid", Null, Ignore),
    rule("oem_strings", EmptyList, Ignore),
    rule("system_serial_number", Null, Ignore),
    rule("system_uuid", Null, Ignore),
    rule("system_manufacturer", Null, Ignore),
    rule("system_product_name", Null, Ignore),
    rule("system_version", Null, Ignore),
    rule("system_family", Null, Ignore),
    rule("system_sku_number", Null, Ignore),
    rule("chassis_asset_tag", Null, Ignore),
];

const DEBUG_CONSOLE_RULES: &[Rule] = &[
    rule(
        "mode",
        OneOf(&["Off"]),
        Reject("podvmm has no debug console"),
    ),
    rule("file", Null, Ignore),
    rule("iobase", Null, Ignore),
];

const PAYLOAD_RULES: &[Rule] = &[
    rule(
        "firmware",
        Null,
        Reject("podvmm boots the kernel directly (no firmware)"),
    ),
    rule("igvm", Null, Reject("IGVM payloads are not supported")),
    // TDX measurement fields (Kata's Rust runtime sends them as null).
    rule(
        "mrconfigid",
        Null,
        Reject("confidential guests (TDX) are not supported"),
    ),
    rule(
        "mrowner",
        Null,
        Reject("confidential guests (TDX) are not supported"),
    ),
    rule(
        "mrownerconfig",
        Null,
        Reject("confidential guests (TDX) are not supported"),
    ),
    rule(
        "host_data",
        Null,
        Reject("confidential guests are not supported"),
    ),
];

const CPUS_RULES: &[Rule] = &[
    // The MP table gives each vCPU its own core.
    rule("topology", Null, Ignore),
    rule(
        "kvm_hyperv",
        False,
        Reject("Hyper-V enlightenments are not provided"),
    ),
    rule("nested", True, Ignore),
    rule(
        "affinity",
        EmptyList,
        Reject("vCPU affinity is not supported"),
    ),
    rule("features", Null, Walk(CPU_FEATURES_RULES)),
    rule("core_scheduling", OneOf(&["Vm", "Off"]), Ignore),
];

const CPU_FEATURES_RULES: &[Rule] = &[rule("amx", False, Reject("AMX is not offered"))];

const MEMORY_RULES: &[Rule] = &[
    rule(
        "hotplugged_size",
        Zero,
        Reject("memory hotplug is not supported"),
    ),
    rule("hotplug_method", OneOf(&["Acpi"]), Ignore),
    rule(
        "mergeable",
        False,
        Reject("KSM-merged guest memory is not supported"),
    ),
    rule(
        "prefault",
        False,
        Reject("prefaulted guest memory is not supported"),
    ),
    rule("reserve", False, Ignore),
    // Guest memory is anonymous memory: the host's transparent-hugepage policy applies.
    rule("thp", True, Ignore),
    rule("zones", EmptyList, Reject("memory zones are not supported")),
];

const CONSOLE_RULES: &[Rule] = &[
    rule("iommu", False, Reject(NO_IOMMU)),
    rule("socket", Null, Reject("socket consoles are not supported")),
    rule("id", Null, Ignore),
    rule("pci_segment", Null, Ignore),
    rule("pci_device_id", Null, Ignore),
];

const DISK_RULES: &[Rule] = &[
    rule("iommu", False, Reject(NO_IOMMU)),
    rule("vhost_user", False, Reject(NO_VHOST_USER)),
    rule("vhost_socket", Null, Reject(NO_VHOST_USER)),
    rule(
        "backing_files",
        False,
        Reject("backing files are not supported (raw images only)"),
    ),
    rule("rate_limiter_config", Null, Ignore),
    rule("rate_limit_group", Null, Ignore),
    rule("queue_affinity", EmptyList, Ignore),
    rule("pci_segment", Null, Ignore),
    rule("pci_device_id", Null, Ignore),
    rule("serial", Null, Ignore),
    rule("sparse", True, Ignore),
    rule("lock_granularity", Null, Ignore),
];

const NET_RULES: &[Rule] = &[
    rule("iommu", False, Reject(NO_IOMMU)),
    rule("vhost_user", False, Reject(NO_VHOST_USER)),
    rule("vhost_socket", Null, Reject(NO_VHOST_USER)),
    rule("vhost_mode", OneOf(&["Client"]), Ignore),
    rule("host_mac", Null, Ignore),
    rule("mtu", Null, Ignore),
    rule("rate_limiter_config", Null, Ignore),
    rule("pci_segment", Null, Ignore),
    rule("pci_device_id", Null, Ignore),
    rule("offload_tso", True, Ignore),
    rule("offload_ufo", True, Ignore),
    rule("offload_csum", True, Ignore),
    // TAP descriptors come with the request (SCM_RIGHTS); numbers in the JSON mean nothing here.
    rule("fds", Null, Ignore),
];

const RNG_RULES: &[Rule] = &[
    rule("iommu", False, Reject(NO_IOMMU)),
    rule("pci_segment", Null, Ignore),
    rule("pci_device_id", Null, Ignore),
];

const FS_RULES: &[Rule] = &[
    rule("pci_segment", Null, Ignore),
    rule("pci_device_id", Null, Ignore),
];

const VSOCK_RULES: &[Rule] = &[
    rule("iommu", False, Reject(NO_IOMMU)),
    rule("pci_segment", Null, Ignore),
    rule("pci_device_id", Null, Ignore),
];

/// The field names of a struct deriving `Deserialize` (what `deny_unknown_fields` accepts).
fn fields_of<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    struct Probe<'a>(&'a mut &'static [&'static str]);
    impl<'de> Deserializer<'de> for Probe<'_> {
        type Error = de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("probe"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("probe"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

/// Removes the Cloud Hypervisor fields of one object that `T` does not model.
fn clean_object<'de, T: Deserialize<'de>>(
    v: &mut Value,
    path: &str,
    rules: &[Rule],
    ignored: &mut BTreeSet<String>,
) -> Result<(), CompatError> {
    let Value::Object(obj) = v else {
        // Wrong shape: the type's own deserialization says what was expected.
        return Ok(());
    };
    let known = fields_of::<T>();
    apply_rules(obj, path, rules, Some(known), ignored)
}

fn apply_rules(
    obj: &mut Map<String, Value>,
    path: &str,
    rules: &[Rule],
    known: Option<&[&str]>,
    ignored: &mut BTreeSet<String>,
) -> Result<(), CompatError> {
    for r in rules {
        if known.is_some_and(|k| k.contains(&r.name)) {
            continue;
        }
        let Some(value) = obj.get_mut(r.name) else {
            continue;
        };
        let field = if path.is_empty() {
            r.name.to_string()
        } else {
            format!("{path}.{}", r.name)
        };
        if !r.inert.matches(value) {
            match r.otherwise {
                Ignore => {
                    ignored.insert(field);
                }
                Reject(reason) => {
                    let mut shown = value.to_string();
                    if shown.len() > 80 {
                        // On a character boundary: the value is the client's text.
                        shown.truncate(shown.floor_char_boundary(77));
                        shown.push_str("...");
                    }
                    return Err(CompatError::Unsupported {
                        path: field,
                        value: shown,
                        reason,
                    });
                }
                Walk(inner) => {
                    let Value::Object(inner_obj) = value else {
                        return Err(CompatError::Shape {
                            path: field,
                            expected: "an object",
                        });
                    };
                    apply_rules(inner_obj, &field, inner, None, ignored)?;
                    // Whatever is left is not a Cloud Hypervisor field either.
                    if let Some(extra) = inner_obj.keys().next() {
                        return Err(CompatError::Shape {
                            path: format!("{field}.{extra}"),
                            expected: "absent (unknown field)",
                        });
                    }
                }
            }
        }
        obj.remove(r.name);
    }
    Ok(())
}

fn clean_list<'de, T: Deserialize<'de>>(
    v: Option<&mut Value>,
    path: &str,
    rules: &[Rule],
    ignored: &mut BTreeSet<String>,
) -> Result<(), CompatError> {
    if let Some(Value::Array(items)) = v {
        for item in items {
            clean_object::<T>(item, path, rules, ignored)?;
        }
    }
    Ok(())
}

/// Prepares a `vm.create` body; returns the paths of the fields ignored.
pub fn clean_vm_config(v: &mut Value) -> Result<BTreeSet<String>, CompatError> {
    let mut ignored = BTreeSet::new();
    clean_object::<VmConfig>(v, "", VM_RULES, &mut ignored)?;
    let Value::Object(obj) = v else {
        return Ok(ignored);
    };
    if let Some(p) = obj.get_mut("payload") {
        clean_object::<PayloadConfig>(p, "payload", PAYLOAD_RULES, &mut ignored)?;
    }
    if let Some(c) = obj.get_mut("cpus") {
        clean_object::<CpusConfig>(c, "cpus", CPUS_RULES, &mut ignored)?;
    }
    if let Some(m) = obj.get_mut("memory") {
        clean_object::<MemoryConfig>(m, "memory", MEMORY_RULES, &mut ignored)?;
    }
    for name in ["serial", "console"] {
        if let Some(c) = obj.get_mut(name) {
            clean_object::<ConsoleConfig>(c, name, CONSOLE_RULES, &mut ignored)?;
        }
    }
    clean_list::<DiskConfig>(obj.get_mut("disks"), "disks", DISK_RULES, &mut ignored)?;
    clean_list::<NetConfig>(obj.get_mut("net"), "net", NET_RULES, &mut ignored)?;
    clean_list::<FsConfig>(obj.get_mut("fs"), "fs", FS_RULES, &mut ignored)?;
    if let Some(v) = obj.get_mut("vsock") {
        clean_object::<VsockConfig>(v, "vsock", VSOCK_RULES, &mut ignored)?;
    }
    if let Some(r) = obj.get_mut("rng") {
        clean_object::<RngConfig>(r, "rng", RNG_RULES, &mut ignored)?;
    }
    Ok(ignored)
}

/// Prepares a `vm.add-disk` body.
pub fn clean_disk(v: &mut Value) -> Result<BTreeSet<String>, CompatError> {
    let mut ignored = BTreeSet::new();
    clean_object::<DiskConfig>(v, "disks", DISK_RULES, &mut ignored)?;
    Ok(ignored)
}

/// Prepares a `vm.add-net` body.
pub fn clean_net(v: &mut Value) -> Result<BTreeSet<String>, CompatError> {
    let mut ignored = BTreeSet::new();
    clean_object::<NetConfig>(v, "net", NET_RULES, &mut ignored)?;
    Ok(ignored)
}

/// Prepares a `vm.add-fs` body.
pub fn clean_fs(v: &mut Value) -> Result<BTreeSet<String>, CompatError> {
    let mut ignored = BTreeSet::new();
    clean_object::<FsConfig>(v, "fs", FS_RULES, &mut ignored)?;
    Ok(ignored)
}

/// Prepares a `vm.add-vsock` body.
pub fn clean_vsock(v: &mut Value) -> Result<BTreeSet<String>, CompatError> {
    let mut ignored = BTreeSet::new();
    clean_object::<VsockConfig>(v, "vsock", VSOCK_RULES, &mut ignored)?;
    Ok(ignored)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Kata's Go driver sends in `vm.create` (clh.go with the generated client's
    /// defaults), with a disk and a vsock device.
    const KATA_CREATE: &str = r#"{
        "payload": {"kernel": "/k", "initramfs": "/i", "cmdline": "console=hvc0"},
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2, "kvm_hyperv": false, "nested": true,
                 "topology": {"threads_per_core": 1, "cores_per_die": 2, "dies_per_package": 1,
                              "packages": 1}},
        "memory": {"size": 2147483648, "hotplug_size": 8589934592, "mergeable": false,
                   "hotplug_method": "Acpi", "shared": false, "hugepages": false,
                   "prefault": false, "thp": true},
        "rng": {"src": "/dev/urandom", "iommu": false},
        "serial": {"mode": "Off", "iommu": false},
        "console": {"mode": "Off", "iommu": false},
        "platform": {"num_pci_segments": 2, "tdx": false, "sev_snp": false},
        "disks": [{"path": "/img", "readonly": true, "direct": false, "iommu": false,
                   "num_queues": 1, "queue_size": 128, "vhost_user": false,
                   "backing_files": false, "sparse": true, "image_type": "Raw"}],
        "vsock": {"cid": 3, "socket": "/run/vsock", "iommu": false},
        "iommu": false, "watchdog": false, "pvpanic": false, "landlock_enable": false
    }"#;

    #[test]
    fn kata_create_body_is_accepted() {
        let mut v: Value = serde_json::from_str(KATA_CREATE).unwrap();
        let ignored = clean_vm_config(&mut v).unwrap();
        let cfg: VmConfig = serde_json::from_value(v).unwrap();
        assert_eq!(cfg.cpus.boot_vcpus, 2);
        assert_eq!(cfg.disks.unwrap()[0].path, std::path::PathBuf::from("/img"));
        let ignored: Vec<&str> = ignored.iter().map(String::as_str).collect();
        assert_eq!(ignored, ["cpus.topology", "platform.num_pci_segments"]);
    }

    /// Found by the `vm_config_json` fuzz target: a rejected value is quoted in the error,
    /// cut to 80 bytes, and a multi-byte character across the cut panicked the API thread.
    #[test]
    fn a_long_rejected_value_is_cut_on_a_character_boundary() {
        for pad in 0..4 {
            let text = format!("{}{}", "x".repeat(60 + pad), "\u{1b5}".repeat(20));
            let mut v: Value =
                serde_json::from_str(&format!(r#"{{"sgx_epc": {{"k": "{text}"}}}}"#)).unwrap();
            let err = clean_vm_config(&mut v).unwrap_err().to_string();
            assert!(err.contains("sgx_epc") && err.contains("..."), "{err}");
            assert!(err.contains("SGX is not supported"), "{err}");
        }
    }

    #[test]
    fn kata_add_net_body_is_accepted() {
        let mut v: Value = serde_json::from_str(
            r#"{"mac": "02:00:00:00:00:01", "ip": "192.168.249.1", "mask": "255.255.255.0",
                "iommu": false, "num_queues": 2, "queue_size": 256, "vhost_user": false,
                "vhost_mode": "Client", "offload_tso": true, "offload_ufo": true,
                "offload_csum": true, "fds": [7, 8]}"#,
        )
        .unwrap();
        let ignored = clean_net(&mut v).unwrap();
        assert_eq!(ignored.into_iter().collect::<Vec<_>>(), ["net.fds"]);
        let net: NetConfig = serde_json::from_value(v).unwrap();
        assert_eq!(net.mac.as_deref(), Some("02:00:00:00:00:01"));
        assert!(net.fds.is_empty(), "fds never come from JSON");
    }

    #[test]
    fn features_we_lack_are_refused_by_name() {
        for (body, field) in [
            (
                r#"{"payload":{},"memory":{"size":1,"prefault":true}}"#,
                "memory.prefault",
            ),
            (r#"{"payload":{},"pmem":[{"file":"x"}]}"#, "pmem"),
            (r#"{"payload":{},"iommu":true}"#, "iommu"),
            (r#"{"payload":{},"platform":{"tdx":true}}"#, "platform.tdx"),
            (r#"{"payload":{"firmware":"/fw"}}"#, "payload.firmware"),
            (
                r#"{"payload":{},"cpus":{"boot_vcpus":1,"max_vcpus":1,"kvm_hyperv":true}}"#,
                "cpus.kvm_hyperv",
            ),
            (
                r#"{"payload":{},"disks":[{"path":"/d","vhost_user":true}]}"#,
                "disks.vhost_user",
            ),
            (
                r#"{"payload":{},"debug_console":{"mode":"Tty"}}"#,
                "debug_console.mode",
            ),
        ] {
            let mut v: Value = serde_json::from_str(body).unwrap();
            let err = clean_vm_config(&mut v).unwrap_err().to_string();
            assert!(
                err.starts_with(field) && err.contains("not supported"),
                "{body}: {err}"
            );
        }
    }

    #[test]
    fn defaults_are_dropped_silently_and_unknown_fields_left_for_serde() {
        let mut v: Value =
            serde_json::from_str(r#"{"payload":{"kernel":"/k"},"fs":[],"watchdog":false,"gpu":1}"#)
                .unwrap();
        assert!(clean_vm_config(&mut v).unwrap().is_empty());
        let err = serde_json::from_value::<VmConfig>(v)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `gpu`"), "{err}");
        // Unknown fields inside a walked Cloud Hypervisor object are refused too.
        let mut v: Value =
            serde_json::from_str(r#"{"payload":{},"platform":{"tdx":false,"warp":9}}"#).unwrap();
        let err = clean_vm_config(&mut v).unwrap_err().to_string();
        assert!(err.contains("platform.warp"), "{err}");
        let mut v: Value = serde_json::from_str(r#"{"payload":{},"platform":7}"#).unwrap();
        assert!(clean_vm_config(&mut v).is_err());
    }

    #[test]
    fn modelled_fields_are_never_touched() {
        assert!(fields_of::<DiskConfig>().contains(&"path"));
        assert!(fields_of::<VmConfig>().contains(&"pod"));
        // A rule for a field the type models is skipped: the type decides.
        let mut v: Value = serde_json::from_str(r#"{"path":"/d","readonly":true}"#).unwrap();
        clean_disk(&mut v).unwrap();
        assert_eq!(v["readonly"], Value::Bool(true));
    }
}
