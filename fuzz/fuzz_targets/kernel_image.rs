//! Kernel images: the fuzz bytes are the file handed to `--kernel` (ELF vmlinux, bzImage or
//! anything else), loaded by `boot::load_kernel` into a small guest memory. The image is
//! written to a memfd and opened through /proc/self/fd, as a file on disk would be.
#![no_main]

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::sync::OnceLock;

use boot::KernelSpec;
use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryMmap};

const MEM: u64 = 64 << 20;

fn image() -> &'static (File, PathBuf) {
    static IMAGE: OnceLock<(File, PathBuf)> = OnceLock::new();
    IMAGE.get_or_init(|| {
        // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"podvmm-fuzz-kernel".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a new descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        (file, PathBuf::from(format!("/proc/self/fd/{fd}")))
    })
}

fuzz_target!(|data: &[u8]| {
    let (file, path) = image();
    let mut f = file;
    f.set_len(0).expect("truncating the memfd");
    f.seek(SeekFrom::Start(0)).expect("seek");
    f.write_all(data).expect("writing the image");
    // Guest memory pages are only touched where the loader writes.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)])
        .expect("guest memory");
    // The loader reads from the descriptor it is given (boot::Input, as the VMM opens it).
    let Ok(input) = boot::Input::open("kernel", path, boot::input::MAX_KERNEL_SIZE) else {
        return;
    };
    let spec = KernelSpec {
        kernel: &input,
        initramfs: None,
        cmdline: "console=ttyS0 reboot=k",
        num_cpus: 1,
        mem_size: MEM,
    };
    let _ = boot::load_kernel(&mem, &spec);
});
