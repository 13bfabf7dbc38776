//! The control queue, offered only with several queue pairs: the driver chooses how many
//! pairs it uses (`VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`), and the TAP queues of the others are
//! detached so the host stops handing them frames. Other commands are refused.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_ERR, VIRTIO_NET_OK,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::worker::{NetCounters, PairControl, SideQueue};
use crate::virtio::Interrupt;

/// Longest command accepted (class, command, data): the MQ command needs 4 bytes.
const MAX_COMMAND: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CtrlError {
    #[error("command chain has no device-writable byte for the ack")]
    NoAck,
    #[error("command chain has a readable descriptor after a writable one")]
    Order,
    #[error("command longer than {MAX_COMMAND} bytes")]
    TooLong,
    #[error("command outside guest memory")]
    Memory,
    #[error("unsupported command class {0} command {1}")]
    Unsupported(u8, u8),
    #[error("cannot use {0} queue pairs (1 to {1})")]
    Pairs(u16, usize),
}

pub struct CtrlQueue {
    pub id: String,
    pub mem: Arc<GuestMemoryMmap>,
    pub queue: Queue,
    pub evt: EventFd,
    pub interrupt: Arc<Interrupt>,
    pub counters: Arc<NetCounters>,
    pub pairs: Vec<Arc<PairControl>>,
}

impl CtrlQueue {
    /// Runs one command; returns where its ack byte goes (if anywhere) and the outcome.
    fn command(
        &self,
        chain: &[(GuestAddress, u32, bool)],
    ) -> (Option<GuestAddress>, Result<(), CtrlError>) {
        let mut data = Vec::new();
        let mut ack = None;
        for &(addr, len, writable) in chain {
            if writable {
                if ack.is_none() && len > 0 {
                    ack = Some(addr);
                }
                continue;
            }
            if ack.is_some() {
                return (ack, Err(CtrlError::Order));
            }
            let len = len as usize;
            if data.len() + len > MAX_COMMAND {
                return (ack, Err(CtrlError::TooLong));
            }
            let start = data.len();
            data.resize(start + len, 0);
            if self.mem.read_slice(&mut data[start..], addr).is_err() {
                return (ack, Err(CtrlError::Memory));
            }
        }
        let Some(ack) = ack else {
            return (None, Err(CtrlError::NoAck));
        };
        let (class, cmd) = match data.as_slice() {
            [class, cmd, ..] => (*class, *cmd),
            _ => return (Some(ack), Err(CtrlError::TooLong)),
        };
        if u32::from(class) == VIRTIO_NET_CTRL_MQ
            && u32::from(cmd) == VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET
        {
            let Some(&[lo, hi]) = data.get(2..4).and_then(|b| <&[u8; 2]>::try_from(b).ok()) else {
                return (Some(ack), Err(CtrlError::Unsupported(class, cmd)));
            };
            let n = u16::from_le_bytes([lo, hi]);
            return (Some(ack), self.set_pairs(n));
        }
        (Some(ack), Err(CtrlError::Unsupported(class, cmd)))
    }

    fn set_pairs(&self, n: u16) -> Result<(), CtrlError> {
        if n == 0 || usize::from(n) > self.pairs.len() {
            return Err(CtrlError::Pairs(n, self.pairs.len()));
        }
        for (i, p) in self.pairs.iter().enumerate() {
            let want = i < usize::from(n);
            if want {
                if let Err(e) = p.backend.set_queue_enabled(true) {
                    log::warn!("net {}: attaching TAP queue {i}: {e}", self.id);
                }
                p.enabled.store(true, Ordering::SeqCst);
            } else {
                p.enabled.store(false, Ordering::SeqCst);
                if let Err(e) = p.backend.set_queue_enabled(false) {
                    log::warn!("net {}: detaching TAP queue {i}: {e}", self.id);
                }
            }
            let _ = p.wake.write(1);
        }
        Ok(())
    }

