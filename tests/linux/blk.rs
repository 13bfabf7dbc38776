//! The guest kit's Linux kernel against podvmm's virtio-blk, checked from the console and
//! from the disk image afterwards.
//!
//! 1. `linux_probes_the_disk_and_reads_its_partition_table`: a 64 MiB raw image with an MBR
//!    partition (sfdisk), two queues, two vCPUs. The kernel must probe it with the right
//!    size, use both queues and read the partition table. No root file system is given, so
//!    the kernel then panics and, with `panic=1`, resets the VM.
//! 2. `linux_mounts_an_ext4_root_read_write_and_it_stays_clean`: a 64 MiB ext4 image
//!    (mkfs.ext4 -d) holding busybox and an `/init` script, booted with
//!    `root=/dev/vda rw rootfstype=ext4` and no initramfs: the kernel itself mounts the file
//!    system read-write (superblock and journal writes through the device). `/init` writes a
//!    file, syncs, remounts read-only and reboots; the host then reads the file with debugfs
//!    and `e2fsck -fn` must pass as is.
//! 3. `user_space_data_survives_a_reboot_and_a_read_only_disk_refuses_writes`: through the
//!    agent, guest user space writes a file on an ext4 data disk, syncs and powers off; a
//!    second boot reads it back byte for byte, and the host finds it with debugfs, `e2fsck -fn`
//!    clean. A second disk, `readonly=on`, refuses every write from inside the guest and its
//!    image is unchanged.
//!
//! They need the guest kit (`scripts/build-guest.sh`), sfdisk (fdisk) and e2fsprogs
//! (`scripts/setup.sh`). Under PVM (software KVM) each boot takes a minute or so (the kit's
//! kernel completes the system calls PVM leaves in user mode); the tests take a lock so they
//! never boot at the same time.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::linux::{one_boot_at_a_time, sh as guest_sh, sh_ok, Boot as AgentBoot, CMDLINE};
use common::*;

fn kit_dir() -> PathBuf {
    std::env::var_os("PODVMM_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/guest"))
}

fn kit_file(name: &str) -> PathBuf {
    let p = kit_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the guest kit first with scripts/build-guest.sh",
        p.display()
    );
    p
}

fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} is missing: run scripts/setup.sh (packages fdisk, e2fsprogs)");
}

/// Runs a host tool; returns (exit status, stdout + stderr).
fn sh(program: &Path, args: &[&str], stdin: Option<&str>) -> (ExitStatus, String) {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, text)
}

/// A file from the kit's initramfs (newc cpio, uncompressed): the very busybox the kit uses.
fn from_initramfs(name: &str) -> Vec<u8> {
    let cpio = std::fs::read(kit_file("initramfs.cpio")).unwrap();
    let mut at = 0usize;
    let hex = |b: &[u8]| usize::from_str_radix(std::str::from_utf8(b).unwrap(), 16).unwrap();
    while at + 110 <= cpio.len() {
        let h = &cpio[at..at + 110];
        assert_eq!(
            &h[..6],
            b"070701",
            "initramfs.cpio is not an uncompressed newc archive"
        );
        let filesize = hex(&h[54..62]);
        let namesize = hex(&h[94..102]);
        let name_end = at + 110 + namesize;
        let fname = &cpio[at + 110..name_end - 1];
        let data = (name_end + 3) & !3;
        if fname == b"TRAILER!!!" {
            break;
        }
        if fname == name.as_bytes() {
            return cpio[data..data + filesize].to_vec();
        }
        at = (data + filesize + 3) & !3;
    }
    panic!("{name} is not in the kit's initramfs");
}

struct Boot {
    /// None: still running at the deadline (killed).
    status: Option<ExitStatus>,
    console: String,
    stderr: String,
    wall: Duration,
}

impl Boot {
    fn context(&self) -> String {
        let tail: Vec<&str> = self.console.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "podvmm status: {:?} after {:.1} s\npodvmm stderr:\n{}\nconsole tail:\n{}",
            self.status,
            self.wall.as_secs_f64(),
            self.stderr,
            tail.join("\n")
        )
    }

    fn line(&self, needle: &str) -> Option<&str> {
        self.console.lines().find(|l| l.contains(needle))
    }
}

