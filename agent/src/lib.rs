//! podvmm's guest agent: listens on vsock port 1024 inside the guest and answers a small
//! line-delimited JSON protocol (ping, exec, info, poweroff); and the host client that reaches
//! it through the VMM's hybrid vsock socket.
//!
//! The protocol logic ([`server::Agent`]) works over any [`vsock::Stream`], the accept loop
//! over any [`vsock::Listener`]: tests run both over Unix sockets, the guest over AF_VSOCK.
//! See `docs/vsock.md`.

pub mod client;
pub mod exec;
pub mod facts;
pub mod init;
pub mod protocol;
pub mod server;
pub mod vsock;

pub use client::{Client, ClientError};
pub use protocol::{
    ExecRequest, ExecResult, Info, PingResult, PowerAction, AGENT_PORT, READY_PORT,
};
