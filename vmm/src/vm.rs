//! One VM: its memory, devices, vCPUs, and the wait for the guest to stop.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::thread;

use api::{ConsoleOutputMode, VmConfig};
use boot::{BootInfo, KernelSpec};
use devices::{i8042, serial, Bus, Serial, SerialOutput, I8042};
use hypervisor::{Hypervisor, Selection, Vcpu, VmOps};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::device_manager::DeviceManager;
use crate::{memory, Error, Result};

pub(crate) mod lifecycle;

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine (i8042 reset, reset request).
    Reset,
    /// A vCPU triple-faulted. On a PC that resets the machine, but it means the guest crashed
    /// (or rebooted with `reboot=t`), so it is not reported as a clean stop.
    TripleFault,
    /// The guest powered off.
    Shutdown,
    /// The guest did something the VMM cannot continue from.
    GuestError(String),
    /// podvmm was asked to stop (SIGTERM, SIGINT): the signal's number.
    Terminated(i32),
}

/// Where vCPU threads and devices report that the VM must stop. The first reason wins.
pub(crate) struct ExitState {
    evt: EventFd,
    reason: Mutex<Option<ExitReason>>,
}

impl ExitState {
    fn new() -> Result<Self> {
        Ok(ExitState {
            evt: EventFd::new(0).map_err(|source| Error::Io {
                what: "creating the exit event",
                source,
            })?,
            reason: Mutex::new(None),
        })
    }

    pub(crate) fn signal(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        r.get_or_insert(reason);
        // Only fails if the counter would overflow, i.e. a stop is already pending.
        let _ = self.evt.write(1);
    }

