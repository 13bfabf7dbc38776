//! Device-level tests: configuration, feature negotiation through the real MMIO transport,
//! the worker threads end to end over a socketpair, and (as root) real TAP interfaces in a
//! network namespace of the test's own.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::worker::tests::{mem, socket_tap, Peer, SocketTap};
use super::*;
use crate::virtio::{status, MmioTransport};

fn cfg(pairs: u16) -> NetDeviceConfig {
    NetDeviceConfig {
        id: "net0".into(),
        host: HostEnd::Name(None),
        mac: Some(validated::MacAddr::new([0x02, 0, 0, 0, 0, 0x42]).unwrap()),
        host_addr: None,
        queue_pairs: validated::NetQueuePairs::from_queues(2 * u32::from(pairs)).unwrap(),
        queue_size: validated::NetQueueSize::new(16).unwrap(),
        deny: Vec::new(),
    }
}

fn socket_net(c: NetDeviceConfig) -> (Net, Vec<Arc<SocketTap>>, Vec<Peer>) {
    let mut backends: Vec<Arc<dyn NetBackend>> = Vec::new();
    let mut taps = Vec::new();
    let mut peers = Vec::new();
    for _ in 0..c.queue_pairs.get() {
        let (b, p) = socket_tap();
        backends.push(b.clone());
        taps.push(b);
        peers.push(p);
    }
    (Net::with_backends(c, backends).unwrap(), taps, peers)
}

#[test]
fn config_space_and_features() {
    let (net, _, _) = socket_net(cfg(1));
    let mut mac = [0u8; 6];
    net.read_config(0, &mut mac);
    assert_eq!(mac, [0x02, 0, 0, 0, 0, 0x42]);
    let mut st = [0u8; 2];
    net.read_config(6, &mut st);
    assert_eq!(u16::from_le_bytes(st), 1, "link up");
    let f = net.features();
    for want in [
        F_MAC,
        F_MRG_RXBUF,
        F_CSUM,
        F_GUEST_CSUM,
        F_GUEST_TSO4,
        F_HOST_TSO6,
        VIRTIO_F_VERSION_1,
    ] {
        assert_ne!(f & want, 0);
    }
    assert_eq!(f & (F_MQ | F_CTRL_VQ), 0, "one pair: no control queue");
    assert_eq!(net.queue_max_sizes(), vec![16, 16]);

    let (net, _, _) = socket_net(cfg(3));
    assert_eq!(net.features() & (F_MQ | F_CTRL_VQ), F_MQ | F_CTRL_VQ);
    assert_eq!(net.queue_max_sizes().len(), 7);
    let mut pairs = [0u8; 2];
    net.read_config(8, &mut pairs);
    assert_eq!(u16::from_le_bytes(pairs), 3);
    // Reads past the end are zeroes, never a panic.
    let mut far = [0xffu8; 4];
    net.read_config(u64::MAX - 1, &mut far);
    assert_eq!(far, [0; 4]);
}

#[test]
fn random_macs_are_local_unicast() {
    let mut c = cfg(1);
    c.mac = None;
    let (a, _, _) = socket_net(c.clone());
    let (b, _, _) = socket_net(c);
    for m in [a.mac(), b.mac()] {
        assert_eq!(m[0] & 0x03, 0x02, "{}", format_mac(&m));
    }
    assert_ne!(a.mac(), b.mac());
}

#[test]
fn offloads_follow_the_driver() {
    assert_eq!(tap_offload(0), 0);
    assert_eq!(
        tap_offload(F_GUEST_TSO4),
        0,
        "TSO without checksum is not offered to the TAP"
    );
    assert_eq!(tap_offload(F_GUEST_CSUM), libc::TUN_F_CSUM);
    assert_eq!(
        tap_offload(F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_ECN | F_GUEST_UFO),
        libc::TUN_F_CSUM
            | libc::TUN_F_TSO4
            | libc::TUN_F_TSO6
            | libc::TUN_F_TSO_ECN
            | libc::TUN_F_UFO
    );
    assert_eq!(tap_offload(F_GUEST_CSUM | F_GUEST_ECN), libc::TUN_F_CSUM);
}

