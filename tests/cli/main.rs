//! The command line: tiny guests, net and vsock options, seccomp filters, running
//! unprivileged, and the agent under QEMU.
//!
//! One test binary per group: each links the whole VMM, and a 2-core CI machine spends less
//! time linking a few binaries than many.

#[path = "../api_support/mod.rs"]
mod api_support;
#[path = "../common/mod.rs"]
mod common;

mod agent_qemu;
mod boot_tiny;
mod least_privilege;
mod net_cli;
mod seccomp;
mod vsock_cli;
