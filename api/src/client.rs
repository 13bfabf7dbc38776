//! A small blocking client for the API socket: used by `podvmm remote`, the tests and the
//! benchmarks. One connection, kept alive across requests.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::http::API_ROOT;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("talking to the VMM: {0}")]
    Io(#[from] io::Error),
    #[error("the VMM closed the connection before answering")]
    Closed,
    #[error("unreadable answer from the VMM: {0}")]
    BadResponse(String),
}

/// An answer: the status and the body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The error message of a failed request: the server sends a JSON list of messages.
    pub fn error_message(&self) -> String {
        match serde_json::from_slice::<Vec<String>>(&self.body) {
            Ok(msgs) if !msgs.is_empty() => msgs.join(": "),
            _ => self.body_text(),
        }
    }
}

pub struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
}

/// The largest answer accepted (a `vm.info` is a few kilobytes).
const MAX_RESPONSE: usize = 16 << 20;

impl Client {
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Client {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Bounds how long a request may wait for its answer.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(timeout)?;
        self.stream.set_write_timeout(timeout)
    }

    /// Sends `method /api/v1/<endpoint>` with an optional JSON body and reads the answer.
    pub fn request(
        &mut self,
        method: &str,
        endpoint: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, ClientError> {
        self.request_with_fds(method, endpoint, body, &[])
    }

    /// Like [`Client::request`], passing `fds` with the request (SCM_RIGHTS), in one
    /// `sendmsg` as Kata's shim does for `vm.add-net`.
    pub fn request_with_fds(
        &mut self,
        method: &str,
        endpoint: &str,
        body: Option<&[u8]>,
        fds: &[RawFd],
    ) -> Result<Response, ClientError> {
        let mut req = format!("{method} {API_ROOT}/{endpoint} HTTP/1.1\r\nHost: localhost\r\n");
        match body {
            Some(b) => req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                b.len()
            )),
            None => req.push_str("\r\n"),
        }
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body.unwrap_or_default());
        let sent = if fds.is_empty() {
            self.stream.write_all(&bytes)
        } else {
            send_with_fds(&self.stream, &bytes, fds)
        };
        match sent {
            Ok(()) => self.read_response(method == "HEAD"),
            // The server may answer early and close (a body over its limit): its answer is
            // still there to read.
            Err(e) => self.read_response(method == "HEAD").map_err(|_| e.into()),
        }
    }

    fn read_response(&mut self, head_only: bool) -> Result<Response, ClientError> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&self.buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let status = resp
                        .code
                        .ok_or_else(|| ClientError::BadResponse("no status".into()))?;
                    let mut length = 0usize;
                    for h in resp.headers.iter() {
                        if h.name.eq_ignore_ascii_case("content-length") {
                            length = std::str::from_utf8(h.value)
                                .ok()
                                .and_then(|v| v.trim().parse().ok())
                                .filter(|n| *n <= MAX_RESPONSE)
                                .ok_or_else(|| {
                                    ClientError::BadResponse("bad Content-Length".into())
                                })?;
                        }
                    }
                    if status == 100 {
                        self.buf.drain(..len);
                        continue;
                    }
                    if head_only || status == 204 || status == 304 {
                        length = 0;
                    }
                    while self.buf.len() < len + length {
                        self.fill()?;
                    }
                    let body = self.buf[len..len + length].to_vec();
                    self.buf.drain(..len + length);
                    return Ok(Response { status, body });
                }
                Ok(httparse::Status::Partial) => {
                    if self.buf.len() > 64 << 10 {
                        return Err(ClientError::BadResponse("response head too large".into()));
                    }
                    self.fill()?;
                }
                Err(e) => return Err(ClientError::BadResponse(e.to_string())),
            }
        }
    }

    fn fill(&mut self) -> Result<(), ClientError> {
        let mut chunk = [0u8; 8192];
        let n = loop {
            match self.stream.read(&mut chunk) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        };
        if n == 0 {
            return Err(ClientError::Closed);
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }
}

/// Writes `bytes` with `fds` attached to the first byte (SCM_RIGHTS).
pub fn send_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    // u64 elements keep the buffer aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: the control buffer holds CMSG_SPACE(fd_bytes) bytes, so the first header and
    // its data fit; the pointers are within that buffer.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as usize;
        std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(cmsg), fd_bytes);
    }
    // SAFETY: msg points at live buffers with their true lengths.
    let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    if n < bytes.len() {
        // The descriptors went with the first part; the rest is plain data.
        (&*stream).write_all(&bytes[n..])?;
    }
    Ok(())
}
