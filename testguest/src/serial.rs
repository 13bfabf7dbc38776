//! COM1 output. Port I/O is not available in ring 3 under PVM (IOPL 3 is not honoured: `out`
//! raises #GP), so lines are assembled in ring 3 and written out by one ring-0 gate call
//! each; every byte is still one port write (one exit to the VMM).

use core::arch::asm;
use core::fmt;

const COM1: u16 = 0x3f8;

/// Writes one byte to COM1's transmit register. Ring 0 only.
#[inline(always)]
pub fn out_byte(b: u8) {
    // SAFETY: port 0x3f8 is the UART's data register; writing it only emits the byte.
    unsafe {
        asm!("out dx, al", in("dx") COM1, in("al") b, options(nomem, nostack, preserves_flags))
    };
}

/// Ring-0 side of [`write`]: emits `len` bytes at `ptr`.
extern "C" fn write_ring0(ptr: u64, len: u64) -> u64 {
    for i in 0..len {
        // SAFETY: `ptr..ptr+len` is the ring-3 caller's live buffer (identity mapped).
        out_byte(unsafe { core::ptr::read_volatile((ptr + i) as *const u8) });
    }
    0
}

/// Writes `bytes` to COM1, from ring 3 (through the gate) or ring 0.
pub fn write(bytes: &[u8]) {
    if crate::arch::cpl() == 0 {
        write_ring0(bytes.as_ptr() as u64, bytes.len() as u64);
    } else {
        crate::arch::ring0_call(write_ring0, bytes.as_ptr() as u64, bytes.len() as u64);
    }
}

/// A line buffer: formatted in ring 3, flushed in one gate call.
pub struct Line {
    buf: [u8; 512],
    len: usize,
}

impl Line {
    pub const fn new() -> Self {
        Line {
            buf: [0; 512],
            len: 0,
        }
    }

    pub fn flush(&mut self) {
        write(&self.buf[..self.len]);
        self.len = 0;
    }
}

impl fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        let mut line = $crate::serial::Line::new();
        let _ = core::fmt::Write::write_fmt(&mut line, format_args!($($arg)*));
        let _ = core::fmt::Write::write_str(&mut line, "\n");
        line.flush();
    }};
}
