//! One client connection: reads HTTP/1.1 requests (with any file descriptors passed along
//! with them) under size and time limits, and writes responses.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::Limits;

/// Most descriptors one `recvmsg` can bring; more than `Limits::max_fds` is refused anyway.
const FD_SPACE: usize = 64;
const READ_CHUNK: usize = 8192;
const MAX_HEADERS: usize = 64;

/// A complete request.
#[derive(Debug)]
pub(crate) struct Request {
    pub method: String,
    pub target: String,
    pub body: Vec<u8>,
    /// Descriptors that came with the request's bytes (SCM_RIGHTS).
    pub fds: Vec<OwnedFd>,
    pub keep_alive: bool,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum RequestError {
    /// The client closed the connection (or was made room for), or never began a request.
    #[error("connection closed")]
    Closed,
    /// The client went away in the middle of a request: nobody to answer.
    #[error("client disconnected mid-request")]
    Disconnected,
    #[error("the request was not received in time ({0} s)")]
    Timeout(u64),
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("request head larger than {0} bytes or with too many headers")]
    HeadTooLarge(usize),
    #[error("request body of {size} bytes is larger than the limit of {limit} bytes")]
    BodyTooLarge { size: u64, limit: usize },
    #[error("chunked or other transfer encodings are not supported: send Content-Length")]
    LengthRequired,
    #[error("too many file descriptors with one request (at most {0})")]
    TooManyFds(usize),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl RequestError {
    /// The status to answer with, if the client can still be answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            RequestError::Closed | RequestError::Disconnected | RequestError::Io(_) => None,
            RequestError::Timeout(_) => Some(408),
            RequestError::Malformed(_) | RequestError::TooManyFds(_) => Some(400),
            RequestError::HeadTooLarge(_) => Some(431),
            RequestError::BodyTooLarge { .. } => Some(413),
            RequestError::LengthRequired => Some(411),
        }
    }
}

pub(crate) struct Connection {
    stream: UnixStream,
    /// Bytes received and not yet consumed by a request (a pipelined next request).
    buf: Vec<u8>,
    /// Descriptors received and not yet handed to a request.
    fds: Vec<OwnedFd>,
    limits: Limits,
}

/// What one wait for bytes gave.
enum Fill {
    Data,
    Eof,
    TimedOut,
}

/// What the head of a request said.
struct Head {
    len: usize,
    method: String,
    target: String,
    content_length: u64,
    keep_alive: bool,
    expect_continue: bool,
}

impl Connection {
    pub fn new(stream: UnixStream, limits: Limits) -> io::Result<Self> {
        stream.set_write_timeout(Some(limits.write_timeout))?;
        Ok(Connection {
            stream,
            buf: Vec::with_capacity(1024),
            fds: Vec::new(),
            limits,
        })
    }

    /// Reads the next request. Before its first byte the client may stay idle for `idle`
    /// (None: as long as it likes); `on_start` is called when that byte is there. Once it has
    /// arrived, the whole request must arrive within `request_timeout`, however slowly it
    /// trickles.
    pub fn read_request(
        &mut self,
        idle: Option<Duration>,
        on_start: &mut dyn FnMut(),
    ) -> Result<Request, RequestError> {
        let limits = self.limits;
        let mut started = (!self.buf.is_empty()).then(Instant::now);
        if started.is_some() {
            on_start();
        }
        let idle_deadline = idle.map(|d| Instant::now() + d);
        let head = loop {
            if !self.buf.is_empty() {
                if let Some(head) = self.parse_head()? {
                    break head;
                }
            }
            let deadline = match started {
                Some(t) => Some(t + limits.request_timeout),
                None => idle_deadline,
            };
            match self.fill(deadline)? {
                Fill::Eof | Fill::TimedOut if started.is_none() => {
                    return Err(RequestError::Closed)
                }
                Fill::Eof => return Err(RequestError::Disconnected),
                Fill::TimedOut => {
                    return Err(RequestError::Timeout(limits.request_timeout.as_secs()))
                }
                Fill::Data => {
                    if started.is_none() {
                        started = Some(Instant::now());
                        on_start();
                    }
                }
            }
        };
        let started = started.unwrap_or_else(Instant::now);
        if head.content_length > limits.max_body_bytes as u64 {
            return Err(RequestError::BodyTooLarge {
                size: head.content_length,
                limit: limits.max_body_bytes,
            });
        }
        // Bounded by max_body_bytes just above.
        let total = head.len + head.content_length as usize;
        if head.expect_continue && self.buf.len() < total {
            self.write_all(b"HTTP/1.1 100 \r\n\r\n")?;
        }
        while self.buf.len() < total {
            match self.fill(Some(started + limits.request_timeout))? {
                Fill::Eof => return Err(RequestError::Disconnected),
                Fill::TimedOut => {
                    return Err(RequestError::Timeout(limits.request_timeout.as_secs()))
                }
                Fill::Data => {}
            }
        }
        let body = self.buf[head.len..total].to_vec();
        self.buf.drain(..total);
        Ok(Request {
            method: head.method,
            target: head.target,
            body,
            fds: std::mem::take(&mut self.fds),
            keep_alive: head.keep_alive,
        })
    }

