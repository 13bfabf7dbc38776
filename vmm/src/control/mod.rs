//! The VMM thread: owns the VM and its lifecycle, and answers API requests.
//!
//! It waits on event-manager for three things: the API mailbox's wake-up descriptor, the
//! termination signals' descriptor, and, while a guest runs, the VM's exit event (watched from
//! `vm.boot` until the VM is released). The one subscriber only notes what became ready; the
//! thread acts on it once the manager's `run` returns, so a request may change what is watched.
//! API requests arrive as [`ApiRequest`] messages and are answered on their one-shot channel;
//! nothing else touches the VM. A guest that resets or powers off
//! moves the VM to `Shutdown` (its vCPU threads joined, its memory released) and the VMM
//! stays up, as Cloud Hypervisor does.
//!
//! States: no VM → `vm.create` → Created → `vm.boot` → Running ⇄ Paused (`vm.pause`,
//! `vm.resume`); Running/Paused → `vm.shutdown` or a guest stop → Shutdown → `vm.boot` again;
//! `vm.delete` from any state → no VM.

use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use api::messages::{
    AddDevice, ApiError, ApiReply, ApiRequest, ApiResult, BootDigests, Counters, CreateVm,
    PciDeviceInfo, PingInfo, VmInfo, VmResize, VmState, VmmMailbox,
};
use api::pod::{self, Sizing};
use api::{
    DiskConfig, FsConfig, ImageType, NetConfig, ValidDisk, ValidFs, ValidationError, VmConfig,
    VsockConfig,
};
use devices::virtio::block::image::{self, ImageFormat};
use devices::virtio::DeviceCounters;
use event_manager::{
    EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberId, SubscriberOps,
};
use hypervisor::Selection;
use sha2::{Digest, Sha256};

use crate::device_manager::DeviceError;
use crate::{Error, ExitReason, Vm};

mod checks;
mod digests;

use checks::*;
use digests::*;

// What each watched descriptor is (the data of its event).
const API: u32 = 0;
const VM: u32 = 1;
const SIGNAL: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the VMM thread's event loop: {what}: {source}")]
    EventLoop {
        what: &'static str,
        #[source]
        source: event_manager::Error,
    },
}

/// The one subscriber: notes which of its descriptors became ready (a bit per kind).
#[derive(Default)]
struct Ready(u32);

impl MutEventSubscriber for Ready {
    // Its descriptors are added and removed by `Watch`, between runs.
    fn init(&mut self, _ops: &mut EventOps) {}

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        self.0 |= 1u32.checked_shl(events.data()).unwrap_or(0);
    }
}

/// What the VMM thread waits on.
struct Watch {
    manager: EventManager<Ready>,
    id: SubscriberId,
}

impl Watch {
    fn new() -> Result<Self, ControlError> {
        let mut manager = EventManager::new().map_err(|source| ControlError::EventLoop {
            what: "creating it",
            source,
        })?;
        let id = manager.add_subscriber(Ready::default());
        Ok(Watch { manager, id })
    }

    /// Watches `fd` for input, as `what`.
    fn add(&mut self, fd: RawFd, what: u32) -> Result<(), event_manager::Error> {
        self.manager
            .event_ops(self.id)?
            .add(Events::with_data_raw(fd, what, EventSet::IN))
    }

    /// Stops watching `fd`: before it is closed (so that its number, reused, is free to watch).
    fn remove(&mut self, fd: RawFd) {
        if let Ok(mut ops) = self.manager.event_ops(self.id) {
            let _ = ops.remove(Events::empty_raw(fd));
        }
    }

    /// Waits for events; returns which kinds became ready (a bit each, none if interrupted).
    fn wait(&mut self) -> Result<u32, ControlError> {
        let failed = |what| move |source| ControlError::EventLoop { what, source };
        self.manager.run().map_err(failed("waiting"))?;
        let ready = self
            .manager
            .subscriber_mut(self.id)
            .map_err(failed("reading it"))?;
        Ok(std::mem::take(&mut ready.0))
    }
}

fn ready(set: u32, what: u32) -> bool {
    set & (1 << what) != 0
}

