#!/usr/bin/env bash
# etcd and the project's bench in the same run, one after the other, with the ratios printed:
# nobody has to compare figures from different days.
#
#   scripts/side-by-side.sh [RUNS] [BENCH ARGS...]
#
# Needs `etcd` and `etcdctl` (Debian: apt-get install etcd-server etcd-client); not run in CI.
# Starts a 3-member etcd cluster on 127.0.0.1 (free ports, fsync on, as etcd always runs), then
# per run (default 3): `bench --etcd <leader>` with in-process clients (every combination),
# `bench --etcd <leader> --network` (every node its own process, the clients over gRPC with one
# unary call per put, exactly as etcd's are driven) and the same with `--streams` (each client
# puts on a long-lived gRPC stream of the kvstore API; etcd's row stays unary, since etcd's KV
# API has no such call). Each bench invocation measures etcd's rows itself, right before its own, with the
# same clients (`--clients`, default here 1,64), values and connections. At the end: per mode,
# combination and client count the median of the runs, and the ratio to etcd's median.
# Extra arguments go to every bench invocation (e.g. `--combos tikv_grpc --secs 10`).
#
# etcd runs with TLS and client certificates on its client and peer URLs (certificates made with
# openssl for this run), since the project's nodes and clients always use mutual TLS: like for
# like. `--etcd-plaintext` (before the bench arguments) runs etcd without TLS instead, as it is
# often deployed inside a trusted network.
set -euo pipefail

runs=3
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then
    runs=$1
    shift
fi
tls=1
if [[ $# -gt 0 && $1 == --etcd-plaintext ]]; then
    tls=0
    shift
fi
tools=(etcd etcdctl python3)
((tls)) && tools+=(openssl)
for tool in "${tools[@]}"; do
    command -v "$tool" >/dev/null || {
        echo "side-by-side: $tool not found (Debian: apt-get install etcd-server etcd-client openssl)" >&2
        exit 2
    }
done

root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
(cd "$root" && cargo build --release -q -p kvstore --bin bench)
bench=$target/release/bench

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

read -r -a ports < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(6)]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks: s.close()')
scheme=http
etcd_tls=()
ctl_tls=()
bench_tls=()
if ((tls)); then
    # One CA, one certificate for every member (serving and as a peer's client), one for the
    # bench's clients; P-256 keys, as the project's own certificates.
    scheme=https
    certs=$work/certs
    mkdir -p "$certs"
    (
        cd "$certs"
        openssl ecparam -name prime256v1 -genkey -noout -out ca-key.pem
        openssl req -x509 -new -key ca-key.pem -subj /CN=side-by-side-ca -days 2 -out ca.pem
        for n in member client; do
            openssl ecparam -name prime256v1 -genkey -noout -out "$n-key.pem"
            openssl req -new -key "$n-key.pem" -subj "/CN=$n" -out "$n.csr"
            printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n' >"$n.ext"
            openssl x509 -req -in "$n.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 2 \
                -extfile "$n.ext" -out "$n.pem"
        done
    ) 2>/dev/null
    etcd_tls=(--cert-file "$certs/member.pem" --key-file "$certs/member-key.pem"
        --client-cert-auth --trusted-ca-file "$certs/ca.pem"
        --peer-cert-file "$certs/member.pem" --peer-key-file "$certs/member-key.pem"
        --peer-client-cert-auth --peer-trusted-ca-file "$certs/ca.pem")
    ctl_tls=(--cacert "$certs/ca.pem" --cert "$certs/client.pem" --key "$certs/client-key.pem")
    bench_tls=(--etcd-tls "$certs")
fi
cluster=""
for i in 1 2 3; do
    cluster+="${cluster:+,}m$i=$scheme://127.0.0.1:${ports[$((i + 2))]}"
done
for i in 1 2 3; do
    c=${ports[$((i - 1))]}
    p=${ports[$((i + 2))]}
    etcd --name "m$i" --data-dir "$work/m$i" \
        --listen-client-urls "$scheme://127.0.0.1:$c" --advertise-client-urls "$scheme://127.0.0.1:$c" \
        --listen-peer-urls "$scheme://127.0.0.1:$p" --initial-advertise-peer-urls "$scheme://127.0.0.1:$p" \
        --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token side-by-side \
        "${etcd_tls[@]}" --logger zap --log-level error >"$work/m$i.log" 2>&1 &
    pids+=($!)
done
endpoints="$scheme://127.0.0.1:${ports[0]},$scheme://127.0.0.1:${ports[1]},$scheme://127.0.0.1:${ports[2]}"
for _ in $(seq 100); do
    if etcdctl --endpoints "$endpoints" "${ctl_tls[@]}" endpoint health >/dev/null 2>&1; then break; fi
    sleep 0.2
done
leader=$(etcdctl --endpoints "$endpoints" "${ctl_tls[@]}" endpoint status -w json | python3 -c '
import json, sys
for s in json.load(sys.stdin):
    if s["Status"]["leader"] == s["Status"]["header"]["member_id"]:
        print(s["Endpoint"])')
[[ -n $leader ]] || { echo "side-by-side: etcd has no leader" >&2; exit 1; }
echo "etcd $(etcd --version | head -1 | awk '{print $3}'): 3 members, leader at $leader, $( ((tls)) && echo "mutual TLS on client and peer URLs" || echo "plaintext")"
echo "bench at $(cd "$root" && git rev-parse --short HEAD), $(nproc) cores"

for run in $(seq "$runs"); do
    for mode in inproc net net-streams; do
        extra=()
        [[ $mode == net ]] && extra=(--network)
        [[ $mode == net-streams ]] && extra=(--network --streams)
        echo "== run $run, $mode"
        "$bench" --etcd "$leader" "${bench_tls[@]}" --clients 1,64 "${extra[@]}" --json "$work/$mode-$run.json" "$@"
    done
done

python3 - "$work" "$runs" <<'EOF'
import json, statistics, sys
work, runs = sys.argv[1], int(sys.argv[2])
for mode in ("inproc", "net", "net-streams"):
    rows = {}
    for run in range(1, runs + 1):
        for r in json.load(open(f"{work}/{mode}-{run}.json")):
            rows.setdefault((r["combo"], r["clients"]), []).append(r)
    med = {k: {f: statistics.median(x[f] for x in v) for f in
               ("ops_per_sec", "p50_us", "p99_us", "rss_mib_max", "floor_us",
                "shared_floor_us")}
           for k, v in rows.items()}
    print(f"\n{mode}: medians of {runs} runs (etcd measured in each run, right before)")
    print(f"{'combo':<18} {'clients':>7} {'puts/s':>9} {'x etcd':>7} {'p50_us':>8} {'p99_us':>8} "
          f"{'etcd_p99':>8} {'p50/floor':>9} {'/shared':>7} {'rss_mib':>8}")
    for (combo, clients), m in sorted(med.items(), key=lambda kv: (kv[0][1], kv[0][0] != "etcd", kv[0][0])):
        e = med.get(("etcd", clients))
        ratio = m["ops_per_sec"] / e["ops_per_sec"] if e and e["ops_per_sec"] else float("nan")
        print(f"{combo:<18} {clients:>7} {m['ops_per_sec']:>9.0f} {ratio:>7.2f} {m['p50_us']:>8.0f} "
              f"{m['p99_us']:>8.0f} {e['p99_us'] if e else 0:>8.0f} "
              f"{m['p50_us'] / max(m['floor_us'], 1):>9.2f} "
              f"{m['p50_us'] / max(m['shared_floor_us'], 1):>7.2f} {m['rss_mib_max']:>8.1f}")
EOF
