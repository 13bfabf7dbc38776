//! Guest RAM: lazily backed mappings (private anonymous memory, or a memfd mapped shared when
//! `memory.shared` asks for memory a vhost-user back-end can map too), hugepages reserved up
//! front (`memory.hugepages`), and the host-capacity check.

use std::sync::Arc;

use vm_memory::{FileOffset, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use validated::MemorySize;

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

/// What backs guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory.
    Private,
    /// A memfd (`podvmm-guest-ram`) mapped `MAP_SHARED`, whose descriptor each region carries
    /// (`file_offset`) for a vhost-user back-end to map.
    Shared,
    /// Hugepages of `page` bytes from the host's pool (a hugetlb memfd), mapped shared or
    /// private. The pages are reserved when the memory is mapped, so a host without enough
    /// free ones is an error then, never a SIGBUS when the guest touches them.
    Hugepages { page: u64, shared: bool },
}

impl Backing {
    pub fn of(config: &api::MemoryConfig) -> Result<Backing> {
        if !config.hugepages {
            return Ok(if config.shared {
                Backing::Shared
            } else {
                Backing::Private
            });
        }
        let page = match config.hugepage_size {
            Some(p) => p,
            None => default_hugepage_size().ok_or_else(|| {
                Error::Limit(
                    "memory hugepages: this host reports no hugepage size (no Hugepagesize in \
                     /proc/meminfo)"
                        .into(),
                )
            })?,
        };
        Ok(Backing::Hugepages {
            page,
            shared: config.shared,
        })
    }
}

/// Refuses more memory than the host has (the one check of the size that needs the host;
/// the rest is `validated::MemorySize`'s).
pub fn check_host_has(size: MemorySize) -> Result<()> {
    let size = size.get();
    match host_memory_bytes() {
        Some(host) if size > host => Err(Error::Limit(format!(
            "memory size {} MiB is more than the host has ({} MiB)",
            size >> 20,
            host >> 20
        ))),
        _ => Ok(()),
    }
}

/// Checks the host has the memory, then maps guest RAM. Private and shared memory are
/// populated only as the guest touches pages; hugepages are reserved up front.
pub fn create(size: MemorySize, backing: Backing) -> Result<Arc<GuestMemoryMmap>> {
    check_host_has(size)?;
    let size = size.get();
    let ranges = boot::layout::ram_regions(size);
    let mem = match backing {
        Backing::Private => GuestMemoryMmap::from_ranges(&ranges)
            .map_err(|source| Error::Memory { size, source })?,
        Backing::Shared => {
            let file = Arc::new(memfd(size, 0)?);
            let mut offset = 0u64;
            let with_files: Vec<_> = ranges
                .iter()
                .map(|&(addr, len)| {
                    let r = (addr, len, Some(FileOffset::from_arc(file.clone(), offset)));
                    offset += len as u64;
                    r
                })
                .collect();
            GuestMemoryMmap::from_ranges_with_files(with_files)
                .map_err(|source| Error::Memory { size, source })?
        }
        Backing::Hugepages { page, shared } => hugepage_memory(size, &ranges, page, shared)?,
    };
    for region in mem.iter() {
        keep_out_of_core_dumps(region)?;
    }
    Ok(Arc::new(mem))
}

