//! The virtio-mmio register file (virtio 1.x, 4.2.2), driven from ring 3: the window is
//! identity mapped and user-accessible, so every access is one MMIO exit and no emulated
//! ring-0 code. Under PVM a ring-3 MMIO access costs more than the same access from
//! (emulated) ring 0; docs/testguest.md has the figures.

use super::{status, Queue, F_VERSION_1};
use crate::cmdline::MmioDevice;

const MAGIC: u32 = 0x7472_6976;

pub mod reg {
    pub const MAGIC: u64 = 0x00;
    pub const VERSION: u64 = 0x04;
    pub const DEVICE_ID: u64 = 0x08;
    pub const VENDOR_ID: u64 = 0x0c;
    pub const DEVICE_FEATURES: u64 = 0x10;
    pub const DEVICE_FEATURES_SEL: u64 = 0x14;
    pub const DRIVER_FEATURES: u64 = 0x20;
    pub const DRIVER_FEATURES_SEL: u64 = 0x24;
    pub const QUEUE_SEL: u64 = 0x30;
    pub const QUEUE_NUM_MAX: u64 = 0x34;
    pub const QUEUE_NUM: u64 = 0x38;
    pub const QUEUE_READY: u64 = 0x44;
    pub const QUEUE_NOTIFY: u64 = 0x50;
    pub const STATUS: u64 = 0x70;
    pub const QUEUE_DESC_LOW: u64 = 0x80;
    pub const QUEUE_DESC_HIGH: u64 = 0x84;
    pub const QUEUE_AVAIL_LOW: u64 = 0x90;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x94;
    pub const QUEUE_USED_LOW: u64 = 0xa0;
    pub const QUEUE_USED_HIGH: u64 = 0xa4;
    pub const CONFIG_GENERATION: u64 = 0xfc;
    pub const CONFIG: u64 = 0x100;
}

/// Where the MMIO hole is; a device window must lie inside it, so that no access through
/// a [`Transport`] can touch RAM.
const HOLE: core::ops::Range<u64> = 0xc000_0000..0xfec0_0000;
const WINDOW: u64 = 0x1000;

/// One device's register window.
#[derive(Clone, Copy)]
pub struct Transport {
    base: u64,
    pub irq: u32,
}

impl Transport {
    /// Checks that `dev` is a window in the MMIO hole holding a version-2 virtio device.
    pub fn probe(dev: &MmioDevice) -> Result<Transport, &'static str> {
        if dev.size < WINDOW
            || !dev.base.is_multiple_of(WINDOW)
            || !HOLE.contains(&dev.base)
            || !HOLE.contains(&(dev.base + WINDOW - 1))
        {
            return Err("window is not a 4 KiB page in the MMIO hole");
        }
        let t = Transport {
            base: dev.base,
            irq: dev.irq,
        };
        if t.read(reg::MAGIC) != MAGIC {
            return Err("bad magic");
        }
        if t.read(reg::VERSION) != 2 {
            return Err("not virtio-mmio version 2");
        }
        Ok(t)
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    fn addr(&self, off: u64, size: u64) -> u64 {
        assert!(
            off + size <= WINDOW && off.is_multiple_of(size),
            "bad register access"
        );
        self.base + off
    }

    pub fn read(&self, off: u64) -> u32 {
        // SAFETY: the address is inside this device's window in the MMIO hole (checked in
        // `probe` and `addr`): the access reaches the VMM, never RAM.
        unsafe { core::ptr::read_volatile(self.addr(off, 4) as *const u32) }
    }

    pub fn write(&self, off: u64, v: u32) {
        // SAFETY: as for `read`.
        unsafe { core::ptr::write_volatile(self.addr(off, 4) as *mut u32, v) }
    }

    /// A 16-bit write, which virtio-mmio forbids below the configuration space (hostile mode).
    pub fn write16(&self, off: u64, v: u16) {
        // SAFETY: as for `read`.
        unsafe { core::ptr::write_volatile(self.addr(off, 2) as *mut u16, v) }
    }

    pub fn config16(&self, off: u64) -> u16 {
        // SAFETY: as for `read`.
        unsafe { core::ptr::read_volatile(self.addr(reg::CONFIG + off, 2) as *const u16) }
    }

