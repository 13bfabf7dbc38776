//! podvmm's devices driven by the test guest (`testguest/`), friendly and hostile.
//!
//! One test binary per group: each links the whole VMM, and a 2-core CI machine spends less
//! time linking a few binaries than many.

#[path = "../common/mod.rs"]
mod common;

mod blk;
mod hostile_guest;
mod net;
mod vsock;
