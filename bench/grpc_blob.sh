#!/usr/bin/env bash
# bench/grpc_blob.sh [SIZE_MIB] — one large blob over gRPC on loopback, each way,
# through the real binaries: `arca castore import FILE` (upload; the client
# hashes locally, the server hashes again) and `arca castore cat DIGEST`
# (download; the client verifies the digest). Against a daemon whose blob
# service is `memory://` (transport and hashing only) and against the default
# store (objectstore+file: chunking, zstd, files). Every upload goes to a
# fresh daemon, so nothing is deduplicated; the daemons take no open files
# (--ingest-socket off), so uploads go over gRPC. Downloads from the default
# store wait for its compactor (the blob chunked and compressed, the steady
# state). One more row: the same upload handed to the daemon as an open file
# (local ingest, the default on one machine). References in the same run:
# b3sum and cat of the same file.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh
SIZE_MIB=${1:-1024}
RUNS=${RUNS:-3}
WORK=${BENCH_WORK:-$(mktemp -d /var/tmp/arca-bench.XXXXXX)}
trap 'kill "${DAEMON_PID:-}" 2>/dev/null || true; rm -rf "$WORK"' EXIT
command -v hyperfine >/dev/null || { echo "missing hyperfine: apt-get install -y hyperfine" >&2; exit 2; }
cargo build --release -q -p arca-cli
ARCA=$PWD/target/release/arca
PORT=${BENCH_PORT:-18766}
CLIENT_ENV=(env BLOB_SERVICE_ADDR=grpc+http://127.0.0.1:$PORT DIRECTORY_SERVICE_ADDR=grpc+http://127.0.0.1:$PORT)

# Incompressible data, so compression cannot flatter the default store.
head -c "$((SIZE_MIB * 1024 * 1024))" /dev/urandom >"$WORK/blob"
cat "$WORK/blob" >/dev/null

gbps() { python3 -c "print('%.2f' % ($SIZE_MIB * 1048576 / $1 / 1e9))"; }

JSON=$WORK/hf.json
hyperfine --runs "$RUNS" --warmup 1 --export-json "$JSON" -n b3sum "b3sum $WORK/blob" -n cat "cat $WORK/blob" >/dev/null
ref() { python3 -c "import json; r={x['command']:x for x in json.load(open('$JSON'))['results']}; print('%.3f' % r['$1']['median'])"; }

echo "### One ${SIZE_MIB} MiB blob over gRPC on loopback — $(date -u +%Y-%m-%d), $(nproc) cores"
echo
echo "| what | median time (s) | GB/s |"
echo "|---|---|---|"
for r in b3sum cat; do t=$(ref $r); echo "| reference: \`$r\` of the file | $t | $(gbps "$t") |"; done
for store in memory default; do
  UP=(); DOWN=(); RSS=0
  for _ in $(seq "$RUNS"); do
    if [ $store = memory ]; then start_daemon --ingest-socket off --blob-service-addr memory://; else start_daemon --ingest-socket off; fi
    s=$(now); OUT=$("${CLIENT_ENV[@]}" "$ARCA" castore import "$WORK/blob"); e=$(now)
    UP+=("$(echo "$e - $s" | bc)")
    DIGEST=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["digest"])' "$OUT")
    if [ $store = default ]; then wait_compacted >/dev/null; fi
    s=$(now); "${CLIENT_ENV[@]}" "$ARCA" castore cat "$DIGEST" >/dev/null; e=$(now)
    DOWN+=("$(echo "$e - $s" | bc)")
    RSS=$(ps -o rss= -p "$DAEMON_PID" | tr -d ' ')
    stop_daemon
  done
  U=$(printf '%s\n' "${UP[@]}" | median); D=$(printf '%s\n' "${DOWN[@]}" | median)
  echo "| daemon blob store \`$store\`: upload (\`arca castore import\`) | $U | $(gbps "$U") |"
  echo "| daemon blob store \`$store\`: download (\`arca castore cat\`) | $D | $(gbps "$D") |"
  echo "| daemon RSS after (\`$store\`) | $((RSS / 1024)) MiB | |"
done
LOCAL=()
for _ in $(seq "$RUNS"); do
  start_daemon
  s=$(now); "${CLIENT_ENV[@]}" "$ARCA" castore import "$WORK/blob" >/dev/null; e=$(now)
  LOCAL+=("$(echo "$e - $s" | bc)")
  stop_daemon
done
L=$(printf '%s\n' "${LOCAL[@]}" | median)
echo "| daemon blob store \`default\`: the file handed over (local ingest, not gRPC) | $L | $(gbps "$L") |"
