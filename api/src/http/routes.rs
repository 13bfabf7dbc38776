//! From an HTTP request to an [`ApiRequest`], and from the handler's answer to a response.

use std::collections::BTreeSet;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::conn::Request;
use super::API_ROOT;
use crate::compat::{self, CompatError};
use crate::messages::{AddDevice, ApiHandler, ApiReply, ApiRequest, CreateVm};
use crate::pod::Explicit;
use crate::VmConfig;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Method {
    Get,
    Put,
}

impl Method {
    fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
        }
    }
}

/// The endpoints served, with the method each takes (Cloud Hypervisor's).
const ENDPOINTS: &[(&str, Method)] = &[
    ("vmm.ping", Method::Get),
    ("vmm.shutdown", Method::Put),
    ("vm.create", Method::Put),
    ("vm.boot", Method::Put),
    ("vm.info", Method::Get),
    ("vm.shutdown", Method::Put),
    ("vm.delete", Method::Put),
    ("vm.pause", Method::Put),
    ("vm.resume", Method::Put),
    ("vm.counters", Method::Get),
    ("vm.add-disk", Method::Put),
    ("vm.add-net", Method::Put),
    ("vm.add-vsock", Method::Put),
    ("vm.add-fs", Method::Put),
    ("vm.resize", Method::Put),
];

/// Cloud Hypervisor endpoints podvmm does not provide: 501, not 404, so a client learns
/// the path is right and the feature is missing.
const NOT_PROVIDED: &[&str] = &[
    "vm.reboot",
    "vm.power-button",
    "vm.resize-disk",
    "vm.resize-zone",
    "vm.add-device",
    "vm.remove-device",
    "vm.add-pmem",
    "vm.add-vdpa",
    "vm.add-user-device",
    "vm.add-generic-vhost-user",
    "vm.snapshot",
    "vm.restore",
    "vm.coredump",
    "vm.nmi",
    "vm.send-migration",
    "vm.receive-migration",
];

/// An answer as Cloud Hypervisor's clients read it. The status line has no reason phrase
/// (`HTTP/1.1 200 `, as Cloud Hypervisor's server writes it; RFC 9112 allows an empty one):
/// Cloud Hypervisor's `api_client` (ch-remote, Kata's Rust runtime) takes everything after the
/// version up to CR as the number. Header names are in the case that client looks for
/// (`Content-Length: `), and bodies are ASCII (non-ASCII escaped as `\uXXXX`), since it decodes
/// each 256-byte read as UTF-8 on its own and would fail on a character cut in two.
fn response(status: u16, extra_headers: &str, body: Option<&[u8]>, keep_alive: bool) -> Vec<u8> {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let mut out = format!(
        "HTTP/1.1 {status} \r\nServer: podvmm\r\nConnection: {connection}\r\n{extra_headers}"
    )
    .into_bytes();
    match body.map(ascii_json) {
        Some(b) => {
            out.extend_from_slice(
                format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    b.len()
                )
                .as_bytes(),
            );
            out.extend_from_slice(&b);
        }
        None if status == 204 => out.extend_from_slice(b"\r\n"),
        None => out.extend_from_slice(b"Content-Length: 0\r\n\r\n"),
    }
    out
}

/// `json` with every non-ASCII character written as a `\uXXXX` escape (UTF-16, surrogate
/// pairs above U+FFFF). In JSON such characters only occur inside strings, where the escape
/// means the same character.
pub(crate) fn ascii_json(json: &[u8]) -> Vec<u8> {
    if json.is_ascii() {
        return json.to_vec();
    }
    let text = String::from_utf8_lossy(json);
    let mut out = String::with_capacity(json.len() + 16);
    for c in text.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        }
    }
    out.into_bytes()
}

/// An error answer. The body is a JSON array of messages, as Cloud Hypervisor sends.
pub(crate) fn error_response(status: u16, message: &str, keep_alive: bool) -> Vec<u8> {
    let body = serde_json::to_vec(&[message]).unwrap_or_else(|_| b"[]".to_vec());
    response(status, "", Some(&body), keep_alive)
}

/// A request the HTTP layer refuses before it reaches the handler.
struct Refusal {
    status: u16,
    message: String,
    allow: Option<Method>,
}

