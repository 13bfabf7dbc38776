//! The command line's option strings (`--disk`, `--net`, `--vsock`, `--memory`, `--cpus`,
//! `--serial`, `--pod-limits`) and the values inside them (sizes, counts, MACs, Kubernetes
//! quantities). The first byte picks the parser; the rest is the option string.
#![no_main]

use api::options::{parse_count, parse_size, OptionMap};
use api::quantity::Quantity;
use api::{ConsoleConfig, ContainerLimits, CpusConfig, DiskConfig, MemoryConfig, NetConfig};
use api::{PodConfig, VsockConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(s) = std::str::from_utf8(rest) else {
        return;
    };
    match which % 11 {
        0 => {
            let _ = DiskConfig::parse(s);
        }
        1 => {
            let _ = NetConfig::parse(s);
        }
        2 => {
            let _ = VsockConfig::parse(s);
        }
        3 => {
            let _ = MemoryConfig::parse(s);
        }
        4 => {
            let _ = CpusConfig::parse(s);
        }
        5 => {
            let _ = ConsoleConfig::parse(s);
        }
        6 => {
            // `--pod-limits`, repeatable: one container per line; then the sizing.
            let containers: Result<Vec<_>, _> = s.lines().map(ContainerLimits::parse).collect();
            if let Ok(containers) = containers {
                let _ = PodConfig { containers }.totals();
            }
        }
        7 => {
            let _ = Quantity::parse(s);
        }
        8 => {
            let _ = parse_size(s);
            let _ = parse_count(s);
        }
        9 => {
            let _ = api::parse_mac(s);
        }
        _ => {
            let _ = OptionMap::parse(s, &["a", "b", "path", "id"]);
        }
    }
});
