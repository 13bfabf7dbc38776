//! Boots tiny hand-made guests on the real hypervisor and checks what they did.

use crate::common;

use common::*;

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn pvh_guest_reads_start_info_and_command_line() {
    let dir = TempDir::new("pvh");
    let kernel = dir.write("tiny.elf", &pvh_elf(&pvh_guest_code()));
    let out = run_podvmm(
        &[
            "--kernel",
            path_str(&kernel),
            "--cmdline",
            "hello pvh",
            "--memory",
            "size=128M",
        ],
        30,
    );
    assert_eq!(
        stdout(&out),
        format!("PVH {}\n", guest_cmdline("hello pvh")),
        "stderr: {}",
        stderr(&out)
    );
    assert!(out.status.success(), "reset must exit 0: {:?}", out.status);
}

#[test]
fn bzimage_guest_gets_zero_page_with_e820_and_command_line() {
    let dir = TempDir::new("bz");
    let kernel = dir.write("bzImage", &bzimage(&linux64_guest_code()));
    // Below the MMIO gap: RAM, reserved boot-table area, RAM from 1 MiB.
    let out = run_podvmm(&["--kernel", path_str(&kernel), "--cmdline", "x=1 y"], 30);
    assert_eq!(
        stdout(&out),
        format!("LINUX64 e820=3 {}\n", guest_cmdline("x=1 y")),
        "stderr: {}",
        stderr(&out)
    );
    assert!(out.status.success());
    // Above 3 GiB a fourth entry maps the RAM above 4 GiB.
    let out = run_podvmm(
        &[
            "--kernel",
            path_str(&kernel),
            "--cmdline",
            "big",
            "--memory",
            "size=5G",
        ],
        30,
    );
    assert_eq!(
        stdout(&out),
        format!("LINUX64 e820=4 {}\n", guest_cmdline("big")),
        "stderr: {}",
        stderr(&out)
    );
}

#[test]
fn default_command_line_and_two_vcpus() {
    let dir = TempDir::new("smp");
    let kernel = dir.write("tiny.elf", &pvh_elf(&pvh_guest_code()));
    let out = run_podvmm(&["--kernel", path_str(&kernel), "--cpus", "boot=2"], 30);
    assert_eq!(
        stdout(&out),
        format!("PVH {}\n", guest_cmdline("console=ttyS0 reboot=k")),
        "{}",
        stderr(&out)
    );
    assert!(out.status.success());
}

#[test]
fn serial_to_file_and_off() {
    let dir = TempDir::new("serial");
    let kernel = dir.write("tiny.elf", &pvh_elf(&pvh_guest_code()));
    let log = dir.path("console.log");
    let file_arg = format!("file={}", path_str(&log));
    let out = run_podvmm(
        &[
            "--kernel",
            path_str(&kernel),
            "--cmdline",
            "to-file",
            "--serial",
            &file_arg,
        ],
        30,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        format!("PVH {}\n", guest_cmdline("to-file"))
    );

    let out = run_podvmm(&["--kernel", path_str(&kernel), "--serial", "off"], 30);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");
}

#[test]
fn initramfs_is_loaded_for_both_protocols() {
    // The guests do not read it, but the VMM must place it and accept it.
    let dir = TempDir::new("initrd");
    let initrd = dir.write("initrd", &[0x5a; 3 * 4096 + 17]);
    for (name, image) in [
        ("tiny.elf", pvh_elf(&pvh_guest_code())),
        ("bzImage", bzimage(&linux64_guest_code())),
    ] {
        let kernel = dir.write(name, &image);
        let out = run_podvmm(
            &[
                "--kernel",
                path_str(&kernel),
                "--initramfs",
                path_str(&initrd),
                "--cmdline",
                "i",
            ],
            30,
        );
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let expected = format!(" {}\n", guest_cmdline("i"));
        assert!(
            stdout(&out).ends_with(&expected),
            "{name}: {}",
            stdout(&out)
        );
    }
}

/// Runs podvmm expecting failure; returns its one-line error.
fn expect_error(args: &[&str]) -> String {
    let out = run_podvmm(args, 30);
    assert!(!out.status.success(), "{args:?} must fail");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{args:?}: a clean error exit, not a crash or a timeout"
    );
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
    err
}

/// Runs podvmm expecting clap to refuse an option (exit 2, a usage hint).
fn expect_usage_error(args: &[&str]) -> String {
    let out = run_podvmm(args, 30);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    stderr(&out)
}

