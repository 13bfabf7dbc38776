//! virtio-mmio transport, version 2 (virtio 1.x, section 4.2).

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{status, ActivateContext, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;

/// Size of one device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Offset of the queue-notify register, where the VMM places the ioeventfds.
pub const NOTIFY_OFFSET: u64 = reg::QUEUE_NOTIFY;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x504f_4456; // "VDOP": podvmm
const CONFIG_OFFSET: u64 = reg::CONFIG;

/// The register map (virtio 1.x, 4.2.2), from virtio-bindings' `virtio_mmio`, as offsets into
/// the window.
pub mod reg {
    use virtio_bindings::virtio_mmio as m;

    pub const MAGIC: u64 = m::VIRTIO_MMIO_MAGIC_VALUE as u64;
    pub const VERSION: u64 = m::VIRTIO_MMIO_VERSION as u64;
    pub const DEVICE_ID: u64 = m::VIRTIO_MMIO_DEVICE_ID as u64;
    pub const VENDOR_ID: u64 = m::VIRTIO_MMIO_VENDOR_ID as u64;
    pub const DEVICE_FEATURES: u64 = m::VIRTIO_MMIO_DEVICE_FEATURES as u64;
    pub const DEVICE_FEATURES_SEL: u64 = m::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
    pub const DRIVER_FEATURES: u64 = m::VIRTIO_MMIO_DRIVER_FEATURES as u64;
    pub const DRIVER_FEATURES_SEL: u64 = m::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
    pub const QUEUE_SEL: u64 = m::VIRTIO_MMIO_QUEUE_SEL as u64;
    pub const QUEUE_NUM_MAX: u64 = m::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
    pub const QUEUE_NUM: u64 = m::VIRTIO_MMIO_QUEUE_NUM as u64;
    pub const QUEUE_READY: u64 = m::VIRTIO_MMIO_QUEUE_READY as u64;
    pub const QUEUE_NOTIFY: u64 = m::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
    pub const INTERRUPT_STATUS: u64 = m::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
    pub const INTERRUPT_ACK: u64 = m::VIRTIO_MMIO_INTERRUPT_ACK as u64;
    pub const STATUS: u64 = m::VIRTIO_MMIO_STATUS as u64;
    pub const QUEUE_DESC_LOW: u64 = m::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
    pub const QUEUE_DESC_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
    pub const QUEUE_AVAIL_LOW: u64 = m::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
    pub const QUEUE_AVAIL_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
    pub const QUEUE_USED_LOW: u64 = m::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
    pub const QUEUE_USED_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
    pub const CONFIG_GENERATION: u64 = m::VIRTIO_MMIO_CONFIG_GENERATION as u64;
    pub const CONFIG: u64 = m::VIRTIO_MMIO_CONFIG as u64;
}

/// Counters a transport keeps about its driver's behaviour.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransportCounters {
    pub activations: u64,
    pub resets: u64,
    /// Register accesses that were refused (bad width, bad state, out of range).
    pub bad_accesses: u64,
    pub failed_activations: u64,
}

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: Arc<GuestMemoryMmap>,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
    activated: bool,
    counters: TransportCounters,
}

