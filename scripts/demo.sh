#!/usr/bin/env bash
# Sets everything up and boots a pod sandbox guest (the guest kit's Linux kernel and
# initramfs, 2 vCPUs) with its console on this terminal, then says how far it got.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build-guest.sh
cargo build --release
log=$(mktemp /tmp/podvmm-demo.XXXXXX.log)
echo "demo: booting target/guest/vmlinux (console below; also in $log)"
start=$(date +%s.%N)
set +e
# panic=1: under software KVM user space cannot run and init dies; the kernel then panics
# and reboots, which ends the VMM instead of leaving a dead guest behind.
timeout 1200 target/release/podvmm --kernel target/guest/vmlinux \
    --initramfs target/guest/initramfs.cpio --cpus boot=2 --memory size=2G \
    --cmdline "console=ttyS0 reboot=k panic=1 podvmm.test=reboot rcupdate.rcu_cpu_stall_suppress=1" | tee "$log"
rc=${PIPESTATUS[0]}
set -e
secs=$(echo "$(date +%s.%N) - $start" | bc)
echo
echo "demo: podvmm exited with status $rc after ${secs%.*} s"
if grep -q "podvmm-guest: init started" "$log"; then
    echo "demo: the guest's user space ran: the pod sandbox guest is fully up."
elif grep -q "Run /init as init process" "$log"; then
    echo "demo: the kernel booted to /init (2 CPUs: $(grep -c 'Brought up 1 node, 2 CPUs' "$log") line)."
    if [[ -d /sys/module/kvm_pvm ]]; then
        echo "demo: this host's /dev/kvm is PVM (software virtualization): guest user space cannot"
        echo "      run here (no system call reaches the guest kernel), so /init dies at its first"
        echo "      system call. On hardware-assisted KVM the same command runs the guest to its shell."
    fi
else
    echo "demo: the kernel did not reach /init; see $log"
    exit 1
fi
