//! The host side of hybrid vsock: the Unix socket the VMM listens on, the `CONNECT <port>`
//! line a host client sends first, and the `PATH_<port>` sockets guest-initiated connections
//! are forwarded to.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Longest `CONNECT` line accepted, newline included.
pub const MAX_CONNECT_LINE: usize = 64;
/// `VMADDR_PORT_ANY`: never a destination.
pub const PORT_ANY: u32 = u32::MAX;
/// Longest socket path `sockaddr_un` holds (108 bytes with the terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum HybridError {
    #[error("expected 'CONNECT <port>', got {0:?}")]
    Malformed(String),
    #[error("port {0} is out of range: 0 to 4294967294 (4294967295 is VMADDR_PORT_ANY)")]
    PortRange(String),
    #[error("no newline within {MAX_CONNECT_LINE} bytes")]
    LineTooLong,
    #[error(
        "vsock socket {path}: longer than the {MAX_SOCKET_PATH} bytes a Unix socket path may have"
    )]
    PathTooLong { path: PathBuf },
    #[error(
        "vsock socket {path}: in use, a process is listening on it (stop it or pick another path)"
    )]
    InUse { path: PathBuf },
    #[error("vsock socket {path}: exists and is not a socket; not replacing it")]
    NotASocket { path: PathBuf },
    #[error("vsock socket {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Parses one `CONNECT <port>` line (without its `\n`). `CONNECT` is matched without regard to
/// case (Firecracker and Cloud Hypervisor accept `connect` too), surrounding blanks and a
/// trailing `\r` are ignored; the port is decimal.
pub fn parse_connect_line(line: &[u8]) -> Result<u32, HybridError> {
    let shown = || String::from_utf8_lossy(line).into_owned();
    let text = std::str::from_utf8(line).map_err(|_| HybridError::Malformed(shown()))?;
    let text = text.trim_matches(|c: char| c == ' ' || c == '\t' || c == '\r');
    let (word, rest) = text
        .split_once([' ', '\t'])
        .ok_or_else(|| HybridError::Malformed(shown()))?;
    if !word.eq_ignore_ascii_case("CONNECT") {
        return Err(HybridError::Malformed(shown()));
    }
    let port = rest.trim_start_matches([' ', '\t']);
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HybridError::Malformed(shown()));
    }
    match port.parse::<u32>() {
        Ok(p) if p != PORT_ANY => Ok(p),
        _ => Err(HybridError::PortRange(port.to_string())),
    }
}

/// Where a guest connection to host port `port` goes: `<socket>_<port>`.
pub fn port_path(socket: &Path, port: u32) -> PathBuf {
    let mut s = socket.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Identity of the socket file we bound, so that clean-up never removes someone else's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketId {
    dev: u64,
    ino: u64,
}

