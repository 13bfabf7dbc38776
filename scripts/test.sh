#!/usr/bin/env bash
# The test suite, as CI runs it: lint, unit and KVM tests (tiny guests and the guest kit's
# Linux kernel), the MSHV backend's tests, and one quick pass of the benchmarks.
# Installs what it needs (apt packages, the guest kit) on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n== %s\n' "$*"; }

step "packages"
scripts/setup.sh

step "guest kit (cached after the first build)"
scripts/build-guest.sh

step "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy --workspace --all-targets --features mshv -- -D warnings
# The entry points the fuzz targets use (devices' `fuzzing` feature, never in podvmm).
cargo clippy -p devices --all-targets --features fuzzing -- -D warnings
# The freestanding test guest is its own workspace (its own link flags): lint it apart.
cargo fmt --manifest-path testguest/Cargo.toml -- --check
# The fuzz targets are their own workspace too (scripts/fuzz.sh builds and runs them).
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
cargo clippy --manifest-path testguest/Cargo.toml --target-dir target/testguest --release -- -D warnings

step "tests (the Linux boot test takes minutes under software KVM)"
cargo test --workspace --no-fail-fast -- --include-ignored --test-threads=2
cargo test -p hypervisor --features mshv

step "fuzzing (quick pass: each target 15 s on its seed corpus; docs/fuzzing.md)"
scripts/fuzz.sh 15

step "benchmarks (quick pass)"
PODVMM_BENCH_QUICK=1 cargo bench --bench tiny_run
# Start-up next to QEMU microvm (and Cloud Hypervisor and Firecracker where
# PODVMM_PEERS_DIR names their binaries): first output, CPU, first API answer, RSS.
PODVMM_BENCH_QUICK=1 cargo bench --bench startup_peers
# virtio-blk's whole device path (4 KiB random I/O, QD32, O_DIRECT on a 1 GiB file written
# once under /var/tmp) taking turns with fio on the same file.
PODVMM_BENCH_QUICK=1 cargo bench --bench blk_iops
# virtio-net's device path against the raw TAP, host side (root: a netns and a TAP).
PODVMM_BENCH_QUICK=1 cargo bench --bench net_tap
# Boot to agent (under PVM: the VMM's part only, and says so) and the VMM's memory overhead.
PODVMM_BENCH_QUICK=1 cargo bench --bench boot_to_agent
PODVMM_BENCH_QUICK=1 cargo bench --bench vmm_overhead
PODVMM_BENCH_QUICK=1 cargo bench --bench api_info
PODVMM_BENCH_QUICK=1 cargo bench --bench testguest_io
