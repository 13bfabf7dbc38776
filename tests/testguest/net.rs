//! virtio-net driven from inside a VM by the freestanding test guest (docs/testguest.md):
//! the guest resolves the host's TAP address with ARP and pings it with hand-made frames,
//! which the host kernel answers. Runs in a network namespace of its own (needs root and
//! iproute2), so nothing leaves the machine; the namespace goes away even on failure.

use crate::common;

use common::testguest::*;

#[test]
fn net_arp_and_ping_the_host_through_the_tap() {
    let ns = Netns::new("ping");
    let net = format!("tap=tgtap0,mac={GUEST_MAC},ip={HOST_IP},mask=255.255.255.0");
    let cmdline =
        format!("testguest.run=net testguest.net_ip={GUEST_IP} testguest.net_host={HOST_IP} testguest.net_ms=200");
    let run = run_testguest_under(
        &["ip", "netns", "exec", &ns.0],
        &cmdline,
        &["--net", &net],
        60,
    );
    run.assert_passed("net");
    assert_eq!(
        run.value("net", "mac").as_deref(),
        Some(GUEST_MAC),
        "{}",
        run.dump()
    );
    assert_eq!(
        run.num("net", "full_frame", "ok"),
        Some(1),
        "{}",
        run.dump()
    );
    let pings = run.num("net", "ping", "pings").unwrap();
    assert!(pings > 0, "{}", run.dump());
    eprintln!(
        "ICMP echo round trips guest -> host kernel: {} per second",
        run.num("net", "ping", "per_sec").unwrap()
    );
    // Only the host's kernel, behind the TAP, can have answered: its MAC is a real one.
    let host_mac = run.value("net", "host_mac").unwrap();
    assert!(
        host_mac != GUEST_MAC && host_mac != "ff:ff:ff:ff:ff:ff",
        "{}",
        run.dump()
    );
}

#[test]
fn net_hostile_chains_and_buffers_are_refused_and_the_vmm_stays_up() {
    let ns = Netns::new("hostile");
    let net = format!("tap=tgtap1,mac={GUEST_MAC},ip={HOST_IP},mask=255.255.255.0");
    let cmdline =
        format!("testguest.mode=hostile testguest.net_ip={GUEST_IP} testguest.net_host={HOST_IP}");
    let run = run_testguest_under(
        &["ip", "netns", "exec", &ns.0],
        &cmdline,
        &["--net", &net],
        120,
    );
    run.assert_hostile_cases("net_hostile", 12);
}