    /// Blocks until something asks the VM to stop. A bare wake-up comes from the i8042.
    /// A termination signal (`signals`) ends the wait too.
    pub(crate) fn wait(&self) -> ExitReason {
        use std::os::fd::AsRawFd;
        let mut fds = vec![libc::pollfd {
            fd: self.evt.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        if let Some(fd) = crate::signals::fd() {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        loop {
            // SAFETY: `fds` is a valid array of pollfd of the length given.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return ExitReason::GuestError(format!("waiting for the VM: {e}"));
            }
            if let Some(sig) = crate::signals::received() {
                return ExitReason::Terminated(sig);
            }
            if fds[0].revents & libc::POLLIN != 0 {
                // Readable: the counter is non-zero, so this does not block.
                let _ = self.evt.read();
                return self.reason_or_reset();
            }
        }
    }

    /// After the exit event became readable and was consumed, without blocking: why the VM
    /// stopped.
    pub(crate) fn take(&self) -> ExitReason {
        let _ = self.evt.read();
        self.reason_or_reset()
    }

    /// The recorded reason; none recorded means the wake-up came from the i8042's reset line.
    fn reason_or_reset(&self) -> ExitReason {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or(ExitReason::Reset)
    }
}

/// Dispatches vCPU I/O exits to the buses.
pub(crate) struct IoHandler {
    pub pio: Bus,
    pub mmio: Bus,
    /// Set at the first I/O exit: the event monitor's `kernel_started`.
    pub first_io: std::sync::atomic::AtomicBool,
}

impl IoHandler {
    /// One relaxed load per exit; the first one records `kernel_started`.
    fn note_io(&self, kind: &str, addr: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        if !self.first_io.load(Relaxed) && !self.first_io.swap(true, Relaxed) {
            crate::event_monitor::emit(
                "vmm",
                "kernel_started",
                serde_json::json!({"observed": "first guest I/O exit", "kind": kind, "addr": addr}),
            );
        }
    }
}

impl VmOps for IoHandler {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        self.note_io("pio", u64::from(port));
        // Nothing at that port: the bus floats high, as on a PC.
        if !self.pio.read(u64::from(port), data) {
            data.fill(0xff);
        }
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        self.note_io("pio", u64::from(port));
        self.pio.write(u64::from(port), data);
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.note_io("mmio", addr);
        if !self.mmio.read(addr, data) {
            data.fill(0xff);
        }
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.note_io("mmio", addr);
        self.mmio.write(addr, data);
    }
}

pub struct Vm {
    // Kept alive for as long as the VM: the hypervisor VM maps `mem`.
    _hypervisor: Arc<dyn Hypervisor>,
    _vm: Arc<dyn hypervisor::Vm>,
    mem: Arc<GuestMemoryMmap>,
    vcpus: Vec<Box<dyn Vcpu>>,
    io: Arc<IoHandler>,
    exit: Arc<ExitState>,
    serial: Arc<Mutex<Serial>>,
    forward_stdin: bool,
    boot: BootInfo,
    devices: DeviceManager,
    /// The command line the guest received.
    cmdline: String,
    /// The vCPU threads once started, and how to pause and stop them (`lifecycle`).
    threads: lifecycle::VcpuThreads,
    /// When the vCPUs were started (`vm_booted`).
    booted_at: Option<std::time::Instant>,
}

impl Vm {
    /// Builds the VM: checks limits, maps memory, creates devices, loads the kernel and puts
    /// every vCPU in its boot state. Nothing runs yet.
    pub fn new(
        config: &VmConfig,
        selection: Selection,
        inputs: &crate::BootInputs,
    ) -> Result<Self> {
        let valid = config.validated()?;
        let hv = hypervisor::new(selection)?;
        let num_cpus = config.cpus.boot_vcpus;
        let max = hv.max_vcpus().min(boot::mptable::MAX_CPUS);
        if num_cpus > max {
            return Err(Error::Limit(format!(
                "{num_cpus} vCPUs requested; this host's {} allows at most {max}",
                hv.kind()
            )));
        }
        let mem = memory::create(valid.memory, memory::Backing::of(&config.memory)?)?;
        let vm = hv.create_vm()?;
        memory::map_into(vm.as_ref(), &mem)?;
        vm.create_interrupt_controllers()?;

        let exit = Arc::new(ExitState::new()?);
        let event = |what| EventFd::new(0).map_err(|source| Error::Io { what, source });
        let output = match config.serial.mode {
            ConsoleOutputMode::Tty => SerialOutput::Stdout,
            ConsoleOutputMode::File => {
                let path = config
                    .serial
                    .file
                    .as_deref()
                    .unwrap_or(std::path::Path::new(""));
                SerialOutput::file(path).map_err(|source| Error::SerialFile {
                    path: path.to_owned(),
                    source,
                })?
            }
            ConsoleOutputMode::Off | ConsoleOutputMode::Null => SerialOutput::Sink,
        };
        let serial_irq = event("creating the serial interrupt event")?;
        vm.register_irqfd(&serial_irq, serial::COM1_IRQ)?;
        let serial = Serial::watched(
            serial_irq,
            output,
            crate::guest_watch::console_watch(hv.syscall_needs_fixup()),
        );
        let serial = Arc::new(Mutex::new(serial));
        let reset_evt = exit.evt.try_clone().map_err(|source| Error::Io {
            what: "cloning the exit event",
            source,
        })?;
        let pio = Bus::new();
        pio.insert(serial.clone(), serial::COM1_BASE, serial::COM1_LEN)?;
        pio.insert(
            Arc::new(Mutex::new(I8042::new(reset_evt))),
            i8042::I8042_BASE,
            i8042::I8042_LEN,
        )?;
        let mmio = Bus::new();
        let devices = DeviceManager::new(vm.as_ref(), &mem, &mmio, config, &valid)?;
        let io = Arc::new(IoHandler {
            pio,
            mmio,
            first_io: Default::default(),
        });

        let cmdline = match devices.cmdline() {
            extra if extra.is_empty() => config.cmdline().to_string(),
            extra => format!("{} {extra}", config.cmdline()),
        };
        let quirks = boot::cpuid::HostQuirks {
            cpuid_not_enforced: !hv.cpuid_enforced(),
            syscall_fixup: hv.syscall_needs_fixup(),
        };
        let added = boot::cpuid::added_params(&cmdline, quirks);
        let full = boot::cpuid::guest_cmdline(&cmdline, quirks);
        // Say how much of the length is ours when only what we add makes it too long.
        let max = boot::loader::PVH_CMDLINE_MAX;
        if full.len() >= max && cmdline.len() < max && !added.is_empty() {
            return Err(Error::CmdlineTooLong {
                given: cmdline.len(),
                added: full.len() - cmdline.len(),
                what: added
                    .iter()
                    .map(|p| p.split('=').next().unwrap_or(p))
                    .collect::<Vec<_>>()
                    .join(", "),
                max,
            });
        }
        let cmdline = full;
        let boot = boot::load_kernel(
            &mem,
            &KernelSpec {
                kernel: &inputs.kernel,
                initramfs: inputs.initramfs.as_ref(),
                cmdline: &cmdline,
                num_cpus,
                mem_size: config.memory.size,
            },
        )?;
        let host_cpuid = hv.supported_cpuid()?;
        let mut vcpus = Vec::with_capacity(num_cpus as usize);
        for id in 0..num_cpus {
            let vcpu = vm.create_vcpu(id)?;
            boot::setup_vcpu(vcpu.as_ref(), num_cpus, &host_cpuid, &boot)?;
            vcpus.push(vcpu);
        }
        static SAID: std::sync::Once = std::sync::Once::new();
        if !added.is_empty() {
            SAID.call_once(|| {
                log::warn!(
                    "this host's {} is software virtualization (PVM); added {} to the guest command line",
                    hv.kind(),
                    added.join(" ")
                )
            });
        }
        crate::event_monitor::emit(
            "vmm",
            "vm_created",
            serde_json::json!({"vcpus": num_cpus, "memory": config.memory.size}),
        );
        Ok(Vm {
            _hypervisor: hv,
            _vm: vm,
            mem,
            vcpus,
            io,
            exit,
            serial,
            forward_stdin: config.serial.mode == ConsoleOutputMode::Tty && stdin_is_tty(),
            boot,
            devices,
            cmdline,
            threads: Default::default(),
            booted_at: None,
        })
    }

