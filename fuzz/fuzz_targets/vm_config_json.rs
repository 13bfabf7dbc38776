//! The VM configuration JSON of `vm.create` (and the device bodies of `vm.add-*`), through
//! the same steps the API takes: parse, the Cloud Hypervisor compatibility pass, the typed
//! schema, validation and pod sizing.
#![no_main]

use api::pod::{apply, Explicit};
use api::{DiskConfig, NetConfig, VmConfig, VsockConfig};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let Ok(mut v) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    match which % 4 {
        0 => {
            let explicit = Explicit::from_json(&v);
            if api::compat::clean_vm_config(&mut v).is_err() {
                return;
            }
            if let Ok(mut config) = serde_json::from_value::<VmConfig>(v) {
                let _ = config.validate();
                let _ = config.cmdline();
                if let Ok(sizing) = apply(&mut config, explicit) {
                    // What vm.info would answer must serialize.
                    serde_json::to_vec(&sizing).expect("sizing serializes");
                }
                serde_json::to_vec(&config).expect("a parsed config serializes");
            }
        }
        1 => {
            if api::compat::clean_disk(&mut v).is_ok() {
                let _ = serde_json::from_value::<DiskConfig>(v);
            }
        }
        2 => {
            if api::compat::clean_net(&mut v).is_ok() {
                let _ = serde_json::from_value::<NetConfig>(v);
            }
        }
        _ => {
            if api::compat::clean_vsock(&mut v).is_ok() {
                let _ = serde_json::from_value::<VsockConfig>(v);
            }
        }
    }
});