#[test]
fn no_output_ever_overwrites_an_input() {
    let dir = TempDir::new("outputs");
    let kernel = dir.write("tiny.elf", &pvh_elf(&pvh_guest_code()));
    let k = path_str(&kernel);
    let disk = dir.path("disk.img");
    let data: Vec<u8> = (0..65536u32).map(|i| i as u8).collect();
    std::fs::write(&disk, &data).unwrap();
    let d = format!("path={},readonly=on", path_str(&disk));
    let on_disk = format!("file={}", path_str(&disk));
    let on_kernel = format!("path={}", k);
    for args in [
        vec!["--kernel", k, "--disk", &d, "--serial", &on_disk],
        vec!["--kernel", k, "--disk", &d, "--event-monitor", &on_kernel],
        vec!["--kernel", k, "--disk", &d, "--log-file", path_str(&disk)],
    ] {
        let err = expect_error(&args);
        assert!(err.contains("podvmm would overwrite it"), "{args:?}: {err}");
        assert_eq!(
            std::fs::read(&disk).unwrap(),
            data,
            "{args:?}: the disk changed"
        );
        assert_eq!(
            std::fs::read(&kernel).unwrap(),
            pvh_elf(&pvh_guest_code()),
            "{args:?}: the kernel changed"
        );
    }
    // Two outputs on one file.
    let log = format!("file={}", path_str(&dir.path("same")));
    let ev = format!("path={}", path_str(&dir.path("same")));
    let err = expect_error(&["--kernel", k, "--serial", &log, "--event-monitor", &ev]);
    assert!(err.contains("are the same file"), "{err}");
}

#[test]
fn bad_kernels_are_refused_cleanly() {
    let dir = TempDir::new("badk");
    let missing = dir.path("missing");
    assert!(expect_error(&["--kernel", path_str(&missing)]).contains("No such file"));
    assert!(expect_error(&["--kernel", path_str(&dir.0)]).contains("directory"));
    let text = dir.write("text", b"this is not a kernel\n");
    assert!(expect_error(&["--kernel", path_str(&text)]).contains("neither an ELF"));
    let empty = dir.write("empty", b"");
    assert!(expect_error(&["--kernel", path_str(&empty)]).contains("is empty"));
    // Not a regular file: refused at once from the descriptor, never waited on or read.
    let fifo = dir.path("fifo");
    let c = std::ffi::CString::new(path_str(&fifo)).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    assert!(expect_error(&["--kernel", path_str(&fifo)]).contains("is a FIFO"));
    assert!(expect_error(&["--kernel", "/dev/zero"]).contains("character device"));
    let good = dir.write("good.elf", &pvh_elf(&pvh_guest_code()));
    assert!(
        expect_error(&["--kernel", path_str(&good), "--initramfs", path_str(&fifo)])
            .contains("is a FIFO")
    );
    // A 20 GiB sparse "kernel" is refused from its size, without being read.
    let huge = dir.path("huge");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(20 << 30)
        .unwrap();
    let t = std::time::Instant::now();
    assert!(expect_error(&["--kernel", path_str(&huge)]).contains("podvmm takes at most"));
    assert!(t.elapsed() < std::time::Duration::from_secs(10));
    // An ELF header cut short.
    let elf = pvh_elf(&pvh_guest_code());
    let cut = dir.write("cut.elf", &elf[..40]);
    assert!(expect_error(&["--kernel", path_str(&cut)]).contains("cannot load kernel"));
    // A bzImage header that is not loadable (protocol too old).
    let mut bz = bzimage(&linux64_guest_code());
    bz[0x206] = 0;
    bz[0x207] = 1;
    let old = dir.write("old.bz", &bz);
    assert!(expect_error(&["--kernel", path_str(&old)]).contains("cannot load kernel"));
}

