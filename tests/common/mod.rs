//! Tiny hand-assembled guests and helpers shared by the integration tests and benchmarks.
//!
//! The guests are a few dozen instructions: they prove the boot protocol was honoured (they
//! read the PVH start info or the zero page the VMM wrote), print what they found on COM1,
//! and reset the machine through the i8042, which ends the VMM with status 0.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod linux;
pub mod testguest;
pub mod virtiofsd;

/// Where guests are loaded; the boot protocols require at least 1 MiB.
pub const LOAD_ADDR: u64 = 0x10_0000;

/// A minimal x86 assembler: raw bytes plus short conditional/unconditional jumps to labels.
#[derive(Default)]
pub struct Asm {
    pub code: Vec<u8>,
    labels: HashMap<&'static str, usize>,
    fixups: Vec<(usize, &'static str)>,
}

impl Asm {
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.code.extend_from_slice(b);
        self
    }

    pub fn label(&mut self, name: &'static str) -> &mut Self {
        self.labels.insert(name, self.code.len());
        self
    }

    /// A short jump (`EB` or a `7x` conditional) to `target`.
    pub fn jump(&mut self, opcode: u8, target: &'static str) -> &mut Self {
        self.code.push(opcode);
        self.fixups.push((self.code.len(), target));
        self.code.push(0);
        self
    }

    /// `mov dx, 0x3f8` (same encoding in 32- and 64-bit mode).
    pub fn com1(&mut self) -> &mut Self {
        self.bytes(&[0x66, 0xba, 0xf8, 0x03])
    }

    /// Writes a constant string to the port in DX.
    pub fn print(&mut self, s: &str) -> &mut Self {
        for b in s.bytes() {
            self.bytes(&[0xb0, b, 0xee]); // mov al, b; out dx, al
        }
        self
    }

    /// Prints the NUL-terminated string at [RSI/ESI]; `inc` is the encoding of `inc esi/rsi`.
    pub fn print_string_at_si(&mut self, inc: &[u8], unique: &'static str) -> &mut Self {
        let done: &'static str = Box::leak(format!("{unique}_done").into_boxed_str());
        self.label(unique)
            .bytes(&[0x8a, 0x06]) // mov al, [rsi]
            .bytes(&[0x84, 0xc0]) // test al, al
            .jump(0x74, done) // jz done
            .bytes(&[0xee]) // out dx, al
            .bytes(inc)
            .jump(0xeb, unique)
            .label(done)
    }

    /// Prints the first word (up to a space or the NUL) of the string at [ESI].
    pub fn print_word_at_esi(&mut self, unique: &'static str) -> &mut Self {
        let done: &'static str = Box::leak(format!("{unique}_done").into_boxed_str());
        self.label(unique)
            .bytes(&[0x8a, 0x06]) // mov al, [esi]
            .bytes(&[0x84, 0xc0]) // test al, al
            .jump(0x74, done) // jz done
            .bytes(&[0x3c, 0x20]) // cmp al, ' '
            .jump(0x74, done) // je done
            .bytes(&[0xee]) // out dx, al
            .bytes(&[0x46]) // inc esi
            .jump(0xeb, unique)
            .label(done)
    }

    /// Pulses the reset line through the i8042, then halts forever.
    pub fn reset(&mut self) -> &mut Self {
        self.bytes(&[0xb0, 0xfe, 0xe6, 0x64]) // mov al, 0xfe; out 0x64, al
            .label("halt")
            .bytes(&[0xf4])
            .jump(0xeb, "halt")
    }

    pub fn finish(&mut self) -> Vec<u8> {
        for &(at, target) in &self.fixups {
            let to = self.labels[target] as isize;
            let rel = to - (at as isize + 1);
            assert!((-128..=127).contains(&rel), "jump to {target} out of range");
            self.code[at] = rel as i8 as u8;
        }
        self.code.clone()
    }
}

/// The PVH test guest (32-bit protected mode): checks the start-info magic that EBX points
/// to, prints `PVH <command line>\n` and resets.
pub fn pvh_guest_code() -> Vec<u8> {
    let mut a = Asm::default();
    a.com1()
        .bytes(&[0x81, 0x3b, 0x78, 0xc5, 0x6e, 0x33]) // cmp dword [ebx], 0x336ec578
        .jump(0x75, "fail")
        .print("PVH ")
        .bytes(&[0x8b, 0x73, 0x18]) // mov esi, [ebx + 0x18] (cmdline_paddr)
        .print_string_at_si(&[0x46], "cmd") // inc esi
        .print("\n")
        .reset()
        .label("fail")
        .print("BAD start_info\n")
        .bytes(&[0xb0, 0xfe, 0xe6, 0x64, 0xf4]);
    a.finish()
}

