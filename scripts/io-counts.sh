#!/usr/bin/env bash
# Per-request counts of virtio-blk's device path next to fio's, on the same file, in one run:
# system calls, sleeps (context switches) and where the CPU goes (user space, kernel, the
# hottest functions), for one `blk_iops` comparison (default: 4 KiB random reads at QD32 on
# one queue, O_DIRECT; `randread_4k_qd32_1q_cached` is the page-cache one) (docs/
# ARCHITECTURE.md, "Data path of one disk request"). Runs `cargo bench --bench blk_iops`
# restricted to that comparison under perf's tracepoints, then under its sampler.
# Needs root and perf with tracepoints (hardware counters are not needed; under PVM there are
# none). Not part of CI: a tool for whoever changes the I/O path.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v perf >/dev/null || { echo "io-counts: perf is not installed" >&2; exit 1; }

config=${1:-randread_4k_qd32_1q}
bench=$(cargo bench --no-run --bench blk_iops 2>&1 | grep -o 'target/[^ )]*blk_iops-[0-9a-f]*' | tail -1)
[[ -x $bench ]] || { echo "io-counts: cannot find the blk_iops bench binary" >&2; exit 1; }
out=$(mktemp -d /tmp/io-counts.XXXXXX)
trap 'rm -rf "$out"' EXIT

run() {
    PODVMM_BENCH_QUICK=1 PODVMM_BLK_BENCH_ONLY="$config" perf record -q "$@" -- \
        "$bench" --bench --exact "blk_iops/$config" 2>/dev/null | grep "podvmm-bench: $config" || true
}

echo "io-counts: $config: the device's queue worker (blk-bench-q0; blk-nopoll-q0 is the same"
echo "io-counts: with its polling off, cached comparison only) and fio, tracepoints"
run -e syscalls:sys_enter_io_uring_enter -e syscalls:sys_enter_read \
    -e syscalls:sys_enter_write -e syscalls:sys_enter_poll -e sched:sched_switch \
    -o "$out/trace.data" | tee "$out/bench.txt"
# The bench prints each side's request total: "requests: blk-bench-q0=N blk-nopoll-q0=M fio=K".
totals=$(grep -o 'requests: .*' "$out/bench.txt" | tail -1 | cut -d' ' -f2-)
[[ -n $totals ]] || { echo "io-counts: the bench printed no request totals" >&2; exit 1; }
perf script -i "$out/trace.data" -F comm,event 2>/dev/null | awk -v totals="$totals" '
    BEGIN { n = split(totals, t, " "); for (i = 1; i <= n; i++) { split(t[i], kv, "="); req[kv[1]] = kv[2] } }
    { sub(/:$/, "", $2); if ($1 in req && req[$1] > 0) n2[$1 "|" $2]++ }
    END {
        for (k in n2) {
            split(k, p, "|")
            printf "  %-14s %-36s %8.3f per request (%d / %d)\n", p[1], p[2], n2[k] / req[p[1]], n2[k], req[p[1]]
        }
    }' | sort

echo "io-counts: where the CPU goes (perf sampling, cpu-clock)"
run -F 10000 -g -o "$out/prof.data" >/dev/null
for comm in blk-bench-q0 blk-nopoll-q0 fio; do
    perf report -i "$out/prof.data" --comm "$comm" --no-children --sort sym -g none \
        --percentage relative 2>/dev/null | awk -v c="$comm" '
        /^ +[0-9.]+%/ {
            pct = $1; sub(/%/, "", pct)
            if ($2 == "[k]") k += pct; else u += pct
            if (shown < 6) { printf "  %-14s %6.2f%% %s %s\n", c, pct, $2, $3; shown++ }
        }
        END { if (k + u > 0) printf "  %-14s kernel %.1f%%, user space %.1f%%\n", c, k, u }'
done