/// The configured VM and, once booted, the running one.
struct VmRecord {
    config: VmConfig,
    sizing: Sizing,
    ignored: BTreeSet<String>,
    /// TAP descriptors received with `vm.add-net`, one list per `config.net` entry; their raw
    /// numbers are in each entry's `fds`, valid for as long as the entry exists.
    net_fds: Vec<Vec<OwnedFd>>,
    state: VmState,
    vm: Option<Vm>,
    digests: Option<BootDigests>,
    stop_reason: Option<String>,
}

pub struct Vmm {
    selection: Selection,
    /// Files the process itself writes (API socket, event monitor, log file): no VM may
    /// take one of them as an input or an output of its own.
    process_outputs: Vec<crate::outputs::Named>,
    record: Option<VmRecord>,
    watch: Watch,
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::BadRequest(msg.into())
}

fn conflict(msg: impl Into<String>) -> ApiError {
    ApiError::Conflict(msg.into())
}

const NO_VM: &str = "no VM has been created (vm.create first)";

impl Vmm {
    pub fn new(selection: Selection) -> Result<Self, ControlError> {
        Ok(Vmm {
            selection,
            process_outputs: Vec::new(),
            record: None,
            watch: Watch::new()?,
        })
    }

    /// Files this process writes, which no VM's configuration may name.
    pub fn set_process_outputs(&mut self, outputs: Vec<crate::outputs::Named>) {
        self.process_outputs = outputs;
    }

