//! Completing instructions the hypervisor's emulator gave up on.
//!
//! On software-virtualized KVM (PVM) the guest kernel runs through KVM's instruction
//! emulator, which lacks a few instructions a stock kernel executes at boot. Two of them are
//! simple enough to finish here instead of killing the guest:
//! - `int3` (the kernel's boot-time INT3 self-test): deliver #BP with RIP after the
//!   instruction, exactly what the CPU would have done;
//! - `fwait`: with no x87 exception pending (the kernel keeps none) it does nothing.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// What to do with the instruction at the failing RIP.
#[derive(Debug, PartialEq, Eq)]
pub enum Completion {
    /// Advance RIP by `len` and inject exception `vector` if given.
    Skip { len: u64, inject: Option<u8> },
    /// Not something we can complete; the bytes are for the error message.
    Unknown,
}

const BP_VECTOR: u8 = 3;

pub fn classify(insn: &[u8]) -> Completion {
    match insn.first() {
        Some(0xcc) => Completion::Skip {
            len: 1,
            inject: Some(BP_VECTOR),
        },
        Some(0x9b) => Completion::Skip {
            len: 1,
            inject: None,
        },
        _ => Completion::Unknown,
    }
}

/// Reads up to 15 instruction bytes at guest physical `gpa`, stopping at the end of RAM.
pub fn fetch(mem: &GuestMemoryMmap, gpa: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(15);
    for i in 0..15 {
        match mem.read_obj::<u8>(GuestAddress(gpa + i)) {
            Ok(b) => out.push(b),
            Err(_) => break,
        }
    }
    out
}

/// Formats instruction bytes for an error message.
pub fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_known_instructions() {
        assert_eq!(
            classify(&[0xcc, 0x90]),
            Completion::Skip {
                len: 1,
                inject: Some(3)
            }
        );
        assert_eq!(
            classify(&[0x9b]),
            Completion::Skip {
                len: 1,
                inject: None
            }
        );
        assert_eq!(classify(&[0xf3, 0x0f, 0xb8, 0xc0]), Completion::Unknown);
        assert_eq!(classify(&[]), Completion::Unknown);
    }

    #[test]
    fn fetch_stops_at_end_of_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        mem.write_slice(&[0xcc, 0x9b], GuestAddress(0xffe)).unwrap();
        assert_eq!(fetch(&mem, 0xffe), vec![0xcc, 0x9b]);
        assert_eq!(hex(&[0x0f, 0xa2]), "0f a2");
    }
}
