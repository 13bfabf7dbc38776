//! Guest RAM: anonymous, lazily backed mappings, and the host-capacity check.

use std::sync::Arc;

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::{Error, Result};

/// Total RAM of the host, from /proc/meminfo.
pub fn host_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_total(&info)
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Checks the size, then maps guest RAM. The mapping is anonymous and not populated: host
/// memory is only consumed as the guest touches pages.
pub fn create(size: u64) -> Result<Arc<GuestMemoryMmap>> {
    if size < boot::layout::MIN_MEMORY {
        return Err(Error::Limit(format!(
            "memory size {size} bytes is below the minimum of {} MiB",
            boot::layout::MIN_MEMORY >> 20
        )));
    }
    if let Some(host) = host_memory_bytes() {
        if size > host {
            return Err(Error::Limit(format!(
                "memory size {} MiB is more than the host has ({} MiB)",
                size >> 20,
                host >> 20
            )));
        }
    }
    let mem = GuestMemoryMmap::from_ranges(&boot::layout::ram_regions(size))
        .map_err(|source| Error::Memory { size, source })?;
    for region in mem.iter() {
        keep_out_of_core_dumps(region)?;
    }
    Ok(Arc::new(mem))
}

/// The pod's memory is the tenant's data: a core dump of the VMM must not carry it (and it
/// would be as large as the guest). Also keeps the region a mapping of its own, never
/// merged with the VMM's heap next to it.
fn keep_out_of_core_dumps(region: &vm_memory::GuestRegionMmap) -> Result<()> {
    let host = region
        .get_host_address(vm_memory::MemoryRegionAddress(0))
        .map_err(|e| Error::Limit(format!("guest region has no host address: {e}")))?;
    let len = usize::try_from(region.len())
        .map_err(|_| Error::Limit("guest region larger than the address space".into()))?;
    // SAFETY: the range is exactly one mapping `mem` owns; MADV_DONTDUMP changes no contents.
    if unsafe { libc::madvise(host.cast(), len, libc::MADV_DONTDUMP) } != 0 {
        return Err(Error::Io {
            what: "excluding guest memory from core dumps",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Hands every RAM region to the hypervisor.
pub fn map_into(vm: &dyn hypervisor::Vm, mem: &GuestMemoryMmap) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| {
                Error::MapMemory(hypervisor::Error::Unsupported(format!(
                    "guest region has no host address: {e}"
                )))
            })?;
        // SAFETY: the region is owned by `mem`, which the VM keeps alive (in an Arc) for as
        // long as the hypervisor VM exists.
        unsafe {
            vm.map_memory(
                slot as u32,
                region.start_addr().0,
                region.len(),
                host as u64,
                false,
            )
        }
        .map_err(Error::MapMemory)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_meminfo() {
        let info = "MemTotal:       24576000 kB\nMemFree:  1 kB\n";
        assert_eq!(parse_mem_total(info), Some(24576000 * 1024));
        assert_eq!(parse_mem_total("nothing"), None);
        assert!(host_memory_bytes().unwrap() > 0);
    }

    #[test]
    fn sizes_outside_limits_are_refused() {
        let err = create(1 << 20).unwrap_err().to_string();
        assert!(err.contains("minimum"), "{err}");
        let err = create(1 << 50).unwrap_err().to_string();
        assert!(err.contains("more than the host has"), "{err}");
    }

    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn guest_memory_stays_out_of_core_dumps() {
        let mem = create(64 << 20).unwrap();
        let region = mem.iter().next().unwrap();
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .unwrap() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut lines = smaps.lines();
        let start = format!("{host:x}-");
        lines
            .find(|l| l.starts_with(&start))
            .expect("the guest RAM mapping");
        let flags = lines
            .find(|l| l.starts_with("VmFlags:"))
            .expect("its flags");
        assert!(flags.split_whitespace().any(|f| f == "dd"), "{flags}");
    }

    #[test]
    fn large_guests_are_not_populated() {
        // 8 GiB of guest memory must not cost 8 GiB of host memory up front.
        let before = rss_kib();
        let mem = create(8 << 30).unwrap();
        assert_eq!(mem.num_regions(), 2);
        let grown = rss_kib().saturating_sub(before);
        assert!(grown < 64 * 1024, "RSS grew by {grown} KiB");
    }
}