/// Binds the listening socket at `path`.
///
/// A path that already exists is handled so that a VMM restarted after a crash just works and
/// a running one is never disturbed: a socket with a live listener (a connect succeeds) is
/// refused with [`HybridError::InUse`]; a stale socket (connect is refused: its listener is
/// gone) is removed and bound again; anything that is not a socket is refused.
pub fn bind_listener(path: &Path) -> Result<(UnixListener, SocketId), HybridError> {
    let io = |what| {
        move |source| HybridError::Io {
            path: path.to_owned(),
            what,
            source,
        }
    };
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(HybridError::PathTooLong {
            path: path.to_owned(),
        });
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(HybridError::InUse {
                    path: path.to_owned(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(io("removing the stale socket"))?;
            }
            Err(e) => return Err(io("probing the existing socket")(e)),
        },
        Ok(_) => {
            return Err(HybridError::NotASocket {
                path: path.to_owned(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("inspecting the path")(e)),
    }
    let listener = bind_private(path).map_err(io("binding"))?;
    listener
        .set_nonblocking(true)
        .map_err(io("setting O_NONBLOCK"))?;
    let meta = std::fs::symlink_metadata(path).map_err(io("inspecting the bound socket"))?;
    Ok((
        listener,
        SocketId {
            dev: meta.dev(),
            ino: meta.ino(),
        },
    ))
}

/// Binds a listening Unix socket at `path` with mode 0600 whatever the umask: the socket's own
/// mode is set before `bind`, which gives the file that mode, so the guest's host-side door is
/// never open to other users, not even for a moment.
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::other(
            "the path does not fit a Unix socket address",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket creation; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: fchmod, bind and listen on the descriptor we own, with a valid address and size.
    unsafe {
        if libc::fchmod(fd.as_raw_fd(), 0o600) < 0
            || libc::bind(
                fd.as_raw_fd(),
                std::ptr::addr_of!(addr).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            ) < 0
            || libc::listen(fd.as_raw_fd(), 128) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(UnixListener::from(fd))
}

/// Removes the socket at `path` if it is still the one identified by `id`.
pub fn remove_if_ours(path: &Path, id: SocketId) {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.dev() == id.dev && meta.ino() == id.ino {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Connects to the Unix socket at `path` without ever blocking: a listener whose backlog is
/// full answers `EAGAIN` instead of stalling the caller.
pub fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a usable Unix socket path",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un and `len` does not exceed its size.
    let rc = unsafe {
        libc::connect(
            fd,
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect_line(b"CONNECT 1024").unwrap(), 1024);
        assert_eq!(parse_connect_line(b"connect 52\r").unwrap(), 52);
        assert_eq!(parse_connect_line(b"  CONNECT \t 0 ").unwrap(), 0);
        assert_eq!(
            parse_connect_line(b"CONNECT 4294967294").unwrap(),
            u32::MAX - 1
        );
        for bad in [
            &b""[..],
            b"CONNECT",
            b"CONNECT ",
            b"CONNECTX 1",
            b"CONNECT -1",
            b"CONNECT +5",
            b"CONNECT 12a",
            b"CONNECT 1 2",
            b"OK 5",
            b"CONNECT \xff",
        ] {
            assert!(
                matches!(parse_connect_line(bad), Err(HybridError::Malformed(_))),
                "{bad:?}"
            );
        }
        for range in [
            &b"CONNECT 4294967295"[..],
            b"CONNECT 4294967296",
            b"CONNECT 99999999999999999999",
        ] {
            assert!(
                matches!(parse_connect_line(range), Err(HybridError::PortRange(_))),
                "{range:?}"
            );
        }
    }

    #[test]
    fn port_paths() {
        assert_eq!(
            port_path(Path::new("/run/v.sock"), 1025),
            PathBuf::from("/run/v.sock_1025")
        );
    }

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("podvmm-hybrid-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn existing_paths() {
        let d = scratch("bind");
        let p = d.join("v.sock");
        let (live, _id) = bind_listener(&p).unwrap();
        // A live listener is never replaced.
        assert!(matches!(bind_listener(&p), Err(HybridError::InUse { .. })));
        drop(live);
        // The file stays behind, stale: it is replaced.
        assert!(p.exists());
        let (_again, id2) = bind_listener(&p).unwrap();
        // Another file put in its place is not ours: left alone.
        let q = d.join("other");
        std::fs::write(&q, b"x").unwrap();
        remove_if_ours(&q, id2);
        assert!(q.exists());
        remove_if_ours(&p, id2);
        assert!(!p.exists());
        // A regular file is never removed.
        std::fs::write(&p, b"data").unwrap();
        assert!(matches!(
            bind_listener(&p),
            Err(HybridError::NotASocket { .. })
        ));
        assert_eq!(std::fs::read(&p).unwrap(), b"data");
        let long = d.join("x".repeat(200));
        assert!(matches!(
            bind_listener(&long),
            Err(HybridError::PathTooLong { .. })
        ));
        let missing_dir = d.join("no/such/dir/v.sock");
        let e = bind_listener(&missing_dir).unwrap_err().to_string();
        assert!(e.contains("binding"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn nonblocking_connect() {
        let d = scratch("connect");
        let p = d.join("s");
        assert!(connect_nonblocking(&p).is_err());
        let l = UnixListener::bind(&p).unwrap();
        let s = connect_nonblocking(&p).unwrap();
        let (_peer, _) = l.accept().unwrap();
        drop(s);
        assert!(connect_nonblocking(Path::new("")).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }
}
