#!/usr/bin/env bash
# The README's first command: sets everything up, boots a pod sandbox guest (the guest kit's
# Linux and its agent, 1 vCPU, 2 GiB) with its console on this terminal, reaches the agent over
# vsock, runs commands inside the guest through it, and powers the guest off.
#
# Under software KVM (PVM, these development machines) a Linux boot takes a minute or two.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build-guest.sh
cargo build --release --bin podvmm
bin=target/x86_64-unknown-linux-gnu/release/podvmm

dir=$(mktemp -d /tmp/podvmm-demo.XXXXXX)
sock="$dir/vsock.sock"
events="$dir/events.jsonl"
pid=
cleanup() {
    [[ -n $pid ]] && kill "$pid" 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

echo "demo: booting target/guest/vmlinux with the agent (console below)"
start_ns=$(date +%s%N)
# quiet: every console byte is a VM exit; rcu stall reports only slow an emulated boot down.
"$bin" --kernel target/guest/vmlinux --initramfs target/guest/initramfs.cpio \
    --cpus boot=1 --memory size=2G --serial tty \
    --vsock "cid=3,socket=$sock" --event-monitor "path=$events" \
    --cmdline "console=ttyS0 reboot=k panic=-1 quiet rcupdate.rcu_cpu_stall_suppress=1" \
    </dev/null &
pid=$!

agent() { "$bin" agent --socket "$sock" --timeout 900 "$@"; }
for _ in $(seq 100); do [[ -S $sock ]] && break; sleep 0.1; done
# One CONNECT, held by podvmm until the agent listens: no polling.
agent ping >/dev/null
ready_ms=$((($(date +%s%N) - start_ns) / 1000000))
echo
echo "demo: the agent answered $((ready_ms / 1000)).$(((ready_ms % 1000) / 100)) s after podvmm was started"
grep -o '"event":"[a-z_]*","monotonic_ns":[0-9]*,"ms":[0-9.]*' "$events" |
    sed -E 's/"event":"([a-z_]*)".*"ms":([0-9]*)\.?.*/  \1 at \2 ms/'
echo "demo: uname -a in the guest:"
agent exec -- uname -a
echo "demo: grep -c processor /proc/cpuinfo in the guest:"
agent exec -- sh -c 'grep -c processor /proc/cpuinfo'
echo "demo: powering the guest off through the agent"
agent poweroff
set +e
wait "$pid"
rc=$?
set -e
pid=
echo "demo: podvmm exited with status $rc"
exit "$rc"
