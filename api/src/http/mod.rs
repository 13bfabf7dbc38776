//! The REST API's HTTP/1.1 server on a Unix socket (Cloud Hypervisor's paths under `/api/v1`).
//!
//! Threads: each connection gets its own thread. Past [`Limits::max_connections`] a new client
//! makes room by closing a connection that let a short grace pass without a whole request
//! (silent, or stuck sending one); past twice that, the longest idle one (see `registry.rs`).
//! So a shim's call always gets in, and is refused (503) only when twice the limit of
//! connections all have a request with the VMM. Threads are reused: they wait in `accept` themselves, and one that finished
//! with a connection goes back to waiting (a few are kept). A request's thread blocks while the
//! VMM thread works on it (a boot can take tens of milliseconds), so a thread per connection
//! keeps one client's slow request, or a stalled or hostile client, from delaying anyone else,
//! with little code. A new connection must begin its first request within
//! [`Limits::first_request_timeout`]; once served, a kept connection may stay idle as long as
//! its client likes (Kata's Rust runtime keeps one for the pod's life). A request, once begun,
//! must arrive within [`Limits::request_timeout`], and its answer be taken within
//! [`Limits::write_timeout`]; heads and bodies have size limits. Requests are parsed with
//! `httparse`; descriptors passed with SCM_RIGHTS (TAP devices for `vm.add-net`) are received
//! with `recvmsg` and travel with the request that brought them.

mod conn;
mod registry;
mod routes;

use std::ffi::OsStr;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::messages::ApiHandler;

/// Where the API lives under the socket.
pub const API_ROOT: &str = "/api/v1";

/// Limits that keep clients from holding the server's resources.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Request line and headers.
    pub max_head_bytes: usize,
    /// Request body (a `VmConfig` is a few kilobytes).
    pub max_body_bytes: usize,
    /// Descriptors passed with one request.
    pub max_fds: usize,
    /// From a request's first byte to its last.
    pub request_timeout: Duration,
    /// From accepting a connection to the first byte of its first request. (Between requests
    /// a kept connection may stay idle for ever: connections are bounded by count instead.)
    pub first_request_timeout: Duration,
    /// For the client to take a response.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 64,
            max_head_bytes: 16 << 10,
            max_body_bytes: 256 << 10,
            max_fds: 16,
            request_timeout: Duration::from_secs(10),
            first_request_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("API socket {0}: the path is in use by a running server")]
    InUse(PathBuf),
    #[error("API socket {0}: the path exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("API socket {0}: the path is too long for a Unix socket (at most 107 bytes)")]
    PathTooLong(PathBuf),
    #[error("API socket {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Binds the API socket at `path` with mode 0600.
///
/// A socket file nobody listens on (left by a VMM that died) is replaced; a path a live
/// server listens on, or a file that is not a socket, is refused.
pub fn bind(path: &Path) -> Result<UnixListener, HttpError> {
    let io_err = |what| {
        move |source| HttpError::Io {
            path: path.to_owned(),
            what,
            source,
        }
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => return Err(HttpError::NotASocket(path.into())),
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => return Err(HttpError::InUse(path.into())),
            // Nobody listening: a stale socket.
            Err(_) => std::fs::remove_file(path)
                .or_else(|e| match e.kind() {
                    io::ErrorKind::NotFound => Ok(()),
                    _ => Err(e),
                })
                .map_err(io_err("removing the stale socket"))?,
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("checking the path")(e)),
    }
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.is_empty() || bytes.contains(&0) {
        return Err(HttpError::PathTooLong(path.into()));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket creation; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io_err("creating the socket")(io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // On Linux the file bind() creates takes the socket inode's mode: set it first, so the
    // socket is never reachable by others, whatever the umask.
    // SAFETY: fchmod on a descriptor we own.
    if unsafe { libc::fchmod(fd.as_raw_fd(), 0o600) } < 0 {
        return Err(io_err("setting the socket mode")(io::Error::last_os_error()));
    }
    // SAFETY: addr is a valid sockaddr_un and the length is its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::AddrInUse {
            // Another VMM bound it between our check and our bind.
            return Err(HttpError::InUse(path.into()));
        }
        return Err(io_err("binding")(e));
    }
    // Belt and braces: the file must be 0600 even where fchmod before bind is not honoured.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(io_err("setting the socket file's mode"))?;
    // SAFETY: listen on a bound socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), 128) } < 0 {
        return Err(io_err("listening")(io::Error::last_os_error()));
    }
    Ok(UnixListener::from(fd))
}

/// State shared by the server's threads.
struct Shared {
    handler: Arc<dyn ApiHandler>,
    limits: Limits,
    connections: registry::Registry,
    /// Requests read and not yet answered.
    in_flight: Mutex<usize>,
    answered: Condvar,
    listener: UnixListener,
    /// Threads waiting in `accept` (or about to).
    accepting: AtomicUsize,
}

/// A running API server.
pub struct ApiServer {
    shared: Arc<Shared>,
    socket: PathBuf,
    /// Identity (device, inode) of the socket file we created.
    identity: Option<(u64, u64)>,
}

