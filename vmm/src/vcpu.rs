//! The vCPU thread: run the guest, hand I/O to the buses, report why it stopped.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};

use hypervisor::{Vcpu, VcpuExit};
use vm_memory::GuestMemoryMmap;

use crate::emulation::{self, Completion};
use crate::vm::lifecycle::VcpuControl;
use crate::vm::{ExitReason, ExitState, IoHandler};

pub(crate) struct VcpuContext {
    pub io: Arc<IoHandler>,
    pub mem: Arc<GuestMemoryMmap>,
    pub exit: Arc<ExitState>,
    /// Pause and stop requests from the VMM thread.
    pub control: Arc<VcpuControl>,
}

pub(crate) fn run(mut vcpu: Box<dyn Vcpu>, ctx: VcpuContext) {
    let id = vcpu.id();
    // Dropped before `vcpu` (declared after it), so the kick handler never sees a dead flag.
    let _immediate_exit = crate::vm::lifecycle::ImmediateExit::install(vcpu.immediate_exit());
    let reason = loop {
        // Parks here while the VM is paused; false when the VMM is tearing the VM down.
        if !ctx.control.checkpoint() {
            return;
        }
        match vcpu.run(ctx.io.as_ref()) {
            Ok(VcpuExit::Continue) => {}
            Ok(VcpuExit::Reset) => break ExitReason::Reset,
            Ok(VcpuExit::TripleFault) => break ExitReason::TripleFault,
            Ok(VcpuExit::Shutdown) => break ExitReason::Shutdown,
            // Only a hypervisor without an in-kernel interrupt controller returns HLT; with
            // nothing to wake the vCPU, the guest has stopped for good.
            Ok(VcpuExit::Halt) => break ExitReason::Shutdown,
            Ok(VcpuExit::EmulationFailure { rip }) => {
                if let Err(msg) = complete(vcpu.as_ref(), &ctx.mem, rip) {
                    break ExitReason::GuestError(format!("vCPU {id}: {msg}"));
                }
            }
            Ok(VcpuExit::Unhandled(what)) => {
                break ExitReason::GuestError(format!("vCPU {id}: unhandled exit: {what}"))
            }
            Err(e) => break ExitReason::GuestError(format!("vCPU {id}: {e}")),
        }
    };
    ctx.exit.signal(reason);
}

/// Finishes an instruction the hypervisor could not emulate, or explains why not.
fn complete(vcpu: &dyn Vcpu, mem: &GuestMemoryMmap, rip: u64) -> Result<(), String> {
    let gpa = vcpu
        .translate_gva(rip)
        .map_err(|e| format!("emulation failure at rip {rip:#x}, and {e}"))?;
    let insn = emulation::fetch(mem, gpa);
    match emulation::classify(&insn) {
        Completion::Skip { len, inject } => {
            note_once(insn[0], rip);
            let mut regs = vcpu.get_regs().map_err(|e| e.to_string())?;
            regs.rip += len;
            vcpu.set_regs(&regs).map_err(|e| e.to_string())?;
            if let Some(vector) = inject {
                vcpu.inject_exception(vector).map_err(|e| e.to_string())?;
            }
            Ok(())
        }
        Completion::Unknown => Err(format!(
            "the hypervisor could not emulate the instruction at rip {rip:#x} (bytes: {})",
            emulation::hex(&insn)
        )),
    }
}

/// Says once per opcode that the VMM completed an instruction for the hypervisor.
fn note_once(opcode: u8, rip: u64) {
    static SEEN: OnceLock<Mutex<HashSet<u8>>> = OnceLock::new();
    let seen = SEEN.get_or_init(Default::default);
    if seen
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(opcode)
    {
        log::warn!(
            "completed instruction {opcode:#04x} at rip {rip:#x} that the hypervisor could not emulate"
        );
    }
}