    /// Serves `mailbox` until `vmm.shutdown`, or a termination signal (`signals`: then the
    /// answer is the signal's number). The VM, if any, is torn down before returning.
    pub fn run(&mut self, mailbox: &VmmMailbox) -> Result<Option<i32>, ControlError> {
        let watching = |what| move |source| ControlError::EventLoop { what, source };
        self.watch
            .add(mailbox.fd(), API)
            .map_err(watching("watching the API mailbox"))?;
        if let Some(fd) = crate::signals::fd() {
            self.watch
                .add(fd, SIGNAL)
                .map_err(watching("watching the signals"))?;
        }
        loop {
            // Zero kinds ready: interrupted by a signal.
            let set = self.watch.wait()?;
            if ready(set, VM) {
                self.guest_stopped();
            }
            if ready(set, SIGNAL) {
                if let Some(sig) = crate::signals::received() {
                    if let Some(record) = self.record.as_mut() {
                        release(&mut self.watch, record);
                    }
                    return Ok(Some(sig));
                }
            }
            if ready(set, API) {
                for message in mailbox.drain() {
                    let exit = matches!(message.request, ApiRequest::VmmShutdown);
                    let answer = self.handle(message.request);
                    let exit = exit && answer.is_ok();
                    // The client may have gone; the request is done either way.
                    let _ = message.reply.send(answer);
                    if exit {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Answers one request.
    pub fn handle(&mut self, request: ApiRequest) -> ApiResult {
        match request {
            ApiRequest::VmmPing => Ok(ApiReply::Ping(ping())),
            ApiRequest::VmmShutdown => {
                if let Some(record) = self.record.as_mut() {
                    release(&mut self.watch, record);
                }
                Ok(ApiReply::Empty)
            }
            ApiRequest::VmCreate(create) => self.create(*create).map(|_| ApiReply::Empty),
            ApiRequest::VmBoot => self.boot().map(|_| ApiReply::Empty),
            ApiRequest::VmInfo => self.info().map(|i| ApiReply::Info(Box::new(i))),
            ApiRequest::VmShutdown => self.shutdown().map(|_| ApiReply::Empty),
            ApiRequest::VmDelete => {
                // As in Cloud Hypervisor, deleting when there is nothing is not an error.
                if let Some(mut record) = self.record.take() {
                    release(&mut self.watch, &mut record);
                }
                Ok(ApiReply::Empty)
            }
            ApiRequest::VmPause => self.pause().map(|_| ApiReply::Empty),
            ApiRequest::VmResume => self.resume().map(|_| ApiReply::Empty),
            ApiRequest::VmCounters => self.counters().map(ApiReply::Counters),
            ApiRequest::VmAddDisk(add) => self.add_disk(*add).map(ApiReply::Device),
            ApiRequest::VmAddNet(add) => self.add_net(*add).map(ApiReply::Device),
            ApiRequest::VmAddVsock(add) => self.add_vsock(*add).map(ApiReply::Device),
            ApiRequest::VmAddFs(add) => self.add_fs(*add).map(ApiReply::Device),
            ApiRequest::VmResize(r) => self.resize(r).map(|_| ApiReply::Empty),
        }
    }

    /// The VM's state, if there is one.
    pub fn state(&self) -> Option<VmState> {
        self.record.as_ref().map(|s| s.state)
    }

    fn record(&mut self) -> Result<&mut VmRecord, ApiError> {
        self.record
            .as_mut()
            .ok_or_else(|| ApiError::NotFound(NO_VM.into()))
    }

    fn create(&mut self, create: CreateVm) -> Result<(), ApiError> {
        if let Some(record) = &self.record {
            return Err(conflict(format!(
                "a VM already exists (state {:?}); vm.delete it first",
                record.state
            )));
        }
        let CreateVm {
            mut config,
            explicit,
            ignored,
        } = create;
        let sizing = pod::apply(&mut config, explicit).map_err(|e| bad(e.to_string()))?;
        check_config(&config)?;
        crate::outputs::check(&config, &self.process_outputs).map_err(bad)?;
        let net_fds = config.net.iter().flatten().map(|_| Vec::new()).collect();
        self.record = Some(VmRecord {
            config,
            sizing,
            ignored,
            net_fds,
            state: VmState::Created,
            vm: None,
            digests: None,
            stop_reason: None,
        });
        Ok(())
    }

    fn boot(&mut self) -> Result<(), ApiError> {
        let selection = self.selection;
        let process_outputs = self.process_outputs.clone();
        let record = self.record()?;
        match record.state {
            VmState::Created | VmState::Shutdown => {}
            VmState::Running => return Err(conflict("the VM is already running")),
            VmState::Paused => {
                return Err(conflict("the VM is paused (vm.resume it, or vm.shutdown)"))
            }
        }
        // Files may have changed since vm.create (a symlink re-pointed): checked again before
        // anything is opened for writing.
        crate::outputs::check(&record.config, &process_outputs).map_err(bad)?;
        // Opened once, checked from the descriptors (no FIFO, no device, bounded sizes), and
        // measured and loaded from them: the digests are of what the guest got.
        let inputs = crate::BootInputs::open(&record.config).map_err(boot_error)?;
        let kernel_sha256 = digest(&inputs.kernel)?;
        let initramfs_sha256 = inputs.initramfs.as_ref().map(digest).transpose()?;
        let mut vm = Vm::new(&record.config, selection, &inputs).map_err(boot_error)?;
        drop(inputs);
        let cmdline = vm.cmdline().to_string();
        vm.start().map_err(|e| ApiError::Internal(e.to_string()))?;
        if let Err(e) = self.watch.add(vm.exit_fd(), VM) {
            vm.stop();
            return Err(ApiError::Internal(format!("watching the VM: {e}")));
        }
        let record = self.record()?;
        record.digests = Some(BootDigests {
            kernel_sha256,
            initramfs_sha256,
            cmdline_sha256: hex(&Sha256::digest(cmdline.as_bytes())),
            cmdline,
        });
        record.vm = Some(vm);
        record.state = VmState::Running;
        record.stop_reason = None;
        Ok(())
    }

    fn info(&mut self) -> Result<VmInfo, ApiError> {
        let record = self.record()?;
        Ok(VmInfo {
            config: record.config.clone(),
            state: record.state,
            memory_actual_size: record.config.memory.size,
            sizing: record.sizing.clone(),
            boot_digests: record.digests.clone(),
            ignored_fields: record.ignored.clone(),
            stop_reason: record.stop_reason.clone(),
            agent_ready_ms: record.vm.as_ref().and_then(Vm::agent_ready_ms),
        })
    }

    fn shutdown(&mut self) -> Result<(), ApiError> {
        let watch = &mut self.watch;
        let record = self
            .record
            .as_mut()
            .ok_or_else(|| ApiError::NotFound(NO_VM.into()))?;
        match record.state {
            VmState::Running | VmState::Paused => {
                release(watch, record);
                // As in Cloud Hypervisor: the configuration stays, ready to boot again.
                record.state = VmState::Created;
                record.stop_reason = Some("vm.shutdown".into());
                Ok(())
            }
            VmState::Created => Err(conflict("the VM has not been booted")),
            VmState::Shutdown => Err(conflict("the VM is already shut down")),
        }
    }

    fn pause(&mut self) -> Result<(), ApiError> {
        let record = self.record()?;
        match (record.state, &record.vm) {
            (VmState::Running, Some(vm)) => {
                vm.pause().map_err(|e| ApiError::Internal(e.to_string()))?;
                record.state = VmState::Paused;
                Ok(())
            }
            (VmState::Paused, _) => Err(conflict("the VM is already paused")),
            (state, _) => Err(conflict(format!("the VM is not running (state {state:?})"))),
        }
    }

    fn resume(&mut self) -> Result<(), ApiError> {
        let record = self.record()?;
        match (record.state, &record.vm) {
            (VmState::Paused, Some(vm)) => {
                vm.resume();
                record.state = VmState::Running;
                Ok(())
            }
            (state, _) => Err(conflict(format!("the VM is not paused (state {state:?})"))),
        }
    }

    fn counters(&mut self) -> Result<Counters, ApiError> {
        let record = self.record()?;
        let Some(vm) = &record.vm else {
            return Err(conflict(format!(
                "the VM is not running (state {:?})",
                record.state
            )));
        };
        // Each device's counters come from the device (`DeviceCounters`); the VMM only names
        // them by device id.
        let devices = vm.devices();
        let named = devices
            .disks
            .iter()
            .map(|d| (d.id.clone(), &*d.counters as &dyn DeviceCounters))
            .chain(
                devices
                    .nets
                    .iter()
                    .map(|n| (n.id.clone(), &*n.counters as &dyn DeviceCounters)),
            )
            .chain(
                devices
                    .fs
                    .iter()
                    .map(|f| (f.id.clone(), &*f.counters as &dyn DeviceCounters)),
            )
            .chain(
                devices
                    .rng
                    .iter()
                    .map(|r| ("rng".to_string(), &**r as &dyn DeviceCounters)),
            );
        let counters: Counters = named
            .map(|(id, c)| {
                let values = c
                    .snapshot()
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect();
                (id, values)
            })
            .collect();
        Ok(counters)
    }

    /// Where a device may be added: only before boot (or after a shutdown).
    fn cold_record(&mut self, what: &str) -> Result<&mut VmRecord, ApiError> {
        let record = self.record()?;
        match record.state {
            VmState::Created | VmState::Shutdown => Ok(record),
            state => Err(conflict(format!(
                "the VM is {state:?}: adding {what} to a booted VM (hotplug) is not supported; add devices before vm.boot"
            ))),
        }
    }

    fn add_disk(&mut self, add: AddDevice<DiskConfig>) -> Result<PciDeviceInfo, ApiError> {
        let record = self.cold_record("a disk")?;
        let index = record.config.disks.as_ref().map_or(0, Vec::len);
        check_disk(&add.config.validate(index)?)?;
        record.config.check_new_id(add.config.id.as_deref())?;
        let disks = record.config.disks.get_or_insert_with(Vec::new);
        disks.push(add.config);
        record.ignored.extend(add.ignored);
        Ok(device_info(&record.config, DeviceKind::Disk))
    }

    /// `vm.resize`: the sizes the VM already has are granted (Kata's Go runtime asks for the
    /// current vCPU count on every pod); anything else needs hotplug, which podvmm does not do.
    fn resize(&mut self, r: VmResize) -> Result<(), ApiError> {
        let record = self.record()?;
        let cpus = &record.config.cpus;
        if let Some(n) = r.desired_vcpus.filter(|&n| n != cpus.boot_vcpus) {
            return Err(bad(format!(
                "desired_vcpus {n}: the VM has {} vCPUs and podvmm does not hotplug vCPUs \
                 (max_vcpus {} is recorded, not provided)",
                cpus.boot_vcpus, cpus.max_vcpus
            )));
        }
        let size = record.config.memory.size;
        if let Some(ram) = r.desired_ram.filter(|&ram| ram != size) {
            return Err(bad(format!(
                "desired_ram {ram}: the VM has {size} bytes of memory and podvmm does not \
                 hotplug memory"
            )));
        }
        if let Some(b) = r.desired_balloon.filter(|&b| b != 0) {
            return Err(bad(format!(
                "desired_balloon {b}: podvmm has no balloon device"
            )));
        }
        Ok(())
    }

    fn add_net(&mut self, add: AddDevice<NetConfig>) -> Result<PciDeviceInfo, ApiError> {
        let record = self.cold_record("a network device")?;
        let AddDevice {
            mut config,
            fds,
            ignored,
        } = add;
        check_tap(&fds)?;
        config.fds = fds.iter().map(AsRawFd::as_raw_fd).collect();
        config.validate(record.config.net.as_ref().map_or(0, Vec::len))?;
        record.config.check_new_id(config.id.as_deref())?;
        record.config.net.get_or_insert_with(Vec::new).push(config);
        record.net_fds.push(fds);
        record.ignored.extend(ignored);
        Ok(device_info(&record.config, DeviceKind::Net))
    }

    fn add_vsock(&mut self, add: AddDevice<VsockConfig>) -> Result<PciDeviceInfo, ApiError> {
        let record = self.cold_record("a vsock device")?;
        if record.config.vsock.is_some() {
            return Err(conflict("the VM already has a vsock device"));
        }
        add.config.validate()?;
        record.config.check_new_id(add.config.id.as_deref())?;
        record.config.vsock = Some(add.config);
        record.ignored.extend(add.ignored);
        Ok(device_info(&record.config, DeviceKind::Vsock))
    }

    fn add_fs(&mut self, add: AddDevice<FsConfig>) -> Result<PciDeviceInfo, ApiError> {
        let record = self.cold_record("a virtio-fs device")?;
        record.config.check_new_id(add.config.id.as_deref())?;
        let tag = &add.config.tag;
        if record.config.fs.iter().flatten().any(|f| &f.tag == tag) {
            return Err(ValidationError::TagInUse(tag.clone()).into());
        }
        let mut config = record.config.clone();
        config.fs.get_or_insert_with(Vec::new).push(add.config);
        for fs in &config.validated()?.fs {
            check_fs(fs)?;
        }
        record.config = config;
        record.ignored.extend(add.ignored);
        Ok(device_info(&record.config, DeviceKind::Fs))
    }

    /// The guest stopped by itself (reset, power-off, crash): the VM moves to Shutdown.
    fn guest_stopped(&mut self) {
        let Some(record) = self.record.as_mut() else {
            return;
        };
        // A readiness report can outlive its VM (shut down and booted again by requests
        // handled in the same wake-up): only a pending exit counts.
        let Some(reason) = record.vm.as_ref().and_then(Vm::exit_reason) else {
            return;
        };
        match &reason {
            ExitReason::Reset | ExitReason::Shutdown | ExitReason::Terminated(_) => {}
            ExitReason::TripleFault => log::warn!("guest stopped: triple fault"),
            ExitReason::GuestError(msg) => log::warn!("guest stopped: {msg}"),
        }
        release(&mut self.watch, record);
        record.state = VmState::Shutdown;
        record.stop_reason = Some(match reason {
            ExitReason::Reset => "Reset".into(),
            ExitReason::Shutdown => "Shutdown".into(),
            ExitReason::TripleFault => "TripleFault".into(),
            ExitReason::GuestError(msg) => format!("GuestError: {msg}"),
            ExitReason::Terminated(sig) => crate::signals::name(sig),
        });
    }
}

/// Stops the running VM, if any: its exit event no longer watched, vCPU threads joined,
/// memory and devices released.
fn release(watch: &mut Watch, record: &mut VmRecord) {
    if let Some(mut vm) = record.vm.take() {
        watch.remove(vm.exit_fd());
        vm.stop();
    }
}

fn ping() -> PingInfo {
    let version = env!("CARGO_PKG_VERSION");
    let mut features = vec!["kvm".to_string()];
    if cfg!(feature = "mshv") {
        features.push("mshv".into());
    }
    PingInfo {
        build_version: format!("podvmm v{version}"),
        version: version.into(),
        pid: i64::from(std::process::id()),
        features,
    }
}

/// Maps an error building the VM to an answer: the client's mistakes are 4xx.
fn boot_error(e: Error) -> ApiError {
    let msg = format!("vm.boot: {e}");
    match e {
        Error::Config(_)
        | Error::Limit(_)
        | Error::Boot(_)
        | Error::Input(_)
        | Error::CmdlineTooLong { .. }
        | Error::SerialFile { .. } => ApiError::BadRequest(msg),
        Error::Device(DeviceError::Block(_) | DeviceError::Fs(_) | DeviceError::TooMany(_)) => {
            ApiError::BadRequest(msg)
        }
        _ => ApiError::Internal(msg),
    }
}

#[cfg(test)]
mod tests;