/// The 64-bit test guest (Linux boot protocol): checks the `HdrS` magic in the zero page RSI
/// points to, prints `LINUX64 e820=<entries> <command line>\n` and resets.
pub fn linux64_guest_code() -> Vec<u8> {
    let mut a = Asm::default();
    a.com1()
        // cmp dword [rsi + 0x202], "HdrS"
        .bytes(&[0x81, 0xbe, 0x02, 0x02, 0x00, 0x00, 0x48, 0x64, 0x72, 0x53])
        .jump(0x75, "fail")
        .print("LINUX64 e820=")
        .bytes(&[0x8a, 0x86, 0xe8, 0x01, 0x00, 0x00]) // mov al, [rsi + 0x1e8]
        .bytes(&[0x04, b'0']) // add al, '0'
        .bytes(&[0xee]) // out dx, al
        .print(" ")
        .bytes(&[0x8b, 0xb6, 0x28, 0x02, 0x00, 0x00]) // mov esi, [rsi + 0x228] (cmd_line_ptr)
        .print_string_at_si(&[0x48, 0xff, 0xc6], "cmd") // inc rsi
        .print("\n")
        .reset()
        .label("fail")
        .print("BAD zero page\n")
        .bytes(&[0xb0, 0xfe, 0xe6, 0x64, 0xf4]);
    a.finish()
}

/// Wraps 32-bit code in an ELF64 executable with a PVH entry note pointing at it.
pub fn pvh_elf(code: &[u8]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let note_off = EHDR + 2 * PHDR;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // namesz
    note.extend_from_slice(&4u32.to_le_bytes()); // descsz
    note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(LOAD_ADDR as u32).to_le_bytes());
    let code_off = (note_off + note.len()).next_multiple_of(16);

    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF");
    f.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little endian, version 1, SysV
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
    f.extend_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&(EHDR as u16).to_le_bytes());
    f.extend_from_slice(&(PHDR as u16).to_le_bytes());
    f.extend_from_slice(&2u16.to_le_bytes()); // e_phnum
    f.extend_from_slice(&[0; 6]); // no section headers
    let phdr = |f: &mut Vec<u8>, kind: u32, off: usize, addr: u64, size: usize| {
        f.extend_from_slice(&kind.to_le_bytes());
        f.extend_from_slice(&5u32.to_le_bytes()); // R+X
        f.extend_from_slice(&(off as u64).to_le_bytes());
        f.extend_from_slice(&addr.to_le_bytes()); // vaddr
        f.extend_from_slice(&addr.to_le_bytes()); // paddr
        f.extend_from_slice(&(size as u64).to_le_bytes()); // filesz
        f.extend_from_slice(&(size as u64).to_le_bytes()); // memsz
        f.extend_from_slice(&4u64.to_le_bytes()); // align
    };
    phdr(&mut f, 1, code_off, LOAD_ADDR, code.len()); // PT_LOAD
    phdr(&mut f, 4, note_off, 0, note.len()); // PT_NOTE
    f.extend_from_slice(&note);
    f.resize(code_off, 0);
    f.extend_from_slice(code);
    f
}

