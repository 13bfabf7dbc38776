//! The guest kit's Linux under podvmm, end to end: boot, agent, disks, network, virtio-fs.
//! Slow under software KVM; boots take `common::linux::one_boot_at_a_time`.
//!
//! One test binary per group: each links the whole VMM, and a 2-core CI machine spends less
//! time linking a few binaries than many.

#[path = "../api_support/mod.rs"]
mod api_support;
#[path = "../common/mod.rs"]
mod common;

mod agent;
mod blk;
mod boot;
mod fs;
mod net;