#[test]
fn bad_initramfs_and_command_lines_are_refused() {
    let dir = TempDir::new("badi");
    let kernel = dir.write("tiny.elf", &pvh_elf(&pvh_guest_code()));
    let k = path_str(&kernel);
    let missing = dir.path("none.cpio");
    assert!(
        expect_error(&["--kernel", k, "--initramfs", path_str(&missing)]).contains("initramfs")
    );
    let empty = dir.write("empty.cpio", b"");
    assert!(expect_error(&["--kernel", k, "--initramfs", path_str(&empty)]).contains("empty"));
    // Bigger than the guest's memory.
    let big = dir.path("big.cpio");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(40 << 20)
        .unwrap();
    let err = expect_error(&[
        "--kernel",
        k,
        "--memory",
        "size=32M",
        "--initramfs",
        path_str(&big),
    ]);
    assert!(err.contains("does not fit"), "{err}");
    let long = "x".repeat(5000);
    assert!(expect_error(&["--kernel", k, "--cmdline", &long]).contains("at most 2047"));
    // Short enough alone, too long with what podvmm adds on PVM: the message says so.
    if hypervisor::kvm::is_pvm() {
        let near = "x".repeat(2000);
        let err = expect_error(&["--kernel", k, "--cmdline", &near]);
        assert!(
            err.contains("is 2000 bytes; podvmm adds") && err.contains("clearcpuid"),
            "{err}"
        );
    }
}

#[test]
fn bad_sizes_and_counts_are_refused() {
    let dir = TempDir::new("bads");
    let kernel = dir.write("tiny.elf", &pvh_elf(&pvh_guest_code()));
    let k = path_str(&kernel);
    assert!(expect_usage_error(&["--kernel", k, "--memory", "size=banana"]).contains("banana"));
    assert!(
        expect_usage_error(&["--kernel", k, "--memory", "size=0"]).contains("greater than zero")
    );
    assert!(expect_usage_error(&["--kernel", k, "--cpus", "boot=0"]).contains("at least 1"));
    assert!(
        expect_usage_error(&["--kernel", k, "--cpus", "boot=4,max=2"]).contains("at least boot")
    );
    assert!(expect_usage_error(&["--kernel", k, "--serial", "pty"]).contains("serial"));
    assert!(expect_usage_error(&["--kernel", k, "--hypervisor", "xen"]).contains("xen"));
    assert!(
        expect_error(&["--kernel", k, "--memory", "size=1T"]).contains("more than the host has")
    );
    assert!(expect_error(&["--kernel", k, "--memory", "size=1M"]).contains("minimum"));
    assert!(expect_error(&["--kernel", k, "--cpus", "boot=1000"]).contains("at most"));
    assert!(
        expect_error(&["--kernel", k, "--memory", "size=17825793"]).contains("multiple of 4 KiB")
    );
    assert!(expect_error(&["--kernel", k, "--console", "tty"]).contains("virtio-console"));
}

#[test]
fn unavailable_hypervisors_are_reported() {
    let dir = TempDir::new("hv");
    let kernel = dir.write("tiny.elf", &pvh_elf(&pvh_guest_code()));
    let err = expect_error(&["--kernel", path_str(&kernel), "--hypervisor", "mshv"]);
    assert!(err.contains("mshv"), "{err}");
}

/// The guest executes CPUID and reports the bits the VMM filters and sets.
#[test]
fn guest_sees_filtered_cpuid() {
    let mut a = Asm::default();
    a.bytes(&[0xb8, 1, 0, 0, 0]) // mov eax, 1
        .bytes(&[0x31, 0xc9]) // xor ecx, ecx
        .bytes(&[0x0f, 0xa2]) // cpuid (clobbers EDX, so COM1 is loaded after)
        .bytes(&[0x89, 0xcf]) // mov edi, ecx
        .bytes(&[0x89, 0xde]) // mov esi, ebx
        .com1()
        // xsave (bit 26)
        .bytes(&[0x0f, 0xba, 0xe7, 26]) // bt edi, 26
        .jump(0x72, "has_xsave")
        .print("xsave=0 ")
        .jump(0xeb, "hv")
        .label("has_xsave")
        .print("xsave=1 ")
        .label("hv")
        .bytes(&[0x0f, 0xba, 0xe7, 31]) // bt edi, 31 (hypervisor)
        .jump(0x72, "has_hv")
        .print("hv=0 ")
        .jump(0xeb, "apic")
        .label("has_hv")
        .print("hv=1 ")
        .label("apic")
        .print("count=")
        .bytes(&[0x89, 0xf0]) // mov eax, esi
        .bytes(&[0xc1, 0xe8, 16]) // shr eax, 16
        .bytes(&[0x04, b'0']) // add al, '0'
        .bytes(&[0xee]) // out dx, al
        .print("\n")
        .reset();
    let dir = TempDir::new("cpuid");
    let kernel = dir.write("cpuid.elf", &pvh_elf(&a.finish()));
    let out = run_podvmm(&["--kernel", path_str(&kernel), "--cpus", "boot=3"], 30);
    // Under PVM the guest sees leaf 1 ECX features (XSAVE among them) whatever the VMM sets;
    // podvmm then hides them through the kernel command line instead (see the note).
    let pvm = hypervisor::kvm::is_pvm();
    let xsave = if pvm { "1" } else { "0" };
    assert_eq!(
        stdout(&out),
        format!("xsave={xsave} hv=1 count=3\n"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        stderr(&out).contains("clearcpuid=") && stderr(&out).contains("pvm_syscall_fixup"),
        pvm,
        "{}",
        stderr(&out)
    );
}

#[test]
fn triple_fault_is_reported_as_a_crash() {
    // Load an empty IDT, then raise #BP: no handler, no double-fault handler -> triple fault.
    let mut a = Asm::default();
    a.com1().print("crash\n");
    let idt_ptr_at = LOAD_ADDR as u32 + 64;
    a.bytes(&[0x0f, 0x01, 0x1d]) // lidt [disp32]
        .bytes(&idt_ptr_at.to_le_bytes())
        .bytes(&[0xcc]); // int3
    let mut code = a.finish();
    code.resize(64, 0x90);
    code.extend_from_slice(&[0; 6]); // limit 0, base 0
    let dir = TempDir::new("tf");
    let kernel = dir.write("tf.elf", &pvh_elf(&code));
    let out = run_podvmm(&["--kernel", path_str(&kernel)], 30);
    assert_eq!(stdout(&out), "crash\n");
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("triple fault"), "{}", stderr(&out));
}

