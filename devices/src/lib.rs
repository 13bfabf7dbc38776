//! Device models and the buses that route guest I/O to them.
//!
//! Nothing here knows about KVM or MSHV: a device sees offsets and bytes, and raises its
//! interrupt through an `EventFd` that the VMM wires to the hypervisor.

pub mod bus;
pub mod i8042;
pub mod serial;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
pub use i8042::I8042;
pub use serial::{Serial, SerialOutput};
