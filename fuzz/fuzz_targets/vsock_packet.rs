//! vsock: the packet header a guest writes (decode, then encode must give the same bytes
//! back) and the hybrid-vsock `CONNECT <port>` line a host client writes.
#![no_main]

use devices::virtio::vsock::hybrid::parse_connect_line;
use devices::virtio::vsock::packet::{Header, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(raw) = data.get(..HEADER_LEN) {
        let mut b = [0u8; HEADER_LEN];
        b.copy_from_slice(raw);
        let h = Header::decode(&b);
        let _ = h.op();
        assert_eq!(h.encode(), b, "a header must encode back to its bytes");
    }
    let _ = parse_connect_line(data);
});
