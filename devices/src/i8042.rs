//! The bit of the PC keyboard controller a guest uses to reset the machine.
//!
//! Linux (`reboot=k`) and most firmware pulse the CPU reset line by writing command 0xFE to
//! port 0x64. We turn that into an event the VMM waits on; everything else reads as an idle
//! controller with no keyboard.

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Base port of the controller on the PIO bus, and its span (0x60..=0x64).
pub const I8042_BASE: u64 = 0x60;
pub const I8042_LEN: u64 = 5;

const COMMAND_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

pub struct I8042 {
    reset_evt: EventFd,
    resets: u64,
}

impl I8042 {
    /// `reset_evt` is signalled each time the guest asks for a reset.
    pub fn new(reset_evt: EventFd) -> Self {
        I8042 {
            reset_evt,
            resets: 0,
        }
    }

    /// How many reset requests the guest made.
    pub fn resets(&self) -> u64 {
        self.resets
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty; data port reads 0.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.resets += 1;
            // A failed write means the counter is saturated: a reset is already pending.
            let _ = self.reset_evt.write(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn reset_command_signals_the_event() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(evt.try_clone().unwrap());
        dev.write(COMMAND_OFFSET, &[0x20]);
        dev.write(0, &[CMD_RESET_CPU]); // the data port
        assert!(
            evt.read().is_err(),
            "only a 0xFE command on port 0x64 resets"
        );
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(evt.read().unwrap(), 1);
        assert_eq!(dev.resets(), 1);
    }

    #[test]
    fn reads_look_idle() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(evt);
        let mut d = [0xffu8; 1];
        dev.read(COMMAND_OFFSET, &mut d);
        assert_eq!(d, [0]);
    }
}
