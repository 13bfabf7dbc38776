//! The egress deny list: IPv4 destinations a guest's frames may not reach.
//!
//! Checked on the transmit path against a copy of the frame's first bytes that the VMM
//! itself writes to the TAP, so a guest that rewrites its buffer while the frame is in
//! flight cannot slip past the check. Parsing never trusts a length from the frame: every
//! field is read with a bounds check, VLAN tags (802.1Q, 802.1ad) are skipped up to
//! [`MAX_VLAN_TAGS`], and when the list is not empty a frame whose IPv4 header cannot be
//! read is dropped (fail closed).

use std::fmt;
use std::net::Ipv4Addr;

/// Ethernet header: destination, source, EtherType.
pub const ETH_HLEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_QINQ: u16 = 0x88a8;
/// Stacked VLAN tags looked through; deeper stacks are treated as unreadable.
pub const MAX_VLAN_TAGS: usize = 4;
const VLAN_HLEN: usize = 4;
/// The IPv4 header up to and including the destination address.
const IPV4_DST_END: usize = 20;
/// Bytes of an Ethernet frame the filter may need: header, tags, IPv4 up to the destination.
pub const INSPECT_LEN: usize = ETH_HLEN + MAX_VLAN_TAGS * VLAN_HLEN + IPV4_DST_END;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CidrError {
    #[error("prefix length {0} is larger than 32")]
    Prefix(u8),
    #[error("{addr}/{prefix} has host bits set (did you mean {network}/{prefix}?)")]
    HostBits {
        addr: Ipv4Addr,
        prefix: u8,
        network: Ipv4Addr,
    },
}

/// An IPv4 network, `addr/prefix`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Net {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Net {
    /// Refuses host bits outside the prefix: `10.0.0.1/8` is almost certainly a typo.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, CidrError> {
        if prefix > 32 {
            return Err(CidrError::Prefix(prefix));
        }
        let network = Ipv4Addr::from(u32::from(addr) & mask(prefix));
        if network != addr {
            return Err(CidrError::HostBits {
                addr,
                prefix,
                network,
            });
        }
        Ok(Ipv4Net { addr, prefix })
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.addr)
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn mask(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => u32::MAX << (32 - u32::from(p.min(32))),
    }
}

/// What the filter decided about one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// An IPv4 frame to a denied destination.
    Denied(Ipv4Addr),
    /// The frame says IPv4 (or VLAN) but is too short or too deeply tagged to check.
    Unreadable,
}

/// Where an Ethernet frame's IPv4 destination is, if it carries IPv4.
#[derive(Debug, PartialEq, Eq)]
enum L3 {
    Ipv4Dst(Ipv4Addr),
    NotIpv4,
    Unreadable,
}

fn be16(frame: &[u8], at: usize) -> Option<u16> {
    let b = frame.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([b[0], b[1]]))
}

fn ipv4_destination(frame: &[u8]) -> L3 {
    let mut type_at = ETH_HLEN - 2;
    for _ in 0..=MAX_VLAN_TAGS {
        let Some(ethertype) = be16(frame, type_at) else {
            return L3::Unreadable;
        };
        match ethertype {
            ETHERTYPE_VLAN | ETHERTYPE_QINQ => type_at += VLAN_HLEN,
            ETHERTYPE_IPV4 => {
                let ip = type_at + 2;
                return match frame.get(ip..ip + IPV4_DST_END) {
                    // Version 4 and a header length of at least 5 words, or it is no IPv4.
                    Some(h) if h[0] >> 4 == 4 && h[0] & 0xf >= 5 => {
                        L3::Ipv4Dst(Ipv4Addr::new(h[16], h[17], h[18], h[19]))
                    }
                    _ => L3::Unreadable,
                };
            }
            _ => return L3::NotIpv4,
        }
    }
    L3::Unreadable
}

/// One interface's deny list.
#[derive(Clone, Debug, Default)]
pub struct EgressFilter {
    deny: Vec<Ipv4Net>,
}

impl EgressFilter {
    pub fn new(deny: Vec<Ipv4Net>) -> Self {
        EgressFilter { deny }
    }

    pub fn is_empty(&self) -> bool {
        self.deny.is_empty()
    }

