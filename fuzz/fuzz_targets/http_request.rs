//! The REST API's HTTP server: the fuzz bytes are what a client sends on one connection
//! (possibly several pipelined requests), then it half-closes. The server is the real one
//! (`api::http::ApiServer`: request framing, limits, routing, JSON bodies) in front of a
//! handler that checks what it is given the way the VMM thread would and answers at once.
#![no_main]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use api::http::{ApiServer, Limits};
use api::messages::{ApiError, ApiHandler, ApiReply, ApiRequest, ApiResult};
use libfuzzer_sys::fuzz_target;

struct Handler;

impl ApiHandler for Handler {
    fn handle(&self, request: ApiRequest) -> ApiResult {
        match request {
            ApiRequest::VmCreate(create) => {
                let mut config = create.config;
                config
                    .validate()
                    .map_err(|e| ApiError::BadRequest(e.to_string()))?;
                api::pod::apply(&mut config, create.explicit)
                    .map_err(|e| ApiError::BadRequest(e.to_string()))?;
                Ok(ApiReply::Empty)
            }
            ApiRequest::VmDelete => Err(ApiError::Conflict("fuzz".into())),
            _ => Ok(ApiReply::Empty),
        }
    }
}

/// The server, on an abstract socket (nothing left in the file system).
fn socket() -> &'static SocketAddr {
    static SERVER: OnceLock<(SocketAddr, ApiServer)> = OnceLock::new();
    &SERVER
        .get_or_init(|| {
            let name = format!("podvmm-fuzz-http-{}", std::process::id());
            let addr = SocketAddr::from_abstract_name(name).expect("socket name");
            let listener = UnixListener::bind_addr(&addr).expect("binding the fuzz socket");
            let limits = Limits {
                // Small, so that the limit paths are reached by small inputs too.
                max_head_bytes: 2048,
                max_body_bytes: 8192,
                request_timeout: Duration::from_secs(5),
                first_request_timeout: Duration::from_secs(5),
                write_timeout: Duration::from_secs(5),
                ..Limits::default()
            };
            let server = ApiServer::serve(listener, Arc::new(Handler), limits)
                .expect("starting the API server");
            (addr, server)
        })
        .0
}

fuzz_target!(|data: &[u8]| {
    let mut client = UnixStream::connect_addr(socket()).expect("connecting to the API server");
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    // Inputs are at most a few kilobytes: they fit the socket buffer, so writing all before
    // reading cannot deadlock.
    let _ = client.write_all(data);
    let _ = client.shutdown(Shutdown::Write);
    let mut answer = Vec::new();
    // The server must answer and close by itself, never hang: a timeout here is a bug.
    if let Err(e) = client.read_to_end(&mut answer) {
        assert!(
            e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut,
            "the API server did not close the connection: {e}"
        );
    }
    if !answer.is_empty() {
        assert!(
            answer.starts_with(b"HTTP/1.1 "),
            "not an HTTP response: {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(64)])
        );
    }
});
