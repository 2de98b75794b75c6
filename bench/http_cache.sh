#!/usr/bin/env bash
# bench/http_cache.sh [TREE_SOURCE] — the Nix binary cache over HTTP under load,
# against `arca daemon --http-listen` (default store, --signing-key: every
# narinfo signed on the fly):
#   narinfo: requests/s and latency (p50/p99) with wrk, cycling over NPATHS
#            path infos (`arca import` of small files): with the signed-narinfo
#            LRU (the default), without it (--narinfo-cache 0: path-info get,
#            render and ed25519 signature per request), and absent paths (404);
#   NAR:     MB/s (of NAR bytes) for the NAR of TREE_SOURCE (imported with
#            `arca import`), single stream and concurrent, plain `.nar` and
#            `.nar.zst`, against `nix-store --dump` of the same tree on disk,
#            whose bytes the served NARs must equal.
# TREE_SOURCE defaults to /usr/lib/x86_64-linux-gnu. Needs nix-bin, wrk, curl, zstd.
# Knobs: NPATHS (2000), DURATION (10 s per wrk run), CONNS ("16 64"), RUNS (3).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh
SRC=${1:-/usr/lib/x86_64-linux-gnu}
NPATHS=${NPATHS:-2000}
DURATION=${DURATION:-10}
CONNS=${CONNS:-"16 64"}
RUNS=${RUNS:-3}
WORK=${BENCH_WORK:-$(mktemp -d /var/tmp/arca-bench-http.XXXXXX)}
trap 'kill "${DAEMON_PID:-}" 2>/dev/null || true; chmod -R u+w "$WORK" 2>/dev/null; rm -rf "$WORK"' EXIT
if ! command -v wrk >/dev/null; then
  echo "bench/http_cache.sh: wrk is missing; installing it with apt-get install -y wrk" >&2
  apt-get install -y -qq wrk >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
fi
for t in nix-store wrk curl zstd; do command -v $t >/dev/null || { echo "missing $t" >&2; exit 2; }; done
nix_standalone
cargo build --release -q -p arca-cli
ARCA=$PWD/target/release/arca
PORT=${BENCH_PORT:-18771}
HTTP_PORT=${BENCH_HTTP_PORT:-18772}
URL=http://127.0.0.1:$HTTP_PORT
client_env
nix key generate-secret --key-name arca-bench-1 > "$WORK/secret.key"

# Starts the daemon on $WORK/data (kept across restarts) with the binary cache on $HTTP_PORT.
start_http_daemon() {
  env -u BLOB_SERVICE_ADDR -u DIRECTORY_SERVICE_ADDR -u PATH_INFO_SERVICE_ADDR -u NAR_INDEX_ADDR \
    "$ARCA" daemon --listen "127.0.0.1:$PORT" --http-listen "127.0.0.1:$HTTP_PORT" --data-dir "$WORK/data" \
    --signing-key "$WORK/secret.key" "$@" 2>"$WORK/daemon.log" &
  DAEMON_PID=$!
  for _ in $(seq 200); do grep -q "binary cache on" "$WORK/daemon.log" 2>/dev/null && return; sleep 0.05; done
  echo "daemon did not start" >&2; cat "$WORK/daemon.log" >&2; exit 1
}
stop_http_daemon() { kill -TERM "$DAEMON_PID"; wait "$DAEMON_PID" || true; }
secs() { python3 -c "import sys; print('%.3f' % (float(sys.argv[2]) - float(sys.argv[1])))" "$1" "$2"; }
mbps() { python3 -c "import sys; print('%.0f' % (float(sys.argv[1]) / 1e6 / float(sys.argv[2])))" "$1" "$2"; }

