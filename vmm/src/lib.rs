//! Builds a VM from a [`VmConfig`] and runs it until the guest stops.
//!
//! Threads: the caller's thread builds the VM and then waits for the first exit event;
//! one thread per vCPU runs the guest and dispatches its I/O to the buses; when the serial
//! console is on a terminal, one thread forwards keyboard input to the UART.
//! Under the REST API, [`control::Vmm`] is the VMM thread: it owns the VM, boots it without
//! blocking (`Vm::start`), pauses, resumes and stops its vCPU threads, and answers requests.

pub mod control;
pub mod device_manager;
mod emulation;
pub mod event_monitor;
mod guest_watch;
mod memory;
pub mod outputs;
pub mod signals;
mod vcpu;
mod vm;

pub use memory::host_memory_bytes;
pub use vm::{ExitReason, Vm};

use api::VmConfig;
use hypervisor::Selection;

/// Errors while building or running a VM. Each says what was being done.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(#[from] api::ValidationError),
    #[error(transparent)]
    Hypervisor(#[from] hypervisor::Error),
    #[error("{0}")]
    Limit(String),
    #[error("allocating {size} bytes of guest memory: {source}")]
    Memory {
        size: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("mapping guest memory into the VM: {0}")]
    MapMemory(#[source] hypervisor::Error),
    #[error("{0}")]
    Boot(#[from] boot::loader::Error),
    #[error("{0}")]
    Input(#[from] boot::InputError),
    #[error(
        "kernel command line is {given} bytes; podvmm adds {added} bytes on this host ({what}), \
         which makes {} of the kernel's {max} (NUL included): shorten it by {}",
        given + added + 1,
        given + added + 1 - max
    )]
    CmdlineTooLong {
        given: usize,
        added: usize,
        what: String,
        max: usize,
    },
    #[error("{0}")]
    VcpuSetup(#[from] boot::Error),
    #[error("serial output {path}: {source}")]
    SerialFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Device(#[from] device_manager::DeviceError),
    #[error("placing a device on the bus: {0}")]
    Bus(#[from] devices::BusError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// The guest's kernel and initramfs, opened once and checked (`boot::Input`): what is
/// measured and what is loaded come from these descriptors.
pub struct BootInputs {
    pub kernel: boot::Input,
    pub initramfs: Option<boot::Input>,
}

impl BootInputs {
    pub fn open(config: &VmConfig) -> Result<Self> {
        let kernel = config
            .payload
            .kernel
            .as_deref()
            .ok_or(api::ValidationError::NoKernel)?;
        Ok(BootInputs {
            kernel: boot::Input::open("kernel", kernel, boot::input::MAX_KERNEL_SIZE)?,
            initramfs: config
                .payload
                .initramfs
                .as_deref()
                .map(|p| boot::Input::open("initramfs", p, boot::input::MAX_INITRAMFS_SIZE))
                .transpose()?,
        })
    }
}

/// Builds the VM described by `config` and runs it to completion.
pub fn run(config: &VmConfig, hypervisor: Selection) -> Result<ExitReason> {
    // Vm::new validates too; first here, so a mistake is reported before the files are opened.
    config.validate()?;
    let inputs = BootInputs::open(config)?;
    let vm = Vm::new(config, hypervisor, &inputs)?;
    drop(inputs);
    vm.run()
}