    /// Checks an Ethernet frame (without the virtio-net header). `frame` needs only its first
    /// [`INSPECT_LEN`] bytes.
    pub fn check(&self, frame: &[u8]) -> Verdict {
        if self.deny.is_empty() {
            return Verdict::Pass;
        }
        match ipv4_destination(frame) {
            L3::NotIpv4 => Verdict::Pass,
            L3::Unreadable => Verdict::Unreadable,
            L3::Ipv4Dst(dst) if self.deny.iter().any(|n| n.contains(dst)) => Verdict::Denied(dst),
            L3::Ipv4Dst(_) => Verdict::Pass,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An Ethernet frame with `tags` VLAN tags carrying IPv4 to `dst`.
    pub(crate) fn ipv4_frame(tags: &[u16], dst: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
        for &t in tags {
            f.extend_from_slice(&t.to_be_bytes());
            f.extend_from_slice(&[0x00, 0x05]); // TCI: VLAN 5
        }
        f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[9] = 17; // UDP
        ip[12..16].copy_from_slice(&[10, 0, 0, 2]);
        ip[16..20].copy_from_slice(&dst);
        f.extend_from_slice(&ip);
        f.extend_from_slice(&[0u8; 8]);
        f
    }

    fn metadata_filter() -> EgressFilter {
        EgressFilter::new(vec![
            Ipv4Net::new(Ipv4Addr::new(169, 254, 169, 254), 32).unwrap(),
            Ipv4Net::new(Ipv4Addr::new(10, 96, 0, 0), 12).unwrap(),
        ])
    }

    #[test]
    fn cidrs() {
        let n = Ipv4Net::new(Ipv4Addr::new(10, 96, 0, 0), 12).unwrap();
        assert!(n.contains(Ipv4Addr::new(10, 111, 255, 255)));
        assert!(!n.contains(Ipv4Addr::new(10, 112, 0, 0)));
        let all = Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 0).unwrap();
        assert!(all.contains(Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!(
            Ipv4Net::new(Ipv4Addr::new(1, 2, 3, 4), 33),
            Err(CidrError::Prefix(33))
        );
        let e = Ipv4Net::new(Ipv4Addr::new(10, 0, 0, 1), 8).unwrap_err();
        assert!(e.to_string().contains("10.0.0.0/8"), "{e}");
        assert_eq!(n.to_string(), "10.96.0.0/12");
    }

    #[test]
    fn denies_ipv4_destinations_plain_and_tagged() {
        let f = metadata_filter();
        let md = [169, 254, 169, 254];
        assert_eq!(
            f.check(&ipv4_frame(&[], md)),
            Verdict::Denied(Ipv4Addr::from(md))
        );
        assert_eq!(
            f.check(&ipv4_frame(&[ETHERTYPE_VLAN], md)),
            Verdict::Denied(Ipv4Addr::from(md))
        );
        assert_eq!(
            f.check(&ipv4_frame(&[ETHERTYPE_QINQ, ETHERTYPE_VLAN], md)),
            Verdict::Denied(Ipv4Addr::from(md))
        );
        assert!(matches!(
            f.check(&ipv4_frame(&[], [10, 100, 1, 1])),
            Verdict::Denied(_)
        ));
        assert_eq!(f.check(&ipv4_frame(&[], [10, 0, 0, 1])), Verdict::Pass);
        assert_eq!(
            f.check(&ipv4_frame(&[ETHERTYPE_VLAN], [169, 254, 169, 253])),
            Verdict::Pass
        );
        // An empty list passes everything, even garbage.
        assert_eq!(EgressFilter::default().check(&[1, 2, 3]), Verdict::Pass);
    }

    #[test]
    fn other_protocols_pass() {
        let f = metadata_filter();
        let mut arp = ipv4_frame(&[], [169, 254, 169, 254]);
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(f.check(&arp), Verdict::Pass);
        let mut v6 = ipv4_frame(&[ETHERTYPE_VLAN], [169, 254, 169, 254]);
        v6[16..18].copy_from_slice(&0x86ddu16.to_be_bytes());
        assert_eq!(f.check(&v6), Verdict::Pass);
    }

    #[test]
    fn unreadable_frames_fail_closed() {
        let f = metadata_filter();
        let full = ipv4_frame(&[ETHERTYPE_VLAN], [169, 254, 169, 254]);
        // Every truncation that cuts the tag or the IPv4 header short.
        for len in 0..ETH_HLEN + VLAN_HLEN + IPV4_DST_END {
            assert_eq!(f.check(&full[..len]), Verdict::Unreadable, "len {len}");
        }
        // More tags than we look through.
        let deep = ipv4_frame(&[ETHERTYPE_VLAN; MAX_VLAN_TAGS + 1], [1, 1, 1, 1]);
        assert_eq!(f.check(&deep), Verdict::Unreadable);
        let deepest_ok = ipv4_frame(&[ETHERTYPE_VLAN; MAX_VLAN_TAGS], [1, 1, 1, 1]);
        assert!(deepest_ok.len() >= INSPECT_LEN);
        assert_eq!(f.check(&deepest_ok[..INSPECT_LEN]), Verdict::Pass);
        // IPv4 EtherType with a bad version or header length.
        let mut bad = ipv4_frame(&[], [1, 1, 1, 1]);
        bad[ETH_HLEN] = 0x65;
        assert_eq!(f.check(&bad), Verdict::Unreadable);
        bad[ETH_HLEN] = 0x44;
        assert_eq!(f.check(&bad), Verdict::Unreadable);
    }
}
