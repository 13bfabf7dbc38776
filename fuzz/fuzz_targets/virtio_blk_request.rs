//! virtio-blk request parsing on chains a hostile driver wrote: the fuzz bytes are the
//! descriptor table, the avail ring's heads and the contents of guest memory (headers,
//! indirect tables, discard segments). Every chain the queue hands out goes through the
//! device's parser; what the parser accepts must lie inside guest memory.
#![no_main]

use devices::virtio::block::request::{parse, read_segments, RequestType};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::GuestMemoryBackend;

#[path = "ring.rs"]
mod ring;

use ring::QSIZE;

/// Sectors of the pretend disk (1 MiB).
const CAPACITY: u64 = 2048;

fuzz_target!(|data: &[u8]| {
    let Some((mem, mut q, choice)) = ring::build(data) else {
        return;
    };
    let readonly = choice & 1 != 0;
    for _ in 0..=QSIZE {
        let chain = match q.iter(&mem) {
            Ok(mut it) => it.next(),
            Err(_) => None,
        };
        let Some(chain) = chain else { break };
        let head = chain.head_index();
        match parse(chain, &mem, CAPACITY, readonly) {
            Ok(req) => {
                assert!(
                    mem.address_in_range(req.status_addr),
                    "status outside memory"
                );
                let mut total = 0u64;
                for &(addr, len) in &req.data {
                    assert!(
                        mem.get_slice(addr, len as usize).is_ok(),
                        "accepted a buffer outside guest memory: {addr:?}+{len}"
                    );
                    total += u64::from(len);
                }
                assert_eq!(total, req.data_len);
                if matches!(req.kind, RequestType::In | RequestType::Out) {
                    assert_eq!(req.data_len % 512, 0, "unaligned data accepted");
                }
                if matches!(req.kind, RequestType::Discard | RequestType::WriteZeroes) {
                    if let Ok(segs) = read_segments(&mem, &req, CAPACITY) {
                        for s in segs {
                            assert!(s.sector + u64::from(s.num_sectors) <= CAPACITY);
                        }
                    }
                }
            }
            Err(rejected) => {
                if let Some(at) = rejected.status_addr {
                    assert!(mem.address_in_range(at), "error status outside memory");
                }
            }
        }
        // Give the chain back as the worker does, so the used ring is exercised too.
        let _ = q.add_used(&mem, head, 0);
    }
});
