//! Guest memory shared with devices: a bump allocator over the RAM between the image and
//! the guard at the top, and [`Region`], a bounds-checked window of it accessed only with
//! volatile loads and stores (the device may read or write it at any time).

use core::ptr;

/// Hands out disjoint, zeroed regions of otherwise unused RAM. Nothing is ever freed: a
/// test that needs fresh memory resets the pool to a mark.
pub struct Pool {
    start: u64,
    next: u64,
    end: u64,
}

impl Pool {
    pub fn new(start: u64, end: u64) -> Self {
        Pool {
            start,
            next: start,
            end,
        }
    }

    /// A zeroed region of `len` bytes aligned to `align` (a power of two).
    pub fn alloc(&mut self, len: usize, align: u64) -> Region {
        let addr = self.next.next_multiple_of(align);
        let end = addr + len as u64;
        assert!(end <= self.end, "DMA pool exhausted");
        self.next = end;
        let r = Region { addr, len };
        r.fill(0);
        r
    }

    /// Everything allocated after `mark()` returned `m` is given back by `release(m)`.
    pub fn mark(&self) -> u64 {
        self.next
    }

    pub fn release(&mut self, mark: u64) {
        assert!((self.start..=self.next).contains(&mark));
        self.next = mark;
    }
}

/// A window of guest RAM owned by this program and shared with devices. It is only ever
/// accessed through volatile operations on raw pointers (never through references), so
/// copies of a `Region` and the device may all touch it.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    pub addr: u64,
    pub len: usize,
}

macro_rules! accessors {
    ($read:ident, $write:ident, $t:ty) => {
        #[inline(always)]
        pub fn $read(&self, off: usize) -> $t {
            self.check(off, core::mem::size_of::<$t>());
            // SAFETY: in bounds (checked) of a region of RAM the pool gave us; the
            // identity map makes the address valid; volatile because devices write it.
            unsafe { ptr::read_volatile((self.addr as usize + off) as *const $t) }
        }

        #[inline(always)]
        pub fn $write(&self, off: usize, v: $t) {
            self.check(off, core::mem::size_of::<$t>());
            // SAFETY: as for the read: in bounds of memory we own; volatile so the store
            // really happens, in program order with the other volatile accesses.
            unsafe { ptr::write_volatile((self.addr as usize + off) as *mut $t, v) }
        }
    };
}

impl Region {
    #[inline(always)]
    fn check(&self, off: usize, size: usize) {
        assert!(
            off.checked_add(size).is_some_and(|e| e <= self.len),
            "region access out of bounds"
        );
    }

    accessors!(read8, write8, u8);
    accessors!(read16, write16, u16);
    accessors!(read32, write32, u32);
    accessors!(read64, write64, u64);

    /// The sub-region `[off, off + len)`.
    pub fn sub(&self, off: usize, len: usize) -> Region {
        self.check(off, len);
        Region {
            addr: self.addr + off as u64,
            len,
        }
    }

    pub fn fill(&self, byte: u8) {
        // SAFETY: the whole region is memory we own (see `accessors!`); `write_bytes` on a
        // raw pointer creates no reference.
        unsafe { ptr::write_bytes(self.addr as *mut u8, byte, self.len) };
    }
}
