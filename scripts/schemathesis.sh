#!/usr/bin/env bash
# Fuzzes the admin HTTP API of a `broker dev` cluster with schemathesis, driven by the OpenAPI
# description the node serves, over HTTPS checked with the dev CA. Outside CI: needs
# `pip install schemathesis`.
#   scripts/schemathesis.sh [MAX_EXAMPLES]
#
# Two runs, each on a fresh cluster: every operation except the two that can legitimately take
# the fuzzed node out of the voting set (`PUT /cluster/voters`, `DELETE /cluster/members/{id}`:
# a well-formed request may remove it, after which it rightly answers 503), then those two with
# schema-violating requests only (each must get a 4xx and change nothing).
set -euo pipefail
examples="${1:-300}"
cd "$(dirname "$0")/.."
command -v schemathesis >/dev/null || { echo "schemathesis not found: pip install schemathesis" >&2; exit 2; }
cargo build -q -p broker-node
broker="${CARGO_TARGET_DIR:-target}/debug/broker"
log="$(mktemp)"
dev=
trap '[ -n "$dev" ] && kill $dev 2>/dev/null; rm -f "$log"' EXIT

# Starts a fresh `broker dev`; sets admin, token, ca.
start_dev() {
  [ -n "$dev" ] && { kill $dev 2>/dev/null || true; wait $dev 2>/dev/null || true; }
  "$broker" dev >"$log" 2>/dev/null &
  dev=$!
  for _ in $(seq 1 100); do grep -q "^data in" "$log" && break; sleep 0.2; done
  admin="$(awk '/^node 1: admin/ {print $4}' "$log")"
  token="$(grep -o 'BROKER_ADMIN_TOKEN=[0-9a-f]*' "$log" | cut -d= -f2)"
  ca="$(grep -o 'BROKER_ADMIN_CA=[^ ]*' "$log" | cut -d= -f2)"
  [ -n "$admin" ] && [ -n "$token" ] && [ -n "$ca" ] || { echo "broker dev did not start" >&2; cat "$log" >&2; exit 1; }
  sleep 2  # brokers register; the run needs nothing else to exist
}

rc=0
start_dev
schemathesis run "$admin/openapi.json" --url "$admin" --tls-verify "$ca" -H "Authorization: Bearer $token" \
    --exclude-name "PUT /cluster/voters" --exclude-name "DELETE /cluster/members/{id}" \
    --max-examples "$examples" --checks all --workers 2 --request-timeout 40 || rc=$?
start_dev
schemathesis run "$admin/openapi.json" --url "$admin" --tls-verify "$ca" -H "Authorization: Bearer $token" \
    --include-name "PUT /cluster/voters" --include-name "DELETE /cluster/members/{id}" --mode negative \
    --max-examples "$examples" --checks all --workers 2 --request-timeout 40 || rc=$?
exit $rc
