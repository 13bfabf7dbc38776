//! The vhost-user front-end of a virtio-fs device, over the rust-vmm `vhost` crate: connect to
//! the back-end's socket, negotiate features, then (when the guest driver is up) share guest
//! memory and hand over the vrings; at a driver reset, take them back.
//!
//! Every reply is awaited at most [`REPLY_TIMEOUT`]: a socket whose peer accepts and then says
//! nothing (not a vhost-user back-end at all) is an error, not a hung VMM thread.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::virtio::VIRTIO_F_VERSION_1;

/// Longest wait for one reply from the back-end.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// `VHOST_USER_F_PROTOCOL_FEATURES`: the back-end speaks protocol features (and its rings
/// start disabled until `SET_VRING_ENABLE`).
const PROTOCOL_FEATURES: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("connecting to the vhost-user back-end at {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("vhost-user back-end at {path}: {step} failed: {source}")]
    Protocol {
        path: PathBuf,
        step: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("vhost-user back-end at {path}: {what}")]
    Unusable { path: PathBuf, what: String },
    #[error(
        "guest memory is not shared: a vhost-user back-end needs memory.shared=true \
         (--memory shared=on)"
    )]
    MemoryNotShared,
    #[error("guest address {0:#x} of a vring is not in guest memory")]
    BadRingAddress(u64),
}

/// Where one vring lives and the events that drive it.
pub struct Vring<'a> {
    pub index: usize,
    pub max_size: u16,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Next available-ring index the back-end processes.
    pub base: u16,
    /// Written by the guest (through the ioeventfd) when it adds buffers.
    pub kick: &'a EventFd,
    /// Written by the back-end when it used buffers.
    pub call: &'a EventFd,
}

/// A connected, negotiated back-end.
pub struct Connection {
    path: PathBuf,
    frontend: Frontend,
    /// A second handle on the socket, watched for the back-end going away.
    watch: UnixStream,
    /// Virtio features the back-end offered (with `VHOST_USER_F_PROTOCOL_FEATURES`).
    features: u64,
    protocol: bool,
}

impl Connection {
    /// Connects and negotiates. `queues` is how many vrings the device has (the back-end must
    /// serve that many when it says how many it serves).
    pub fn connect(path: &Path, queues: usize) -> Result<Self, FrontendError> {
        let connect_err = |source| FrontendError::Connect {
            path: path.to_owned(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(connect_err)?;
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(REPLY_TIMEOUT)))
            .map_err(connect_err)?;
        let watch = stream.try_clone().map_err(connect_err)?;
        let mut frontend = Frontend::from_stream(stream, queues as u64);
        let step = |step| {
            let path = path.to_owned();
            move |source| FrontendError::Protocol { path, step, source }
        };
        frontend.set_owner().map_err(step("SET_OWNER"))?;
        let features = frontend.get_features().map_err(step("GET_FEATURES"))?;
        if features & VIRTIO_F_VERSION_1 == 0 {
            return Err(FrontendError::Unusable {
                path: path.to_owned(),
                what: format!(
                    "it offers features {features:#x}, without VIRTIO_F_VERSION_1 (podvmm drives \
                     virtio 1.x devices only)"
                ),
            });
        }
        let protocol = features & PROTOCOL_FEATURES != 0;
        if protocol {
            let offered = frontend
                .get_protocol_features()
                .map_err(step("GET_PROTOCOL_FEATURES"))?;
            let acked =
                offered & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK);
            frontend
                .set_protocol_features(acked)
                .map_err(step("SET_PROTOCOL_FEATURES"))?;
            if acked.contains(VhostUserProtocolFeatures::MQ) {
                let n = frontend.get_queue_num().map_err(step("GET_QUEUE_NUM"))?;
                if n < queues as u64 {
                    return Err(FrontendError::Unusable {
                        path: path.to_owned(),
                        what: format!(
                            "it serves {n} queues and the device needs {queues} (one high-priority \
                             queue and {} request queues): lower num_queues",
                            queues - 1
                        ),
                    });
                }
            }
            // Every set-up message then gets an answer, so a refusal is seen where it happens.
            if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        Ok(Connection {
            path: path.to_owned(),
            frontend,
            watch,
            features,
            protocol,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The virtio features the back-end offered.
    pub fn features(&self) -> u64 {
        self.features & !PROTOCOL_FEATURES
    }

    /// The socket, to watch for the back-end going away.
    pub fn socket(&self) -> &UnixStream {
        &self.watch
    }

    fn step(&self, step: &'static str) -> impl Fn(vhost::Error) -> FrontendError + '_ {
        move |source| FrontendError::Protocol {
            path: self.path.clone(),
            step,
            source,
        }
    }

    /// Hands guest memory and the vrings to the back-end. `acked`: what the driver accepted.
    pub fn start(
        &self,
        mem: &GuestMemoryMmap,
        acked: u64,
        vrings: &[Vring<'_>],
    ) -> Result<(), FrontendError> {
        let f = &self.frontend;
        f.set_features(acked | (self.features & PROTOCOL_FEATURES))
            .map_err(self.step("SET_FEATURES"))?;
        let mut regions = Vec::new();
        for region in mem.iter() {
            let file = region.file_offset().ok_or(FrontendError::MemoryNotShared)?;
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| FrontendError::BadRingAddress(region.start_addr().0))?;
            regions.push(VhostUserMemoryRegionInfo {
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                mmap_offset: file.start(),
                mmap_handle: file.file().as_raw_fd(),
            });
        }
        f.set_mem_table(&regions)
            .map_err(self.step("SET_MEM_TABLE"))?;
        let hva = |gpa: u64| {
            mem.get_host_address(GuestAddress(gpa))
                .map(|p| p as u64)
                .map_err(|_| FrontendError::BadRingAddress(gpa))
        };
        for v in vrings {
            f.set_vring_num(v.index, v.size)
                .map_err(self.step("SET_VRING_NUM"))?;
            let config = VringConfigData {
                queue_max_size: v.max_size,
                queue_size: v.size,
                flags: 0,
                desc_table_addr: hva(v.desc)?,
                used_ring_addr: hva(v.used)?,
                avail_ring_addr: hva(v.avail)?,
                log_addr: None,
            };
            f.set_vring_addr(v.index, &config)
                .map_err(self.step("SET_VRING_ADDR"))?;
            f.set_vring_base(v.index, v.base)
                .map_err(self.step("SET_VRING_BASE"))?;
            f.set_vring_call(v.index, v.call)
                .map_err(self.step("SET_VRING_CALL"))?;
            f.set_vring_kick(v.index, v.kick)
                .map_err(self.step("SET_VRING_KICK"))?;
        }
        if self.protocol {
            let mut f = self.frontend.clone();
            for v in vrings {
                f.set_vring_enable(v.index, true)
                    .map_err(self.step("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// Takes the vrings back (`GET_VRING_BASE` stops each one): after this the back-end no
    /// longer touches them, and guest memory may be reused by a driver reset.
    pub fn stop(&self, queues: usize) -> Result<(), FrontendError> {
        for i in 0..queues {
            self.frontend
                .get_vring_base(i)
                .map_err(self.step("GET_VRING_BASE"))?;
        }
        Ok(())
    }
}