/// The host's default hugepage size (`Hugepagesize` in /proc/meminfo).
fn default_hugepage_size() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("Hugepagesize:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

fn hugepage_memory(
    size: u64,
    ranges: &[(vm_memory::GuestAddress, usize)],
    page: u64,
    shared: bool,
) -> Result<GuestMemoryMmap> {
    let kib = page >> 10;
    let pool = format!("/sys/kernel/mm/hugepages/hugepages-{kib}kB");
    let free: u64 = std::fs::read_to_string(format!("{pool}/free_hugepages"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| {
            Error::Limit(format!(
                "memory hugepages: this host has no {} KiB hugepages ({pool} is missing)",
                kib
            ))
        })?;
    if !size.is_multiple_of(page) {
        return Err(Error::Limit(format!(
            "memory size {size} is not a multiple of the hugepage size {page}"
        )));
    }
    let need = size / page;
    if free < need {
        return Err(Error::Limit(format!(
            "memory hugepages: the VM needs {need} free {kib} KiB hugepages and the host has \
             {free} (reserve more: echo N > {pool}/nr_hugepages)"
        )));
    }
    let flags = libc::MFD_HUGETLB | (page.trailing_zeros() << libc::MFD_HUGE_SHIFT);
    let file = Arc::new(memfd(size, flags)?);
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for &(addr, len) in ranges {
        // No MAP_NORESERVE: the kernel reserves the pages now, or refuses the mapping.
        let map_flags = if shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
        let region = vm_memory::mmap::MmapRegionBuilder::new(len)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(map_flags)
            .with_file_offset(FileOffset::from_arc(file.clone(), offset))
            .with_hugetlbfs(true)
            .build()
            .map_err(|e| {
                Error::Limit(format!(
                    "memory hugepages: reserving {need} {kib} KiB hugepages: {e}"
                ))
            })?;
        let region = vm_memory::GuestRegionMmap::new(region, addr)
            .ok_or_else(|| Error::Limit("guest memory region wraps the address space".into()))?;
        regions.push(region);
        offset += len as u64;
    }
    GuestMemoryMmap::from_regions(regions)
        .map_err(|e| Error::Limit(format!("arranging guest memory: {e}")))
}

/// A memfd of `size` bytes (sparse unless hugetlb: pages are allocated as they are touched).
fn memfd(size: u64, extra_flags: u32) -> Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    let io = |what| move |source| Error::Io { what, source };
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe {
        libc::memfd_create(
            c"podvmm-guest-ram".as_ptr(),
            libc::MFD_CLOEXEC | extra_flags,
        )
    };
    if fd < 0 {
        return Err(io("creating shared guest memory (memfd_create)")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(io("sizing shared guest memory (ftruncate)"))?;
    Ok(file)
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

    /// A size the tests know to be valid.
    fn size(bytes: u64) -> MemorySize {
        MemorySize::new(bytes).unwrap()
    }

    #[test]
    fn parses_meminfo() {
        let info = "MemTotal:       24576000 kB\nMemFree:  1 kB\n";
        assert_eq!(parse_mem_total(info), Some(24576000 * 1024));
        assert_eq!(parse_mem_total("nothing"), None);
        assert!(host_memory_bytes().unwrap() > 0);
    }

    #[test]
    fn sizes_outside_limits_are_refused() {
        // The smallest size is `validated::MemorySize`'s, which must agree with the layout.
        assert_eq!(validated::MIN_MEMORY, boot::layout::MIN_MEMORY);
        assert!(MemorySize::new(1 << 20).is_err());
        let err = create(size(1 << 50), Backing::Shared)
            .unwrap_err()
            .to_string();
        assert!(err.contains("more than the host has"), "{err}");
    }

    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn guest_memory_stays_out_of_core_dumps() {
        let mem = create(size(64 << 20), Backing::Private).unwrap();
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
        let mem = create(size(8 << 30), Backing::Private).unwrap();
        assert_eq!(mem.num_regions(), 2);
        let grown = rss_kib().saturating_sub(before);
        assert!(grown < 64 * 1024, "RSS grew by {grown} KiB");
    }

    #[test]
    fn shared_memory_is_a_sparse_memfd_the_guest_writes_through() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        use vm_memory::{Bytes, GuestAddress};
        let before = rss_kib();
        let mem = create(size(8 << 30), Backing::Shared).unwrap();
        assert!(
            rss_kib().saturating_sub(before) < 64 * 1024,
            "populated up front"
        );
        // Every region is the same memfd, at consecutive offsets.
        let mut next = 0;
        for region in mem.iter() {
            let fo = region.file_offset().expect("a file-backed region");
            assert_eq!(fo.start(), next);
            next += region.len();
        }
        let fo = mem.iter().next().unwrap().file_offset().unwrap();
        assert_eq!(fo.file().metadata().unwrap().len(), 8 << 30);
        // What the guest writes, the descriptor (what a back-end maps) sees.
        mem.write_slice(b"podvmm", GuestAddress(0x10_0000)).unwrap();
        let mut buf = [0u8; 6];
        fo.file().read_exact_at(&mut buf, 0x10_0000).unwrap();
        assert_eq!(&buf, b"podvmm");
        // Sparse: only the touched page is allocated.
        let allocated = fo.file().metadata().unwrap().blocks() * 512;
        assert!(allocated <= 1 << 20, "{allocated} bytes allocated");
    }

    fn meminfo_field(name: &str) -> u64 {
        let info = std::fs::read_to_string("/proc/meminfo").unwrap();
        let line = info.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Reserves 2 MiB hugepages in the host's pool (root) and hands them back on drop.
    struct HugepagePool {
        path: &'static str,
        before: u64,
    }

    impl HugepagePool {
        fn grow_by(n: u64) -> HugepagePool {
            let path = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";
            let before: u64 = std::fs::read_to_string(path)
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            std::fs::write(path, (before + n).to_string())
                .unwrap_or_else(|e| panic!("{path}: {e} (this test reserves hugepages: root)"));
            HugepagePool { path, before }
        }
    }

    impl Drop for HugepagePool {
        fn drop(&mut self) {
            let _ = std::fs::write(self.path, self.before.to_string());
        }
    }

    #[test]
    fn hugepages_are_reserved_up_front_or_refused_with_the_reason() {
        use vm_memory::{Bytes, GuestAddress};
        let page = 2 << 20;
        let hugepages = Backing::Hugepages { page, shared: true };
        // More than the pool has free: refused before anything is mapped, saying how many.
        let free = meminfo_field("HugePages_Free:");
        let want = (free + 64) * page;
        let err = create(size(want), hugepages).unwrap_err().to_string();
        assert!(
            err.contains(&format!("needs {} free 2048 KiB hugepages", free + 64)),
            "{err}"
        );
        let err = create(size(65 << 20), hugepages).unwrap_err().to_string();
        assert!(err.contains("not a multiple of the hugepage size"), "{err}");
        // With the pages in the pool: reserved at once (no SIGBUS later), a descriptor a
        // vhost-user back-end can map, and what the guest writes is there.
        let _pool = HugepagePool::grow_by(64);
        let reserved_before = meminfo_field("HugePages_Rsvd:");
        let mem = create(size(128 << 20), hugepages).unwrap();
        assert_eq!(meminfo_field("HugePages_Rsvd:") - reserved_before, 64);
        let region = mem.iter().next().unwrap();
        assert!(region.file_offset().is_some());
        mem.write_slice(b"huge", GuestAddress(0x20_0000)).unwrap();
        let mut buf = [0u8; 4];
        mem.read_slice(&mut buf, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(&buf, b"huge");
        drop(mem);
        assert_eq!(meminfo_field("HugePages_Rsvd:"), reserved_before);
    }
}
