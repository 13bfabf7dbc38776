//! The VM configuration, shared by the command line and the REST API.
//!
//! Field names and JSON shapes follow Cloud Hypervisor's `VmConfig` so existing clients work
//! unchanged. The command-line option strings (`--memory size=2G`, `--cpus boot=2`...) use
//! Cloud Hypervisor's syntax and parse into the same types.

pub mod config;
pub mod devices;
pub mod options;

pub use config::*;
pub use devices::*;