# ------------------------------------------------------------------ narinfos
mkdir -p "$WORK/files"
for i in $(seq "$NPATHS"); do echo "bench file $i" > "$WORK/files/f$i"; done
start_http_daemon
(cd "$WORK/files" && ls) | sed "s|^|$WORK/files/|" | xargs "${CLIENT_ENV[@]}" "$ARCA" import > "$WORK/paths.txt"
[ "$(wc -l < "$WORK/paths.txt")" -eq "$NPATHS" ] || { echo "import failed" >&2; exit 1; }
cut -c12-43 "$WORK/paths.txt" > "$WORK/hashes.txt"
python3 -c "import random; [print(''.join(random.choice('0123456789abcdfghijklmnpqrsvwxyz') for _ in range(32))) for _ in range($NPATHS)]" > "$WORK/absent.txt"
cat > "$WORK/narinfo.lua" <<'LUA'
local hashes = {}
for line in io.lines(os.getenv("HASHES")) do hashes[#hashes + 1] = "/" .. line .. ".narinfo" end
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", hashes[(i % #hashes) + 1])
end
LUA
curl -sf "$URL/$(head -1 "$WORK/hashes.txt").narinfo" | grep -q '^Sig: arca-bench-1:' || { echo "narinfo not signed" >&2; exit 1; }

# wrk_run NAME HASHFILE CONNS: one row of the narinfo table.
NARINFO_ROWS=()
wrk_run() {
  local name=$1 hashes=$2 c=$3 out rps p50 p99 non2xx
  out=$(HASHES=$hashes wrk -t1 -c"$c" -d"${DURATION}s" --latency -s "$WORK/narinfo.lua" "$URL")
  rps=$(awk '/^Requests\/sec/ {printf "%.0f", $2}' <<<"$out")
  p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  non2xx=$(awk '/Non-2xx or 3xx responses/ {print $5}' <<<"$out")
  NARINFO_ROWS+=("| $name | $c | $rps | $p50 | $p99 | ${non2xx:-0} |")
}
HASHES=$WORK/hashes.txt wrk -t1 -c16 -d2s -s "$WORK/narinfo.lua" "$URL" >/dev/null   # warm-up
for c in $CONNS; do wrk_run "present; signed narinfos in the LRU (default)" "$WORK/hashes.txt" "$c"; done
for c in $CONNS; do wrk_run "absent (404)" "$WORK/absent.txt" "$c"; done
stop_http_daemon
start_http_daemon --narinfo-cache 0
HASHES=$WORK/hashes.txt wrk -t1 -c16 -d2s -s "$WORK/narinfo.lua" "$URL" >/dev/null   # warm-up
for c in $CONNS; do wrk_run "present; --narinfo-cache 0 (get, render, sign per request)" "$WORK/hashes.txt" "$c"; done

# ------------------------------------------------------------------ NARs
cp -a "$SRC" "$WORK/tree"
TREE=$WORK/tree
find "$TREE" -type f -print0 | xargs -0 cat >/dev/null
SIZE=$(du -sb "$TREE" | cut -f1)
P=$("${CLIENT_ENV[@]}" "$ARCA" import "$TREE")
NARINFO=$(curl -sf "$URL/$(basename "$P" | cut -c1-32).narinfo")
NARSIZE=$(sed -n 's/^NarSize: //p' <<<"$NARINFO")
H=$(sed -n 's/^NarHash: sha256://p' <<<"$NARINFO")
PLAIN=$URL/nar/$H.nar
ZST=$URL/nar/$H.nar.zst
REF=$(nix-store --dump "$TREE" | sha256sum | cut -d' ' -f1)
[ "$(curl -sf "$PLAIN" | sha256sum | cut -d' ' -f1)" = "$REF" ] || { echo "plain NAR differs from nix-store --dump" >&2; exit 1; }
[ "$(curl -sf "$ZST" | zstd -dc | sha256sum | cut -d' ' -f1)" = "$REF" ] || { echo "zstd NAR differs from nix-store --dump" >&2; exit 1; }
ZSIZE=$(curl -sf "$ZST" | wc -c)

# timed N CMD...: median seconds over RUNS of N copies of CMD run in parallel.
timed() {
  local n=$1; shift
  local t=() s e
  for _ in $(seq "$RUNS"); do
    s=$(now)
    for _ in $(seq "$n"); do "$@" & done
    wait
    e=$(now)
    t+=("$(secs "$s" "$e")")
  done
  printf '%s\n' "${t[@]}" | median
}
dump() { nix-store --dump "$TREE" > /dev/null; }
get() { curl -sf -o /dev/null "$1"; }
T_REF=$(timed 1 dump)
T_PLAIN=$(timed 1 get "$PLAIN")
T_ZST=$(timed 1 get "$ZST")
T_PLAIN4=$(timed 4 get "$PLAIN")
T_ZST2=$(timed 2 get "$ZST")
stop_http_daemon

cat <<EOF
### Binary cache over HTTP — $(date -u +%Y-%m-%d), $(nproc) cores, \`arca daemon --http-listen --signing-key\`

Narinfos: $NPATHS path infos; wrk (1 thread, sharing the 2 cores with the daemon), ${DURATION} s
per row, each request the next path in turn.

| narinfo requests | connections | requests/s | p50 | p99 | non-2xx |
|---|---|---|---|---|---|
$(printf '%s\n' "${NARINFO_ROWS[@]}")

NAR of \`$SRC\` ($((SIZE / 1000000)) MB on disk, NAR $((NARSIZE / 1000000)) MB, $((ZSIZE / 1000000)) MB as zstd level 1);
median of $RUNS runs; MB/s are NAR bytes per second (aggregate for the concurrent rows). The NARs
served were checked equal to \`nix-store --dump\` (SHA-256 $REF).

| what | median time (s) | MB/s |
|---|---|---|
| reference: \`nix-store --dump\` of the tree on disk > /dev/null | $T_REF | $(mbps "$NARSIZE" "$T_REF") |
| GET .nar, 1 stream (curl > /dev/null) | $T_PLAIN | $(mbps "$NARSIZE" "$T_PLAIN") |
| GET .nar.zst (zstd level 1 on the fly), 1 stream | $T_ZST | $(mbps "$NARSIZE" "$T_ZST") |
| GET .nar, 4 concurrent streams | $T_PLAIN4 | $(mbps "$((4 * NARSIZE))" "$T_PLAIN4") |
| GET .nar.zst, 2 concurrent streams | $T_ZST2 | $(mbps "$((2 * NARSIZE))" "$T_ZST2") |
EOF
