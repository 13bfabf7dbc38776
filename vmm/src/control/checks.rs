//! What a configuration must be before it is accepted (`vm.create`, `vm.add-*`): each
//! mistake a 400 (or a 409) saying what is wrong; and the answer to an add.

use super::*;

/// What can be checked when the configuration arrives, so mistakes are reported by
/// `vm.create` rather than at boot.
pub(super) fn check_config(config: &VmConfig) -> Result<(), ApiError> {
    config.validate().map_err(|e| bad(e.to_string()))?;
    if config.cpus.boot_vcpus > pod::MAX_VCPUS {
        return Err(bad(format!(
            "{} vCPUs requested; podvmm supports at most {}",
            config.cpus.boot_vcpus,
            pod::MAX_VCPUS
        )));
    }
    let size = config.memory.size;
    if size < boot::layout::MIN_MEMORY {
        return Err(bad(format!(
            "memory size {size} bytes is below the minimum of {} MiB",
            boot::layout::MIN_MEMORY >> 20
        )));
    }
    if let Some(host) = crate::host_memory_bytes() {
        if size > host {
            return Err(bad(format!(
                "memory size {} MiB is more than the host has ({} MiB)",
                size >> 20,
                host >> 20
            )));
        }
    }
    crate::BootInputs::open(config).map_err(|e| bad(e.to_string()))?;
    // Unique ids: VmConfig::validate, above.
    for disk in config.disks.iter().flatten() {
        check_disk(disk)?;
    }
    for net in config.net.iter().flatten() {
        check_net(net)?;
    }
    if let Some(v) = &config.vsock {
        check_vsock(v)?;
    }
    if let Some(r) = &config.rng {
        check_rng(r)?;
    }
    for fs in config.fs.iter().flatten() {
        check_fs(fs)?;
    }
    Ok(())
}

/// The back-end must be listening already (Kata starts virtiofsd before `vm.create`); it is
/// connected to at `vm.boot`, which fails with the reason if it is no vhost-user back-end.
pub(super) fn check_fs(fs: &FsConfig) -> Result<(), ApiError> {
    use std::os::unix::fs::FileTypeExt;
    let path = fs.socket.display();
    match std::fs::metadata(&fs.socket) {
        Ok(m) if m.file_type().is_socket() => Ok(()),
        Ok(_) => Err(bad(format!(
            "fs {}: {path} is not a Unix socket (the vhost-user back-end's, e.g. virtiofsd \
             --socket-path)",
            fs.tag
        ))),
        Err(e) => Err(bad(format!(
            "fs {}: socket {path}: {e} (start the vhost-user back-end, e.g. virtiofsd, first)",
            fs.tag
        ))),
    }
}

pub(super) fn check_disk(disk: &DiskConfig) -> Result<(), ApiError> {
    let path = disk.path.display();
    // The device's own checks (a regular file or block device of at least one sector, opened
    // without blocking), read-only here: nothing is written or locked before boot.
    let (file, size) = devices::virtio::block::open_checked(&disk.path, false, false)
        .map_err(|e| bad(e.to_string()))?;
    check_image_type(disk, &file, size)?;
    if disk.num_queues == 0 || disk.num_queues > 64 {
        return Err(bad(format!(
            "disk {path}: num_queues must be 1 to 64, not {}",
            disk.num_queues
        )));
    }
    if !disk.queue_size.is_power_of_two() {
        return Err(bad(format!(
            "disk {path}: queue_size must be a power of two, not {}",
            disk.queue_size
        )));
    }
    Ok(())
}

/// podvmm serves raw images: other formats are refused by name, and an image of unknown type
/// (Kata's Rust runtime says `Unknown`) is probed and refused if it is not raw.
pub(super) fn check_image_type(
    disk: &DiskConfig,
    file: &std::fs::File,
    size: u64,
) -> Result<(), ApiError> {
    let path = disk.path.display();
    match disk.image_type {
        ImageType::Raw => Ok(()),
        ImageType::Qcow2 | ImageType::FixedVhd | ImageType::Vhdx => Err(bad(format!(
            "disk {path}: image_type {:?} is not supported: podvmm serves raw images only",
            disk.image_type
        ))),
        ImageType::Unknown => match image::probe(file, size) {
            Ok(ImageFormat::Raw) => Ok(()),
            Ok(other) => Err(bad(format!(
                "disk {path}: the image is {} (probed, image_type Unknown): podvmm serves raw \
                 images only",
                other.name()
            ))),
            Err(e) => Err(bad(format!("disk {path}: probing its format: {e}"))),
        },
    }
}

