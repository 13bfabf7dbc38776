//! The messages between the API server and the VMM thread.
//!
//! The HTTP layer never touches VMM state: it turns a request into an [`ApiRequest`] and hands
//! it to an [`ApiHandler`]. The real handler, [`VmmChannel`], sends the request to the VMM
//! thread over a channel, wakes that thread through an `EventFd` it polls, and waits for the
//! answer on a one-shot channel. Tests put a mock handler behind the HTTP layer instead.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TryRecvError};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::pod::{Explicit, Sizing};
use crate::{DiskConfig, FsConfig, NetConfig, VmConfig, VsockConfig};

/// A `vm.create`: the configuration, which of its sizes were given explicitly (they win
/// over the pod rule), and the Cloud Hypervisor fields that were ignored.
#[derive(Debug)]
pub struct CreateVm {
    pub config: VmConfig,
    pub explicit: Explicit,
    pub ignored: BTreeSet<String>,
}

/// A `vm.add-*`: the device, descriptors passed with the request (TAP fds for `vm.add-net`),
/// and the Cloud Hypervisor fields that were ignored.
#[derive(Debug)]
pub struct AddDevice<T> {
    pub config: T,
    pub fds: Vec<OwnedFd>,
    pub ignored: BTreeSet<String>,
}

/// What a client asked for, one variant per endpoint.
#[derive(Debug)]
pub enum ApiRequest {
    VmmPing,
    VmmShutdown,
    VmCreate(Box<CreateVm>),
    VmBoot,
    VmInfo,
    VmShutdown,
    VmDelete,
    VmPause,
    VmResume,
    VmCounters,
    VmAddDisk(Box<AddDevice<DiskConfig>>),
    VmAddNet(Box<AddDevice<NetConfig>>),
    VmAddVsock(Box<AddDevice<VsockConfig>>),
    VmAddFs(Box<AddDevice<FsConfig>>),
    VmResize(VmResize),
}

impl ApiRequest {
    /// The endpoint's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            ApiRequest::VmmPing => "vmm.ping",
            ApiRequest::VmmShutdown => "vmm.shutdown",
            ApiRequest::VmCreate(_) => "vm.create",
            ApiRequest::VmBoot => "vm.boot",
            ApiRequest::VmInfo => "vm.info",
            ApiRequest::VmShutdown => "vm.shutdown",
            ApiRequest::VmDelete => "vm.delete",
            ApiRequest::VmPause => "vm.pause",
            ApiRequest::VmResume => "vm.resume",
            ApiRequest::VmCounters => "vm.counters",
            ApiRequest::VmAddDisk(_) => "vm.add-disk",
            ApiRequest::VmAddNet(_) => "vm.add-net",
            ApiRequest::VmAddVsock(_) => "vm.add-vsock",
            ApiRequest::VmAddFs(_) => "vm.add-fs",
            ApiRequest::VmResize(_) => "vm.resize",
        }
    }
}

/// Cloud Hypervisor's `VmState` (podvmm never reports `BreakPoint`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Created,
    Running,
    Shutdown,
    Paused,
}

/// `vm.resize`'s body (Cloud Hypervisor's `VmResize`): each field absent or null when not
/// asked for. podvmm does not hotplug, so only the sizes the VM already has are granted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmResize {
    #[serde(default)]
    pub desired_vcpus: Option<u32>,
    /// Bytes of guest RAM.
    #[serde(default)]
    pub desired_ram: Option<u64>,
    #[serde(default)]
    pub desired_balloon: Option<u64>,
}

/// What `vm.add-disk`, `vm.add-net`, `vm.add-vsock` and `vm.add-fs` answer: Cloud Hypervisor's
/// `PciDeviceInfo`. podvmm's devices are virtio-mmio, not PCI: `bdf` is `0000:00:NN.0` with
/// NN the device's virtio-mmio slot (the guest's `virtio-mmio.NN`), in the form clients
/// expect; it names no PCI device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciDeviceInfo {
    pub id: String,
    pub bdf: String,
}

/// `vmm.ping`'s answer (Cloud Hypervisor's `VmmPingResponse`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingInfo {
    pub build_version: String,
    pub version: String,
    pub pid: i64,
    pub features: Vec<String>,
}

/// SHA-256 digests of what the VM booted, as lowercase hex.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootDigests {
    pub kernel_sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs_sha256: Option<String>,
    /// The command line the guest received (podvmm may have appended to the configured one).
    pub cmdline: String,
    pub cmdline_sha256: String,
}

/// `vm.info`'s answer: Cloud Hypervisor's `VmInfo` (`config`, `state`, `memory_actual_size`)
/// plus podvmm's own fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub config: VmConfig,
    pub state: VmState,
    /// Guest RAM in bytes.
    pub memory_actual_size: u64,
    /// How the VM was sized (pod rule, explicit, defaults) and the pod's totals.
    pub sizing: Sizing,
    /// Digests of the kernel, initramfs and command line booted; absent before the first boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_digests: Option<BootDigests>,
    /// Cloud Hypervisor fields accepted but not acted on (see `docs/api.md`).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub ignored_fields: BTreeSet<String>,
    /// Why the guest last stopped, once it has (`Reset`, `Shutdown`, an error...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    /// Milliseconds from `vm.boot` to the guest agent's ready signal on the vsock device
    /// (`docs/vsock.md`); absent until the agent has announced itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_ready_ms: Option<u64>,
}

