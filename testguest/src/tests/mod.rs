//! The device tests, one module each. Each one prints its own measurement lines and ends
//! with a `TESTGUEST result` line (see `report`).

pub mod blk;
pub mod blk_hostile;
pub mod net;
pub mod net_hostile;
pub mod ring;
pub mod vsock;
pub mod vsock_hostile;

/// xorshift64*: reproducible pseudo-random numbers for offsets and hostile values.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
