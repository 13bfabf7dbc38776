//! virtio-vsock with hybrid vsock: guest sockets reach host programs through Unix sockets.
//!
//! - Host to guest: a host program connects to the device's Unix socket `PATH`, writes
//!   `CONNECT <port>\n`, and once the guest accepted reads `OK <host_port>\n`; then bytes flow
//!   both ways. A CONNECT that arrives before anything listens on the guest port (the guest
//!   answers RST) is retried: until [`VsockOptions::boot_connect_timeout`] while the agent has
//!   not announced itself (the guest is booting), then for [`VsockOptions::connect_timeout`]; the
//!   agent's ready signal retries every waiting CONNECT at once. A CONNECT still waiting when the
//!   guest stops is told so. Errors are reported as one `ERR <reason>\n` line
//!   before the stream is closed (no line of ours ever contains `OK` otherwise).
//! - Guest to host: a guest connection to host port `N` is forwarded to the Unix socket
//!   `PATH_N`, which a host program listens on.
//! - Host port [`VsockOptions::ready_port`] (default [`AGENT_READY_PORT`]) is the agent's
//!   ready signal: the VMM records the time of the first connection request to it and refuses
//!   it (RST); nothing is forwarded.
//!
//! See `docs/vsock.md` for the protocol, ports and flow control.

#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod hybrid;
mod muxer;
pub mod packet;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use validated::GuestCid;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::hybrid::{HybridError, SocketId};
use self::muxer::{Active, Control, Muxer};
use super::worker::{self, ResetLine};
use super::{
    ActivateContext, ActivateError, Interrupt, VirtioDevice, TYPE_VSOCK, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_INDIRECT_DESC,
};

/// The guest agent's vsock port (Kata's too).
pub const AGENT_PORT: u32 = 1024;
/// The host port the agent connects to once it listens: the ready signal.
pub const AGENT_READY_PORT: u32 = 1023;
/// Default of [`VsockOptions::boot_connect_timeout`]: a Linux boot under software KVM takes
/// minutes.
pub const DEFAULT_BOOT_CONNECT_TIMEOUT: Duration = Duration::from_secs(600);
/// Queue size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error(transparent)]
    Socket(#[from] HybridError),
    #[error("vsock: {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// What the device reports as it happens (for the VMM's event monitor).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VsockEvent {
    /// The guest driver set DRIVER_OK: the guest kernel's vsock is up.
    DriverReady,
    /// The agent announced itself on the ready port; `first` is false for later announcements
    /// (an agent restarted).
    AgentReady { first: bool },
    /// The guest refused a host CONNECT to `port` (nothing listens there yet); the VMM keeps
    /// retrying. Reported once per CONNECT.
    ConnectRefused { port: u32 },
}

pub type EventSink = Arc<dyn Fn(VsockEvent) + Send + Sync>;

/// Tunables; [`VsockOptions::default`] is what the VMM uses.
#[derive(Clone, Debug)]
pub struct VsockOptions {
    /// How long a host CONNECT waits for the guest to accept (retrying while it refuses) once
    /// the agent has announced itself.
    pub connect_timeout: Duration,
    /// How long a host CONNECT waits while the agent has not announced itself yet (the guest is
    /// still booting: minutes under software KVM). A shim dials right after `vm.boot`; it is
    /// held until the guest accepts, the guest stops, or this bound passes.
    pub boot_connect_timeout: Duration,
    /// How long a host client may take to send its CONNECT line.
    pub line_timeout: Duration,
    /// After both sides shut a connection down, how long to wait for the guest's RST.
    pub close_timeout: Duration,
    /// Receive buffer per connection: the credit the guest gets, and the most we ever buffer
    /// for a host peer that does not read.
    pub buf_alloc: u32,
    /// Connections at once (both directions together).
    pub max_connections: usize,
    /// The host port of the agent's ready signal.
    pub ready_port: u32,
}

impl Default for VsockOptions {
    fn default() -> Self {
        VsockOptions {
            connect_timeout: Duration::from_secs(30),
            boot_connect_timeout: DEFAULT_BOOT_CONNECT_TIMEOUT,
            line_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(2),
            buf_alloc: 256 * 1024,
            max_connections: 256,
            ready_port: AGENT_READY_PORT,
        }
    }
}

/// What the VMM asks for (`api::ValidVsock`): the context id was checked when the
/// configuration arrived.
#[derive(Clone)]
pub struct VsockConfig {
    pub cid: GuestCid,
    pub socket: PathBuf,
    pub options: VsockOptions,
    pub events: Option<EventSink>,
}

/// Counters of what happened, for tests and reports.
#[derive(Debug, Default)]
pub struct VsockCounters {
    /// Host clients accepted on the socket.
    pub host_connections: AtomicU64,
    /// Host clients refused (too many connections).
    pub refused_host: AtomicU64,
    /// Host clients dropped for a bad or missing CONNECT line.
    pub bad_connect_lines: AtomicU64,
    /// Connections established, both directions.
    pub established: AtomicU64,
    /// REQUESTs re-sent after the guest refused a host CONNECT.
    pub connect_retries: AtomicU64,
    /// Host CONNECTs the guest never accepted in time.
    pub connect_timeouts: AtomicU64,
    /// Guest connections refused (no `PATH_N` listener, or too many connections).
    pub refused_guest: AtomicU64,
    /// Malformed packets or buffers from the guest.
    pub invalid_packets: AtomicU64,
    /// Connections reset because the guest sent beyond its credit.
    pub credit_violations: AtomicU64,
    /// RSTs not sent because too many were queued.
    pub dropped_rsts: AtomicU64,
    /// The device thread stopped on its own (an error it cannot go on from, or a panic): vsock
    /// is down, the driver is asked for a reset, the VM goes on.
    pub worker_failures: Arc<AtomicU64>,
}

