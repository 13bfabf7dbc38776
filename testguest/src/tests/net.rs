//! virtio-net through a TAP: raw Ethernet frames out and in. The guest has no IP stack;
//! it builds its frames by hand. With `testguest.net_ip=A.B.C.D` (ours) and
//! `testguest.net_host=A.B.C.D` (the TAP's address on the host, which podvmm sets with
//! `--net ...,ip=`), it
//! - resolves the host's MAC with an ARP request (and answers the host's ARP requests);
//! - sends ICMP echo requests of 56 bytes for `testguest.net_ms` ms, each answered by the
//!   host's kernel, and checks every reply (round trips per second);
//! - sends one full-size (1500-byte IP) echo request and checks its reply.

use crate::arch::rdtsc;
use crate::cmdline::Cmdline;
use crate::dma::{Pool, Region};
use crate::net::{Frame, Net};
use crate::println;
use crate::report::{Summary, Test};
use crate::time::{Clock, Deadline};
use crate::virtio::Transport;

const ETH_ARP: u16 = 0x0806;
const ETH_IP: u16 = 0x0800;
const ICMP_ID: u16 = 0x7467; // "tg"

pub fn parse_ip(s: &str) -> Option<[u8; 4]> {
    let mut ip = [0u8; 4];
    let mut parts = s.split('.');
    for b in &mut ip {
        *b = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(ip)
}

fn put(r: Region, off: usize, bytes: &[u8]) {
    for (i, &b) in bytes.iter().enumerate() {
        r.write8(off + i, b);
    }
}

fn get<const N: usize>(r: Region, off: usize) -> [u8; N] {
    let mut a = [0u8; N];
    for (i, b) in a.iter_mut().enumerate() {
        *b = r.read8(off + i);
    }
    a
}

fn be16(r: Region, off: usize) -> u16 {
    u16::from_be_bytes(get(r, off))
}

/// The Internet checksum of `len` bytes at `off`.
fn checksum(r: Region, off: usize, len: usize) -> u16 {
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < len {
        sum += u32::from(be16(r, off + i));
        i += 2;
    }
    if i < len {
        sum += u32::from(r.read8(off + i)) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub struct Link {
    pub mac: [u8; 6],
    pub ip: [u8; 4],
    pub host_ip: [u8; 4],
    pub host_mac: [u8; 6],
    pub arp_answered: u64,
    pub ignored: u64,
}

pub fn arp(r: Region, link: &Link, op: u16, target_mac: [u8; 6], target_ip: [u8; 4], dst: [u8; 6]) {
    put(r, 0, &dst);
    put(r, 6, &link.mac);
    put(r, 12, &ETH_ARP.to_be_bytes());
    put(r, 14, &[0, 1, 8, 0, 6, 4]);
    put(r, 20, &op.to_be_bytes());
    put(r, 22, &link.mac);
    put(r, 28, &link.ip);
    put(r, 32, &target_mac);
    put(r, 38, &target_ip);
}

/// An ICMP echo request with `payload` bytes of pattern after the headers.
fn echo_request(r: Region, link: &Link, seq: u16, payload: usize) {
    put(r, 0, &link.host_mac);
    put(r, 6, &link.mac);
    put(r, 12, &ETH_IP.to_be_bytes());
    let total = (20 + 8 + payload) as u16;
    put(r, 14, &[0x45, 0]);
    put(r, 16, &total.to_be_bytes());
    put(r, 18, &seq.to_be_bytes());
    put(r, 20, &[0x40, 0, 64, 1, 0, 0]); // don't fragment, TTL 64, ICMP, checksum 0
    put(r, 26, &link.ip);
    put(r, 30, &link.host_ip);
    let c = checksum(r, 14, 20);
    put(r, 24, &c.to_be_bytes());
    put(r, 34, &[8, 0, 0, 0]);
    put(r, 38, &ICMP_ID.to_be_bytes());
    put(r, 40, &seq.to_be_bytes());
    for i in 0..payload {
        r.write8(42 + i, (seq as usize + i) as u8);
    }
    let c = checksum(r, 34, 8 + payload);
    put(r, 36, &c.to_be_bytes());
}

pub enum Got {
    ArpReply([u8; 6]),
    EchoReply { seq: u16, ok: bool },
    Other,
}

/// Classifies a frame; answers ARP requests for our address on the way.
pub fn classify(
    net: &mut Net,
    link: &mut Link,
    f: &Frame,
    deadline: Deadline,
) -> Result<Got, &'static str> {
    let d = f.data;
    if d.len < 14 {
        return Ok(Got::Other);
    }
    let dst: [u8; 6] = get(d, 0);
    if dst != link.mac && dst != [0xff; 6] {
        return Ok(Got::Other);
    }
    match be16(d, 12) {
        ETH_ARP if d.len >= 42 => {
            let op = be16(d, 20);
            let sender_mac: [u8; 6] = get(d, 22);
            let sender_ip: [u8; 4] = get(d, 28);
            let target_ip: [u8; 4] = get(d, 38);
            if op == 1 && target_ip == link.ip {
                let l = &*link;
                net.send(42, deadline, |r| {
                    arp(r, l, 2, sender_mac, sender_ip, sender_mac)
                })?;
                link.arp_answered += 1;
                return Ok(Got::Other);
            }
            if op == 2 && sender_ip == link.host_ip {
                return Ok(Got::ArpReply(sender_mac));
            }
            Ok(Got::Other)
        }
        ETH_IP if d.len >= 42 => {
            let proto = d.read8(23);
            let src: [u8; 4] = get(d, 26);
            if proto != 1 || src != link.host_ip || d.read8(34) != 0 || be16(d, 38) != ICMP_ID {
                return Ok(Got::Other);
            }
            let total = usize::from(be16(d, 16));
            let seq = be16(d, 40);
            let payload = total.saturating_sub(28);
            let ok = 14 + total <= d.len
                && checksum(d, 14, 20) == 0
                && checksum(d, 34, total - 20) == 0
                && (0..payload).all(|i| d.read8(42 + i) == (seq as usize + i) as u8);
            Ok(Got::EchoReply { seq, ok })
        }
        _ => Ok(Got::Other),
    }
}

/// Sends an echo request and waits for its reply.
fn ping(
    net: &mut Net,
    link: &mut Link,
    seq: u16,
    payload: usize,
    clock: &Clock,
) -> Result<bool, &'static str> {
    let deadline = clock.deadline(2000);
    {
        let l = &*link;
        net.send(42 + payload, deadline, |r| echo_request(r, l, seq, payload))?;
    }
    loop {
        if deadline.passed() {
            return Err("no echo reply within 2 s");
        }
        let Some(f) = net.recv() else { continue };
        let got = classify(net, link, &f, deadline);
        net.release(f);
        match got? {
            Got::EchoReply { seq: s, ok } if s == seq => return Ok(ok),
            _ => link.ignored += 1,
        }
    }
}

pub fn run(t: Transport, pool: &mut Pool, clock: &Clock, cmd: &Cmdline, sum: &mut Summary) {
    let mut test = Test::new("net");
    let (Some(ip), Some(host_ip)) = (
        cmd.option("net_ip").and_then(parse_ip),
        cmd.option("net_host").and_then(parse_ip),
    ) else {
        test.fail(format_args!(
            "needs testguest.net_ip= and testguest.net_host="
        ));
        return sum.finish(test);
    };
    let mut net = match Net::init(t, pool) {
        Ok(n) => n,
        Err(e) => {
            test.fail(format_args!("init: {e}"));
            return sum.finish(test);
        }
    };
    let m = net.mac;
    println!(
        "TESTGUEST net mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} features={:#x}",
        m[0], m[1], m[2], m[3], m[4], m[5], net.features
    );
    let mut link = Link {
        mac: net.mac,
        ip,
        host_ip,
        host_mac: [0; 6],
        arp_answered: 0,
        ignored: 0,
    };

    // ARP for the host, again every 200 ms, for up to 5 s.
    let give_up = clock.deadline(5000);
    let mut resolved = None;
    let mut arp_requests = 0;
    while resolved.is_none() && !give_up.passed() {
        let l = &link;
        if net
            .send(42, give_up, |r| arp(r, l, 1, [0; 6], host_ip, [0xff; 6]))
            .is_err()
        {
            break;
        }
        arp_requests += 1;
        let retry = clock.deadline(200);
        while resolved.is_none() && !retry.passed() {
            let Some(f) = net.recv() else { continue };
            let got = classify(&mut net, &mut link, &f, give_up);
            net.release(f);
            match got {
                Ok(Got::ArpReply(mac)) => resolved = Some(mac),
                Ok(_) => link.ignored += 1,
                Err(_) => break,
            }
        }
    }
    let Some(host_mac) = resolved else {
        test.fail(format_args!(
            "no ARP reply from the host after {arp_requests} requests"
        ));
        return sum.finish(test);
    };
    link.host_mac = host_mac;
    let h = host_mac;
    println!(
        "TESTGUEST net arp host_mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} requests={arp_requests}",
        h[0], h[1], h[2], h[3], h[4], h[5]
    );

    // Echo round trips.
    let ms = cmd.num("net_ms", 200);
    let until = clock.deadline(ms);
    let t0 = rdtsc();
    let (mut pings, mut bad) = (0u64, 0u64);
    let mut err = None;
    let mut seq = 1u16;
    while !until.passed() {
        match ping(&mut net, &mut link, seq, 56, clock) {
            Ok(ok) => {
                pings += 1;
                bad += u64::from(!ok);
            }
            Err(e) => {
                err = Some(e);
                break;
            }
        }
        seq = seq.wrapping_add(1);
    }
    let cycles = rdtsc() - t0;
    println!(
        "TESTGUEST net ping pings={pings} per_sec={} us={} bad={bad}",
        clock.per_sec(pings, cycles),
        clock.ns(cycles / pings.max(1)) / 1000
    );
    if let Some(e) = err {
        test.fail(format_args!("ping: {e}"));
    }
    test.check(
        pings > 0 && bad == 0,
        format_args!("{bad} of {pings} echo replies were wrong"),
    );

    // One full-size frame each way.
    let big = ping(&mut net, &mut link, 0xbeef, 1500 - 28, clock);
    println!("TESTGUEST net full_frame ok={}", u8::from(big == Ok(true)));
    test.check(big == Ok(true), format_args!("1514-byte frame: {big:?}"));
    println!(
        "TESTGUEST net arp_answered={} ignored={}",
        link.arp_answered, link.ignored
    );
    sum.finish(test);
}
