//! A virtio 1.x driver core: the virtio-mmio (version 2) transport and split virtqueues.

pub mod mmio;
pub mod queue;

pub use mmio::Transport;
pub use queue::Queue;

pub const F_VERSION_1: u64 = 1 << 32;
pub const F_INDIRECT_DESC: u64 = 1 << 28;
pub const F_EVENT_IDX: u64 = 1 << 29;

pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_VSOCK: u32 = 19;

pub fn type_name(id: u32) -> &'static str {
    match id {
        TYPE_NET => "net",
        TYPE_BLOCK => "blk",
        TYPE_VSOCK => "vsock",
        0 => "none",
        _ => "other",
    }
}