/// State shared by the device, its worker and the VMM.
pub struct Shared {
    pub counters: VsockCounters,
    agent_ready: OnceLock<Instant>,
    events: Option<EventSink>,
}

impl Shared {
    fn emit(&self, e: VsockEvent) {
        if let Some(sink) = &self.events {
            sink(e);
        }
    }
}

/// The VMM's view of a vsock device. Dropping it removes the socket file (if it is still the
/// one the device bound).
pub struct VsockHandle {
    shared: Arc<Shared>,
    socket: PathBuf,
    id: SocketId,
}

impl VsockHandle {
    /// When the agent first announced itself.
    pub fn agent_ready(&self) -> Option<Instant> {
        self.shared.agent_ready.get().copied()
    }

    pub fn counters(&self) -> &VsockCounters {
        &self.shared.counters
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for VsockHandle {
    fn drop(&mut self) {
        hybrid::remove_if_ours(&self.socket, self.id);
    }
}

pub struct Vsock {
    cid: u64,
    ctl: Sender<Control>,
    wake: EventFd,
    /// The interrupt of the current activation: where a failed worker's reset request goes.
    interrupt: Arc<Mutex<Option<Arc<Interrupt>>>>,
    worker: Option<JoinHandle<()>>,
}

impl Vsock {
    /// Binds the socket (so it exists before the guest runs) and starts the worker, which
    /// accepts host clients at once; their CONNECTs wait until the guest driver is up.
    pub fn new(cfg: VsockConfig) -> Result<(Self, VsockHandle), VsockError> {
        let (listener, id) = hybrid::bind_listener(&cfg.socket)?;
        let shared = Arc::new(Shared {
            counters: VsockCounters::default(),
            agent_ready: OnceLock::new(),
            events: cfg.events.clone(),
        });
        let handle = VsockHandle {
            shared: shared.clone(),
            socket: cfg.socket.clone(),
            id,
        };
        let io = |what| move |source| VsockError::Io { what, source };
        let wake = EventFd::new(EFD_NONBLOCK).map_err(io("creating an eventfd"))?;
        let (ctl, ctl_rx) = mpsc::channel();
        let failures = shared.counters.worker_failures.clone();
        let muxer = Muxer::new(
            cfg.cid.get(),
            cfg.socket.clone(),
            listener,
            cfg.options,
            shared,
            wake.try_clone().map_err(io("cloning an eventfd"))?,
            ctl_rx,
        )
        .map_err(io("creating its timer"))?;
        let interrupt = Arc::new(Mutex::new(None));
        let worker = worker::spawn(
            "vsock".into(),
            seccomp::ThreadKind::Vsock,
            "vsock".into(),
            ResetLine::Current(interrupt.clone()),
            failures,
            move || worker::event_loop(muxer),
        )
        .map_err(io("spawning the device thread"))?;
        Ok((
            Vsock {
                cid: cfg.cid.get(),
                ctl,
                wake,
                interrupt,
                worker: Some(worker),
            },
            handle,
        ))
    }

    fn set_interrupt(&self, interrupt: Option<Arc<Interrupt>>) {
        *self
            .interrupt
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = interrupt;
    }

    fn send(&self, msg: Control) -> bool {
        let ok = self.ctl.send(msg).is_ok();
        let _ = self.wake.write(1);
        ok
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.send(Control::Stop);
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // guest_cid (le64) is the whole configuration space.
        super::read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let n = ctx.queues.len();
        if n != 3 {
            return Err(ActivateError::BadQueue(n.min(2)));
        }
        let mut qs = ctx.queues.into_iter();
        let (Some((rx, rx_evt)), Some((tx, tx_evt)), Some((ev, ev_evt))) =
            (qs.next(), qs.next(), qs.next())
        else {
            return Err(ActivateError::BadQueue(0));
        };
        self.set_interrupt(Some(ctx.interrupt.clone()));
        let active = Active {
            mem: ctx.mem,
            rx,
            tx,
            _ev: ev,
            evts: [rx_evt, tx_evt, ev_evt],
            interrupt: ctx.interrupt,
        };
        if !self.send(Control::Activate(Box::new(active))) {
            return Err(ActivateError::Io {
                what: "the vsock device thread is gone",
                source: std::io::Error::from(std::io::ErrorKind::BrokenPipe),
            });
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.set_interrupt(None);
        // Wait until the worker let go of the queues: the driver reuses their memory next.
        let (ack, done) = mpsc::sync_channel(1);
        if self.send(Control::Reset(ack)) {
            let _ = done.recv_timeout(Duration::from_secs(2));
        }
    }
}