impl MmioTransport {
    /// `irq_evt` raises the device's interrupt line (the VMM registers it as an irqfd).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: Arc<GuestMemoryMmap>,
        irq_evt: EventFd,
    ) -> std::io::Result<Self> {
        let mut queues = Vec::new();
        let mut queue_evts = Vec::new();
        for max in device.queue_max_sizes() {
            queues.push(Queue::new(max).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{e:?}"))
            })?);
            queue_evts.push(EventFd::new(EFD_NONBLOCK)?);
        }
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(irq_evt)),
            queues,
            queue_evts,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            activated: false,
            counters: TransportCounters::default(),
        })
    }

    /// One notify event per queue; the VMM registers them as ioeventfds at
    /// base + [`NOTIFY_OFFSET`] with the queue index as data match.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    pub fn counters(&self) -> TransportCounters {
        self.counters
    }

    pub fn status(&self) -> u32 {
        self.status
            | if self.interrupt.needs_reset() {
                status::DEVICE_NEEDS_RESET
            } else {
                0
            }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queue registers may only change before DRIVER_OK.
        if self.status & status::DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.activated = false;
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt.clear();
        self.counters.resets += 1;
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let new_bits = value & !self.status;
        // The driver may only add bits (4.2.2.2); anything else is ignored.
        if value & self.status != self.status {
            self.counters.bad_accesses += 1;
            return;
        }
        if new_bits & status::FEATURES_OK != 0 {
            let offered = self.device.features();
            let valid = self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !valid {
                // Leaving FEATURES_OK clear tells the driver its choice was refused.
                self.status = value & !status::FEATURES_OK;
                return;
            }
        }
        self.status = value;
        if new_bits & status::DRIVER_OK != 0 && self.status & status::FEATURES_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        if self.interrupt.needs_reset() {
            self.counters.failed_activations += 1;
            self.status |= status::FAILED;
            return;
        }
        let event_idx = self.driver_features & super::VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::new();
        for (i, q) in self.queues.iter_mut().enumerate() {
            if !q.ready() {
                continue;
            }
            if !q.is_valid(self.mem.as_ref()) {
                self.counters.failed_activations += 1;
                self.status |= status::FAILED;
                return;
            }
            q.set_event_idx(event_idx);
            let evt = match self.queue_evts[i].try_clone() {
                Ok(e) => e,
                Err(_) => {
                    self.counters.failed_activations += 1;
                    self.status |= status::FAILED;
                    return;
                }
            };
            let queue = match Queue::try_from(q.state()) {
                Ok(queue) => queue,
                Err(_) => {
                    self.counters.failed_activations += 1;
                    self.status |= status::FAILED;
                    return;
                }
            };
            queues.push((queue, evt));
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            interrupt: self.interrupt.clone(),
            acked_features: self.driver_features,
        };
        match self.device.activate(ctx) {
            Ok(()) => {
                self.activated = true;
                self.counters.activations += 1;
            }
            Err(_) => {
                self.counters.failed_activations += 1;
                self.status |= status::DEVICE_NEEDS_RESET;
            }
        }
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => q.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status(),
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                // Features are fixed once FEATURES_OK is set.
                if self.status & status::FEATURES_OK != 0 {
                    self.counters.bad_accesses += 1;
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => self.counters.bad_accesses += 1,
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => match self.selected_queue() {
                Some(q) => q.set_size(v as u16),
                None => self.counters.bad_accesses += 1,
            },
            reg::QUEUE_READY => match self.selected_queue() {
                Some(q) => q.set_ready(v == 1),
                None => self.counters.bad_accesses += 1,
            },
            // virtio-queue ignores a misaligned ring address and keeps the old one (0 after
            // a reset), which would put the rings at guest address 0: refuse the set-up.
            reg::QUEUE_DESC_LOW | reg::QUEUE_AVAIL_LOW | reg::QUEUE_USED_LOW
                if v & match offset {
                    reg::QUEUE_DESC_LOW => 0xf,
                    reg::QUEUE_AVAIL_LOW => 0x1,
                    _ => 0x3,
                } != 0
                    && self.status & status::DRIVER_OK == 0 =>
            {
                self.counters.bad_accesses += 1;
                self.interrupt.signal_needs_reset();
            }
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_AVAIL_LOW
            | reg::QUEUE_AVAIL_HIGH
            | reg::QUEUE_USED_LOW
            | reg::QUEUE_USED_HIGH => match self.selected_queue() {
                Some(q) => match offset {
                    reg::QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
                    reg::QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
                    reg::QUEUE_AVAIL_LOW => q.set_avail_ring_address(Some(v), None),
                    reg::QUEUE_AVAIL_HIGH => q.set_avail_ring_address(None, Some(v)),
                    reg::QUEUE_USED_LOW => q.set_used_ring_address(Some(v), None),
                    _ => q.set_used_ring_address(None, Some(v)),
                },
                None => self.counters.bad_accesses += 1,
            },
            // Reached only when no ioeventfd is registered (or for a bad index).
            reg::QUEUE_NOTIFY => match self.queue_evts.get(v as usize) {
                Some(evt) if self.activated => {
                    let _ = evt.write(1);
                }
                _ => self.counters.bad_accesses += 1,
            },
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.write_status(v),
            _ => self.counters.bad_accesses += 1,
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        // Registers below the configuration space are 32-bit wide and aligned.
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.counters.bad_accesses += 1;
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.write_config(offset - CONFIG_OFFSET, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.counters.bad_accesses += 1;
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_reg(offset, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{reg_read as r, reg_write as w, set_up_queue, DriverQueue};
    use crate::virtio::{read_config_bytes, ActivateError};
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    #[derive(Default)]
    struct Probe {
        activated: Vec<(usize, u64)>,
        resets: u32,
    }

    struct TestDevice(Arc<Mutex<Probe>>);

    impl VirtioDevice for TestDevice {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![16, 16]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            read_config_bytes(&[1, 2, 3, 4], offset, data);
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            self.0
                .lock()
                .unwrap()
                .activated
                .push((ctx.queues.len(), ctx.acked_features));
            Ok(())
        }
        fn reset(&mut self) {
            self.0.lock().unwrap().resets += 1;
        }
    }

    fn setup() -> (MmioTransport, Arc<Mutex<Probe>>, Arc<GuestMemoryMmap>) {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap());
        let probe = Arc::new(Mutex::new(Probe::default()));
        let t = MmioTransport::new(
            Box::new(TestDevice(probe.clone())),
            mem.clone(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        )
        .unwrap();
        (t, probe, mem)
    }

    /// Drives the transport as Linux's virtio_mmio driver does, but writes `features_hi`
    /// whatever the device offers (the refusals are what some tests check).
    fn bring_up(t: &mut MmioTransport, mem: &GuestMemoryMmap, features_hi: u32) {
        w(t, reg::STATUS, status::ACKNOWLEDGE);
        w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(t, reg::DRIVER_FEATURES_SEL, 1);
        w(t, reg::DRIVER_FEATURES, features_hi);
        w(t, reg::DRIVER_FEATURES_SEL, 0);
        w(t, reg::DRIVER_FEATURES, 1);
        w(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        w(t, reg::QUEUE_SEL, 0);
        assert_eq!(r(t, reg::QUEUE_NUM_MAX), 16);
        set_up_queue(t, 0, &DriverQueue::new(mem, 0x1000, 16));
        w(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
    }

    #[test]
    fn identifies_itself() {
        let (mut t, _, _) = setup();
        assert_eq!(r(&mut t, reg::MAGIC), MAGIC);
        assert_eq!(r(&mut t, reg::VERSION), 2);
        assert_eq!(r(&mut t, reg::DEVICE_ID), 42);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1);
        let mut b = [0u8; 2];
        t.read(CONFIG_OFFSET + 2, &mut b);
        assert_eq!(b, [3, 4]);
    }

    #[test]
    fn full_bring_up_activates_ready_queues() {
        let (mut t, probe, mem) = setup();
        bring_up(&mut t, &mem, 1);
        assert_eq!(
            probe.lock().unwrap().activated,
            vec![(1, VIRTIO_F_VERSION_1 | 1)]
        );
        assert_eq!(t.counters().activations, 1);
        // Queue registers are frozen after DRIVER_OK.
        w(&mut t, reg::QUEUE_NUM, 8);
        assert_eq!(t.counters().bad_accesses, 1);
        // Reset tears the device down.
        w(&mut t, reg::STATUS, 0);
        assert_eq!(probe.lock().unwrap().resets, 1);
        assert_eq!(r(&mut t, reg::STATUS), 0);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
    }

    #[test]
    fn features_without_version_1_or_unknown_are_refused() {
        let (mut t, probe, mem) = setup();
        bring_up(&mut t, &mem, 0); // no VERSION_1
        assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        assert!(probe.lock().unwrap().activated.is_empty());
        let (mut t, probe, mem) = setup();
        bring_up(&mut t, &mem, 1 | 0x100); // a feature the device never offered
        assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        assert!(probe.lock().unwrap().activated.is_empty());
    }

    #[test]
    fn invalid_queue_fails_activation() {
        let (mut t, probe, _) = setup();
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut t, reg::DRIVER_FEATURES, 1);
        w(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        w(&mut t, reg::QUEUE_NUM, 16);
        // Rings outside guest memory.
        w(&mut t, reg::QUEUE_DESC_HIGH, 0x10);
        w(&mut t, reg::QUEUE_READY, 1);
        w(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert_ne!(r(&mut t, reg::STATUS) & status::FAILED, 0);
        assert!(probe.lock().unwrap().activated.is_empty());
    }

    #[test]
    fn odd_accesses_are_counted_not_fatal() {
        let (mut t, _, _) = setup();
        let mut b = [0xffu8; 2];
        t.read(reg::MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        t.write(reg::STATUS + 1, &[1, 2, 3, 4]);
        w(&mut t, 0x0c0, 1); // unknown register below config space
        w(&mut t, reg::QUEUE_NOTIFY, 7); // not activated, no such queue
        assert_eq!(t.counters().bad_accesses, 4);
        // Clearing a status bit without a reset is ignored.
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        assert_eq!(r(&mut t, reg::STATUS), status::ACKNOWLEDGE | status::DRIVER);
    }

    #[test]
    fn interrupt_status_and_ack() {
        let (mut t, _, _) = setup();
        t.interrupt.signal_used();
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 1);
        w(&mut t, reg::INTERRUPT_ACK, 1);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
        t.interrupt.signal_needs_reset();
        assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), INT_CONFIG_BIT);
    }

    const INT_CONFIG_BIT: u32 = crate::virtio::INT_CONFIG;
}
