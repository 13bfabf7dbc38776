//! What the host must offer a configuration before it is accepted (`vm.create`, `vm.add-*`):
//! the files and sockets it names, and the memory it asks for; each mistake a 400 saying what
//! is wrong. What needs no host (numbers, ids, tags, MACs...) is `api::valid`'s, checked
//! first; and the answer to an add.

use super::*;

/// What can be checked when the configuration arrives, so mistakes are reported by
/// `vm.create` rather than at boot.
pub(super) fn check_config(config: &VmConfig) -> Result<(), ApiError> {
    let valid = config.validated()?;
    crate::memory::check_host_has(valid.memory).map_err(|e| bad(e.to_string()))?;
    crate::BootInputs::open(config).map_err(|e| bad(e.to_string()))?;
    for disk in &valid.disks {
        check_disk(disk)?;
    }
    if let Some(r) = &config.rng {
        check_rng(r)?;
    }
    for fs in &valid.fs {
        check_fs(fs)?;
    }
    Ok(())
}

/// The back-end must be listening already (Kata starts virtiofsd before `vm.create`); it is
/// connected to at `vm.boot`, which fails with the reason if it is no vhost-user back-end.
pub(super) fn check_fs(fs: &ValidFs) -> Result<(), ApiError> {
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

pub(super) fn check_disk(disk: &ValidDisk) -> Result<(), ApiError> {
    // The device's own checks (a regular file or block device of at least one sector, opened
    // without blocking), read-only here: nothing is written or locked before boot.
    let (file, size) = devices::virtio::block::open_checked(&disk.path, false, false)
        .map_err(|e| bad(e.to_string()))?;
    check_image_type(disk, &file, size)
}

/// podvmm serves raw images: other formats are refused by name, and an image of unknown type
/// (Kata's Rust runtime says `Unknown`) is probed and refused if it is not raw.
pub(super) fn check_image_type(
    disk: &ValidDisk,
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
            let id = disks.last().map(|d| d.device_id(i));
            (i, id.unwrap_or_default())
        }
        DeviceKind::Net => {
            let i = nets.len().saturating_sub(1);
            let id = nets.last().map(|n| n.device_id(i));
            (disks.len() + i, id.unwrap_or_default())
        }
        DeviceKind::Vsock => {
            let id = config.vsock.as_ref().map(VsockConfig::device_id);
            (disks.len() + nets.len(), id.unwrap_or_default())
        }
        DeviceKind::Fs => {
            let shares = config.fs.as_deref().unwrap_or_default();
            let i = shares.len().saturating_sub(1);
            let id = shares.last().map(|f| f.device_id(i));
            (
                disks.len() + nets.len() + usize::from(config.vsock.is_some()) + i,
                id.unwrap_or_default(),
            )
        }
    };
    PciDeviceInfo {
        id,
        bdf: format!("0000:00:{:02x}.0", slot & 0xff),
    }
}

/// The device's own check of its source (opened without blocking, a character device or a
/// regular file); the device starts nothing until the guest's driver is up.
pub(super) fn check_rng(r: &api::RngConfig) -> Result<(), ApiError> {
    devices::virtio::rng::Rng::new(&r.src)
        .map(drop)
        .map_err(|e| bad(e.to_string()))
}

/// Refuses descriptors the net device would refuse at boot (not a TAP, opened without the
/// flags it needs, of two interfaces): the device's own check, run when they arrive.
pub(super) fn check_tap(fds: &[OwnedFd]) -> Result<(), ApiError> {
    let raw: Vec<_> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    devices::virtio::net::tap::check_fds(&raw)
        .map(drop)
        .map_err(|e| {
            bad(format!(
                "vm.add-net: descriptor passed with the request: {e}"
            ))
        })
}