/// Boots the kit's kernel with `args` and waits until podvmm exits (the guest resets) or
/// the deadline passes.
fn boot(dir: &TempDir, args: &[&str], cmdline: &str) -> Boot {
    let log = dir.path("console.log");
    let _ = std::fs::remove_file(&log);
    let serial = format!("file={}", path_str(&log));
    let kernel = kit_file("vmlinux");
    let start = Instant::now();
    let mut child = Command::new(podvmm_bin())
        .args(["--kernel", path_str(&kernel), "--serial", &serial])
        .args(args)
        .args(["--cmdline", cmdline])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start podvmm");
    // Generous: under PVM a boot to the root mount takes minutes when the cores are shared.
    let deadline = Duration::from_secs(
        std::env::var("PODVMM_LINUX_TIMEOUT_S")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(900),
    );
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll podvmm") {
            break Some(status);
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let wall = start.elapsed();
    let out = child.wait_with_output().expect("collect podvmm");
    Boot {
        status,
        console: std::fs::read_to_string(&log).unwrap_or_default(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        wall,
    }
}

#[test]
#[ignore = "boots Linux: minutes under PVM; scripts/test.sh and CI run it with --include-ignored"]
fn linux_probes_the_disk_and_reads_its_partition_table() {
    let _one = one_boot_at_a_time();
    let dir = TempDir::new("linux-blk-part");
    let img = dir.path("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let (st, out) = sh(
        &tool("sfdisk"),
        &["--no-reread", "--no-tell-kernel", "-q", path_str(&img)],
        Some("label: dos\nstart=2048, type=83\n"),
    );
    assert!(st.success(), "sfdisk: {out}");
    let disk = format!("path={},num_queues=2", path_str(&img));
    let b = boot(
        &dir,
        &["--cpus", "boot=2", "--memory", "size=256M", "--disk", &disk],
        "console=ttyS0 reboot=k panic=1 rcupdate.rcu_cpu_stall_suppress=1",
    );
    let ctx = b.context();
    eprintln!(
        "linux-blk: partition test: podvmm ran {:.1} s (wall)",
        b.wall.as_secs_f64()
    );
    let probe = b
        .line("virtio_blk virtio0: [vda] 131072 512-byte logical blocks")
        .unwrap_or_else(|| panic!("no probe line with the right size\n{ctx}"));
    eprintln!("linux-blk: console: {}", probe.trim());
    let queues = b
        .line("virtio_blk virtio0: 2/0/0 default/read/poll queues")
        .unwrap_or_else(|| panic!("the kernel did not use both queues\n{ctx}"));
    eprintln!("linux-blk: console: {}", queues.trim());
    let part = b
        .console
        .lines()
        .find(|l| l.trim_end().ends_with(" vda: vda1"))
        .unwrap_or_else(|| panic!("no ' vda: vda1' partition line\n{ctx}"));
    eprintln!("linux-blk: console: {}", part.trim());
    // No root file system was given: the kernel panics and panic=1 resets the VM.
    let status = b
        .status
        .unwrap_or_else(|| panic!("the guest did not reset\n{ctx}"));
    assert!(status.success(), "podvmm: {status:?}\n{ctx}");
    assert!(
        !b.stderr.contains("invalid request"),
        "the device saw invalid requests\n{ctx}"
    );
}

/// The `/init` the ext4 image carries (the kit's busybox is at /bin/busybox).
const EXT4_INIT: &str = "#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
echo podvmm-blk: init started
echo written-by-the-guest > /podvmm-guest-file
/bin/busybox sync
echo podvmm-blk: synced
/bin/busybox mount -o remount,ro /
echo podvmm-blk: remounted read-only
/bin/busybox reboot -f
";

#[test]
#[ignore = "boots Linux: minutes under PVM; scripts/test.sh and CI run it with --include-ignored"]
fn linux_mounts_an_ext4_root_read_write_and_it_stays_clean() {
    let _one = one_boot_at_a_time();
    let dir = TempDir::new("linux-blk-ext4");
    let root = dir.path("root");
    for d in ["bin", "dev", "proc", "sys"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    use std::os::unix::fs::PermissionsExt;
    let busybox = root.join("bin/busybox");
    std::fs::write(&busybox, from_initramfs("bin/busybox")).unwrap();
    std::fs::set_permissions(&busybox, std::fs::Permissions::from_mode(0o755)).unwrap();
    let init = root.join("init");
    std::fs::write(&init, EXT4_INIT).unwrap();
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755)).unwrap();
    let img = dir.path("root.img");
    // Inode tables and journal zeroed now, so the guest kernel starts no lazy-init thread.
    let (st, out) = sh(
        &tool("mkfs.ext4"),
        &[
            "-q",
            "-F",
            "-L",
            "podvmm-root",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            "-d",
            path_str(&root),
            path_str(&img),
            "64M",
        ],
        None,
    );
    assert!(st.success(), "mkfs.ext4: {out}");
    let dumpe2fs = tool("dumpe2fs");
    let field = |img: &Path, name: &str| -> String {
        let (_, out) = sh(&dumpe2fs, &["-h", path_str(img)], None);
        out.lines()
            .find(|l| l.starts_with(name))
            .map(|l| l[name.len()..].trim().to_string())
            .unwrap_or_default()
    };
    assert_eq!(field(&img, "Mount count:"), "0");
    let e2fsck = tool("e2fsck");

    let disk = format!("path={}", path_str(&img));
    let b = boot(
        &dir,
        &["--cpus", "boot=1", "--memory", "size=256M", "--disk", &disk],
        "console=ttyS0 reboot=k panic=1 rcupdate.rcu_cpu_stall_suppress=1 root=/dev/vda rw rootfstype=ext4 init=/init",
    );
    let ctx = b.context();
    eprintln!(
        "linux-blk: ext4 test: podvmm ran {:.1} s (wall)",
        b.wall.as_secs_f64()
    );
    let mounted = b
        .line("EXT4-fs (vda): mounted filesystem")
        .unwrap_or_else(|| panic!("the kernel did not mount the ext4 root\n{ctx}"));
    eprintln!("linux-blk: console: {}", mounted.trim());
    assert!(
        mounted.contains(" r/w"),
        "not mounted read-write: {mounted}\n{ctx}"
    );
    let vfs = b
        .line("VFS: Mounted root (ext4 filesystem)")
        .unwrap_or_else(|| panic!("no root mount line\n{ctx}"));
    eprintln!("linux-blk: console: {}", vfs.trim());
    let status = b
        .status
        .unwrap_or_else(|| panic!("the guest did not reset\n{ctx}"));
    assert!(status.success(), "podvmm: {status:?}\n{ctx}");
    assert!(
        !b.stderr.contains("invalid request"),
        "the device saw invalid requests\n{ctx}"
    );
    // The kernel's own superblock write reached the file.
    assert_eq!(
        field(&img, "Mount count:"),
        "1",
        "the superblock the kernel wrote at mount is not in the file\n{ctx}"
    );

    if b.console.contains("podvmm-blk: remounted read-only") {
        // User space ran: the file system was cleanly remounted read-only before the reset.
        let (st, out) = sh(&e2fsck, &["-fn", path_str(&img)], None);
        assert!(
            st.success(),
            "e2fsck -fn after a clean remount: {out}\n{ctx}"
        );
        let (_, cat) = sh(
            &tool("debugfs"),
            &["-R", "cat /podvmm-guest-file", path_str(&img)],
            None,
        );
        assert!(
            cat.contains("written-by-the-guest"),
            "the guest's file is not on the disk: {cat}\n{ctx}"
        );
        eprintln!(
            "linux-blk: path: guest user space ran: /init wrote a file, synced, remounted \
             read-only and rebooted; debugfs reads the file back, e2fsck -fn is clean"
        );
    } else {
        panic!("the guest's /init did not run to its end\n{ctx}");
    }
}

