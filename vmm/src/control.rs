//! The VMM thread: owns the VM and its lifecycle, and answers API requests.
//!
//! It waits (epoll) on two things: the API mailbox's wake-up descriptor, and, while a guest
//! runs, the VM's exit event. API requests arrive as [`ApiRequest`] messages and are answered
//! on their one-shot channel; nothing else touches the VM. A guest that resets or powers off
//! moves the VM to `Shutdown` (its vCPU threads joined, its memory released) and the VMM
//! stays up, as Cloud Hypervisor does.
//!
//! States: no VM → `vm.create` → Created → `vm.boot` → Running ⇄ Paused (`vm.pause`,
//! `vm.resume`); Running/Paused → `vm.shutdown` or a guest stop → Shutdown → `vm.boot` again;
//! `vm.delete` from any state → no VM.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;

use api::control::{
    AddDevice, ApiError, ApiReply, ApiRequest, ApiResult, BootDigests, Counters, CreateVm,
    PciDeviceInfo, PingInfo, VmInfo, VmResize, VmState, VmmMailbox,
};
use api::pod::{self, Sizing};
use api::{DiskConfig, FsConfig, ImageType, NetConfig, VmConfig, VsockConfig};
use devices::virtio::block::image::{self, ImageFormat};
use hypervisor::Selection;
use sha2::{Digest, Sha256};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::device_manager::DeviceError;
use crate::{Error, ExitReason, Vm};

const TOKEN_API: u64 = 0;
const TOKEN_VM: u64 = 1;
const TOKEN_SIGNAL: u64 = 2;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("setting up the VMM thread's event loop: {0}")]
    Epoll(#[source] io::Error),
}

