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

step "tests (the Linux boot test takes minutes under software KVM)"
cargo test --workspace -- --include-ignored --test-threads=2
cargo test -p hypervisor --features mshv

step "benchmarks (quick pass)"
PODVMM_BENCH_QUICK=1 cargo bench --bench tiny_run
