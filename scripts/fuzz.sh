#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a while on its seed corpus (docs/fuzzing.md).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     default: 20 s, every target
#
# The toolchain here is stable: cargo-fuzz's -Z flags are enabled with RUSTC_BOOTSTRAP=1.
# Seeds are copied to a scratch corpus (fuzz/target/corpus/<target>), so what libFuzzer adds
# does not dirty the tree; crashes are left in fuzz/artifacts/<target>/ and fail the script.
# Set FUZZ_JOBS=N to run N workers per target (a long run on a machine with cores to spare).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
shift || true
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
fi

cargo fuzz build --fuzz-dir fuzz
failed=()
for t in "${targets[@]}"; do
    scratch=fuzz/target/corpus/$t
    mkdir -p "$scratch" "fuzz/artifacts/$t"
    cp -n fuzz/corpus/"$t"/* "$scratch"/ 2>/dev/null || true
    log=fuzz/target/$t.log
    jobs=()
    if [ "${FUZZ_JOBS:-1}" -gt 1 ]; then
        jobs=(-jobs="$FUZZ_JOBS" -workers="$FUZZ_JOBS")
    fi
    start=$(date +%s)
    if cargo fuzz run --fuzz-dir fuzz "$t" "$scratch" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout=20 -print_final_stats=1 \
        -artifact_prefix="fuzz/artifacts/$t/" "${jobs[@]}" >"$log" 2>&1; then
        status=ok
    else
        status=FAILED
        failed+=("$t")
    fi
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | awk '{s+=$2} END {print s+0}')
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | awk '{print $2}')
    printf 'fuzz %-20s %-6s %10s execs in %4ss, cov %s, corpus %s files\n' \
        "$t" "$status" "$runs" "$(( $(date +%s) - start ))" "${cov:-?}" "$(ls "$scratch" | wc -l)"
    if [ "$status" != ok ]; then
        tail -40 "$log"
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: crashes in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