impl ApiServer {
    /// Binds `path` and starts serving it with `handler`.
    pub fn start(
        path: &Path,
        handler: Arc<dyn ApiHandler>,
        limits: Limits,
    ) -> Result<Self, HttpError> {
        let listener = bind(path)?;
        let identity = std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
        let server = Self::serve(listener, handler, limits).map_err(|source| HttpError::Io {
            path: path.to_owned(),
            what: "starting the API thread",
            source,
        })?;
        Ok(ApiServer {
            socket: path.to_owned(),
            identity,
            ..server
        })
    }

    /// Serves an already bound listener.
    pub fn serve(
        listener: UnixListener,
        handler: Arc<dyn ApiHandler>,
        limits: Limits,
    ) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            handler,
            limits,
            connections: registry::Registry::new(limits.max_connections),
            in_flight: Mutex::new(0),
            answered: Condvar::new(),
            listener,
            accepting: AtomicUsize::new(0),
        });
        spawn_worker(&shared)?;
        Ok(ApiServer {
            shared,
            socket: PathBuf::new(),
            identity: None,
        })
    }

    /// Waits (up to `timeout`) until every request read so far has been answered, so a
    /// `vmm.shutdown`'s answer reaches its client before the process exits.
    pub fn wait_answered(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut n = lock(&self.shared.in_flight);
        while *n > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            n = self
                .shared
                .answered
                .wait_timeout(n, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Removes the socket file, if it is still the one this server created.
    pub fn remove_socket(&self) {
        let current = std::fs::metadata(&self.socket)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if self.identity.is_some() && current == self.identity {
            let _ = std::fs::remove_file(&self.socket);
        }
    }

    pub fn socket(&self) -> &OsStr {
        self.socket.as_os_str()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Idle threads kept waiting in `accept` beyond this many end.
const MAX_IDLE_THREADS: usize = 4;

/// Starts a connection thread: it waits in `accept`, serves what it accepted, and waits
/// again.
fn spawn_worker(shared: &Arc<Shared>) -> io::Result<()> {
    shared.accepting.fetch_add(1, Ordering::AcqRel);
    let worker_shared = shared.clone();
    let failed_shared = shared.clone();
    // Not waited for: the connection that made this thread start another is served at once.
    let spawned = seccomp::spawn_detached(
        thread::Builder::new()
            .name("api-conn".into())
            .stack_size(256 << 10),
        seccomp::ThreadKind::Api,
        move || worker(&worker_shared),
        move |_| {
            failed_shared.accepting.fetch_sub(1, Ordering::AcqRel);
        },
    );
    if spawned.is_err() {
        shared.accepting.fetch_sub(1, Ordering::AcqRel);
    }
    spawned
}

/// Connection threads take turns in `accept` on the shared listener (the kernel wakes one
/// per connection), so a connection needs no hand-off between threads, and creating a thread
/// (about a millisecond where the hypervisor is itself virtualized) is off the path of a new
/// connection: whenever the last waiting thread takes a connection, it starts another first.
fn worker(shared: &Arc<Shared>) {
    loop {
        let stream = match shared.listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                // Out of descriptors or memory: back off instead of spinning.
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if shared.accepting.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Nobody is waiting in accept any more: start someone. On failure, this
            // thread comes back to accept once done.
            let _ = spawn_worker(shared);
        }
        match shared.connections.admit(&stream) {
            Some(ticket) => serve_connection(stream, shared, &ticket),
            None => refuse(stream),
        }
        if shared.accepting.load(Ordering::Acquire) >= MAX_IDLE_THREADS {
            return;
        }
        shared.accepting.fetch_add(1, Ordering::AcqRel);
    }
}

/// Counts a request as in flight until its answer is written (or the attempt failed).
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn new(shared: &'a Shared) -> Self {
        *lock(&shared.in_flight) += 1;
        InFlight(shared)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        *lock(&self.0.in_flight) -= 1;
        self.0.answered.notify_all();
    }
}

/// Every connection has a request with the VMM: say so without reading anything, and close.
fn refuse(mut stream: UnixStream) {
    let _ = stream.set_nonblocking(true);
    let _ = stream.write_all(&routes::error_response(
        503,
        "too many API requests in progress; try again",
        false,
    ));
}

fn serve_connection(stream: UnixStream, shared: &Shared, ticket: &registry::Ticket) {
    let Ok(mut conn) = conn::Connection::new(stream, shared.limits) else {
        return;
    };
    let mut idle = Some(shared.limits.first_request_timeout);
    loop {
        let request = match conn.read_request(idle, &mut || ticket.set(registry::Phase::Reading)) {
            Ok(r) => r,
            Err(e) => {
                if let Some(status) = e.status() {
                    let _ = conn.write_all(&routes::error_response(status, &e.to_string(), false));
                }
                return;
            }
        };
        ticket.set(registry::Phase::Handling);
        let _in_flight = InFlight::new(shared);
        let (response, keep_alive) = routes::respond(request, shared.handler.as_ref());
        if conn.write_all(&response).is_err() || !keep_alive {
            return;
        }
        ticket.set(registry::Phase::Idle);
        idle = None;
    }
}

#[cfg(test)]
mod tests;
