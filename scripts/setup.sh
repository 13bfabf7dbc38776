#!/usr/bin/env bash
# Installs the Debian packages podvmm's scripts, tests and benchmarks use, if missing.
# The guest kit's own build dependencies are installed by scripts/build-guest.sh.
set -euo pipefail
PKGS=(
    qemu-system-x86 # the side-by-side VMM in benches/tiny_run.rs
    fio             # host-side figure next to the in-VM IOPS in benches/testguest_io.rs and benches/blk_iops.rs
    fdisk           # sfdisk: the partitioned disk of tests/linux/blk.rs
    e2fsprogs       # mkfs.ext4, e2fsck, debugfs, dumpe2fs: the ext4 root of tests/linux/blk.rs
    dnsmasq-base    # DHCP server for the guest in tests/linux/net.rs
    iputils-arping  # ARP check of the guest in tests/linux/net.rs
    iputils-ping    # ICMP check of the guest in tests/linux/net.rs
    acl             # setfacl: /dev/kvm for an unprivileged user in tests/cli/least_privilege.rs
    libseccomp-dev  # building virtiofsd (below)
    libcap-ng-dev   # building virtiofsd (below)
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

# virtiofsd, the vhost-user back-end of virtio-fs that Kata starts for every pod: the Rust one,
# from crates.io, built once into the cache (about a minute). Tests find it there, or at
# $PODVMM_VIRTIOFSD.
VIRTIOFSD_VERSION=1.14.0
VIRTIOFSD_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/podvmm/virtiofsd-$VIRTIOFSD_VERSION"
if [[ ! -x $VIRTIOFSD_ROOT/bin/virtiofsd ]]; then
    echo "setup: building virtiofsd $VIRTIOFSD_VERSION into $VIRTIOFSD_ROOT"
    cargo install --quiet --locked virtiofsd --version "$VIRTIOFSD_VERSION" --root "$VIRTIOFSD_ROOT"
fi
