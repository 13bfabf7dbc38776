//! The REST API over its socket: lifecycle, bad input, Kata's runtimes' own bytes, the
//! OpenAPI conformance run, a client shim, and leak cycles.
//!
//! One test binary per group: each links the whole VMM, and a 2-core CI machine spends less
//! time linking a few binaries than many.

#[path = "../api_support/mod.rs"]
mod api_support;
#[path = "../common/mod.rs"]
mod common;

mod conformance;
mod errors;
mod leak_cycles;
mod lifecycle;
mod replay;
mod shim;
