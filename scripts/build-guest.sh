#!/usr/bin/env bash
# Build the podvmm guest kit: a minimal Linux 6.12 kernel (vmlinux with the PVH
# entry note, and bzImage) plus a busybox initramfs (uncompressed and gzip).
#
# Usage: scripts/build-guest.sh [--print-key | --config-only | --help]
#
#   (no flag)      build (or take from the cache) and copy the results to
#                  <repo>/target/guest/
#   --print-key    print the cache key and exit (installs missing packages
#                  first, because the key includes the linux-source version)
#   --config-only  generate the kernel .config only, report every option of
#                  resources/kernel-config that did not survive olddefconfig,
#                  and exit (for editing the fragment; nothing is cached)
#
# Environment:
#   PODVMM_GUEST_CACHE   cache directory (default ~/.cache/podvmm/guest)
#   PODVMM_GUEST_JOBS    make -j value (default: nproc)
#
# See docs/guest.md.
set -euo pipefail

START_TS=$(date +%s)
log() { printf 'build-guest: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

MODE=build
case "${1:-}" in
    "") ;;
    --print-key) MODE=print-key ;;
    --config-only) MODE=config-only ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1 (try --help)" ;;
esac

SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")
REPO=$(cd "$(dirname "$SCRIPT_PATH")/.." && pwd)
FRAGMENT="$REPO/resources/kernel-config"
INIT="$REPO/resources/guest/init"
# Guest-kernel patches (patch -p1, applied in name order to a copy of the source).
PATCHES="$REPO/resources/kernel-patches"
CACHE=${PODVMM_GUEST_CACHE:-$HOME/.cache/podvmm/guest}
JOBS=${PODVMM_GUEST_JOBS:-$(nproc)}
OUT="$REPO/target/guest"
SRC_PKG=linux-source-6.12
SRC_TARBALL=/usr/src/linux-source-6.12.tar.xz

[[ -f $FRAGMENT ]] || die "missing $FRAGMENT"
[[ -f $INIT ]] || die "missing $INIT"

mkdir -p "$CACHE"
# One build at a time per cache directory; a second caller waits here and then
# finds the finished result in the cache.
exec 9>"$CACHE/.lock"
if ! flock -n 9; then
    log "another build-guest run holds $CACHE/.lock; waiting"
    flock 9
fi