/// The configured VM and, once booted, the running one.
struct Slot {
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
    slot: Option<Slot>,
    epoll: Epoll,
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
            slot: None,
            epoll: Epoll::new().map_err(ControlError::Epoll)?,
        })
    }

    /// Files this process writes, which no VM's configuration may name.
    pub fn set_process_outputs(&mut self, outputs: Vec<crate::outputs::Named>) {
        self.process_outputs = outputs;
    }

    /// Serves `mailbox` until `vmm.shutdown`, or a termination signal (`signals`: then the
    /// answer is the signal's number). The VM, if any, is torn down before returning.
    pub fn run(&mut self, mailbox: &VmmMailbox) -> Result<Option<i32>, ControlError> {
        self.epoll
            .ctl(
                ControlOperation::Add,
                mailbox.fd(),
                EpollEvent::new(EventSet::IN, TOKEN_API),
            )
            .map_err(ControlError::Epoll)?;
        if let Some(fd) = crate::signals::fd() {
            self.epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, TOKEN_SIGNAL),
                )
                .map_err(ControlError::Epoll)?;
        }
        let mut events = vec![EpollEvent::default(); 4];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ControlError::Epoll(e)),
            };
            for event in &events[..n] {
                match event.data() {
                    TOKEN_VM => self.guest_stopped(),
                    TOKEN_SIGNAL => {
                        if let Some(sig) = crate::signals::received() {
                            if let Some(slot) = self.slot.as_mut() {
                                release(&self.epoll, slot);
                            }
                            return Ok(Some(sig));
                        }
                    }
                    _ => {
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
        }
    }

    /// Answers one request.
    pub fn handle(&mut self, request: ApiRequest) -> ApiResult {
        match request {
            ApiRequest::VmmPing => Ok(ApiReply::Ping(ping())),
            ApiRequest::VmmShutdown => {
                if let Some(slot) = self.slot.as_mut() {
                    release(&self.epoll, slot);
                }
                Ok(ApiReply::Empty)
            }
            ApiRequest::VmCreate(create) => self.create(*create).map(|_| ApiReply::Empty),
            ApiRequest::VmBoot => self.boot().map(|_| ApiReply::Empty),
            ApiRequest::VmInfo => self.info().map(|i| ApiReply::Info(Box::new(i))),
            ApiRequest::VmShutdown => self.shutdown().map(|_| ApiReply::Empty),
            ApiRequest::VmDelete => {
                // As in Cloud Hypervisor, deleting when there is nothing is not an error.
                if let Some(mut slot) = self.slot.take() {
                    release(&self.epoll, &mut slot);
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
        self.slot.as_ref().map(|s| s.state)
    }

    fn slot(&mut self) -> Result<&mut Slot, ApiError> {
        self.slot
            .as_mut()
            .ok_or_else(|| ApiError::NotFound(NO_VM.into()))
    }

    fn create(&mut self, create: CreateVm) -> Result<(), ApiError> {
        if let Some(slot) = &self.slot {
            return Err(conflict(format!(
                "a VM already exists (state {:?}); vm.delete it first",
                slot.state
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
        self.slot = Some(Slot {
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
        let slot = self.slot()?;
        match slot.state {
            VmState::Created | VmState::Shutdown => {}
            VmState::Running => return Err(conflict("the VM is already running")),
            VmState::Paused => {
                return Err(conflict("the VM is paused (vm.resume it, or vm.shutdown)"))
            }
        }
        // Files may have changed since vm.create (a symlink re-pointed): checked again before
        // anything is opened for writing.
        crate::outputs::check(&slot.config, &process_outputs).map_err(bad)?;
        // Opened once, checked from the descriptors (no FIFO, no device, bounded sizes), and
        // measured and loaded from them: the digests are of what the guest got.
        let inputs = crate::BootInputs::open(&slot.config).map_err(boot_error)?;
        let kernel_sha256 = digest(&inputs.kernel)?;
        let initramfs_sha256 = inputs.initramfs.as_ref().map(digest).transpose()?;
        let mut vm = Vm::new(&slot.config, selection, &inputs).map_err(boot_error)?;
        drop(inputs);
        let cmdline = vm.cmdline().to_string();
        vm.start().map_err(|e| ApiError::Internal(e.to_string()))?;
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            vm.exit_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_VM),
        ) {
            vm.stop();
            return Err(ApiError::Internal(format!("watching the VM: {e}")));
        }
        let slot = self.slot()?;
        slot.digests = Some(BootDigests {
            kernel_sha256,
            initramfs_sha256,
            cmdline_sha256: hex(&Sha256::digest(cmdline.as_bytes())),
            cmdline,
        });
        slot.vm = Some(vm);
        slot.state = VmState::Running;
        slot.stop_reason = None;
        Ok(())
    }

    fn info(&mut self) -> Result<VmInfo, ApiError> {
        let slot = self.slot()?;
        Ok(VmInfo {
            config: slot.config.clone(),
            state: slot.state,
            memory_actual_size: slot.config.memory.size,
            sizing: slot.sizing.clone(),
            boot_digests: slot.digests.clone(),
            ignored_fields: slot.ignored.clone(),
            stop_reason: slot.stop_reason.clone(),
            agent_ready_ms: slot.vm.as_ref().and_then(Vm::agent_ready_ms),
        })
    }

    fn shutdown(&mut self) -> Result<(), ApiError> {
        let epoll = &self.epoll;
        let slot = self
            .slot
            .as_mut()
            .ok_or_else(|| ApiError::NotFound(NO_VM.into()))?;
        match slot.state {
            VmState::Running | VmState::Paused => {
                release(epoll, slot);
                // As in Cloud Hypervisor: the configuration stays, ready to boot again.
                slot.state = VmState::Created;
                slot.stop_reason = Some("vm.shutdown".into());
                Ok(())
            }
            VmState::Created => Err(conflict("the VM has not been booted")),
            VmState::Shutdown => Err(conflict("the VM is already shut down")),
        }
    }

    fn pause(&mut self) -> Result<(), ApiError> {
        let slot = self.slot()?;
        match (slot.state, &slot.vm) {
            (VmState::Running, Some(vm)) => {
                vm.pause().map_err(|e| ApiError::Internal(e.to_string()))?;
                slot.state = VmState::Paused;
                Ok(())
            }
            (VmState::Paused, _) => Err(conflict("the VM is already paused")),
            (state, _) => Err(conflict(format!("the VM is not running (state {state:?})"))),
        }
    }

    fn resume(&mut self) -> Result<(), ApiError> {
        let slot = self.slot()?;
        match (slot.state, &slot.vm) {
            (VmState::Paused, Some(vm)) => {
                vm.resume();
                slot.state = VmState::Running;
                Ok(())
            }
            (state, _) => Err(conflict(format!("the VM is not paused (state {state:?})"))),
        }
    }

    fn counters(&mut self) -> Result<Counters, ApiError> {
        let slot = self.slot()?;
        let Some(vm) = &slot.vm else {
            return Err(conflict(format!(
                "the VM is not running (state {:?})",
                slot.state
            )));
        };
        let mut counters = Counters::new();
        for disk in &vm.devices().disks {
            let c = &disk.counters;
            let entries = [
                ("read_ops", &c.reads),
                ("write_ops", &c.writes),
                ("flush_ops", &c.flushes),
                ("read_bytes", &c.read_bytes),
                ("write_bytes", &c.write_bytes),
                ("invalid_requests", &c.invalid_requests),
                ("io_errors", &c.io_errors),
                ("syncs", &c.syncs),
                ("interrupts", &c.interrupts),
                ("worker_failures", &*c.worker_failures),
            ];
            counters.insert(
                disk.id.clone(),
                entries
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.load(Ordering::Relaxed)))
                    .collect(),
            );
        }
        for net in &vm.devices().nets {
            let c = &net.counters;
            let entries = [
                ("rx_frames", &c.rx_frames),
                ("rx_bytes", &c.rx_bytes),
                ("tx_frames", &c.tx_frames),
                ("tx_bytes", &c.tx_bytes),
                ("tx_invalid", &c.tx_invalid),
                ("rx_invalid", &c.rx_invalid),
                ("tx_denied", &c.tx_denied),
                ("tx_errors", &c.tx_errors),
                ("rx_dropped", &c.rx_dropped),
                ("rx_stalls", &c.rx_stalls),
                ("ctrl_errors", &c.ctrl_errors),
                ("worker_failures", &*c.worker_failures),
            ];
            counters.insert(
                net.id.clone(),
                entries
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.load(Ordering::Relaxed)))
                    .collect(),
            );
        }
        for fs in &vm.devices().fs {
            counters.insert(
                fs.id.clone(),
                fs.counters
                    .snapshot()
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
            );
        }
        if let Some(c) = &vm.devices().rng {
            let entries = [
                ("bytes", &c.bytes),
                ("requests", &c.requests),
                ("invalid_requests", &c.invalid_requests),
                ("source_errors", &c.source_errors),
                ("worker_failures", &*c.worker_failures),
            ];
            counters.insert(
                "rng".to_string(),
                entries
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.load(Ordering::Relaxed)))
                    .collect(),
            );
        }
        Ok(counters)
    }

    /// Where a device may be added: only before boot (or after a shutdown).
    fn cold_slot(&mut self, what: &str) -> Result<&mut Slot, ApiError> {
        let slot = self.slot()?;
        match slot.state {
            VmState::Created | VmState::Shutdown => Ok(slot),
            state => Err(conflict(format!(
                "the VM is {state:?}: adding {what} to a booted VM (hotplug) is not supported; add devices before vm.boot"
            ))),
        }
    }

    fn add_disk(&mut self, add: AddDevice<DiskConfig>) -> Result<PciDeviceInfo, ApiError> {
        let slot = self.cold_slot("a disk")?;
        check_disk(&add.config)?;
        check_unique_id(&slot.config, add.config.id.as_deref())?;
        let disks = slot.config.disks.get_or_insert_with(Vec::new);
        disks.push(add.config);
        slot.ignored.extend(add.ignored);
        Ok(device_info(&slot.config, DeviceKind::Disk))
    }

    /// `vm.resize`: the sizes the VM already has are granted (Kata's Go runtime asks for the
    /// current vCPU count on every pod); anything else needs hotplug, which podvmm does not do.
    fn resize(&mut self, r: VmResize) -> Result<(), ApiError> {
        let slot = self.slot()?;
        let cpus = &slot.config.cpus;
        if let Some(n) = r.desired_vcpus.filter(|&n| n != cpus.boot_vcpus) {
            return Err(bad(format!(
                "desired_vcpus {n}: the VM has {} vCPUs and podvmm does not hotplug vCPUs \
                 (max_vcpus {} is recorded, not provided)",
                cpus.boot_vcpus, cpus.max_vcpus
            )));
        }
        let size = slot.config.memory.size;
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
        let slot = self.cold_slot("a network device")?;
        let AddDevice {
            mut config,
            fds,
            ignored,
        } = add;
        check_net(&config)?;
        check_unique_id(&slot.config, config.id.as_deref())?;
        for fd in &fds {
            check_tap(fd)?;
        }
        config.fds = fds.iter().map(AsRawFd::as_raw_fd).collect();
        slot.config.net.get_or_insert_with(Vec::new).push(config);
        slot.net_fds.push(fds);
        slot.ignored.extend(ignored);
        Ok(device_info(&slot.config, DeviceKind::Net))
    }

    fn add_vsock(&mut self, add: AddDevice<VsockConfig>) -> Result<PciDeviceInfo, ApiError> {
        let slot = self.cold_slot("a vsock device")?;
        if slot.config.vsock.is_some() {
            return Err(conflict("the VM already has a vsock device"));
        }
        check_vsock(&add.config)?;
        check_unique_id(&slot.config, add.config.id.as_deref())?;
        slot.config.vsock = Some(add.config);
        slot.ignored.extend(add.ignored);
        Ok(device_info(&slot.config, DeviceKind::Vsock))
    }

    fn add_fs(&mut self, add: AddDevice<FsConfig>) -> Result<PciDeviceInfo, ApiError> {
        let slot = self.cold_slot("a virtio-fs device")?;
        check_unique_id(&slot.config, add.config.id.as_deref())?;
        if slot
            .config
            .fs
            .iter()
            .flatten()
            .any(|f| f.tag == add.config.tag)
        {
            return Err(conflict(format!(
                "fs tag {} is already in use",
                add.config.tag
            )));
        }
        let mut config = slot.config.clone();
        config.fs.get_or_insert_with(Vec::new).push(add.config);
        config.validate().map_err(|e| bad(e.to_string()))?;
        for fs in config.fs.iter().flatten() {
            check_fs(fs)?;
        }
        slot.config = config;
        slot.ignored.extend(add.ignored);
        Ok(device_info(&slot.config, DeviceKind::Fs))
    }

    /// The guest stopped by itself (reset, power-off, crash): the VM moves to Shutdown.
    fn guest_stopped(&mut self) {
        let Some(slot) = self.slot.as_mut() else {
            return;
        };
        // A readiness report can outlive its VM (shut down and booted again by requests
        // handled in the same wake-up): only a pending exit counts.
        let Some(reason) = slot.vm.as_ref().and_then(Vm::exit_reason) else {
            return;
        };
        match &reason {
            ExitReason::Reset | ExitReason::Shutdown | ExitReason::Terminated(_) => {}
            ExitReason::TripleFault => eprintln!("podvmm: guest stopped: triple fault"),
            ExitReason::GuestError(msg) => eprintln!("podvmm: guest stopped: {msg}"),
        }
        release(&self.epoll, slot);
        slot.state = VmState::Shutdown;
        slot.stop_reason = Some(match reason {
            ExitReason::Reset => "Reset".into(),
            ExitReason::Shutdown => "Shutdown".into(),
            ExitReason::TripleFault => "TripleFault".into(),
            ExitReason::GuestError(msg) => format!("GuestError: {msg}"),
            ExitReason::Terminated(sig) => crate::signals::name(sig),
        });
    }
}

/// Stops the running VM, if any: vCPU threads joined, memory and devices released.
fn release(epoll: &Epoll, slot: &mut Slot) {
    if let Some(mut vm) = slot.vm.take() {
        let _ = epoll.ctl(
            ControlOperation::Delete,
            vm.exit_fd(),
            EpollEvent::default(),
        );
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

/// What can be checked when the configuration arrives, so mistakes are reported by
/// `vm.create` rather than at boot.
fn check_config(config: &VmConfig) -> Result<(), ApiError> {
    config.validate().map_err(|e| bad(e.to_string()))?;
    if config.cpus.boot_vcpus > pod::MAX_VCPUS {
        return Err(bad(format!(
            "{} vCPUs requested; podvmm supports at most {}",
            config.cpus.boot_vcpus,
            pod::MAX_VCPUS
        )));
    }
    let size = config.memory.size;
    if size < boot::layout::MIN_MEMORY {
        return Err(bad(format!(
            "memory size {size} bytes is below the minimum of {} MiB",
            boot::layout::MIN_MEMORY >> 20
        )));
    }
    if let Some(host) = crate::host_memory_bytes() {
        if size > host {
            return Err(bad(format!(
                "memory size {} MiB is more than the host has ({} MiB)",
                size >> 20,
                host >> 20
            )));
        }
    }
    crate::BootInputs::open(config).map_err(|e| bad(e.to_string()))?;
    // Unique ids: VmConfig::validate, above.
    for disk in config.disks.iter().flatten() {
        check_disk(disk)?;
    }
    for net in config.net.iter().flatten() {
        check_net(net)?;
    }
    if let Some(v) = &config.vsock {
        check_vsock(v)?;
    }
    if let Some(r) = &config.rng {
        check_rng(r)?;
    }
    for fs in config.fs.iter().flatten() {
        check_fs(fs)?;
    }
    Ok(())
}

/// The back-end must be listening already (Kata starts virtiofsd before `vm.create`); it is
/// connected to at `vm.boot`, which fails with the reason if it is no vhost-user back-end.
fn check_fs(fs: &FsConfig) -> Result<(), ApiError> {
    use std::os::unix::fs::FileTypeExt;
    let path = fs.socket.display();
    match std::fs::metadata(&fs.socket) {
        Ok(m) if m.file_type().is_socket() => Ok(()),
        Ok(_) => Err(bad(format!(
            "fs {}: {path} is not a Unix socket (the vhost-user back-end's, e.g. virtiofsd \
             --socket-path)",
            fs.tag
        ))),
        Err(e) => Err(bad(format!(
            "fs {}: socket {path}: {e} (start the vhost-user back-end, e.g. virtiofsd, first)",
            fs.tag
        ))),
    }
}

fn check_disk(disk: &DiskConfig) -> Result<(), ApiError> {
    let path = disk.path.display();
    // The device's own checks (a regular file or block device of at least one sector, opened
    // without blocking), read-only here: nothing is written or locked before boot.
    let (file, size) = devices::virtio::block::open_checked(&disk.path, false, false)
        .map_err(|e| bad(e.to_string()))?;
    check_image_type(disk, &file, size)?;
    if disk.num_queues == 0 || disk.num_queues > 64 {
        return Err(bad(format!(
            "disk {path}: num_queues must be 1 to 64, not {}",
            disk.num_queues
        )));
    }
    if !disk.queue_size.is_power_of_two() {
        return Err(bad(format!(
            "disk {path}: queue_size must be a power of two, not {}",
            disk.queue_size
        )));
    }
    Ok(())
}

/// podvmm serves raw images: other formats are refused by name, and an image of unknown type
/// (Kata's Rust runtime says `Unknown`) is probed and refused if it is not raw.
fn check_image_type(disk: &DiskConfig, file: &std::fs::File, size: u64) -> Result<(), ApiError> {
    let path = disk.path.display();
    match disk.image_type {
        ImageType::Raw => Ok(()),
        ImageType::Qcow2 | ImageType::FixedVhd | ImageType::Vhdx => Err(bad(format!(
            "disk {path}: image_type {:?} is not supported: podvmm serves raw images only",
            disk.image_type
        ))),
        ImageType::Unknown => match image::probe(file, size) {
            Ok(ImageFormat::Raw) => Ok(()),
            Ok(other) => Err(bad(format!(
                "disk {path}: the image is {} (probed, image_type Unknown): podvmm serves raw \
                 images only",
                other.name()
            ))),
            Err(e) => Err(bad(format!("disk {path}: probing its format: {e}"))),
        },
    }
}

#[derive(Clone, Copy)]
enum DeviceKind {
    Disk,
    Net,
    Vsock,
    Fs,
}

/// The answer to an add: the last device of `kind` in `config`, its id (the default one if
/// none was given, as the device manager names it) and its virtio-mmio slot, in the order the
/// device manager wires devices (disks, then nets, then vsock, then shares).
fn device_info(config: &VmConfig, kind: DeviceKind) -> PciDeviceInfo {
    let disks = config.disks.as_deref().unwrap_or_default();
    let nets = config.net.as_deref().unwrap_or_default();
    let (slot, id) = match kind {
        DeviceKind::Disk => {
            let i = disks.len().saturating_sub(1);
            let id = disks.last().and_then(|d| d.id.clone());
            (i, id.unwrap_or_else(|| format!("disk{i}")))
        }
        DeviceKind::Net => {
            let i = nets.len().saturating_sub(1);
            let id = nets.last().and_then(|n| n.id.clone());
            (disks.len() + i, id.unwrap_or_else(|| format!("net{i}")))
        }
        DeviceKind::Vsock => {
            let id = config.vsock.as_ref().and_then(|v| v.id.clone());
            (
                disks.len() + nets.len(),
                id.unwrap_or_else(|| "vsock".into()),
            )
        }
        DeviceKind::Fs => {
            let shares = config.fs.as_deref().unwrap_or_default();
            let i = shares.len().saturating_sub(1);
            let id = shares.last().and_then(|f| f.id.clone());
            (
                disks.len() + nets.len() + usize::from(config.vsock.is_some()) + i,
                id.unwrap_or_else(|| format!("fs{i}")),
            )
        }
    };
    PciDeviceInfo {
        id,
        bdf: format!("0000:00:{:02x}.0", slot & 0xff),
    }
}

fn check_net(net: &NetConfig) -> Result<(), ApiError> {
    if let Some(mac) = &net.mac {
        api::parse_mac(mac).map_err(|e| bad(format!("net mac {mac}: {e}")))?;
    }
    if net.num_queues == 0 || !net.num_queues.is_multiple_of(2) {
        return Err(bad(format!(
            "net num_queues must be a positive even number (a receive and a transmit queue per pair), not {}",
            net.num_queues
        )));
    }
    if !net.queue_size.is_power_of_two() {
        return Err(bad(format!(
            "net queue_size must be a power of two, not {}",
            net.queue_size
        )));
    }
    Ok(())
}

fn check_vsock(v: &VsockConfig) -> Result<(), ApiError> {
    if v.cid < 3 || v.cid == u32::MAX {
        return Err(bad(format!(
            "vsock cid {} is reserved (0-2 and 4294967295 are)",
            v.cid
        )));
    }
    if v.socket.as_os_str().is_empty() {
        return Err(bad("vsock socket path is empty"));
    }
    v.validate().map_err(bad)
}

/// The device's own check of its source (opened without blocking, a character device or a
/// regular file); the device starts nothing until the guest's driver is up.
fn check_rng(r: &api::RngConfig) -> Result<(), ApiError> {
    devices::virtio::rng::Rng::new(&r.src)
        .map(drop)
        .map_err(|e| bad(e.to_string()))
}

fn check_unique_id(config: &VmConfig, id: Option<&str>) -> Result<(), ApiError> {
    let Some(id) = id else {
        return Ok(());
    };
    if config.device_ids().any(|used| used == id) {
        return Err(conflict(format!("device id {id} is already in use")));
    }
    Ok(())
}

/// Refuses a descriptor that is not a TAP device (TUNGETIFF answers only on a tun/tap fd).
fn check_tap(fd: &OwnedFd) -> Result<(), ApiError> {
    const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
    const IFF_TAP: libc::c_short = 0x0002;
    // struct ifreq: a 16-byte name, then a union whose first member is the flags.
    let mut ifreq = [0u8; 40];
    // SAFETY: TUNGETIFF writes at most a struct ifreq (40 bytes) into the buffer given.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNGETIFF, ifreq.as_mut_ptr()) };
    if rc < 0 {
        return Err(bad(format!(
            "vm.add-net: descriptor passed with the request is not a TAP device ({})",
            io::Error::last_os_error()
        )));
    }
    let flags = libc::c_short::from_ne_bytes([ifreq[16], ifreq[17]]);
    if flags & IFF_TAP == 0 {
        return Err(bad(
            "vm.add-net: descriptor passed with the request is a TUN device, not a TAP device",
        ));
    }
    Ok(())
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
        Error::Device(
            DeviceError::Block(_) | DeviceError::DiskOption { .. } | DeviceError::Fs(_),
        )
        | Error::Device(DeviceError::TooMany(_)) => ApiError::BadRequest(msg),
        _ => ApiError::Internal(msg),
    }
}

/// The SHA-256 of an input, read from its descriptor (bounded by the input's size limit).
fn digest(input: &boot::Input) -> Result<String, ApiError> {
    let mut hasher = Sha256::new();
    input
        .for_each_chunk(|c| hasher.update(c))
        .map_err(|e| bad(e.to_string()))?;
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::pod::Explicit;

    fn create_request(json: &str) -> ApiRequest {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        ApiRequest::VmCreate(Box::new(CreateVm {
            explicit: Explicit::from_json(&v),
            config: serde_json::from_value(v).unwrap(),
            ignored: BTreeSet::new(),
        }))
    }

    fn kernel_file() -> (tempfile::Dir, String) {
        let dir = tempfile::Dir::new("ctl");
        let k = dir.0.join("k");
        // Not really a kernel; a sector long, so it serves as a disk image too.
        std::fs::write(&k, [0x5a; 4096]).unwrap();
        let s = k.display().to_string();
        (dir, s)
    }

    mod tempfile {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new(tag: &str) -> Self {
                let d = std::env::temp_dir().join(format!(
                    "podvmm-{tag}-{}-{:?}",
                    std::process::id(),
                    std::thread::current().id()
                ));
                let _ = std::fs::remove_dir_all(&d);
                std::fs::create_dir_all(&d).unwrap();
                Dir(d)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn status(r: ApiResult) -> u16 {
        match r {
            Ok(_) => 200,
            Err(e) => e.status(),
        }
    }

    #[test]
    fn states_without_a_vm() {
        let mut vmm = Vmm::new(Selection::Kvm).unwrap();
        assert!(matches!(
            vmm.handle(ApiRequest::VmmPing),
            Ok(ApiReply::Ping(_))
        ));
        for r in [
            ApiRequest::VmBoot,
            ApiRequest::VmInfo,
            ApiRequest::VmShutdown,
            ApiRequest::VmPause,
            ApiRequest::VmResume,
            ApiRequest::VmCounters,
        ] {
            let name = r.name();
            assert_eq!(status(vmm.handle(r)), 404, "{name}");
        }
        assert!(vmm.handle(ApiRequest::VmDelete).is_ok());
    }

    #[test]
    fn create_sizes_and_checks() {
        let (_dir, k) = kernel_file();
        let mut vmm = Vmm::new(Selection::Kvm).unwrap();
        let r = vmm.handle(create_request(&format!(
            r#"{{"payload":{{"kernel":"{k}"}},"pod":{{"containers":[{{"cpu":"1500m","memory":"1Gi"}}]}}}}"#
        )));
        assert!(r.is_ok(), "{r:?}");
        let Ok(ApiReply::Info(info)) = vmm.handle(ApiRequest::VmInfo) else {
            panic!("no info");
        };
        assert_eq!(info.state, VmState::Created);
        assert_eq!(info.config.cpus.boot_vcpus, 3);
        assert_eq!(info.memory_actual_size, 3072 << 20);
        assert_eq!(info.sizing.pod.as_ref().unwrap().cpu_limits_millis, 1500);
        assert!(info.boot_digests.is_none());
        // Wrong-state calls.
        assert_eq!(
            status(vmm.handle(create_request(&format!(
                r#"{{"payload":{{"kernel":"{k}"}}}}"#
            )))),
            409
        );
        assert_eq!(status(vmm.handle(ApiRequest::VmPause)), 409);
        assert_eq!(status(vmm.handle(ApiRequest::VmResume)), 409);
        assert_eq!(status(vmm.handle(ApiRequest::VmShutdown)), 409);
        assert_eq!(status(vmm.handle(ApiRequest::VmCounters)), 409);
        // Cold-adding devices, and refusing bad ones.
        let disk = |path: &str, id: Option<&str>| {
            ApiRequest::VmAddDisk(Box::new(AddDevice {
                config: DiskConfig::parse(&match id {
                    Some(id) => format!("path={path},id={id}"),
                    None => format!("path={path}"),
                })
                .unwrap(),
                fds: vec![],
                ignored: BTreeSet::new(),
            }))
        };
        assert_eq!(status(vmm.handle(disk(&k, Some("d0")))), 200);
        assert_eq!(status(vmm.handle(disk(&k, Some("d0")))), 409);
        assert_eq!(status(vmm.handle(disk("/nonexistent/disk.img", None))), 400);
        let vsock = |cid| {
            ApiRequest::VmAddVsock(Box::new(AddDevice {
                config: VsockConfig {
                    cid,
                    socket: "/tmp/v.sock".into(),
                    id: None,
                    connect_timeout: None,
                },
                fds: vec![],
                ignored: BTreeSet::new(),
            }))
        };
        assert_eq!(status(vmm.handle(vsock(2))), 400);
        assert_eq!(status(vmm.handle(vsock(3))), 200);
        assert_eq!(status(vmm.handle(vsock(4))), 409);
        // A descriptor that is not a TAP device.
        let not_tap = std::fs::File::open(&k).unwrap();
        let r = vmm.handle(ApiRequest::VmAddNet(Box::new(AddDevice {
            config: NetConfig::parse("mac=02:00:00:00:00:01").unwrap(),
            fds: vec![not_tap.into()],
            ignored: BTreeSet::new(),
        })));
        assert_eq!(status(r), 400);
        assert!(vmm.handle(ApiRequest::VmDelete).is_ok());
        assert_eq!(vmm.state(), None);
    }

    #[test]
    fn bad_configurations_are_400() {
        let (_dir, k) = kernel_file();
        let mut vmm = Vmm::new(Selection::Kvm).unwrap();
        for body in [
            r#"{"payload":{}}"#.to_string(),
            r#"{"payload":{"kernel":"/nonexistent/vmlinux"}}"#.into(),
            format!(r#"{{"payload":{{"kernel":"{k}","initramfs":"/nonexistent"}}}}"#),
            r#"{"payload":{"kernel":"/"}}"#.to_string(),
            format!(r#"{{"payload":{{"kernel":"{k}"}},"cpus":{{"boot_vcpus":0,"max_vcpus":0}}}}"#),
            format!(
                r#"{{"payload":{{"kernel":"{k}"}},"cpus":{{"boot_vcpus":300,"max_vcpus":300}}}}"#
            ),
            format!(r#"{{"payload":{{"kernel":"{k}"}},"memory":{{"size":1}}}}"#),
            format!(r#"{{"payload":{{"kernel":"{k}"}},"memory":{{"size":18446744073709551615}}}}"#),
            format!(r#"{{"payload":{{"kernel":"{k}"}},"pod":{{"containers":[{{"cpu":"-1"}}]}}}}"#),
            format!(
                r#"{{"payload":{{"kernel":"{k}"}},"pod":{{"containers":[{{"memory":"1e30"}}]}}}}"#
            ),
            format!(r#"{{"payload":{{"kernel":"{k}"}},"pod":{{"containers":[{{"cpu":"300"}}]}}}}"#),
            format!(r#"{{"payload":{{"kernel":"{k}"}},"net":[{{"mac":"01:00:00:00:00:01"}}]}}"#),
            format!(r#"{{"payload":{{"kernel":"{k}"}},"vsock":{{"cid":1,"socket":"/s"}}}}"#),
        ] {
            let r = vmm.handle(create_request(&body));
            assert_eq!(status(r), 400, "{body}");
            assert_eq!(vmm.state(), None, "{body}");
        }
    }

    #[test]
    fn max_vcpus_agrees_with_the_mp_table() {
        assert_eq!(pod::MAX_VCPUS, boot::mptable::MAX_CPUS);
    }

    #[test]
    fn digests_are_sha256_hex() {
        assert_eq!(
            hex(&Sha256::digest(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