/// Wraps 64-bit code in a bzImage whose protected-mode part starts with 0x200 bytes of
/// padding, so the code sits at the 64-bit entry point.
pub fn bzimage(code64: &[u8]) -> Vec<u8> {
    let setup_sects = 1u8;
    let mut f = vec![0u8; (usize::from(setup_sects) + 1) * 512];
    f[0x1f1] = setup_sects;
    f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    f[0x200] = 0xeb; // the real-mode jump over the header (never executed here)
    f[0x201] = 0x66; // header ends at 0x268
    f[0x202..0x206].copy_from_slice(b"HdrS");
    f[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
    f[0x211] = 0x01; // LOADED_HIGH
    f[0x214..0x218].copy_from_slice(&(LOAD_ADDR as u32).to_le_bytes()); // code32_start
    f[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    f[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes()); // cmdline_size
    let mut pm = vec![0xf4u8; 0x200]; // the 32-bit entry: hlt
    pm.extend_from_slice(code64);
    f.extend_from_slice(&pm);
    f
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "podvmm-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).expect("write temp file");
        p
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The podvmm binary under test.
pub fn podvmm_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_podvmm"))
}

/// Runs podvmm with `args`, killing it after `timeout_s` seconds (`timeout` from coreutils).
pub fn run_podvmm(args: &[&str], timeout_s: u32) -> Output {
    Command::new("timeout")
        .arg("--kill-after=5")
        .arg(timeout_s.to_string())
        .arg(podvmm_bin())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run podvmm")
}

/// The command line a guest receives for `cmdline`: on PVM hosts podvmm appends the
/// `clearcpuid=` workaround and `pvm_syscall_fixup`.
pub fn guest_cmdline(cmdline: &str) -> String {
    let pvm = hypervisor::kvm::is_pvm();
    boot::cpuid::guest_cmdline(
        cmdline,
        boot::cpuid::HostQuirks {
            cpuid_not_enforced: pvm,
            syscall_fixup: pvm,
        },
    )
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Ends the run on every VMM the benchmarks compare, whichever device each one has, and
/// halts: an ACPI S5 sleep (`SLP_TYP=5 | SLP_EN`) written to port 0x600, Cloud Hypervisor's
/// ACPI shutdown device (it reboots at an i8042 reset); the i8042 reset (podvmm, Firecracker);
/// 0 written to QEMU's `isa-debug-exit` port 0xf4 (`-device isa-debug-exit,iobase=0xf4,iosize=4`;
/// QEMU microvm has no i8042), which makes QEMU exit with status `(0 << 1) | 1 = 1`. A VMM
/// without a device at a port ignores the write, and each one exits at its own.
fn end_on_any_vmm(a: &mut Asm, debug_exit_value: u8) {
    a.bytes(&[0x66, 0xba, 0x00, 0x06]) // mov dx, 0x600
        .bytes(&[0xb0, 0x34, 0xee]) // mov al, 0x34; out dx, al (ACPI S5)
        .bytes(&[0xb0, 0xfe, 0xe6, 0x64]) // mov al, 0xfe; out 0x64, al (i8042 reset)
        .bytes(&[0xb0, debug_exit_value, 0xe6, 0xf4]); // mov al, v; out 0xf4, al (isa-debug-exit)
}

/// The PVH test guest made to end the same image on podvmm, Cloud Hypervisor, Firecracker and
/// QEMU microvm (see [`end_on_any_vmm`]): like [`pvh_guest_code`], it checks the start info, but
/// prints only the command line's first word, `PVH <word>\n`: podvmm adds PVM workarounds to
/// the command line on this host, and a VMM's cost must not grow with a line the others do
/// not print (every character is an exit). A bad start info prints `BAD start_info` and makes QEMU exit
/// with status 3.
pub fn pvh_guest_code_any_vmm() -> Vec<u8> {
    let mut a = Asm::default();
    a.com1()
        .bytes(&[0x81, 0x3b, 0x78, 0xc5, 0x6e, 0x33]) // cmp dword [ebx], 0x336ec578
        .jump(0x75, "fail")
        .print("PVH ")
        .bytes(&[0x8b, 0x73, 0x18]) // mov esi, [ebx + 0x18] (cmdline_paddr)
        .print_word_at_esi("cmd")
        .print("\n");
    end_on_any_vmm(&mut a, 0);
    a.label("halt")
        .bytes(&[0xf4])
        .jump(0xeb, "halt")
        .label("fail");
    a.com1().print("BAD start_info\n");
    end_on_any_vmm(&mut a, 1);
    a.bytes(&[0xf4]);
    a.finish()
}

/// Like [`pvh_guest_code_any_vmm`] (first word only), but after its line the guest idles for ever (interrupts
/// off, `hlt`): what a VMM holds while its guest sits idle.
pub fn pvh_guest_code_idle() -> Vec<u8> {
    let mut a = Asm::default();
    a.com1()
        .bytes(&[0x81, 0x3b, 0x78, 0xc5, 0x6e, 0x33]) // cmp dword [ebx], 0x336ec578
        .jump(0x75, "fail")
        .print("PVH ")
        .bytes(&[0x8b, 0x73, 0x18]) // mov esi, [ebx + 0x18] (cmdline_paddr)
        .print_word_at_esi("cmd")
        .print("\n")
        .bytes(&[0xfa]) // cli
        .label("halt")
        .bytes(&[0xf4])
        .jump(0xeb, "halt")
        .label("fail")
        .print("BAD start_info\n");
    end_on_any_vmm(&mut a, 1);
    a.bytes(&[0xf4]);
    a.finish()
}