/// A deterministic payload of `len` bytes of text lines (the agent carries text).
fn payload(len: usize) -> String {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = String::with_capacity(len + 64);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push_str(&format!("{:08} {x:016x}\n", out.len()));
    }
    out.truncate(len);
    out
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn mkfs_ext4(img: &Path, label: &str, from: Option<&Path>) {
    let mut args = vec![
        "-q",
        "-F",
        "-L",
        label,
        "-E",
        "lazy_itable_init=0,lazy_journal_init=0",
    ];
    if let Some(d) = from {
        args.extend(["-d", path_str(d)]);
    }
    args.extend([path_str(img), "32M"]);
    let (st, out) = sh(&tool("mkfs.ext4"), &args, None);
    assert!(st.success(), "mkfs.ext4: {out}");
}

#[test]
#[ignore = "boots Linux: minutes under PVM; scripts/test.sh and CI run it with --include-ignored"]
fn user_space_data_survives_a_reboot_and_a_read_only_disk_refuses_writes() {
    let _one = one_boot_at_a_time();
    let dir = TempDir::new("linux-blk-user");
    let data_img = dir.path("data.img");
    mkfs_ext4(&data_img, "podvmm-data", None);
    let ro_src = dir.path("ro-src");
    std::fs::create_dir_all(&ro_src).unwrap();
    std::fs::write(ro_src.join("hello"), "from the host\n").unwrap();
    let ro_img = dir.path("ro.img");
    mkfs_ext4(&ro_img, "podvmm-ro", Some(&ro_src));
    let ro_before = sha256_hex(&std::fs::read(&ro_img).unwrap());
    let data = payload(256 << 10);
    let data_sha = sha256_hex(data.as_bytes());
    let disks = [
        "--disk".to_string(),
        format!("path={},id=data", path_str(&data_img)),
        "--disk".to_string(),
        format!("path={},readonly=on,id=ro", path_str(&ro_img)),
    ];
    let disks: Vec<&str> = disks.iter().map(String::as_str).collect();
    let cmdline = format!("{CMDLINE} quiet rdinit=/sbin/podvmm-agent");
    let e2fsck = tool("e2fsck");

    // First boot: write, sync, unmount, power off.
    let mut b = AgentBoot::start(&dir, "write", 1, &disks, &cmdline);
    let mut c = b.agent();
    let ids = sh_ok(
        &mut c,
        &b,
        "for f in vda/serial vdb/serial vda/ro vdb/ro; do cat /sys/block/$f; echo; done",
        None,
    );
    assert_eq!(
        ids.split_whitespace().collect::<Vec<_>>(),
        ["data", "ro", "0", "1"],
        "{ids}"
    );
    let sum = sh_ok(
        &mut c,
        &b,
        "mkdir -p /mnt/data && mount -t ext4 /dev/vda /mnt/data && cat > /mnt/data/file && sync \
         && sha256sum /mnt/data/file",
        Some(&data),
    );
    assert!(
        sum.starts_with(&data_sha),
        "guest's sha256 {sum} vs {data_sha}"
    );
    // The read-only disk: readable, and every way of writing it fails.
    let hello = sh_ok(
        &mut c,
        &b,
        "mkdir -p /mnt/ro && mount -t ext4 -o ro /dev/vdb /mnt/ro && cat /mnt/ro/hello",
        None,
    );
    assert_eq!(hello, "from the host\n");
    let r = guest_sh(&mut c, &b, "echo x > /mnt/ro/new", None);
    assert_ne!(r.exit_code, Some(0), "wrote to a read-only mount: {r:?}");
    let r = guest_sh(&mut c, &b, "mount -o remount,rw /mnt/ro", None);
    assert_ne!(r.exit_code, Some(0), "remounted a read-only disk rw: {r:?}");
    let r = guest_sh(
        &mut c,
        &b,
        "umount /mnt/ro && dd if=/dev/zero of=/dev/vdb bs=4096 count=1 conv=fsync",
        None,
    );
    assert_ne!(
        r.exit_code,
        Some(0),
        "dd wrote to the read-only disk: {r:?}"
    );
    eprintln!("linux-blk: read-only disk: dd said {:?}", r.stderr.trim());
    sh_ok(&mut c, &b, "umount /mnt/data", None);
    b.poweroff(c);
    let (st, out) = sh(&e2fsck, &["-fn", path_str(&data_img)], None);
    assert!(st.success(), "e2fsck -fn after the first boot: {out}");
    let (_, cat) = sh(
        &tool("debugfs"),
        &["-R", "cat /file", path_str(&data_img)],
        None,
    );
    assert!(
        cat.starts_with(&data[..4096]),
        "debugfs does not find the guest's file"
    );
    assert_eq!(
        sha256_hex(&std::fs::read(&ro_img).unwrap()),
        ro_before,
        "the read-only image changed"
    );

    // Second boot: the same bytes come back.
    let mut b = AgentBoot::start(&dir, "read", 1, &disks, &cmdline);
    let mut c = b.agent();
    let back = sh_ok(
        &mut c,
        &b,
        "mkdir -p /mnt/data && mount -t ext4 /dev/vda /mnt/data && cat /mnt/data/file",
        None,
    );
    assert!(
        back == data,
        "read back {} bytes, not the {} written (or different ones)",
        back.len(),
        data.len()
    );
    sh_ok(&mut c, &b, "umount /mnt/data", None);
    b.poweroff(c);
    let (st, out) = sh(&e2fsck, &["-fn", path_str(&data_img)], None);
    assert!(st.success(), "e2fsck -fn after the second boot: {out}");
    assert_eq!(
        sha256_hex(&std::fs::read(&ro_img).unwrap()),
        ro_before,
        "the read-only image changed"
    );
    eprintln!(
        "linux-blk: {} bytes written by guest user space, synced, powered off, read back byte \
         for byte after a reboot; e2fsck -fn clean; the read-only disk refused writes",
        data.len()
    );
}
