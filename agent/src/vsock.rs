//! AF_VSOCK sockets through libc (std has none): the agent's listener, its streams, and the
//! ready announcement. Plus the [`Listener`]/[`Stream`] traits the server is written against,
//! so tests run it over Unix sockets.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("vsock socket: {0} (does the VM have a virtio-vsock device?)")]
    Socket(#[source] std::io::Error),
    #[error("binding vsock port {port}: {source}")]
    Bind {
        port: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("listening on vsock port {port}: {source}")]
    Listen {
        port: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to vsock {cid}:{port}: {source}")]
    Connect {
        cid: u32,
        port: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("announcing readiness to host port {port}: {source}")]
    Announce {
        port: u32,
        #[source]
        source: std::io::Error,
    },
}

/// A connected byte stream the server can answer on.
pub trait Stream: Read + Write + Send + 'static {
    /// No more writes (the peer reads EOF).
    fn shutdown_write(&self) -> std::io::Result<()>;
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
}

/// Where connections come from.
pub trait Listener: Send + 'static {
    type Stream: Stream;
    fn accept(&self) -> std::io::Result<Self::Stream>;
}

impl Stream for UnixStream {
    fn shutdown_write(&self) -> std::io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_read_timeout(self, t)
    }
}

impl Listener for UnixListener {
    type Stream = UnixStream;
    fn accept(&self) -> std::io::Result<UnixStream> {
        UnixListener::accept(self).map(|(s, _)| s)
    }
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all zeroes is valid.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

fn vsock_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

const ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

/// A vsock stream socket.
pub struct VsockStream(OwnedFd);

impl VsockStream {
    /// Connects to `port` of context `cid` (the host is [`crate::protocol::HOST_CID`]); with
    /// podvmm's hybrid vsock, host port N is the Unix socket `<socket>_N`.
    pub fn connect(cid: u32, port: u32) -> Result<Self, VsockError> {
        let fd = vsock_socket().map_err(VsockError::Socket)?;
        let addr = vsock_addr(cid, port);
        loop {
            // SAFETY: `addr` is a valid sockaddr_vm of ADDR_LEN bytes.
            let rc =
                unsafe { libc::connect(fd.as_raw_fd(), std::ptr::addr_of!(addr).cast(), ADDR_LEN) };
            if rc == 0 {
                return Ok(VsockStream(fd));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(VsockError::Connect {
                    cid,
                    port,
                    source: e,
                });
            }
        }
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // SAFETY: `buf` is valid and writable for its length; the descriptor is ours.
        let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // SAFETY: `buf` is valid for its length; the descriptor is ours.
        let n = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Stream for VsockStream {
    fn shutdown_write(&self) -> std::io::Result<()> {
        // SAFETY: shutdown(2) on our own descriptor.
        if unsafe { libc::shutdown(self.0.as_raw_fd(), libc::SHUT_WR) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        let t = t.unwrap_or_default();
        let tv = libc::timeval {
            tv_sec: t.as_secs() as libc::time_t,
            tv_usec: t.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: `tv` is a valid timeval for SO_RCVTIMEO, with its size.
        let rc = unsafe {
            libc::setsockopt(
                self.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::addr_of!(tv).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The console (stdin and stdout) as a stream: `podvmm-agent --console` serves the protocol
/// there too, for debugging a guest without vsock (QEMU's TCG oracle, `tests/cli/agent_qemu.rs`).
#[derive(Default)]
pub struct ConsoleStream {
    /// Read timeout in milliseconds; 0 for none.
    timeout_ms: std::sync::atomic::AtomicU64,
}

impl Read for ConsoleStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let ms = self.timeout_ms.load(std::sync::atomic::Ordering::Relaxed);
        if ms > 0 {
            let mut pfd = libc::pollfd {
                fd: libc::STDIN_FILENO,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, ms.min(i32::MAX as u64) as i32) };
            if n == 0 {
                return Err(std::io::ErrorKind::TimedOut.into());
            }
        }
        // SAFETY: `buf` is valid and writable for its length.
        let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl Write for ConsoleStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // SAFETY: `buf` is valid for its length.
        let n = unsafe { libc::write(libc::STDOUT_FILENO, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Stream for ConsoleStream {
    fn shutdown_write(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        let ms = t.map_or(0, |d| d.as_millis().max(1) as u64);
        self.timeout_ms
            .store(ms, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// Listens on a vsock port, any local context id.
pub struct VsockListener(OwnedFd);

impl VsockListener {
    pub fn bind(port: u32) -> Result<Self, VsockError> {
        let fd = vsock_socket().map_err(VsockError::Socket)?;
        let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
        // SAFETY: `addr` is a valid sockaddr_vm of ADDR_LEN bytes.
        let rc = unsafe { libc::bind(fd.as_raw_fd(), std::ptr::addr_of!(addr).cast(), ADDR_LEN) };
        if rc != 0 {
            return Err(VsockError::Bind {
                port,
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: listen(2) on our own bound socket.
        if unsafe { libc::listen(fd.as_raw_fd(), 64) } != 0 {
            return Err(VsockError::Listen {
                port,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(VsockListener(fd))
    }

    pub fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Listener for VsockListener {
    type Stream = VsockStream;

    fn accept(&self) -> std::io::Result<VsockStream> {
        loop {
            // SAFETY: accept4 on our listening socket; peer address not wanted.
            let fd = unsafe {
                libc::accept4(
                    self.0.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: a fresh descriptor nobody else owns.
                return Ok(VsockStream(unsafe { OwnedFd::from_raw_fd(fd) }));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// The ready signal: a connection request to the host's `port`. podvmm records it and refuses
/// it, so "connection reset/refused" is the expected answer; an accepted connection (another
/// VMM forwarding the port) is closed at once, which is fine too.
pub fn announce(cid: u32, port: u32) -> Result<(), VsockError> {
    let fd = vsock_socket().map_err(VsockError::Socket)?;
    let addr = vsock_addr(cid, port);
    // SAFETY: `addr` is a valid sockaddr_vm of ADDR_LEN bytes.
    let rc = unsafe { libc::connect(fd.as_raw_fd(), std::ptr::addr_of!(addr).cast(), ADDR_LEN) };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ECONNRESET) | Some(libc::ECONNREFUSED) => Ok(()),
        _ => Err(VsockError::Announce { port, source: e }),
    }
}