    /// Parses the request head if it is all there.
    fn parse_head(&self) -> Result<Option<Head>, RequestError> {
        let max = self.limits.max_head_bytes;
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let len = match req.parse(&self.buf) {
            Ok(httparse::Status::Complete(len)) if len <= max => len,
            Ok(httparse::Status::Complete(_)) => return Err(RequestError::HeadTooLarge(max)),
            Ok(httparse::Status::Partial) if self.buf.len() > max => {
                return Err(RequestError::HeadTooLarge(max))
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(RequestError::HeadTooLarge(max)),
            Err(e) => return Err(RequestError::Malformed(e.to_string())),
        };
        let malformed = |m: &str| RequestError::Malformed(m.to_string());
        let method = req.method.ok_or_else(|| malformed("no method"))?;
        let target = req.path.ok_or_else(|| malformed("no request target"))?;
        let version = req.version.ok_or_else(|| malformed("no HTTP version"))?;
        let mut content_length: Option<u64> = None;
        let mut keep_alive = version >= 1;
        let mut expect_continue = false;
        for h in req.headers.iter() {
            let value = std::str::from_utf8(h.value).map_err(|_| malformed("header not UTF-8"))?;
            let value = value.trim();
            if h.name.eq_ignore_ascii_case("content-length") {
                let n: u64 = Some(value)
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| malformed("Content-Length is not a number"))?;
                if content_length.is_some_and(|c| c != n) {
                    return Err(malformed("conflicting Content-Length headers"));
                }
                content_length = Some(n);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                if !value.eq_ignore_ascii_case("identity") {
                    return Err(RequestError::LengthRequired);
                }
            } else if h.name.eq_ignore_ascii_case("connection") {
                for token in value.split(',').map(str::trim) {
                    if token.eq_ignore_ascii_case("close") {
                        keep_alive = false;
                    } else if token.eq_ignore_ascii_case("keep-alive") {
                        keep_alive = true;
                    }
                }
            } else if h.name.eq_ignore_ascii_case("expect") {
                if !value.eq_ignore_ascii_case("100-continue") {
                    return Err(malformed("unsupported Expect header"));
                }
                expect_continue = true;
            }
        }
        Ok(Some(Head {
            len,
            method: method.to_string(),
            target: target.to_string(),
            content_length: content_length.unwrap_or(0),
            keep_alive,
            expect_continue,
        }))
    }

    /// Waits until `deadline` (None: for ever) for bytes, then receives them and any
    /// descriptors with them.
    fn fill(&mut self, deadline: Option<Instant>) -> Result<Fill, RequestError> {
        let fd = self.stream.as_raw_fd();
        loop {
            let ms = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(Fill::TimedOut);
                    }
                    left.as_millis().clamp(1, i32::MAX as u128) as i32
                }
                None => -1,
            };
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, for the length given.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            if n == 0 {
                continue; // the deadline check above ends the wait
            }
            match self.recv() {
                Ok(0) => return Ok(Fill::Eof),
                Ok(_) => return Ok(Fill::Data),
                Err(RequestError::Io(e))
                    if e.kind() == io::ErrorKind::Interrupted
                        || e.kind() == io::ErrorKind::WouldBlock =>
                {
                    continue
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One `recvmsg`: bytes into the buffer, SCM_RIGHTS descriptors into `self.fds`.
    fn recv(&mut self) -> Result<usize, RequestError> {
        let mut data = [0u8; READ_CHUNK];
        // u64 elements keep the control buffer aligned for cmsghdr.
        let mut control = [0u64; (FD_SPACE * 4 + 64) / 8];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        // SAFETY: msghdr is plain data; all-zero is a valid empty value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: msg points at buffers that live across the call, with their true lengths.
        let n = unsafe {
            libc::recvmsg(
                self.stream.as_raw_fd(),
                &mut msg,
                libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // Take ownership of every descriptor first, so each is closed whatever happens next.
        // SAFETY: msg was filled by recvmsg; CMSG_FIRSTHDR/NXTHDR stay within msg_controllen.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !cmsg.is_null() {
            // SAFETY: cmsg is non-null and points at a header inside the control buffer.
            let hdr = unsafe { &*cmsg };
            if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
                // SAFETY: CMSG_LEN(0) is a constant computation.
                let header_len = unsafe { libc::CMSG_LEN(0) } as usize;
                let count = (hdr.cmsg_len as usize).saturating_sub(header_len) / 4;
                // SAFETY: the kernel wrote `count` descriptors after the header.
                let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<libc::c_int>();
                for i in 0..count {
                    // SAFETY: i < count, within the descriptors the kernel wrote; the
                    // descriptor is new to this process and owned by nobody else yet.
                    let raw = unsafe { data.add(i).read_unaligned() };
                    // SAFETY: as above, a fresh descriptor we now own.
                    self.fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
            // SAFETY: as for CMSG_FIRSTHDR.
            cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 || self.fds.len() > self.limits.max_fds {
            self.fds.clear();
            return Err(RequestError::TooManyFds(self.limits.max_fds));
        }
        let n = n as usize;
        self.buf.extend_from_slice(&data[..n]);
        Ok(n)
    }

    pub fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }
}
