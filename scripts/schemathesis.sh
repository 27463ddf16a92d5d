#!/usr/bin/env bash
# Fuzzes the admin HTTP API of a `broker dev` cluster with schemathesis, driven by the OpenAPI
# description the node serves. Outside CI: needs `pip install schemathesis`.
#   scripts/schemathesis.sh [MAX_EXAMPLES]
set -euo pipefail
examples="${1:-300}"
cd "$(dirname "$0")/.."
command -v schemathesis >/dev/null || { echo "schemathesis not found: pip install schemathesis" >&2; exit 2; }
cargo build -q -p broker-node
log="$(mktemp)"
"${CARGO_TARGET_DIR:-target}/debug/broker" dev >"$log" 2>/dev/null &
dev=$!
trap 'kill $dev 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 100); do grep -q "admin token" "$log" && break; sleep 0.2; done
admin="$(awk '/^node 1: admin/ {print $4}' "$log")"
token="$(grep -o 'BROKER_ADMIN_TOKEN=[0-9a-f]*' "$log" | cut -d= -f2)"
[ -n "$admin" ] && [ -n "$token" ] || { echo "broker dev did not start" >&2; cat "$log" >&2; exit 1; }
sleep 2  # brokers register; the run needs nothing else to exist
schemathesis run "$admin/openapi.json" --url "$admin" -H "Authorization: Bearer $token" \
    --max-examples "$examples" --checks all --workers 2 --request-timeout 40
