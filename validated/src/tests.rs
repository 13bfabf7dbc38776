use super::*;

#[test]
fn queue_sizes() {
    assert_eq!(QueueSize::new(256).unwrap().get(), 256);
    assert_eq!(QueueSize::new(1).unwrap().get(), 1);
    assert_eq!(QueueSize::new(32768).unwrap().get(), 32768);
    for bad in [0, 100, 65536, 1 << 20] {
        let e = QueueSize::new(bad).unwrap_err().to_string();
        assert!(e.contains("power of two up to 32768"), "{bad}: {e}");
    }
    let e = NetQueueSize::new(1).unwrap_err().to_string();
    assert!(e.contains("from 2 to 32768, not 1"), "{e}");
}

#[test]
fn queue_counts() {
    assert_eq!(DiskQueues::new(64).unwrap().get(), 64);
    for bad in [0, 65, 1 << 16, u32::MAX] {
        let e = DiskQueues::new(bad).unwrap_err().to_string();
        assert_eq!(e, format!("num_queues must be 1 to 64, not {bad}"));
    }
    assert_eq!(NetQueuePairs::from_queues(2).unwrap().get(), 1);
    assert_eq!(NetQueuePairs::from_queues(32).unwrap().get(), 16);
    for bad in [0, 1, 3, 34, u32::MAX - 1] {
        let e = NetQueuePairs::from_queues(bad).unwrap_err().to_string();
        assert!(e.contains("even number from 2 to 32"), "{bad}: {e}");
    }
}

#[test]
fn cids() {
    assert_eq!(GuestCid::new(3).unwrap().get(), 3);
    assert_eq!(
        GuestCid::new(u64::from(u32::MAX) - 1).unwrap().get(),
        4294967294
    );
    for bad in [0, 1, 2, u64::from(u32::MAX), 1 << 40] {
        assert!(GuestCid::new(bad)
            .unwrap_err()
            .to_string()
            .contains("reserved"));
    }
}

#[test]
fn macs() {
    let m: MacAddr = "02:ab:CD:00:00:01".parse().unwrap();
    assert_eq!(m.bytes()[1], 0xab);
    assert_eq!(m.to_string(), "02:ab:cd:00:00:01");
    for (bad, why) in [
        ("02:00:00:00:00", "six hex bytes"),
        ("02:00:00:00:00:001", "six hex bytes"),
        ("zz:00:00:00:00:01", "'zz'"),
        ("01:00:00:00:00:01", "multicast"),
        ("00:00:00:00:00:00", "all-zero"),
    ] {
        let e = bad.parse::<MacAddr>().unwrap_err().to_string();
        assert!(e.contains(why), "{bad}: {e}");
    }
}

#[test]
fn netmasks_tags_and_memory() {
    assert!(Netmask::new(Ipv4Addr::new(255, 255, 255, 0)).is_ok());
    assert!(Netmask::new(Ipv4Addr::UNSPECIFIED).is_ok());
    assert!(Netmask::new(Ipv4Addr::BROADCAST).is_ok());
    let e = Netmask::new(Ipv4Addr::new(255, 0, 255, 0)).unwrap_err();
    assert!(e.to_string().contains("not a netmask"), "{e}");
    assert_eq!(FsTag::new("kataShared").unwrap().as_str(), "kataShared");
    for bad in ["", "a\0b", &"t".repeat(37)] {
        let e = FsTag::new(bad).unwrap_err().to_string();
        assert!(e.contains("1 to 36 bytes"), "{e}");
    }
    assert_eq!(MemorySize::new(16 << 20).unwrap().get(), 16 << 20);
    assert_eq!(MemorySize::new(0), Err(ValueError::NoMemory));
    assert_eq!(
        MemorySize::new(17825793),
        Err(ValueError::MemoryAlignment(17825793))
    );
    assert_eq!(MemorySize::new(4096), Err(ValueError::MemoryTooSmall(4096)));
}