#[derive(Clone, Copy)]
pub(super) enum DeviceKind {
    Disk,
    Net,
    Vsock,
    Fs,
}

/// The answer to an add: the last device of `kind` in `config`, its id (the default one if
/// none was given, as the device manager names it) and its virtio-mmio slot, in the order the
/// device manager wires devices (disks, then nets, then vsock, then shares).
pub(super) fn device_info(config: &VmConfig, kind: DeviceKind) -> PciDeviceInfo {
    let disks = config.disks.as_deref().unwrap_or_default();
    let nets = config.net.as_deref().unwrap_or_default();
    let (slot, id) = match kind {
        DeviceKind::Disk => {
            let i = disks.len().saturating_sub(1);
            let id = disks.last().and_then(|d| d.id.clone());
            (i, id.unwrap_or_else(|| format!("disk{i}")))
        }
        DeviceKind::Net => {
            let i = nets.len().saturating_sub(1);
            let id = nets.last().and_then(|n| n.id.clone());
            (disks.len() + i, id.unwrap_or_else(|| format!("net{i}")))
        }
        DeviceKind::Vsock => {
            let id = config.vsock.as_ref().and_then(|v| v.id.clone());
            (
                disks.len() + nets.len(),
                id.unwrap_or_else(|| "vsock".into()),
            )
        }
        DeviceKind::Fs => {
            let shares = config.fs.as_deref().unwrap_or_default();
            let i = shares.len().saturating_sub(1);
            let id = shares.last().and_then(|f| f.id.clone());
            (
                disks.len() + nets.len() + usize::from(config.vsock.is_some()) + i,
                id.unwrap_or_else(|| format!("fs{i}")),
            )
        }
    };
    PciDeviceInfo {
        id,
        bdf: format!("0000:00:{:02x}.0", slot & 0xff),
    }
}

pub(super) fn check_net(net: &NetConfig) -> Result<(), ApiError> {
    if let Some(mac) = &net.mac {
        api::parse_mac(mac).map_err(|e| bad(format!("net mac {mac}: {e}")))?;
    }
    if net.num_queues == 0 || !net.num_queues.is_multiple_of(2) {
        return Err(bad(format!(
            "net num_queues must be a positive even number (a receive and a transmit queue per pair), not {}",
            net.num_queues
        )));
    }
    if !net.queue_size.is_power_of_two() {
        return Err(bad(format!(
            "net queue_size must be a power of two, not {}",
            net.queue_size
        )));
    }
    Ok(())
}

pub(super) fn check_vsock(v: &VsockConfig) -> Result<(), ApiError> {
    if v.cid < 3 || v.cid == u32::MAX {
        return Err(bad(format!(
            "vsock cid {} is reserved (0-2 and 4294967295 are)",
            v.cid
        )));
    }
    if v.socket.as_os_str().is_empty() {
        return Err(bad("vsock socket path is empty"));
    }
    v.validate().map_err(bad)
}

/// The device's own check of its source (opened without blocking, a character device or a
/// regular file); the device starts nothing until the guest's driver is up.
pub(super) fn check_rng(r: &api::RngConfig) -> Result<(), ApiError> {
    devices::virtio::rng::Rng::new(&r.src)
        .map(drop)
        .map_err(|e| bad(e.to_string()))
}

pub(super) fn check_unique_id(config: &VmConfig, id: Option<&str>) -> Result<(), ApiError> {
    let Some(id) = id else {
        return Ok(());
    };
    if config.device_ids().any(|used| used == id) {
        return Err(conflict(format!("device id {id} is already in use")));
    }
    Ok(())
}

/// Refuses a descriptor that is not a TAP device (TUNGETIFF answers only on a tun/tap fd).
pub(super) fn check_tap(fd: &OwnedFd) -> Result<(), ApiError> {
    const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
    const IFF_TAP: libc::c_short = 0x0002;
    // struct ifreq: a 16-byte name, then a union whose first member is the flags.
    let mut ifreq = [0u8; 40];
    // SAFETY: TUNGETIFF writes at most a struct ifreq (40 bytes) into the buffer given.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNGETIFF, ifreq.as_mut_ptr()) };
    if rc < 0 {
        return Err(bad(format!(
            "vm.add-net: descriptor passed with the request is not a TAP device ({})",
            io::Error::last_os_error()
        )));
    }
    let flags = libc::c_short::from_ne_bytes([ifreq[16], ifreq[17]]);
    if flags & IFF_TAP == 0 {
        return Err(bad(
            "vm.add-net: descriptor passed with the request is a TUN device, not a TAP device",
        ));
    }
    Ok(())
}