impl Refusal {
    fn bad(message: impl Into<String>) -> Self {
        Refusal {
            status: 400,
            message: message.into(),
            allow: None,
        }
    }
}

impl From<CompatError> for Refusal {
    fn from(e: CompatError) -> Self {
        Refusal::bad(e.to_string())
    }
}

/// Answers one request; also says whether the connection stays open.
pub(crate) fn respond(request: Request, handler: &dyn ApiHandler) -> (Vec<u8>, bool) {
    let keep_alive = request.keep_alive;
    let api_request = match to_api_request(request) {
        Ok(r) => r,
        Err(r) => {
            let allow = r
                .allow
                .map(|m| format!("Allow: {}\r\n", m.as_str()))
                .unwrap_or_default();
            let body = serde_json::to_vec(&[&r.message]).unwrap_or_default();
            return (
                response(r.status, &allow, Some(&body), keep_alive),
                keep_alive,
            );
        }
    };
    let shutting_down = matches!(api_request, ApiRequest::VmmShutdown);
    match handler.handle(api_request) {
        Ok(reply) => {
            let keep_alive = keep_alive && !shutting_down;
            let body = match reply {
                ApiReply::Empty => return (response(204, "", None, keep_alive), keep_alive),
                ApiReply::Ping(p) => serde_json::to_vec(&p),
                ApiReply::Info(i) => serde_json::to_vec(&i),
                ApiReply::Counters(c) => serde_json::to_vec(&c),
                ApiReply::Device(d) => serde_json::to_vec(&d),
            };
            match body {
                Ok(b) => (response(200, "", Some(&b), keep_alive), keep_alive),
                Err(e) => (
                    error_response(500, &format!("encoding the answer: {e}"), keep_alive),
                    keep_alive,
                ),
            }
        }
        Err(e) => (
            error_response(e.status(), &e.to_string(), keep_alive),
            keep_alive,
        ),
    }
}

/// The endpoint named by a request target: `/api/v1/vm.info`, also in absolute form
/// (`http://localhost/api/v1/vm.info`), any query ignored.
fn endpoint(target: &str) -> Option<&str> {
    let path = match target.strip_prefix("http://") {
        Some(rest) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    let path = path.split(['?', '#']).next().unwrap_or(path);
    path.strip_prefix(API_ROOT)?.strip_prefix('/')
}

fn to_api_request(mut request: Request) -> Result<ApiRequest, Refusal> {
    let Some(name) = endpoint(&request.target) else {
        return Err(Refusal {
            status: 404,
            message: format!(
                "no such path {}; the API is under {API_ROOT}/",
                shorten(&request.target)
            ),
            allow: None,
        });
    };
    let Some(&(name, method)) = ENDPOINTS.iter().find(|(n, _)| *n == name) else {
        if NOT_PROVIDED.contains(&name) {
            return Err(Refusal {
                status: 501,
                message: format!("{name} is not provided by podvmm"),
                allow: None,
            });
        }
        return Err(Refusal {
            status: 404,
            message: format!("unknown endpoint {}", shorten(name)),
            allow: None,
        });
    };
    if request.method != method.as_str() {
        return Err(Refusal {
            status: 405,
            message: format!(
                "{name} takes {}, not {}",
                method.as_str(),
                shorten(&request.method)
            ),
            allow: Some(method),
        });
    }
    let body = &request.body;
    Ok(match name {
        "vmm.ping" => ApiRequest::VmmPing,
        "vmm.shutdown" => ApiRequest::VmmShutdown,
        "vm.boot" => ApiRequest::VmBoot,
        "vm.info" => ApiRequest::VmInfo,
        "vm.shutdown" => ApiRequest::VmShutdown,
        "vm.delete" => ApiRequest::VmDelete,
        "vm.pause" => ApiRequest::VmPause,
        "vm.resume" => ApiRequest::VmResume,
        "vm.counters" => ApiRequest::VmCounters,
        "vm.resize" => ApiRequest::VmResize(typed(name, "VmResize", json_body(name, body)?)?),
        "vm.create" => {
            let mut v = json_body(name, body)?;
            let explicit = Explicit::from_json(&v);
            let ignored = compat::clean_vm_config(&mut v)?;
            let config: VmConfig = typed(name, "VmConfig", v)?;
            ApiRequest::VmCreate(Box::new(CreateVm {
                config,
                explicit,
                ignored,
            }))
        }
        "vm.add-disk" => {
            let (config, ignored) = device(name, "DiskConfig", body, compat::clean_disk)?;
            ApiRequest::VmAddDisk(Box::new(AddDevice {
                config,
                fds: Vec::new(),
                ignored,
            }))
        }
        "vm.add-net" => {
            let (config, ignored) = device(name, "NetConfig", body, compat::clean_net)?;
            ApiRequest::VmAddNet(Box::new(AddDevice {
                config,
                fds: std::mem::take(&mut request.fds),
                ignored,
            }))
        }
        "vm.add-vsock" => {
            let (config, ignored) = device(name, "VsockConfig", body, compat::clean_vsock)?;
            ApiRequest::VmAddVsock(Box::new(AddDevice {
                config,
                fds: Vec::new(),
                ignored,
            }))
        }
        "vm.add-fs" => {
            let (config, ignored) = device(name, "FsConfig", body, compat::clean_fs)?;
            ApiRequest::VmAddFs(Box::new(AddDevice {
                config,
                fds: Vec::new(),
                ignored,
            }))
        }
        // ENDPOINTS and this match list the same names.
        other => {
            return Err(Refusal {
                status: 404,
                message: format!("unknown endpoint {other}"),
                allow: None,
            })
        }
    })
}

type Cleaner = fn(&mut Value) -> Result<BTreeSet<String>, CompatError>;

fn device<T: DeserializeOwned>(
    name: &str,
    schema: &str,
    body: &[u8],
    clean: Cleaner,
) -> Result<(T, BTreeSet<String>), Refusal> {
    let mut v = json_body(name, body)?;
    let ignored = clean(&mut v)?;
    Ok((typed(name, schema, v)?, ignored))
}

fn json_body(name: &str, body: &[u8]) -> Result<Value, Refusal> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Refusal::bad(format!("{name} needs a JSON body")));
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| Refusal::bad(format!("{name}: malformed JSON: {e}")))?;
    if !v.is_object() {
        return Err(Refusal::bad(format!(
            "{name}: the body must be a JSON object"
        )));
    }
    Ok(v)
}