#[test]
fn bad_configurations_are_refused() {
    let err = |c: NetDeviceConfig| {
        let (b, _) = socket_tap();
        let backends: Vec<Arc<dyn NetBackend>> = vec![b];
        Net::with_backends(c, backends)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    // Bad numbers, a multicast MAC or a bad netmask cannot reach the device: `validated`
    // refuses to make them.
    assert!(
        err(cfg(2)).contains("2 queue pairs"),
        "one backend for two pairs"
    );
    // Fds: the count must match the pairs, and a non-TAP fd is refused by name.
    let mut c = cfg(2);
    c.host = HostEnd::Fds(vec![0]);
    let e = Net::new(c).err().unwrap().to_string();
    assert!(
        e.contains("1 TAP fds") && e.contains("2 queue pairs"),
        "{e}"
    );
    let null = std::fs::File::open("/dev/null").unwrap();
    let mut c = cfg(1);
    c.host = HostEnd::Fds(vec![null.as_raw_fd()]);
    let e = Net::new(c).err().unwrap().to_string();
    assert!(e.contains("is not a TAP device"), "{e}");
    // A name the kernel would refuse.
    let mut c = cfg(1);
    c.host = HostEnd::Name(Some("much-too-long-name".into()));
    let e = Net::new(c).err().unwrap().to_string();
    assert!(e.contains("longer than 15"), "{e}");
}

// ------------------------------------------------------- through the MMIO transport --

use crate::virtio::mmio::reg;
use crate::virtio::testing::{self, reg_write as w, DriverQueue};

const QSIZE: u16 = 16;

/// `queues` driver queues, 0x1000 apart from 0x1000.
fn rings(mem: &GuestMemoryMmap, queues: u64) -> Vec<DriverQueue<&GuestMemoryMmap>> {
    (0..queues)
        .map(|i| DriverQueue::new(mem, 0x1000 + i * 0x1000, QSIZE))
        .collect()
}

/// Brings the device up as Linux's virtio_mmio driver does, accepting `features` (masked by
/// what the device offers) and setting up `queues` queues; returns what it accepted and the
/// driver's queues.
fn bring_up<'m>(
    t: &mut MmioTransport,
    mem: &'m GuestMemoryMmap,
    features: u64,
    queues: u64,
) -> (u64, Vec<DriverQueue<&'m GuestMemoryMmap>>) {
    let rings = rings(mem, queues);
    let acked = testing::bring_up(t, features, &rings.iter().collect::<Vec<_>>());
    (acked, rings)
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn test_frame(len: usize) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 7]);
    f.extend_from_slice(&0x88b5u16.to_be_bytes());
    f.extend((0..len).map(|i| i as u8));
    f
}

#[test]
fn end_to_end_over_the_transport_with_back_pressure() {
    let mem = mem();
    let (net, _taps, peers) = socket_net(cfg(1));
    let counters = net.counters();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(Box::new(net), mem.clone(), irq.try_clone().unwrap()).unwrap();
    let all = u64::MAX;
    let (acked, mut q) = bring_up(&mut t, &mem, all, 2);
    assert_ne!(acked & F_MRG_RXBUF, 0);
    assert_eq!(t.counters().activations, 1);

    // Guest -> host.
    let out = test_frame(1000);
    mem.write_slice(&out, GuestAddress(0x10_0000)).unwrap();
    q[1].post_each(&[(0x10_0000, out.len() as u32, false)]);
    w(&mut t, reg::QUEUE_NOTIFY, 1);
    let mut buf = vec![0u8; 70_000];
    let peer = &peers[0];
    wait_for("the transmitted frame", || peer.recv(&mut buf).is_ok());
    assert_eq!(&buf[..out.len()], &out[..]);
    wait_for("the tx used ring", || q[1].used_idx() == 1);

    // Host -> guest while the guest has no receive buffers: the worker must park, not spin.
    let inbound = test_frame(200);
    for _ in 0..3 {
        peer.send(&inbound).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let stalls = counters.rx_stalls.load(Ordering::Relaxed);
    assert!(
        stalls <= 3,
        "the worker polled {stalls} times without buffers"
    );
    assert_eq!(counters.rx_frames.load(Ordering::Relaxed), 0);

    // Buffers arrive (64 KiB worth: the guest took GSO, so a frame may need that much).
    let bufs: Vec<_> = (0..u64::from(QSIZE))
        .map(|i| (0x20_0000 + i * 0x1_0000, 0x1_0000, true))
        .collect();
    q[0].post_each(&bufs);
    w(&mut t, reg::QUEUE_NOTIFY, 0);
    wait_for("three received frames", || q[0].used_idx() == 3);
    assert_eq!(q[0].used_elem(0).1 as usize, inbound.len());
    let mut got = vec![0u8; inbound.len()];
    mem.read_slice(&mut got, GuestAddress(0x20_0000)).unwrap();
    assert_eq!(&got[12..], &inbound[12..]);
    assert_eq!(&got[10..12], &[1, 0]);
    assert!(irq.read().unwrap() >= 1);

    // Reset stops the workers; a later bring-up works again.
    w(&mut t, reg::STATUS, 0);
    drop(q);
    bring_up(&mut t, &mem, all, 2);
    assert_eq!(t.counters().activations, 2);
}

#[test]
fn activation_checks_the_queue_count() {
    let mem = mem();
    let (net, _taps, _peers) = socket_net(cfg(2));
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(Box::new(net), mem.clone(), irq).unwrap();
    // MQ accepted but only 3 queues set up (needs 5): activation refused, no panic.
    let three = rings(&mem, 3);
    let (_, st) = testing::bring_up_status(&mut t, u64::MAX, &three.iter().collect::<Vec<_>>());
    assert_ne!(st & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(t.counters().failed_activations, 1);
    assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
    // Without MQ (and the control queue), one pair is all it takes.
    w(&mut t, reg::STATUS, 0);
    bring_up(&mut t, &mem, !(F_MQ | F_CTRL_VQ), 2);
    assert_eq!(t.counters().activations, 1);
}

// ----------------------------------------------------------------- real TAPs (root) --

/// Moves this test's thread into a network namespace of its own (threads spawned from it
/// follow). Returns false, and says so, where that is not allowed.
fn private_netns() -> bool {
    // SAFETY: unshare(2) with a flag; affects only the calling thread.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        eprintln!(
            "SKIPPED: cannot create a network namespace ({}); run as root for the TAP tests",
            std::io::Error::last_os_error()
        );
        return false;
    }
    std::path::Path::new("/dev/net/tun").exists()
}

