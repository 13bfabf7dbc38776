//! `podvmm --api-socket PATH`: the REST API server and the VMM thread.
//!
//! The socket is bound and served first, so `vmm.ping` answers within milliseconds of exec;
//! then this (the main) thread becomes the VMM thread. With `--kernel` and friends the VM is
//! created and booted before the VMM thread starts serving requests, as Cloud Hypervisor does.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use api::http::{ApiServer, Limits};
use api::messages::{ApiRequest, CreateVm};
use api::pod::Explicit;
use api::VmConfig;
use hypervisor::Selection;
use vmm::control::Vmm;

pub fn run(
    socket: &Path,
    initial: Option<(VmConfig, Explicit)>,
    selection: Selection,
    process_outputs: Vec<vmm::outputs::Named>,
) -> ExitCode {
    let (channel, mailbox) = match api::messages::channel() {
        Ok(c) => c,
        Err(e) => return fail(&format!("creating the API mailbox: {e}")),
    };
    let server = match ApiServer::start(socket, Arc::new(channel), Limits::default()) {
        Ok(s) => s,
        Err(e) => return fail(&e.to_string()),
    };
    // The API's threads carry their own filter; this one, the VMM's, from here on.
    if let Err(e) = seccomp::apply(seccomp::ThreadKind::Vmm) {
        server.remove_socket();
        return fail(&e.to_string());
    }
    let mut vmm = match Vmm::new(selection) {
        Ok(v) => v,
        Err(e) => {
            server.remove_socket();
            return fail(&e.to_string());
        }
    };
    vmm.set_process_outputs(process_outputs);
    if let Some((config, explicit)) = initial {
        let create = ApiRequest::VmCreate(Box::new(CreateVm {
            config,
            explicit,
            ignored: Default::default(),
        }));
        for request in [create, ApiRequest::VmBoot] {
            if let Err(e) = vmm.handle(request) {
                server.remove_socket();
                return fail(&e.to_string());
            }
        }
    }
    let result = vmm.run(&mailbox);
    // Requests still queued get "shutting down"; answers being written get to finish.
    drop(mailbox);
    server.wait_answered(Duration::from_secs(2));
    server.remove_socket();
    match result {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(sig)) => crate::terminated(sig),
        Err(e) => fail(&e.to_string()),
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("podvmm: error: {msg}");
    ExitCode::FAILURE
}