fn typed<T: DeserializeOwned>(name: &str, schema: &str, v: Value) -> Result<T, Refusal> {
    serde_json::from_value(v).map_err(|e| Refusal::bad(format!("{name}: invalid {schema}: {e}")))
}

/// Client-supplied text echoed in a message, cut to a sane length.
fn shorten(s: &str) -> String {
    let mut out: String = s.chars().take(80).collect();
    if out.len() < s.len() {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_found_in_all_target_forms() {
        assert_eq!(endpoint("/api/v1/vm.info"), Some("vm.info"));
        assert_eq!(endpoint("/api/v1/vm.info?x=1"), Some("vm.info"));
        assert_eq!(
            endpoint("http://localhost/api/v1/vmm.ping"),
            Some("vmm.ping")
        );
        assert_eq!(endpoint("/api/v2/vm.info"), None);
        assert_eq!(endpoint("/api/v1"), None);
        assert_eq!(endpoint("*"), None);
    }

    #[test]
    fn every_endpoint_maps_to_a_request() {
        for (name, method) in ENDPOINTS {
            let body = match *name {
                "vm.create" => r#"{"payload":{"kernel":"/k"}}"#,
                "vm.add-disk" => r#"{"path":"/d"}"#,
                "vm.add-net" => r#"{"tap":"t0"}"#,
                "vm.add-vsock" => r#"{"cid":3,"socket":"/s"}"#,
                "vm.add-fs" => r#"{"tag":"t","socket":"/s"}"#,
                "vm.resize" => r#"{"desired_vcpus":1}"#,
                _ => "",
            };
            let req = Request {
                method: method.as_str().into(),
                target: format!("/api/v1/{name}"),
                body: body.as_bytes().to_vec(),
                fds: Vec::new(),
                keep_alive: true,
            };
            let api = to_api_request(req).unwrap_or_else(|r| panic!("{name}: {}", r.message));
            assert_eq!(api.name(), *name);
        }
    }
}