fn ip(args: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("run ip");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn real_tap_create_configure_and_refuse() {
    if !private_netns() {
        return;
    }
    let mut c = cfg(2);
    c.host = HostEnd::Name(Some("ptap%d".into()));
    c.host_addr = Some((
        Ipv4Addr::new(10, 201, 0, 1),
        validated::Netmask::new(Ipv4Addr::new(255, 255, 255, 0)).unwrap(),
    ));
    let net = Net::new(c).unwrap();
    let name = net.tap_name().unwrap().to_string();
    assert!(name.starts_with("ptap"), "{name}");
    let link = ip(&["-d", "link", "show", &name]);
    assert!(
        link.contains("tap") && link.contains("multi_queue") && link.contains("vnet_hdr"),
        "{link}"
    );
    assert!(link.contains(",UP"), "{link}");
    let addr = ip(&["-4", "addr", "show", &name]);
    assert!(addr.contains("10.201.0.1/24"), "{addr}");
    drop(net);
    // podvmm created it: it is gone with the device.
    assert!(ip(&["link", "show", &name]).contains("does not exist"));

    // An existing interface that is no TAP.
    let mut c = cfg(1);
    c.host = HostEnd::Name(Some("lo".into()));
    let e = Net::new(c).err().unwrap().to_string();
    assert!(e.contains("TAP lo") && e.contains("not a TUN/TAP"), "{e}");

    // A TUN device of that name.
    assert_eq!(ip(&["tuntap", "add", "dev", "ptun0", "mode", "tun"]), "");
    let mut c = cfg(1);
    c.host = HostEnd::Name(Some("ptun0".into()));
    let e = Net::new(c).err().unwrap().to_string();
    assert!(e.contains("TUN device, not a TAP"), "{e}");
}

#[test]
fn real_tap_fds_are_checked() {
    if !private_netns() {
        return;
    }
    // A persistent TAP with vnet_hdr, opened by us as a client would, then handed over.
    assert_eq!(
        ip(&[
            "tuntap",
            "add",
            "dev",
            "pfd0",
            "mode",
            "tap",
            "vnet_hdr",
            "multi_queue"
        ]),
        ""
    );
    let mine = Tap::open_named("pfd0", 2).unwrap();
    let fds: Vec<i32> = mine.iter().map(|t| t.fd()).collect();
    let mut c = cfg(2);
    c.host = HostEnd::Fds(fds.clone());
    let net = Net::new(c).unwrap();
    assert_eq!(net.tap_name(), Some("pfd0"));
    drop(net);
    // Our own descriptors are still open (the device took duplicates).
    for fd in &fds {
        // SAFETY: F_GETFD on a descriptor number; harmless if closed.
        assert!(unsafe { libc::fcntl(*fd, libc::F_GETFD) } >= 0);
    }
    drop(mine);

    // A TAP fd opened without IFF_VNET_HDR.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap();
    // SAFETY: ifreq is plain old data.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"pplain0") {
        *d = *s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF with our own ifreq on our own descriptor.
    let ret = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    assert_eq!(ret, 0);
    let mut c = cfg(1);
    c.host = HostEnd::Fds(vec![f.as_raw_fd()]);
    let e = Net::new(c).err().unwrap().to_string();
    assert!(e.contains("without IFF_VNET_HDR"), "{e}");
}

/// An AF_PACKET socket on `ifname` for EtherType 0x88b5: the host side of a TAP.
fn packet_socket(ifname: &str) -> OwnedFd {
    let proto = 0x88b5u16.to_be();
    // SAFETY: socket(2); the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0);
    // SAFETY: sockaddr_ll is plain old data.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = index as i32;
    // SAFETY: bind with a sockaddr_ll of the right size.
    let ret = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(ret, 0, "{}", std::io::Error::last_os_error());
    let tv = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: SO_RCVTIMEO with a timeval.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(tv).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    fd
}

#[test]
fn real_tap_carries_frames_both_ways() {
    if !private_netns() {
        return;
    }
    let mem = mem();
    let mut c = cfg(1);
    c.host = HostEnd::Name(Some("pdata0".into()));
    c.host_addr = Some((
        Ipv4Addr::new(10, 202, 0, 1),
        validated::Netmask::new(Ipv4Addr::new(255, 255, 255, 0)).unwrap(),
    ));
    let net = Net::new(c).unwrap();
    let counters = net.counters();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(Box::new(net), mem.clone(), irq).unwrap();
    let (_, mut q) = bring_up(&mut t, &mem, u64::MAX, 2);
    let sock = packet_socket("pdata0");

    // Guest -> host.
    let out = test_frame(1400);
    mem.write_slice(&out, GuestAddress(0x10_0000)).unwrap();
    q[1].post_each(&[(0x10_0000, out.len() as u32, false)]);
    w(&mut t, reg::QUEUE_NOTIFY, 1);
    let mut buf = vec![0u8; 2048];
    // SAFETY: recv into our buffer.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    assert_eq!(
        n as usize,
        out.len() - VNET_HDR_LEN,
        "{}",
        std::io::Error::last_os_error()
    );
    assert_eq!(&buf[..n as usize], &out[VNET_HDR_LEN..]);

    // Host -> guest, with a frame larger than any one guest buffer (mergeable).
    let bufs: Vec<_> = (0..u64::from(QSIZE))
        .map(|i| (0x20_0000 + i * 0x1000, 0x1000, true))
        .collect();
    q[0].post_each(&bufs);
    w(&mut t, reg::QUEUE_NOTIFY, 0);
    let inbound = &test_frame(1400)[VNET_HDR_LEN..];
    // SAFETY: send from our buffer.
    let n = unsafe { libc::send(sock.as_raw_fd(), inbound.as_ptr().cast(), inbound.len(), 0) };
    assert_eq!(n as usize, inbound.len());
    // The host stack may send frames of its own (IPv6 neighbour discovery): find ours.
    let want = (inbound.len() + VNET_HDR_LEN) as u32;
    let mut head = None;
    wait_for("the received frame", || {
        head = (0..q[0].used_idx())
            .map(|i| q[0].used_elem(i))
            .find(|e| e.1 == want)
            .map(|e| u64::from(e.0));
        head.is_some()
    });
    let addr = 0x20_0000 + head.unwrap() * 0x1000;
    let mut got = vec![0u8; inbound.len()];
    mem.read_slice(&mut got, GuestAddress(addr + VNET_HDR_LEN as u64))
        .unwrap();
    assert_eq!(&got[..], inbound);
    assert_eq!(counters.rx_dropped.load(Ordering::Relaxed), 0);
}

