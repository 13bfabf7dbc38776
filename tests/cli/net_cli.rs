//! `--net` from the command line: bad input gives a clear one-line error and leaves nothing
//! behind; a good interface is set up and the guest runs. The TAP cases run in a network
//! namespace of the test's own (root and iproute2 needed; nothing leaves the machine).

use crate::common;

use std::process::{Command, Output, Stdio};

use common::*;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs podvmm (in the namespace `ns` if given) on the tiny PVH guest with `args`.
fn podvmm_net(ns: Option<&str>, args: &[&str]) -> Output {
    let dir = TempDir::new("netcli");
    let kernel = dir.write("tiny.elf", &pvh_elf(&pvh_guest_code()));
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(podvmm_bin());
            c
        }
        None => Command::new(podvmm_bin()),
    };
    cmd.args(["--kernel", path_str(&kernel), "--memory", "size=64M"])
        .args(["--serial", "off"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run podvmm")
}

#[test]
fn malformed_net_options_are_usage_errors() {
    for (opt, why) in [
        ("tap=t0,mac=01:00:00:00:00:01", "multicast"),
        ("tap=t0,mac=02:00:00:00:00", "six hex bytes"),
        ("tap=t0,deny=10.0.0.1/8", "did you mean 10.0.0.0/8"),
        ("tap=t0,deny=169.254.169.254", "a.b.c.d/n"),
        ("tap=t0,num_queues=3", "even"),
        ("tap=t0,queue_size=100", "power of two"),
        ("tap=t0,bogus=1", "unknown option"),
    ] {
        let out = podvmm_net(None, &["--net", opt]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{opt}: {err}");
        assert!(err.contains(why), "{opt}: {err}");
    }
}

/// A network namespace removed on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Option<Netns> {
        let name = format!("podvmm-netcli-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .is_ok_and(|o| o.status.success());
        // Fail, never pass without having run: CI is root and scripts/setup.sh installs iproute2.
        assert!(
            ok,
            "cannot create a network namespace (needs root and iproute2)"
        );
        Some(Netns(name))
    }

    fn links(&self) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.0, "-o", "link", "show"])
            .output()
            .expect("ip link");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

#[test]
fn bad_interfaces_fail_cleanly_and_leave_nothing() {
    let Some(ns) = Netns::new("bad") else { return };
    for (args, why) in [
        (vec!["--net", "tap=lo"], "not a TUN/TAP device"),
        (
            vec!["--net", "tap=much-too-long-name"],
            "longer than 15 bytes",
        ),
        (
            vec!["--net", "tap=pt0,mask=255.255.255.0"],
            "mask given without ip",
        ),
        (
            vec!["--net", "tap=pt0,ip=10.78.0.1,mask=255.0.255.0"],
            "not a netmask",
        ),
        // The first interface is fine, the second is not: the first TAP must go too.
        (
            vec![
                "--net",
                "tap=pgood0,ip=10.78.0.1,mask=255.255.255.0",
                "--net",
                "tap=lo",
            ],
            "TAP lo",
        ),
    ] {
        let out = podvmm_net(Some(&ns.0), &args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(why), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        let links = ns.links();
        assert!(
            !links.contains("pt0") && !links.contains("pgood0"),
            "{args:?} left an interface behind:\n{links}"
        );
    }
}

#[test]
fn a_good_interface_is_configured_and_the_guest_runs() {
    let Some(ns) = Netns::new("good") else { return };
    // A persistent TAP (as a CNI plugin would make it) keeps what podvmm configured.
    let out = Command::new("ip")
        .args(["-n", &ns.0, "tuntap", "add", "dev", "ppers0", "mode", "tap"])
        .args(["vnet_hdr", "multi_queue"])
        .output()
        .expect("ip tuntap");
    assert!(out.status.success(), "{}", stderr(&out));
    let out = podvmm_net(
        Some(&ns.0),
        &[
            "--net",
            "tap=ppers0,ip=10.78.1.1,mask=255.255.255.0,deny=169.254.169.254/32",
            "--net",
            "tap=pmq%d,num_queues=4",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let addr = Command::new("ip")
        .args(["-n", &ns.0, "-4", "addr", "show", "dev", "ppers0"])
        .output()
        .expect("ip addr");
    let addr = String::from_utf8_lossy(&addr.stdout);
    assert!(
        addr.contains("10.78.1.1/24") && addr.contains("UP"),
        "{addr}"
    );
    // The one podvmm created went away with it.
    assert!(!ns.links().contains("pmq"), "{}", ns.links());
}
