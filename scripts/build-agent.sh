#!/usr/bin/env bash
# Build podvmm-agent, the guest agent, as a static executable for the guest kit's initramfs.
#
# Usage: scripts/build-agent.sh [--print-key]
#
#   (no flag)     build (cargo, release, +crt-static for x86_64-unknown-linux-gnu only: the
#                 flag travels in RUSTFLAGS with an explicit --target, so build scripts and
#                 proc macros, and every other crate of the workspace, are unaffected), strip,
#                 check that it is static, and print the stripped binary's path on stdout
#   --print-key   print a hash of everything the binary is built from (the agent's sources,
#                 Cargo.lock, this script, rustc's version); scripts/build-guest.sh puts it in
#                 the initramfs cache key
#
# See docs/guest.md and docs/vsock.md.
set -euo pipefail

log() { printf 'build-agent: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")
REPO=$(cd "$(dirname "$SCRIPT_PATH")/.." && pwd)
TARGET=x86_64-unknown-linux-gnu
OUT_DIR="$REPO/target/agent"

key() {
    {
        cd "$REPO"
        find agent -type f -not -path 'agent/target/*' | LC_ALL=C sort | xargs sha256sum
        sha256sum Cargo.lock scripts/build-agent.sh
        rustc -V
    } | sha256sum | cut -c1-16
}

case "${1:-}" in
    --print-key) key; exit 0 ;;
    "") ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1 (try --help)" ;;
esac

command -v cargo >/dev/null || die "cargo not found (scripts/setup.sh installs Rust)"
t0=$(date +%s)
log "cargo build --release -p agent --target $TARGET (static)"
(
    cd "$REPO"
    unset CARGO_ENCODED_RUSTFLAGS
    # Size over speed (every byte of the initramfs is unpacked by an emulated kernel under
    # PVM): -Os, one codegen unit, fat LTO; 1.4 MB instead of 1.7 MB stripped.
    CARGO_PROFILE_RELEASE_OPT_LEVEL=s CARGO_PROFILE_RELEASE_LTO=fat \
        CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 \
        RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --quiet --release -p agent --bin podvmm-agent --target "$TARGET"
) >&2 || die "cargo build failed"
BIN="$REPO/target/$TARGET/release/podvmm-agent"
[[ -x $BIN ]] || die "$BIN missing after the build"
if LC_ALL=C readelf -l "$BIN" | grep -q INTERP; then
    die "$BIN is dynamically linked (crt-static did not apply)"
fi
mkdir -p "$OUT_DIR"
strip --strip-all -o "$OUT_DIR/podvmm-agent.tmp.$$" "$BIN"
mv -f "$OUT_DIR/podvmm-agent.tmp.$$" "$OUT_DIR/podvmm-agent"
log "static podvmm-agent: $(stat -c %s "$OUT_DIR/podvmm-agent") bytes, in $(( $(date +%s) - t0 )) s"
echo "$OUT_DIR/podvmm-agent"