#[test]
fn real_tap_frames_too_big_for_the_buffers_are_dropped() {
    if !private_netns() {
        return;
    }
    let mem = mem();
    let mut c = cfg(1);
    c.host = HostEnd::Name(Some("ptrunc0".into()));
    c.host_addr = Some((
        Ipv4Addr::new(10, 203, 0, 1),
        validated::Netmask::new(Ipv4Addr::new(255, 255, 255, 0)).unwrap(),
    ));
    let net = Net::new(c).unwrap();
    let counters = net.counters();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(Box::new(net), mem.clone(), irq).unwrap();
    // No mergeable buffers: each frame must fit one chain.
    let (_, mut q) = bring_up(&mut t, &mem, !F_MRG_RXBUF, 2);
    let sock = packet_socket("ptrunc0");
    let bufs: Vec<_> = (0..u64::from(QSIZE))
        .map(|i| (0x20_0000 + i * 0x1000, 1024, true))
        .collect();
    q[0].post_each(&bufs);
    w(&mut t, reg::QUEUE_NOTIFY, 0);
    let big = &test_frame(1400)[VNET_HDR_LEN..];
    let small = &test_frame(300)[VNET_HDR_LEN..];
    for f in [big, small] {
        // SAFETY: send from our buffer.
        let n = unsafe { libc::send(sock.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
        assert_eq!(n as usize, f.len());
    }
    let want = (small.len() + VNET_HDR_LEN) as u32;
    wait_for("the small frame", || {
        (0..q[0].used_idx()).any(|i| q[0].used_elem(i).1 == want)
    });
    // A TAP cuts a frame to the buffers given: the device must notice, not deliver it cut.
    assert_eq!(counters.rx_dropped.load(Ordering::Relaxed), 1);
    for i in 0..q[0].used_idx() {
        let (_, len) = q[0].used_elem(i);
        assert!(len < 1024, "a frame filled a whole buffer: {len}");
    }
}
