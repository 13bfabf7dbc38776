//! A vhost-user back-end for the virtio-fs front-end's tests (`src/virtio/fs/tests.rs`), on
//! the rust-vmm `vhost-user-backend` crate: it answers every FUSE request with a reply whose
//! body is the request's `nodeid`, and holds (never answers) a request of opcode 0xdead.
//!
//! `vhost_user_echo_fs SOCKET`; `ECHO_FS_FEATURES` overrides the virtio features it offers.

use std::sync::{Arc, RwLock};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueOwnedT;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

const HOLD: u32 = 0xdead;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

struct EchoFs {
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    features: u64,
    queues: usize,
}

impl VhostUserBackendMut for EchoFs {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.queues
    }
    fn max_queue_size(&self) -> usize {
        1024
    }
    fn features(&self) -> u64 {
        self.features
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
    }
    fn set_event_idx(&mut self, _enabled: bool) {}
    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        self.mem = mem;
        Ok(())
    }
    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Ok(());
        };
        let mem = self.mem.memory();
        let chains: Vec<_> = vring
            .get_mut()
            .get_queue_mut()
            .iter(mem.clone())
            .map_err(|e| std::io::Error::other(format!("{e:?}")))?
            .collect();
        for chain in chains {
            let head = chain.head_index();
            let descs: Vec<_> = chain.collect();
            let mut header = [0u8; 40];
            mem.read_slice(&mut header, descs[0].addr()).unwrap();
            let opcode = u32::from_le_bytes(header[4..8].try_into().unwrap());
            if opcode == HOLD {
                continue;
            }
            let mut reply = Vec::new();
            reply.extend_from_slice(&24u32.to_le_bytes());
            reply.extend_from_slice(&0i32.to_le_bytes());
            reply.extend_from_slice(&header[8..16]); // unique
            reply.extend_from_slice(&header[16..24]); // nodeid, as the body
            let out = descs.iter().find(|d| d.is_write_only()).unwrap();
            mem.write_slice(&reply, out.addr()).unwrap();
            vring.add_used(head, 24).unwrap();
        }
        vring.signal_used_queue()
    }
}

fn main() {
    let socket = std::env::args()
        .nth(1)
        .expect("usage: vhost_user_echo_fs SOCKET");
    let features = std::env::var("ECHO_FS_FEATURES")
        .ok()
        .and_then(|f| f.parse().ok())
        .unwrap_or(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VHOST_USER_F_PROTOCOL_FEATURES);
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let backend = Arc::new(RwLock::new(EchoFs {
        mem: mem.clone(),
        features,
        queues: 2,
    }));
    let mut daemon = VhostUserDaemon::new("echo-fs".into(), backend, mem).expect("daemon");
    daemon.serve(&socket).expect("serving");
}
