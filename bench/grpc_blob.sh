#!/usr/bin/env bash
# bench/grpc_blob.sh [SIZE_MIB] — one large blob over gRPC on loopback, each way,
# through the real binaries: `arca castore import FILE` (upload; the client
# hashes locally, the server hashes again) and `arca castore cat DIGEST`
# (download; the client verifies the digest), against a daemon whose blob
# service is `memory://` (so only transport and hashing are measured) and
# against the default store (objectstore+file: chunking, zstd, disk).
# Reference in the same run: b3sum of the file, and cat of the file.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-1024}
RUNS=${RUNS:-3}
WORK=${BENCH_WORK:-$(mktemp -d /var/tmp/arca-bench.XXXXXX)}
trap 'kill "${DAEMON_PID:-}" 2>/dev/null || true; rm -rf "$WORK"' EXIT
command -v hyperfine >/dev/null || { echo "missing hyperfine: apt-get install -y hyperfine" >&2; exit 2; }
cargo build --release -q -p arca-cli
ARCA=$PWD/target/release/arca
PORT=${BENCH_PORT:-18766}
export BLOB_SERVICE_ADDR=grpc+http://127.0.0.1:$PORT DIRECTORY_SERVICE_ADDR=grpc+http://127.0.0.1:$PORT

# Incompressible data, so compression cannot flatter the default store.
head -c "$((SIZE_MIB * 1024 * 1024))" /dev/urandom >"$WORK/blob"
cat "$WORK/blob" >/dev/null

start_daemon() {
  rm -rf "$WORK/data"
  env -u BLOB_SERVICE_ADDR -u DIRECTORY_SERVICE_ADDR "$ARCA" daemon --listen "127.0.0.1:$PORT" --data-dir "$WORK/data" "$@" 2>"$WORK/daemon.log" &
  DAEMON_PID=$!
  for _ in $(seq 100); do grep -q "listening on" "$WORK/daemon.log" && return; sleep 0.05; done
  echo "daemon did not start" >&2; exit 1
}
stop_daemon() { kill -TERM "$DAEMON_PID"; wait "$DAEMON_PID" || true; }

JSON=$WORK/hf.json
row() { # name, json
  python3 - "$1" "$JSON" "$SIZE_MIB" <<'EOF'
import json, sys
name, path, mib = sys.argv[1], sys.argv[2], int(sys.argv[3])
for r in json.load(open(path))["results"]:
    gbps = mib * 1024 * 1024 / r["median"] / 1e9
    print(f"| {name}: {r['command']} | {r['median']:.3f} | {gbps:.2f} |")
EOF
}

echo "### One ${SIZE_MIB} MiB blob over gRPC on loopback — $(date -u +%Y-%m-%d), $(nproc) cores"
echo
echo "| what | median time (s) | GB/s |"
echo "|---|---|---|"
hyperfine --runs "$RUNS" --export-json "$JSON" -n "b3sum" "b3sum $WORK/blob" -n "cat" "cat $WORK/blob" >/dev/null
row "reference" 
for store in memory default; do
  if [ $store = memory ]; then start_daemon --blob-service-addr memory://; else start_daemon; fi
  DIGEST=$("$ARCA" castore import "$WORK/blob" | python3 -c 'import json,sys; print(json.load(sys.stdin)["digest"])')
  hyperfine --runs "$RUNS" --export-json "$JSON" \
    -n "upload (castore import)" "$ARCA castore import $WORK/blob" \
    -n "download (castore cat)" "$ARCA castore cat $DIGEST >/dev/null" >/dev/null
  row "daemon blob store $store"
  RSS=$(ps -o rss= -p "$DAEMON_PID" | tr -d ' ')
  stop_daemon
  echo "| daemon RSS after ($store) | $((RSS / 1024)) MiB | |"
done
