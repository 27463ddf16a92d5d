#!/usr/bin/env bash
# The README's operator walkthrough on one machine: three `broker serve` processes started
# from TOML config files, then membership from the CLI one step at a time (add a voter,
# replace node 1, move the leadership, remove a node), `quorum describe` after each step, the
# consensus metrics, an offline `debug dump` of a stopped node, and a backup restored as a new
# three-node cluster. Outside CI; prints the session. Ports: a random base B (node N:
# consensus B+N, admin B+100+N; restored node N: B+10+N and B+110+N).
#   scripts/walkthrough.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p broker-node
broker="$(pwd)/${CARGO_TARGET_DIR:-target}/debug/broker"
[ -x "$broker" ] || broker="${CARGO_TARGET_DIR}/debug/broker"
dir="$(mktemp -d)"
declare -A pid
cleanup() { for p in "${pid[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
base=$((20000 + RANDOM % 20000))
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/admin-token"
peers="1 = \"127.0.0.1:$((base + 1))\"
2 = \"127.0.0.1:$((base + 2))\"
3 = \"127.0.0.1:$((base + 3))\""

config() { # config ID [join]
  local id=$1
  {
    echo "id = $id"
    echo "listen = \"127.0.0.1:$((base + id))\""
    echo "admin = \"127.0.0.1:$((base + 100 + id))\""
    echo "data-dir = \"$dir/node-$id\""
    echo "cluster-id = \"walkthrough\""
    echo "dev-certs = \"$dir/certs\""
    echo "admin-token-file = \"$dir/admin-token\""
    if [ "${2:-}" = join ]; then echo "join = true"; else printf '\n[peers]\n%s\n' "$peers"; fi
  } > "$dir/node-$id.toml"
}
serve() { # serve ID [extra flags]
  local id=$1; shift
  RUST_LOG=error "$broker" serve --config "$dir/node-$id.toml" "$@" > "$dir/node-$id.out" 2>&1 &
  pid[$id]=$!
}
run() { echo "\$ broker $*"; "$broker" "$@"; echo; }
until_ok() { for _ in $(seq 1 100); do "$broker" "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done; "$broker" "$@"; }

for id in 1 2 3; do config "$id"; done
config 4 join
config 5 join
# The first start of the initial members creates the cluster: --bootstrap on the command line
# (kept out of the files, so a wiped data dir is refused later rather than re-created).
for id in 1 2 3; do serve "$id" --bootstrap; done
export BROKER_ADMIN="https://127.0.0.1:$((base + 102)),https://127.0.0.1:$((base + 103))"
export BROKER_ADMIN_CA="$dir/certs/ca.pem" BROKER_ADMIN_TOKEN="$(cat "$dir/admin-token")"
echo "# three nodes from $dir/node-{1,2,3}.toml; BROKER_ADMIN=$BROKER_ADMIN"
cat "$dir/node-1.toml"; echo
until_ok quorum describe --status
until_ok topics create orders --partitions 3 --replication-factor 3
run quorum describe --status
run quorum describe --replication

serve 4
run cluster add-voter 4 --address "127.0.0.1:$((base + 4))"
run quorum describe --replication

serve 5
run cluster replace 1 5 --address "127.0.0.1:$((base + 5))"
kill "${pid[1]}"; unset 'pid[1]'
run quorum describe --replication

run cluster transfer-leader 4
run quorum describe --status

run cluster remove 2
kill "${pid[2]}"; unset 'pid[2]'
export BROKER_ADMIN="https://127.0.0.1:$((base + 104)),https://127.0.0.1:$((base + 105))"
run quorum describe --replication
run topics describe orders
run cluster backup "$dir/metadata.backup"
echo "\$ curl -s --cacert ca.pem https://127.0.0.1:$((base + 104))/metrics | grep -E '^consensus_(role|proposals_total|replication_lag_entries|log_fsyncs_total)'"
curl -s --cacert "$BROKER_ADMIN_CA" "https://127.0.0.1:$((base + 104))/metrics" \
  | grep -E '^consensus_(role|proposals_total|replication_lag_entries|log_fsyncs_total)\{' || true
echo
kill -9 "${pid[3]}"; unset 'pid[3]'
echo "# node 3 killed; two seconds later:"
sleep 2
run quorum describe --replication
kill "${pid[5]}"; unset 'pid[5]'
wait "${pid[5]:-}" 2>/dev/null || true
sleep 0.5
run debug dump --data-dir "$dir/node-5" --entries 6

# Disaster recovery from the backup: a new cluster of three on new ports and data dirs.
kill "${pid[4]}"; unset 'pid[4]'
restored="1=127.0.0.1:$((base + 11)),2=127.0.0.1:$((base + 12)),3=127.0.0.1:$((base + 13))"
for id in 1 2 3; do
  run restore --backup "$dir/metadata.backup" --data-dir "$dir/restored-$id" --id "$id" \
    --peers "$restored" --cluster-id walkthrough-restored
  {
    echo "id = $id"
    echo "listen = \"127.0.0.1:$((base + 10 + id))\""
    echo "admin = \"127.0.0.1:$((base + 110 + id))\""
    echo "data-dir = \"$dir/restored-$id\""
    echo "cluster-id = \"walkthrough-restored\""
    echo "dev-certs = \"$dir/certs\""
    echo "admin-token-file = \"$dir/admin-token\""
    printf '\n[peers]\n'
    for p in 1 2 3; do echo "$p = \"127.0.0.1:$((base + 10 + p))\""; done
  } > "$dir/restored-$id.toml"
  RUST_LOG=error "$broker" serve --config "$dir/restored-$id.toml" > "$dir/restored-$id.out" 2>&1 &
  pid[r$id]=$!
done
export BROKER_ADMIN="https://127.0.0.1:$((base + 111)),https://127.0.0.1:$((base + 112))"
until_ok topics describe orders
run quorum describe --status
run topics list