    /// Serves every pending command.
    pub fn process_all(&mut self) {
        let mem = self.mem.clone();
        let mut any = false;
        let mut descs = Vec::new();
        loop {
            let chain = match self.queue.iter(mem.as_ref()) {
                Ok(mut it) => it.next(),
                Err(_) => {
                    self.interrupt.signal_needs_reset();
                    return;
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            descs.clear();
            descs.extend(chain.map(|d| (d.addr(), d.len(), d.is_write_only())));
            let (ack, result) = self.command(&descs);
            let status = match result {
                Ok(()) => VIRTIO_NET_OK as u8,
                Err(e) => {
                    self.counters.ctrl_errors.fetch_add(1, Ordering::Relaxed);
                    if !matches!(e, CtrlError::Unsupported(..)) {
                        log::warn!("net {}: control queue: {e}", self.id);
                    }
                    VIRTIO_NET_ERR as u8
                }
            };
            let written = match ack {
                Some(addr) if mem.write_obj(status, addr).is_ok() => 1,
                _ => 0,
            };
            if self.queue.add_used(mem.as_ref(), head, written).is_err() {
                self.interrupt.signal_needs_reset();
                return;
            }
            any = true;
        }
        if any && !matches!(self.queue.needs_notification(mem.as_ref()), Ok(false)) {
            self.interrupt.signal_used();
        }
    }
}

impl SideQueue for CtrlQueue {
    fn event(&self) -> &EventFd {
        &self.evt
    }

    fn process(&mut self) {
        self.process_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::net::worker::tests::{mem, socket_tap};
    use crate::virtio::testing::DriverQueue;
    use std::sync::atomic::AtomicBool;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn pairs_set_enables_and_disables_pairs() {
        let mem = mem();
        let mut q = DriverQueue::new(mem.as_ref(), 0x1000, 16);
        let pairs: Vec<Arc<PairControl>> = (0..3)
            .map(|i| {
                Arc::new(PairControl {
                    backend: socket_tap().0,
                    enabled: AtomicBool::new(i == 0),
                    wake: EventFd::new(EFD_NONBLOCK).unwrap(),
                })
            })
            .collect();
        let counters = Arc::new(NetCounters::default());
        let mut ctrl = CtrlQueue {
            id: "t".into(),
            mem: mem.clone(),
            queue: q.queue(),
            evt: EventFd::new(EFD_NONBLOCK).unwrap(),
            interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
            counters: counters.clone(),
            pairs: pairs.clone(),
        };
        let cmd = |n: u16| {
            let mut b = vec![
                VIRTIO_NET_CTRL_MQ as u8,
                VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
            ];
            b.extend_from_slice(&n.to_le_bytes());
            b
        };
        // 0: set 2 pairs (header+data, then the ack).
        mem.write_slice(&cmd(2), GuestAddress(0x10_0000)).unwrap();
        // 2: set 9 pairs: refused.
        mem.write_slice(&cmd(9), GuestAddress(0x10_1000)).unwrap();
        // 4: an unknown class. 6: no ack byte at all.
        mem.write_slice(&[0x55, 0], GuestAddress(0x10_2000))
            .unwrap();
        let chains: [&[(u64, u32, bool)]; 4] = [
            &[(0x10_0000, 4, false), (0x10_0100, 1, true)],
            &[(0x10_1000, 4, false), (0x10_1100, 1, true)],
            &[(0x10_2000, 2, false), (0x10_2100, 1, true)],
            &[(0x10_0000, 4, false)],
        ];
        for c in chains {
            let head = q.chain(c);
            q.push_avail(head);
        }
        q.publish();
        ctrl.process_all();
        let ack = |a: u64| mem.read_obj::<u8>(GuestAddress(a)).unwrap();
        assert_eq!(ack(0x10_0100), VIRTIO_NET_OK as u8);
        assert_eq!(ack(0x10_1100), VIRTIO_NET_ERR as u8);
        assert_eq!(ack(0x10_2100), VIRTIO_NET_ERR as u8);
        let enabled: Vec<bool> = pairs
            .iter()
            .map(|p| p.enabled.load(Ordering::SeqCst))
            .collect();
        assert_eq!(enabled, vec![true, true, false]);
        assert_eq!(pairs[1].wake.read().unwrap(), 1);
        assert_eq!(counters.ctrl_errors.load(Ordering::Relaxed), 3);
        assert_eq!(q.used_idx(), 4);
    }
}
