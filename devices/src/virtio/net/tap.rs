//! The host end of a virtio-net device: a TAP interface, or anything that carries whole
//! frames behind a file descriptor (a socketpair in tests).
//!
//! A TAP is opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (and `IFF_MULTI_QUEUE` for more
//! than one queue pair): every frame read or written starts with the 12-byte virtio 1.x
//! `virtio_net_hdr_v1` (`TUNSETVNETHDRSZ`), so checksum and segmentation offloads pass
//! between the guest and the host stack untouched. A TAP that podvmm creates is not
//! persistent: it disappears with the last descriptor, so a failure half way leaves nothing.

use std::fs::{File, OpenOptions};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};

use vm_memory::VolatileSlice;

/// The virtio 1.x header size (`virtio_net_hdr_v1`, with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;
/// `readv`/`writev` take at most this many buffers (UIO_MAXIOV).
pub const MAX_IOVECS: usize = 1024;

/// Interface names: at most 15 bytes (IFNAMSIZ - 1).
const MAX_NAME: usize = libc::IFNAMSIZ - 1;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP name '{name}': {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("cannot open /dev/net/tun: {0} (is the tun module loaded?)")]
    OpenTun(#[source] io::Error),
    #[error("TAP {name}: cannot open or create it: {source}{hint}")]
    Attach {
        name: String,
        hint: String,
        #[source]
        source: io::Error,
    },
    #[error("fd {fd} is not a TAP device (TUNGETIFF: {source})")]
    NotATap {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("fd {fd} ({name}) is not usable: {what}")]
    WrongFlags {
        fd: RawFd,
        name: String,
        what: &'static str,
    },
    #[error("TAP fds belong to different interfaces ({0} and {1})")]
    MixedInterfaces(String, String),
    #[error("fd {fd}: cannot duplicate it: {source}")]
    Dup {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("TAP {name}: {what}: {source}")]
    Ioctl {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// What a virtio-net queue pair needs from its host end. Reads and writes carry one whole
/// frame each, header included, scattered over `bufs` (at most [`MAX_IOVECS`]).
pub trait NetBackend: Send + Sync {
    fn fd(&self) -> RawFd;

    /// Reads one frame; `WouldBlock` when none is waiting. Returns the bytes read: a frame
    /// longer than the buffers is cut to them (as a TAP does).
    fn read_frame(&self, bufs: &[VolatileSlice<'_>]) -> io::Result<usize> {
        with_iovecs(bufs, |iov| {
            // SAFETY: each iovec describes a live VolatileSlice (guest memory mapped for the
            // VM's lifetime, or a local buffer) valid for writes of its length; the count is
            // bounded by MAX_IOVECS.
            let n = unsafe { libc::readv(self.fd(), iov.as_ptr(), iov.len() as libc::c_int) };
            usize::try_from(n).map_err(|_| io::Error::last_os_error())
        })
    }

    /// Writes one frame.
    fn write_frame(&self, bufs: &[VolatileSlice<'_>]) -> io::Result<usize> {
        with_iovecs(bufs, |iov| {
            // SAFETY: each iovec describes a live VolatileSlice valid for reads of its length.
            let n = unsafe { libc::writev(self.fd(), iov.as_ptr(), iov.len() as libc::c_int) };
            usize::try_from(n).map_err(|_| io::Error::last_os_error())
        })
    }

    /// Which offloads the host may use towards the guest (`TUN_F_*`).
    fn set_offload(&self, _flags: u32) -> io::Result<()> {
        Ok(())
    }

    /// Attaches or detaches this queue of a multi-queue TAP (`TUNSETQUEUE`), so that the
    /// host stops handing frames to a queue the guest does not use.
    fn set_queue_enabled(&self, _enabled: bool) -> io::Result<()> {
        Ok(())
    }
}

/// Calls `f` with `bufs` as iovecs (at most [`MAX_IOVECS`]), on the stack when they are few.
fn with_iovecs<R>(bufs: &[VolatileSlice<'_>], f: impl FnOnce(&[libc::iovec]) -> R) -> R {
    const ON_STACK: usize = 8;
    let iovec = |s: &VolatileSlice<'_>| libc::iovec {
        iov_base: s.ptr_guard_mut().as_ptr().cast(),
        iov_len: s.len(),
    };
    let bufs = &bufs[..bufs.len().min(MAX_IOVECS)];
    if bufs.len() <= ON_STACK {
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; ON_STACK];
        for (d, s) in iov.iter_mut().zip(bufs) {
            *d = iovec(s);
        }
        f(&iov[..bufs.len()])
    } else {
        let iov: Vec<libc::iovec> = bufs.iter().map(iovec).collect();
        f(&iov)
    }
}

/// One queue of a TAP interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    multi_queue: bool,
    attached: AtomicBool,
}

fn ifreq_with_name(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes().take(MAX_NAME)) {
        *d = s as libc::c_char;
    }
    req
}

fn name_of(req: &libc::ifreq) -> String {
    let bytes: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// What the device needs of TAP descriptors a client hands over (the VMM checks them with
/// this when they arrive, `vm.add-net`, and the device when it takes them): each a TAP, not a
/// TUN, opened with IFF_NO_PI and IFF_VNET_HDR, multi-queue when there are several, all of one
/// interface. Returns each one's interface name and whether it is multi-queue.
pub fn check_fds(fds: &[RawFd]) -> Result<Vec<(String, bool)>, TapError> {
    let mut checked: Vec<(String, bool)> = Vec::with_capacity(fds.len());
    for &fd in fds {
        let (name, flags) = tun_get_iff(fd)?;
        let wrong = |what| TapError::WrongFlags {
            fd,
            name: name.clone(),
            what,
        };
        if flags & libc::IFF_TAP == 0 {
            return Err(wrong("it is a TUN (layer 3) device, not a TAP"));
        }
        if flags & libc::IFF_NO_PI == 0 {
            return Err(wrong("it was opened without IFF_NO_PI"));
        }
        if flags & libc::IFF_VNET_HDR == 0 {
            return Err(wrong("it was opened without IFF_VNET_HDR"));
        }
        let multi_queue = flags & libc::IFF_MULTI_QUEUE != 0;
        if fds.len() > 1 && !multi_queue {
            return Err(wrong("several fds given but the TAP is not multi-queue"));
        }
        if let Some((first, _)) = checked.first() {
            if *first != name {
                return Err(TapError::MixedInterfaces(first.clone(), name));
            }
        }
        checked.push((name, multi_queue));
    }
    Ok(checked)
}

/// Checks a name the kernel would accept for an interface (`dev_valid_name`); `%d` asks the
/// kernel to pick a free number.
pub fn check_name(name: &str) -> Result<(), TapError> {
    let bad = |reason| {
        Err(TapError::BadName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME {
        return bad("longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return bad("not a valid interface name");
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0 || !b.is_ascii())
    {
        return bad("interface names cannot contain '/', ':', spaces or non-ASCII bytes");
    }
    Ok(())
}

/// What an existing interface is, asked in the caller's network namespace.
#[derive(Debug, PartialEq, Eq)]
enum Existing {
    Missing,
    Tun,
    Tap,
    Other,
}

fn existing_kind(name: &str) -> Existing {
    // SAFETY: a plain socket(2) call; the result is checked.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Existing::Other;
    }
    // SAFETY: `sock` is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    // struct ethtool_drvinfo: cmd (u32), then driver[32], ...; 196 bytes in all.
    const ETHTOOL_GDRVINFO: u32 = 3;
    let mut drvinfo = [0u8; 196];
    drvinfo[..4].copy_from_slice(&ETHTOOL_GDRVINFO.to_ne_bytes());
    let mut req = ifreq_with_name(name);
    req.ifr_ifru.ifru_data = drvinfo.as_mut_ptr().cast();
    // SAFETY: SIOCETHTOOL reads the command from, and writes at most 196 bytes into, the
    // buffer `ifru_data` points to, which lives across the call.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut req) };
    if ret < 0 {
        return match io::Error::last_os_error().raw_os_error() {
            Some(libc::ENODEV) => Existing::Missing,
            _ => Existing::Other,
        };
    }
    let driver: Vec<u8> = drvinfo[4..36]
        .iter()
        .copied()
        .take_while(|&b| b != 0)
        .collect();
    if driver != b"tun" {
        return Existing::Other;
    }
    let mut req = ifreq_with_name(name);
    // SAFETY: SIOCGIFHWADDR fills the ifreq we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } < 0 {
        return Existing::Other;
    }
    // SAFETY: SIOCGIFHWADDR wrote ifru_hwaddr.
    let family = unsafe { req.ifr_ifru.ifru_hwaddr.sa_family };
    if family == libc::ARPHRD_NONE {
        Existing::Tun
    } else {
        Existing::Tap
    }
}

/// Why TUNSETIFF refused `name`, in words.
fn attach_hint(name: &str, err: &io::Error) -> String {
    match err.raw_os_error() {
        Some(libc::EPERM) => " (needs CAP_NET_ADMIN, or a TAP owned by this user)".into(),
        Some(libc::EBUSY) => " (it is in use by another process)".into(),
        Some(libc::EINVAL) => match existing_kind(name) {
            Existing::Other => {
                " (an interface of that name exists and is not a TUN/TAP device)".into()
            }
            Existing::Tun => " (it is a TUN device, not a TAP)".into(),
            Existing::Tap => " (its multi-queue setting differs from the one asked for)".into(),
            Existing::Missing => String::new(),
        },
        _ => String::new(),
    }
}

fn ioctl_err<'a>(name: &'a str, what: &'static str) -> impl FnOnce(io::Error) -> TapError + 'a {
    move |source| TapError::Ioctl {
        name: name.to_string(),
        what,
        source,
    }
}

impl Tap {
    /// Opens (creating it if needed) `queues` queues of the TAP `name`.
    pub fn open_named(name: &str, queues: u16) -> Result<Vec<Tap>, TapError> {
        check_name(name)?;
        let first = Tap::open_queue(name, queues > 1);
        // A single queue may still attach to a TAP created multi-queue (Kata creates them so).
        let first = match first {
            Err(TapError::Attach { ref source, .. })
                if queues == 1 && source.raw_os_error() == Some(libc::EINVAL) =>
            {
                Tap::open_queue(name, true).or(first)
            }
            other => other,
        }?;
        // The kernel fills in `%d`; the other queues attach to that very interface.
        let actual = first.name.clone();
        let multi = first.multi_queue;
        let mut taps = vec![first];
        for _ in 1..queues {
            taps.push(Tap::open_queue(&actual, multi)?);
        }
        Ok(taps)
    }

    fn open_queue(name: &str, multi_queue: bool) -> Result<Tap, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = ifreq_with_name(name);
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        req.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF reads and updates the ifreq we own, on our own descriptor.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if ret < 0 {
            let source = io::Error::last_os_error();
            return Err(TapError::Attach {
                name: name.to_string(),
                hint: attach_hint(name, &source),
                source,
            });
        }
        let tap = Tap {
            file,
            name: name_of(&req),
            multi_queue,
            attached: AtomicBool::new(true),
        };
        tap.set_vnet_hdr_size()?;
        Ok(tap)
    }

    /// Uses TAP descriptors handed over by a client (SCM_RIGHTS), checked by [`check_fds`].
    /// Each is duplicated: the caller keeps, and closes, its own.
    pub fn from_fds(fds: &[RawFd]) -> Result<Vec<Tap>, TapError> {
        let checked = check_fds(fds)?;
        let mut taps: Vec<Tap> = Vec::with_capacity(fds.len());
        for (&fd, (name, multi_queue)) in fds.iter().zip(checked) {
            // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor the caller vouches for; the
            // result is checked before use.
            let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
            if dup < 0 {
                return Err(TapError::Dup {
                    fd,
                    source: io::Error::last_os_error(),
                });
            }
            // SAFETY: `dup` is a fresh descriptor nobody else owns.
            let file = File::from(unsafe { OwnedFd::from_raw_fd(dup) });
            set_nonblocking(&file).map_err(ioctl_err(&name, "setting O_NONBLOCK"))?;
            let tap = Tap {
                file,
                name,
                multi_queue,
                attached: AtomicBool::new(true),
            };
            tap.set_vnet_hdr_size()?;
            taps.push(tap);
        }
        Ok(taps)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn is_multi_queue(&self) -> bool {
        self.multi_queue
    }

    fn set_vnet_hdr_size(&self) -> Result<(), TapError> {
        let size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer we pass.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) };
        if ret < 0 {
            return Err(ioctl_err(&self.name, "setting the vnet header size")(
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Gives the interface on the host side an address and netmask, and brings it up.
    /// On failure the address is removed again.
    pub fn configure_host(&self, ip: Ipv4Addr, mask: Ipv4Addr) -> Result<(), TapError> {
        let name = self.name.as_str();
        // SAFETY: a plain socket(2) call; the result is checked.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            return Err(ioctl_err(name, "opening a socket")(
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: `sock` is a fresh descriptor nobody else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(sock) };
        let set_addr = |req: libc::c_ulong, addr: Ipv4Addr| -> io::Result<()> {
            let mut ifr = ifreq_with_name(name);
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from(addr).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in the sockaddr inside the union (both 16 bytes);
            // we write it through a pointer to the union field we own.
            unsafe {
                std::ptr::write_unaligned(
                    std::ptr::addr_of_mut!(ifr.ifr_ifru.ifru_addr).cast::<libc::sockaddr_in>(),
                    sin,
                )
            };
            // SAFETY: SIOCSIFADDR/SIOCSIFNETMASK read the ifreq we own.
            let ret = unsafe { libc::ioctl(sock.as_raw_fd(), req, &ifr) };
            if ret < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        };
        set_addr(libc::SIOCSIFADDR, ip).map_err(ioctl_err(name, "setting its address"))?;
        let rest = set_addr(libc::SIOCSIFNETMASK, mask)
            .map_err(ioctl_err(name, "setting its netmask"))
            .and_then(|()| self.bring_up(&sock));
        if rest.is_err() {
            let _ = set_addr(libc::SIOCSIFADDR, Ipv4Addr::UNSPECIFIED);
        }
        rest
    }

    fn bring_up(&self, sock: &OwnedFd) -> Result<(), TapError> {
        let mut ifr = ifreq_with_name(&self.name);
        let err = ioctl_err(&self.name, "bringing it up");
        // SAFETY: SIOCGIFFLAGS fills the ifreq we own.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        // SAFETY: SIOCGIFFLAGS just wrote ifru_flags.
        let flags = unsafe { ifr.ifr_ifru.ifru_flags };
        ifr.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        // SAFETY: SIOCSIFFLAGS reads the ifreq we own.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) } < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        Ok(())
    }
}

fn set_nonblocking(file: &File) -> io::Result<()> {
    // SAFETY: fcntl on our own descriptor.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The interface name and `IFF_*` flags of a TUN/TAP descriptor.
fn tun_get_iff(fd: RawFd) -> Result<(String, libc::c_int), TapError> {
    let mut req = ifreq_with_name("");
    // SAFETY: TUNGETIFF fills the ifreq we own; on a descriptor that is not a TUN/TAP (or not
    // open) the kernel refuses without touching memory.
    let ret = unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut req) };
    if ret < 0 {
        return Err(TapError::NotATap {
            fd,
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: TUNGETIFF wrote ifru_flags.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    Ok((name_of(&req), libc::c_int::from(flags) & 0xffff))
}

impl NetBackend for Tap {
    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn set_queue_enabled(&self, enabled: bool) -> io::Result<()> {
        if !self.multi_queue || self.attached.load(Ordering::SeqCst) == enabled {
            return Ok(());
        }
        let mut req = ifreq_with_name("");
        let flag = if enabled {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        req.ifr_ifru.ifru_flags = flag as libc::c_short;
        // SAFETY: TUNSETQUEUE reads the ifreq we own.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETQUEUE, &req) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        self.attached.store(enabled, Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("tap0").is_ok());
        assert!(check_name("vmtap%d").is_ok());
        for bad in ["", "abcdefghijklmnop", "a/b", "a b", "a:1", ".", ".."] {
            let e = check_name(bad).unwrap_err();
            assert!(e.to_string().contains("TAP name"), "{e}");
        }
    }

    #[test]
    fn a_file_is_not_a_tap() {
        let f = File::open("/dev/null").unwrap();
        let e = Tap::from_fds(&[f.as_raw_fd()]).unwrap_err();
        assert!(matches!(e, TapError::NotATap { .. }), "{e}");
        assert!(e.to_string().contains("is not a TAP"), "{e}");
        let e = Tap::from_fds(&[12345]).unwrap_err();
        assert!(matches!(e, TapError::NotATap { .. }), "{e}");
    }
}