    pub fn config32(&self, off: u64) -> u32 {
        self.read(reg::CONFIG + off)
    }

    /// A 64-bit configuration field, read as two halves until the generation is stable.
    pub fn config64(&self, off: u64) -> u64 {
        loop {
            let gen = self.read(reg::CONFIG_GENERATION);
            let lo = u64::from(self.config32(off));
            let hi = u64::from(self.config32(off + 4));
            if self.read(reg::CONFIG_GENERATION) == gen {
                return lo | hi << 32;
            }
        }
    }

    pub fn device_id(&self) -> u32 {
        self.read(reg::DEVICE_ID)
    }

    pub fn vendor_id(&self) -> u32 {
        self.read(reg::VENDOR_ID)
    }

    pub fn status(&self) -> u32 {
        self.read(reg::STATUS)
    }

    pub fn set_status(&self, s: u32) {
        self.write(reg::STATUS, s);
    }

    pub fn reset(&self) {
        self.set_status(0);
    }

    pub fn device_features(&self) -> u64 {
        self.write(reg::DEVICE_FEATURES_SEL, 0);
        let lo = u64::from(self.read(reg::DEVICE_FEATURES));
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        let hi = u64::from(self.read(reg::DEVICE_FEATURES));
        lo | hi << 32
    }

    pub fn write_driver_features(&self, f: u64) {
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, f as u32);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, (f >> 32) as u32);
    }

    /// Reset, ACKNOWLEDGE, DRIVER, feature negotiation (`wanted` & offered, which must hold
    /// `required` and VERSION_1), FEATURES_OK checked. Returns the accepted features.
    pub fn begin_init(&self, wanted: u64, required: u64) -> Result<u64, &'static str> {
        self.reset();
        if self.status() != 0 {
            return Err("status not 0 after reset");
        }
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        let offered = self.device_features();
        let required = required | F_VERSION_1;
        if offered & required != required {
            self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FAILED);
            return Err("device lacks a required feature");
        }
        let accepted = offered & (wanted | required);
        self.write_driver_features(accepted);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.set_status(s);
        if self.status() & status::FEATURES_OK == 0 {
            return Err("device refused our features");
        }
        Ok(accepted)
    }

    /// Registers `q`'s rings as queue `q.index` and enables it.
    pub fn setup_queue(&self, q: &Queue) -> Result<(), &'static str> {
        self.write(reg::QUEUE_SEL, u32::from(q.index));
        let max = self.read(reg::QUEUE_NUM_MAX);
        if max == 0 {
            return Err("queue does not exist");
        }
        if u32::from(q.size) > max {
            return Err("queue larger than the device allows");
        }
        if self.read(reg::QUEUE_READY) != 0 {
            return Err("queue already ready after reset");
        }
        self.write(reg::QUEUE_NUM, u32::from(q.size));
        self.set_queue_addrs(q.desc_addr(), q.avail_addr(), q.used_addr());
        self.write(reg::QUEUE_READY, 1);
        Ok(())
    }

    /// Writes the three ring addresses of the selected queue (hostile mode passes bad ones).
    pub fn set_queue_addrs(&self, desc: u64, avail: u64, used: u64) {
        self.write(reg::QUEUE_DESC_LOW, desc as u32);
        self.write(reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.write(reg::QUEUE_AVAIL_LOW, avail as u32);
        self.write(reg::QUEUE_AVAIL_HIGH, (avail >> 32) as u32);
        self.write(reg::QUEUE_USED_LOW, used as u32);
        self.write(reg::QUEUE_USED_HIGH, (used >> 32) as u32);
    }

    pub fn queue_max(&self, index: u16) -> u32 {
        self.write(reg::QUEUE_SEL, u32::from(index));
        self.read(reg::QUEUE_NUM_MAX)
    }

    /// Sets DRIVER_OK and checks the device took it (no FAILED, no NEEDS_RESET).
    pub fn driver_ok(&self) -> Result<(), &'static str> {
        self.set_status(
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        let s = self.status();
        if s & (status::FAILED | status::NEEDS_RESET) != 0 || s & status::DRIVER_OK == 0 {
            return Err("device did not accept DRIVER_OK");
        }
        Ok(())
    }
}
