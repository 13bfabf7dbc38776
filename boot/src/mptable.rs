//! The Intel MultiProcessor Specification 1.4 table, which tells the guest how many CPUs
//! there are and how legacy interrupts reach the IO-APIC. Chosen over ACPI because it needs
//! no ACPI interpreter in the guest kernel, which keeps the kernel small and its boot short.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{EBDA_START, IOAPIC_ADDR, LAPIC_ADDR, LOW_MEM_END, MPTABLE_ADDR};

/// APIC IDs are 8 bits, 0xff is broadcast, and the IO-APIC takes the id after the CPUs.
pub const MAX_CPUS: u32 = 254;
/// IO-APIC input pins (and so ISA/legacy interrupt lines) described.
pub const IOAPIC_PINS: u8 = 24;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the MP table supports 1 to {MAX_CPUS} vCPUs, not {0}")]
    CpuCount(u32),
    #[error("the MP table ({0} bytes) does not fit below the EBDA")]
    TooLarge(usize),
    #[error("writing the MP table to guest memory: {0}")]
    Write(#[source] vm_memory::GuestMemoryError),
}

const MPC_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the 16-byte floating pointer structure and the configuration table it points to
/// at `table_addr`.
pub fn build(table_addr: u64, num_cpus: u32) -> Result<(Vec<u8>, Vec<u8>), Error> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(Error::CpuCount(num_cpus));
    }
    let ioapic_id = num_cpus as u8;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu as u8, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        // Pin 0 carries the 8259's ExtINT; every other ISA line maps to the same pin.
        let kind = if pin == 0 {
            INT_TYPE_EXTINT
        } else {
            INT_TYPE_INT
        };
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, kind, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    // LINT0 of the boot CPU is ExtINT; LINT1 of every CPU is NMI.
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    header.push(MPC_SPEC_REV);
    header.push(0); // checksum, filled below
    header.extend_from_slice(b"PODVMM  ");
    header.extend_from_slice(b"POD-SANDBOX ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.extend_from_slice(&[1, MPC_SPEC_REV, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);

    Ok((fp, table))
}

/// Writes the floating pointer into the EBDA, where Linux scans for it, and the table below.
pub fn write(mem: &GuestMemoryMmap, num_cpus: u32) -> Result<(), Error> {
    let (fp, table) = build(MPTABLE_ADDR, num_cpus)?;
    if MPTABLE_ADDR + table.len() as u64 > EBDA_START {
        return Err(Error::TooLarge(table.len()));
    }
    debug_assert!(EBDA_START + fp.len() as u64 <= LOW_MEM_END);
    mem.write_slice(&table, GuestAddress(MPTABLE_ADDR))
        .map_err(Error::Write)?;
    mem.write_slice(&fp, GuestAddress(EBDA_START))
        .map_err(Error::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts_are_right() {
        let (fp, cfg) = build(MPTABLE_ADDR, 2).unwrap();
        assert_eq!(&fp[0..4], b"_MP_");
        assert_eq!(fp.len(), 16);
        assert_eq!(sum(&fp), 0);
        let ptr = u32::from_le_bytes(fp[4..8].try_into().unwrap()) as u64;
        assert_eq!(ptr, MPTABLE_ADDR);
        assert_eq!(&cfg[0..4], b"PCMP");
        let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
        assert_eq!(len, cfg.len());
        assert_eq!(sum(&cfg), 0);
        let count = u16::from_le_bytes([cfg[34], cfg[35]]);
        assert_eq!(count, 2 + 1 + 1 + u16::from(IOAPIC_PINS) + 2);
        // First processor entry: APIC id 0, enabled boot processor.
        assert_eq!(&cfg[44..48], &[0, 0, APIC_VERSION, 3]);
        // Second: APIC id 1, enabled, not boot.
        assert_eq!(&cfg[64..68], &[0, 1, APIC_VERSION, 1]);
    }

    #[test]
    fn cpu_count_limits() {
        assert!(matches!(build(MPTABLE_ADDR, 0), Err(Error::CpuCount(0))));
        assert!(matches!(
            build(MPTABLE_ADDR, 255),
            Err(Error::CpuCount(255))
        ));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write(&mem, MAX_CPUS).unwrap();
        let sig: [u8; 4] = mem.read_obj(GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&sig, b"_MP_");
    }
}