/// `vm.counters`: per device (or vCPU), named counters.
pub type Counters = BTreeMap<String, BTreeMap<String, u64>>;

/// A successful answer.
#[derive(Debug)]
pub enum ApiReply {
    /// 204 No Content.
    Empty,
    Ping(PingInfo),
    Info(Box<VmInfo>),
    Counters(Counters),
    Device(PciDeviceInfo),
}

/// A refused or failed request. The variant decides the HTTP status.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is wrong (bad configuration, missing file...).
    #[error("{0}")]
    BadRequest(String),
    /// 404: there is no VM to act on.
    #[error("{0}")]
    NotFound(String),
    /// 409: the request makes no sense in the VM's current state.
    #[error("{0}")]
    Conflict(String),
    /// 503: the VMM is shutting down.
    #[error("{0}")]
    Unavailable(String),
    /// 500: the host failed (no hypervisor, out of memory...), not the client.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) => 400,
            ApiError::NotFound(_) => 404,
            ApiError::Conflict(_) => 409,
            ApiError::Unavailable(_) => 503,
            ApiError::Internal(_) => 500,
        }
    }
}

pub type ApiResult = Result<ApiReply, ApiError>;

/// Whoever answers API requests: the VMM thread (through [`VmmChannel`]) or a test's mock.
pub trait ApiHandler: Send + Sync {
    fn handle(&self, request: ApiRequest) -> ApiResult;
}

/// A request on its way to the VMM thread, with where to send the answer.
pub struct ApiMessage {
    pub request: ApiRequest,
    pub reply: SyncSender<ApiResult>,
}

/// The API side of the VMM thread's mailbox.
pub struct VmmChannel {
    tx: Sender<ApiMessage>,
    wake: EventFd,
}

/// The VMM thread's side: poll [`VmmMailbox::fd`], then [`VmmMailbox::drain`].
pub struct VmmMailbox {
    rx: Receiver<ApiMessage>,
    wake: EventFd,
}

/// A mailbox for the VMM thread and the handler the API server uses to reach it.
pub fn channel() -> io::Result<(VmmChannel, VmmMailbox)> {
    let wake = EventFd::new(EFD_NONBLOCK)?;
    let (tx, rx) = mpsc::channel();
    Ok((
        VmmChannel {
            tx,
            wake: wake.try_clone()?,
        },
        VmmMailbox { rx, wake },
    ))
}

const VMM_GONE: &str = "the VMM is shutting down";

impl ApiHandler for VmmChannel {
    fn handle(&self, request: ApiRequest) -> ApiResult {
        let (reply, answer) = mpsc::sync_channel(1);
        self.tx
            .send(ApiMessage { request, reply })
            .map_err(|_| ApiError::Unavailable(VMM_GONE.into()))?;
        // The counter only saturates if the VMM thread stopped reading it; the message is
        // queued either way and the thread drains the whole queue when it wakes.
        let _ = self.wake.write(1);
        answer
            .recv()
            .unwrap_or_else(|_| Err(ApiError::Unavailable(VMM_GONE.into())))
    }
}

impl VmmMailbox {
    /// The descriptor that becomes readable when requests are waiting.
    pub fn fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Takes every waiting request. Reset the wake-up first, so a request sent while
    /// draining leaves the descriptor readable for the next poll: none is ever missed.
    pub fn drain(&self) -> Vec<ApiMessage> {
        let _ = self.wake.read();
        let mut out = Vec::new();
        loop {
            match self.rx.try_recv() {
                Ok(m) => out.push(m),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return out,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    #[test]
    fn requests_reach_the_vmm_thread_and_answers_come_back() {
        let (chan, mailbox) = channel().unwrap();
        let vmm = thread::spawn(move || {
            let mut served = 0;
            while served < 3 {
                let mut pfd = libc::pollfd {
                    fd: mailbox.fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, for the length given.
                let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
                assert_eq!(n, 1, "wake-up lost");
                for m in mailbox.drain() {
                    let _ = m.reply.send(match m.request {
                        ApiRequest::VmPause => Err(ApiError::Conflict("not running".into())),
                        _ => Ok(ApiReply::Empty),
                    });
                    served += 1;
                }
            }
        });
        assert!(matches!(
            chan.handle(ApiRequest::VmBoot),
            Ok(ApiReply::Empty)
        ));
        let err = chan.handle(ApiRequest::VmPause).unwrap_err();
        assert_eq!(
            (err.status(), err.to_string().as_str()),
            (409, "not running")
        );
        assert!(chan.handle(ApiRequest::VmInfo).is_ok());
        vmm.join().unwrap();
        // The VMM thread is gone: a clean 503, not a hang.
        assert_eq!(chan.handle(ApiRequest::VmmPing).unwrap_err().status(), 503);
    }
}