# ---------------------------------------------------------------- packages --
# Package -> reason.  Only missing ones are installed, so warm runs stay fast.
PKGS=(
    "$SRC_PKG"        # the kernel source tarball
    build-essential   # gcc, make, libc headers
    flex bison bc     # kconfig / kernel build tools
    libelf-dev        # objtool (x86_64 ORC unwinder)
    xz-utils          # to unpack the source tarball
    lz4               # bzImage compression (CONFIG_KERNEL_LZ4)
    gzip              # initramfs.cpio.gz
    busybox-static    # the initramfs user space
    patch             # resources/kernel-patches/
)
pkg_installed() {
    [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true) == installed ]]
}
missing=()
for p in "${PKGS[@]}"; do pkg_installed "$p" || missing+=("$p"); done
if ((${#missing[@]})); then
    log "installing missing packages: ${missing[*]}"
    SUDO=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || die "need root or sudo to install: ${missing[*]}"
        SUDO=(sudo)
    fi
    "${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=600 update -qq
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 \
        install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
[[ -f $SRC_TARBALL ]] || die "$SRC_TARBALL not found after installing $SRC_PKG"
BUSYBOX=/bin/busybox
[[ -x $BUSYBOX ]] || die "$BUSYBOX not found"
file_is_static() { ! LC_ALL=C readelf -l "$1" 2>/dev/null | grep -q 'INTERP'; }
file_is_static "$BUSYBOX" || die "$BUSYBOX is dynamically linked (need busybox-static)"

SRC_VERSION=$(dpkg-query -W -f='${Version}' "$SRC_PKG")
BB_VERSION=$(dpkg-query -W -f='${Version}' busybox-static)
# The guest agent (agent/, /sbin/podvmm-agent in the initramfs): its key covers its sources,
# Cargo.lock and rustc; it is built (scripts/build-agent.sh) only when the initramfs is.
AGENT_KEY=$("$REPO/scripts/build-agent.sh" --print-key)

# -------------------------------------------------------------- cache keys --
# The result key covers everything the outputs depend on: the config fragment,
# the init, this script, and the linux-source and busybox-static versions.  It
# is made of two sub-keys so that editing only the init does not rebuild the
# kernel (and editing only the config does not rebuild the initramfs).
hash16() { sha256sum | cut -c1-16; }
SCRIPT_SUM=$(sha256sum <"$SCRIPT_PATH")
# The patches' key: their names and contents, in the order they are applied.
PATCH_LIST=()
if [[ -d $PATCHES ]]; then
    while IFS= read -r f; do PATCH_LIST+=("$f"); done < <(find "$PATCHES" -maxdepth 1 -name '*.patch' | sort)
fi
PKEY=$(for f in ${PATCH_LIST[@]+"${PATCH_LIST[@]}"}; do
    printf '%s %s\n' "$(basename "$f")" "$(sha256sum <"$f")"; done | hash16)
KKEY=$(printf 'fragment %s\nscript %s\n%s %s\npatches %s\n' "$(sha256sum <"$FRAGMENT")" \
    "$SCRIPT_SUM" "$SRC_PKG" "$SRC_VERSION" "$PKEY" | hash16)
IKEY=$(printf 'init %s\nscript %s\nbusybox-static %s\nagent %s\n' "$(sha256sum <"$INIT")" \
    "$SCRIPT_SUM" "$BB_VERSION" "$AGENT_KEY" | hash16)
KEY=$(printf 'kernel %s\ninitramfs %s\n' "$KKEY" "$IKEY" | hash16)
if [[ $MODE == print-key ]]; then
    echo "$KEY"
    exit 0
fi
log "cache key $KEY (kernel $KKEY: $SRC_PKG $SRC_VERSION, ${#PATCH_LIST[@]} patches $PKEY; initramfs $IKEY: busybox-static $BB_VERSION, agent $AGENT_KEY)"

# --------------------------------------------------- unpacked kernel source --
# Shared by all keys of the same linux-source version; never built in (all
# builds use O=), so it stays clean.  Unpacked into a temp dir then renamed.
SRC_ROOT="$CACHE/src/$SRC_VERSION"
KSRC="$SRC_ROOT/linux-source-6.12"
if [[ ! -f $KSRC/Makefile ]]; then
    log "unpacking $SRC_TARBALL (once per source version)"
    rm -rf "$SRC_ROOT" "$SRC_ROOT.tmp"
    mkdir -p "$SRC_ROOT.tmp"
    tar -C "$SRC_ROOT.tmp" -xf "$SRC_TARBALL"
    [[ -f $SRC_ROOT.tmp/linux-source-6.12/Makefile ]] || die "unexpected tarball layout"
    mv "$SRC_ROOT.tmp" "$SRC_ROOT"
fi

# ---------------------------------------------------- patched kernel source --
# The pristine tree above stays untouched: the patches go to a copy made of hard links
# (patch writes each file it changes anew, so the pristine inode keeps its contents), one per
# patch set, built under a temp name and renamed into place when every patch applied.
if ((${#PATCH_LIST[@]})); then
    PSRC_ROOT="$CACHE/src/$SRC_VERSION+patches-$PKEY"
    if [[ ! -f $PSRC_ROOT/applied ]]; then
        log "applying ${#PATCH_LIST[@]} kernel patch(es) to a copy of the source"
        rm -rf "$PSRC_ROOT" "$PSRC_ROOT.tmp"
        mkdir -p "$PSRC_ROOT.tmp"
        cp -al "$KSRC" "$PSRC_ROOT.tmp/linux-source-6.12"
        for f in "${PATCH_LIST[@]}"; do
            patch -s -p1 -N -d "$PSRC_ROOT.tmp/linux-source-6.12" <"$f" >&2 \
                || die "patch $(basename "$f") does not apply to $SRC_PKG $SRC_VERSION"
            echo "$(basename "$f")" >>"$PSRC_ROOT.tmp/applied"
        done
        mv "$PSRC_ROOT.tmp" "$PSRC_ROOT"
    fi
    KSRC="$PSRC_ROOT/linux-source-6.12"
fi

# Reproducible-build knobs (uname -v shows the kernel key instead of a date).
export KBUILD_BUILD_USER=podvmm KBUILD_BUILD_HOST=guest-kit
export KBUILD_BUILD_TIMESTAMP="podvmm-guest-kernel-$KKEY"
KMAKE=(make -s -C "$KSRC" ARCH=x86_64)

# Generate .config in $1: tinyconfig + fragment, resolved by olddefconfig, then
# check that every option the fragment sets survived (Kconfig silently drops an
# option whose dependencies are off).
make_config() {
    local obj=$1
    "${KMAKE[@]}" O="$obj" tinyconfig >"$obj/config.log" 2>&1
    (cd "$obj" && "$KSRC/scripts/kconfig/merge_config.sh" -m -O "$obj" \
        "$obj/.config" "$FRAGMENT") >>"$obj/config.log" 2>&1
    "${KMAKE[@]}" O="$obj" olddefconfig >>"$obj/config.log" 2>&1
    local bad=0 line sym want have
    while IFS= read -r line; do
        if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
            sym=${BASH_REMATCH[1]}; want="$sym=${BASH_REMATCH[2]}"
        elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
            sym=${BASH_REMATCH[1]}; want="# $sym is not set"
        else
            continue
        fi
        have=$(grep -E "^($sym=|# $sym is not set)" "$obj/.config" || true)
        if [[ $have != "$want" && ! ( -z $have && $want == "# "* ) ]]; then
            log "config: fragment wants '$want', got '${have:-<absent>}'"
            bad=1
        fi
    done <"$FRAGMENT"
    return $bad
}

# ------------------------------------------------------------- config only --
if [[ $MODE == config-only ]]; then
    obj="$CACHE/config-only"
    rm -rf "$obj"; mkdir -p "$obj"
    if make_config "$obj"; then
        log "config OK: $obj/.config ($(grep -c '=y' "$obj/.config") options =y)"
    else
        die "config: some fragment options were dropped (see above; $obj/.config)"
    fi
    exit 0
fi

# -------------------------------------------------------------------- build --
# Every cache entry is built under tmp.<pid>/ and renamed into place
# when complete, so an interrupted run leaves no half-written entry.
WORK="$CACHE/tmp.$$"
trap 'rm -rf "$WORK"' EXIT
rm -rf "$CACHE"/tmp.*            # leftovers of killed runs (we hold the lock)

KDIR="$CACHE/kernel/$KKEY"
if [[ -f $KDIR/done ]]; then
    log "kernel: cache hit ($KDIR)"
else
    KB="$WORK/kbuild"
    mkdir -p "$KB" "$WORK/kernel" "$CACHE/kernel"
    log "kernel: configuring (tinyconfig + resources/kernel-config)"
    make_config "$KB" || die "config: some fragment options were dropped (see above)"
    log "kernel: make -j$JOBS bzImage (a few minutes; log: $KB/build.log)"
    t0=$(date +%s)
    if ! "${KMAKE[@]}" O="$KB" -j"$JOBS" bzImage >"$KB/build.log" 2>&1; then
        tail -n 40 "$KB/build.log" >&2
        die "kernel build failed"
    fi
    log "kernel: built $(cat "$KB/include/config/kernel.release") in $(( $(date +%s) - t0 )) s"
    cp "$KB/vmlinux" "$KB/arch/x86/boot/bzImage" "$KB/System.map" "$KB/build.log" \
        "$WORK/kernel/"
    cp "$KB/.config" "$WORK/kernel/config"
    cp "$KB/include/config/kernel.release" "$WORK/kernel/kernel.release"
    echo "$KKEY" >"$WORK/kernel/done"
    rm -rf "$KDIR"
    mv "$WORK/kernel" "$KDIR"
    rm -rf "$KB"
fi

IDIR="$CACHE/initramfs/$IKEY"
if [[ -f $IDIR/done ]]; then
    log "initramfs: cache hit ($IDIR)"
else
    log "initramfs: busybox-static $BB_VERSION + resources/guest/init + podvmm-agent"
    mkdir -p "$WORK/initramfs" "$CACHE/initramfs"
    agent_bin=$("$REPO/scripts/build-agent.sh") || die "building the guest agent failed"
    cp "$agent_bin" "$WORK/podvmm-agent"
    # The kernel's own cpio writer: needs no root for device nodes, and with
    # -t 0 (fixed mtimes) the archive is byte-for-byte reproducible.
    gcc -O2 -o "$WORK/gen_init_cpio" "$KSRC/usr/gen_init_cpio.c"
    spec="$WORK/initramfs/initramfs.list"
    {
        echo "# generated by scripts/build-guest.sh"
        for d in /dev /proc /sys /tmp /run /root /etc /mnt /bin /sbin /usr /usr/bin /usr/sbin; do
            echo "dir $d 0755 0 0"
        done
        # The kernel opens /dev/console for init before anyone mounts devtmpfs.
        echo "nod /dev/console 0600 0 0 c 5 1"
        echo "nod /dev/null 0666 0 0 c 1 3"
        echo "file /bin/busybox $BUSYBOX 0755 0 0"
        echo "file /init $INIT 0755 0 0"
        echo "file /sbin/podvmm-agent $WORK/podvmm-agent 0755 0 0"
        "$BUSYBOX" --list-full | sort | while read -r applet; do
            [[ $applet == bin/busybox ]] && continue
            echo "slink /$applet /bin/busybox 0777 0 0"
        done
    } >"$spec"
    "$WORK/gen_init_cpio" -t 0 "$spec" >"$WORK/initramfs/initramfs.cpio"
    gzip -9 -n -c "$WORK/initramfs/initramfs.cpio" >"$WORK/initramfs/initramfs.cpio.gz"
    echo "$IKEY" >"$WORK/initramfs/done"
    rm -rf "$IDIR"
    mv "$WORK/initramfs" "$IDIR"
fi

# The result set for KEY: hard links into the two sub-caches.
DEST="$CACHE/$KEY"
if [[ ! -f $DEST/done ]]; then
    mkdir -p "$WORK/result"
    ln "$KDIR"/{vmlinux,bzImage,System.map,config,kernel.release} "$WORK/result/"
    ln "$IDIR"/initramfs.cpio{,.gz} "$WORK/result/"
    echo "$KEY" >"$WORK/result/done"
    rm -rf "$DEST"
    mv "$WORK/result" "$DEST"
fi
rm -rf "$WORK"
trap - EXIT

# ------------------------------------------------------ copy to the repo --
mkdir -p "$OUT"
for f in vmlinux bzImage initramfs.cpio initramfs.cpio.gz System.map config kernel.release; do
    cp "$DEST/$f" "$OUT/.$f.tmp.$$"
    mv -f "$OUT/.$f.tmp.$$" "$OUT/$f"
done

log "kernel $(cat "$OUT/kernel.release"), cache $DEST"
for f in vmlinux bzImage initramfs.cpio initramfs.cpio.gz; do
    printf 'build-guest: %-40s %10d bytes\n' "$OUT/$f" "$(stat -c %s "$OUT/$f")" >&2
done
log "done in $(( $(date +%s) - START_TS )) s"
