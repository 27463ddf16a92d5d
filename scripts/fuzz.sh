#!/usr/bin/env bash
# Fuzzes every decoder of outside bytes with cargo-fuzz (libFuzzer) on the nightly toolchain.
# Each target starts from the committed corpus in fuzz/corpus/<target>/ (which the conformance
# crate's `fuzz_corpus` test replays on stable in CI) and grows a working copy in
# fuzz/target/corpus/<target>/, minimized at the end; the committed corpus stays small and is
# only changed by hand (copy a few new inputs from the working copy).
#
#   scripts/fuzz.sh                      # every target: FUZZ_RUNS (default 10 M) executions
#                                        # or FUZZ_SECS (default 1800) seconds, whichever first
#   FUZZ_SECS=120 scripts/fuzz.sh quic_wire raft_message
#
# Needs: rustup's nightly toolchain and `cargo install cargo-fuzz`. A crash stops the script
# and leaves the input in fuzz/artifacts/<target>/. Prints each target's executions and time.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECS:-1800}
runs=${FUZZ_RUNS:-10000000}
# The fuzz crate is its own workspace; seed its lock from the main one so the versions match.
cp Cargo.lock fuzz/Cargo.lock
if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(ls fuzz/fuzz_targets | sed 's/\.rs$//' | sort)
fi
summary=()
for t in "${targets[@]}"; do
  work="fuzz/target/corpus/$t"
  mkdir -p "$work"
  cp -n "fuzz/corpus/$t"/* "$work"/ 2>/dev/null || true
  log="fuzz/target/fuzz-$t.log"
  echo "== $t: $runs executions or ${secs}s"
  cargo +nightly fuzz run "$t" "$work" -- \
    -runs="$runs" -max_total_time="$secs" -rss_limit_mb=4096 -max_len=65536 -print_final_stats=1 \
    > "$log" 2>&1 || { tail -40 "$log"; echo "CRASH in $t (see $log and fuzz/artifacts/$t/)"; exit 1; }
  done_runs=$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}')
  took=$(grep -E '^Done [0-9]+ runs in' "$log" | awk '{print $5}')
  cargo +nightly fuzz cmin "$t" "$work" > "fuzz/target/cmin-$t.log" 2>&1
  files=$(ls "$work" | wc -l)
  line="$t: ${done_runs:-?} executions in ${took:-?} s, working corpus $files files, no crash"
  echo "$line" | tee -a fuzz/target/summary.log
  summary+=("$line")
done
printf '%s\n' "${summary[@]}"
