//! The VM configuration, shared by the command line and the REST API.
//!
//! Field names and JSON shapes follow Cloud Hypervisor's `VmConfig` so existing clients work
//! unchanged. The command-line option strings (`--memory size=2G`, `--cpus boot=2`...) use
//! Cloud Hypervisor's syntax and parse into the same types.
//!
//! Also the REST API's side of podvmm: the HTTP server on the API socket (`http`), the
//! messages it exchanges with the VMM thread and the `ApiHandler` trait (`messages`), the pass
//! over Cloud Hypervisor fields podvmm does not model (`compat`), pod sizing from Kubernetes
//! quantities (`pod`, `quantity`), the one validation of a configuration (`valid`) and a client
//! for the socket (`client`).

pub mod client;
pub mod compat;
pub mod config;
pub mod devices;
pub mod http;
pub mod messages;
pub mod options;
pub mod pod;
pub mod quantity;
pub mod valid;

pub use config::*;
pub use devices::*;
pub use pod::{ContainerLimits, PodConfig};
pub use valid::*;
/// The checked values devices take (re-exported for the VMM and tests).
pub use validated;
