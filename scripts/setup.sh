#!/usr/bin/env bash
# Installs the Debian packages podvmm's scripts, tests and benchmarks use, if missing.
# The guest kit's own build dependencies are installed by scripts/build-guest.sh.
set -euo pipefail
PKGS=(
    qemu-system-x86 # the side-by-side VMM in benches/tiny_run.rs
    fio             # host-side figure next to the in-VM IOPS in benches/testguest_io.rs and benches/blk_iops.rs
    fdisk           # sfdisk: the partitioned disk of tests/linux_blk.rs
    e2fsprogs       # mkfs.ext4, e2fsck, debugfs, dumpe2fs: the ext4 root of tests/linux_blk.rs
    dnsmasq-base    # DHCP server for the guest in tests/net_linux.rs
    iputils-arping  # ARP check of the guest in tests/net_linux.rs
    iputils-ping    # ICMP check of the guest in tests/net_linux.rs
    acl             # setfacl: /dev/kvm for an unprivileged user in tests/least_privilege.rs
)
missing=()
for p in "${PKGS[@]}"; do
    [[ $(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true) == installed ]] || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    SUDO=()
    [[ $(id -u) -eq 0 ]] || SUDO=(sudo)
    "${SUDO[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "setup: cargo not found: install Rust (rustup) first" >&2; exit 1; }
[[ -e /dev/kvm ]] || echo "setup: warning: /dev/kvm is missing; podvmm cannot run guests here" >&2