    /// The virtio devices.
    pub fn devices(&self) -> &DeviceManager {
        &self.devices
    }

    /// How the boot vCPU enters the kernel.
    pub fn boot_info(&self) -> BootInfo {
        self.boot
    }

    /// Milliseconds from the boot (vCPUs started) to the guest agent's ready signal on the
    /// vsock device; None before it (or without a vsock device).
    pub fn agent_ready_ms(&self) -> Option<u64> {
        let ready = self.devices.vsock.as_ref()?.agent_ready()?;
        let booted = self.booted_at?;
        Some(ready.saturating_duration_since(booted).as_millis() as u64)
    }

    /// Starts the vCPUs, waits until the guest stops, then stops and joins the vCPU threads.
    pub fn run(mut self) -> Result<ExitReason> {
        self.start()?;
        let reason = self.wait();
        self.stop();
        Ok(reason)
    }
}

fn stdin_is_tty() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(libc::STDIN_FILENO) == 1 }
}

/// Feeds terminal input to the UART until stdin closes or the VM is gone.
fn forward_stdin(serial: std::sync::Weak<Mutex<Serial>>) {
    let mut stdin = std::io::stdin();
    let mut buf = [0u8; 64];
    while let Ok(n) = stdin.read(&mut buf) {
        if n == 0 {
            return;
        }
        let Some(serial) = serial.upgrade() else {
            return;
        };
        let mut pending = &buf[..n];
        while !pending.is_empty() {
            let taken = serial
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .enqueue_input(pending)
                .unwrap_or(0);
            pending = &pending[taken..];
            if taken == 0 {
                // The guest has not drained the FIFO yet.
                thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}
