#!/usr/bin/env bash
# Bugs the suite must catch: applies each deliberate defect in scripts/defects/*.patch, one at a
# time, to a scratch checkout of HEAD, runs the tests against it, and reports whether the tests
# turned red (they must, for every defect), which tests failed, and how long it took.
#
#   scripts/defects.sh                 # every defect, the whole workspace suite each time
#   scripts/defects.sh --quick         # every defect, only the tests its patch names (# quick:)
#   scripts/defects.sh 01 06           # only defects whose file name starts with these
#
# The scratch checkout (a detached git worktree) and its target dir are kept between runs under
# $DEFECTS_DIR (default: /tmp/consensus-defects), so each defect rebuilds only what it touches.
# Never point DEFECTS_TARGET at the target dir of another checkout of this workspace: cargo names
# workspace artifacts by their path relative to the workspace root, so the defective builds
# would replace that checkout's artifacts, and its next build may reuse them as up to date.
# Exit status: 0 when every defect was caught, 1 otherwise. Not part of CI (it takes long).
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
dir=${DEFECTS_DIR:-/tmp/consensus-defects}
scratch=$dir/tree
export CARGO_TARGET_DIR=${DEFECTS_TARGET:-$dir/target}
quick=false
filters=()
for a in "$@"; do
  case $a in
    --quick) quick=true ;;
    -h|--help) sed -n 2,13p "$0"; exit 0 ;;
    *) filters+=("$a") ;;
  esac
done

mkdir -p "$dir"
if [ ! -d "$scratch" ]; then
  git -C "$repo" worktree add --detach "$scratch" HEAD >/dev/null 2>&1 ||
    { echo "cannot create the scratch worktree at $scratch" >&2; exit 2; }
fi
git -C "$scratch" checkout -q --detach "$(git -C "$repo" rev-parse HEAD)"
git -C "$scratch" reset -q --hard && git -C "$scratch" clean -qfd

results=()
all_caught=true
for patch in "$repo"/scripts/defects/*.patch; do
  name=$(basename "$patch" .patch)
  if [ ${#filters[@]} -gt 0 ]; then
    keep=false
    for f in "${filters[@]}"; do [[ $name == "$f"* ]] && keep=true; done
    $keep || continue
  fi
  desc=$(sed -n 's/^# defect: //p' "$patch")
  if $quick; then
    args=$(sed -n 's/^# quick: //p' "$patch")
  else
    args="--workspace --all-features --no-fail-fast"
  fi
  log=$dir/$name.log
  echo "== $name: $desc"
  if ! git -C "$scratch" apply "$patch"; then
    echo "   the patch no longer applies: update it" >&2
    results+=("| $name | patch does not apply | - | - |")
    all_caught=false
    continue
  fi
  start=$(date +%s)
  # shellcheck disable=SC2086
  (cd "$scratch" && CONFORMANCE_SEED=${CONFORMANCE_SEED:-1} cargo test $args) >"$log" 2>&1
  status=$?
  secs=$(( $(date +%s) - start ))
  git -C "$scratch" apply -R "$patch"
  failed=$(grep -E '^test .* \.\.\. FAILED$' "$log" | sed -E 's/^test (.*) \.\.\. FAILED$/\1/' | sort -u)
  count=$(printf '%s\n' "$failed" | grep -c . || true)
  if [ $status -ne 0 ]; then
    verdict="caught"
    if [ "$count" -eq 0 ]; then
      failed="(build or test run failed: see $log)"
    fi
  else
    verdict="MISSED"
    all_caught=false
  fi
  shown=$(printf '%s\n' "$failed" | head -6 | paste -sd ',' - | sed 's/,/, /g')
  [ "$count" -gt 6 ] && shown="$shown, ... ($count tests)"
  echo "   $verdict in ${secs}s: $shown"
  results+=("| $name | $verdict | ${secs}s | $shown |")
done

echo
echo "| defect | result | time | tests that failed |"
echo "|---|---|---|---|"
printf '%s\n' "${results[@]}"
$all_caught