#[test]
fn missing_dev_kvm_is_reported() {
    // A private mount namespace whose /dev is empty: neither /dev/kvm nor /dev/mshv.
    let dir = TempDir::new("nokvm");
    let kernel = dir.write("tiny.elf", &pvh_elf(&pvh_guest_code()));
    let script = r#"mount -t tmpfs none /dev && exec "$0" --kernel "$1""#;
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .arg(podvmm_bin())
        .arg(&kernel)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run unshare (needs root)");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("neither /dev/mshv nor /dev/kvm exists"),
        "{err}"
    );
}

#[test]
fn a_read_write_disk_belongs_to_one_vm() {
    let dir = TempDir::new("locks");
    // A guest that keeps running: `cli; hlt` after one port write.
    let kernel = dir.write("halt.elf", &pvh_elf(&[0xe6, 0x80, 0xfa, 0xf4, 0xeb, 0xfd]));
    let k = path_str(&kernel);
    let disk = dir.path("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let rw = format!("path={}", path_str(&disk));
    let ro = format!("path={},readonly=on", path_str(&disk));
    let start = |d: &str| {
        let mut c = std::process::Command::new(podvmm_bin())
            .args([
                "--kernel", k, "--memory", "size=64M", "--serial", "off", "--disk", d,
            ])
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(500));
        assert!(c.try_wait().unwrap().is_none(), "the first VM stopped");
        c
    };
    let mut first = start(&rw);
    // A second VM may neither write nor read what the first one writes; the error names it.
    for d in [&rw, &ro] {
        let err = expect_error(&["--kernel", k, "--memory", "size=64M", "--disk", d]);
        assert!(err.contains("in use"), "{err}");
        assert!(
            err.contains(&format!("pid {} (podvmm)", first.id())),
            "{err}"
        );
    }
    let _ = first.kill();
    let _ = first.wait();
    // Read-only, the image is shared; a writer is then refused.
    let mut a = start(&ro);
    let mut b = start(&ro);
    let err = expect_error(&["--kernel", k, "--memory", "size=64M", "--disk", &rw]);
    assert!(err.contains("in use"), "{err}");
    for c in [&mut a, &mut b] {
        let _ = c.kill();
        let _ = c.wait();
    }
    // The same disk twice in one VM, and one id for two disks: refused.
    let other = dir.path("other.img");
    std::fs::File::create(&other)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let err = expect_error(&["--kernel", k, "--disk", &rw, "--disk", &rw]);
    assert!(err.contains("this VM (the image is given twice)"), "{err}");
    let a = format!("path={},id=x", path_str(&disk));
    let b = format!("path={},id=x", path_str(&other));
    let err = expect_error(&["--kernel", k, "--disk", &a, "--disk", &b]);
    assert!(err.contains("device id x is used twice"), "{err}");
}
