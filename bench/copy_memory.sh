#!/usr/bin/env bash
# bench/copy_memory.sh [COUNT] [SIZE] — peak RSS of `arca copy` and of the daemon while
# moving COUNT x SIZE bytes (default 5 x 2 GiB = 10 GiB) of NARs from a local binary cache
# (nix+file://, no HTTP server in the way) into a fresh daemon (default store).
# performance.md: daemon and `arca copy` RSS <= 256 MB while moving 10 GB.
# Needs ~2 x COUNT x SIZE of free disk under BENCH_WORK (the cache and the store).
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT=${1:-5}
SIZE=${2:-2147483648}
WORK=${BENCH_WORK:-$(mktemp -d /var/tmp/arca-bench-mem.XXXXXX)}
PORT=${BENCH_PORT:-18830}
trap 'kill "${DP:-}" 2>/dev/null || true; rm -rf "$WORK"' EXIT
cargo build --release -q -p arca-cli
ARCA=$PWD/target/release/arca
(cd "$WORK" && python3 "$OLDPWD/bench/big_nar_cache.py" "$COUNT" "$SIZE")
env -u BLOB_SERVICE_ADDR -u DIRECTORY_SERVICE_ADDR -u PATH_INFO_SERVICE_ADDR \
  "$ARCA" daemon --listen "127.0.0.1:$PORT" --data-dir "$WORK/data" 2>"$WORK/daemon.log" &
DP=$!
for _ in $(seq 100); do grep -q listening "$WORK/daemon.log" && break; sleep 0.1; done
G=grpc+http://127.0.0.1:$PORT
mapfile -t PATHS <"$WORK/paths.txt"
env BLOB_SERVICE_ADDR=$G DIRECTORY_SERVICE_ADDR=$G PATH_INFO_SERVICE_ADDR=$G ARCA_DATA_DIR="$WORK/client" \
  /usr/bin/time -f "%e %M" -o "$WORK/time" "$ARCA" copy --from "nix+file://$WORK/cache" "${PATHS[@]}" 2>"$WORK/copy.err" &
CP=$!
maxd=0
while kill -0 "$CP" 2>/dev/null; do
  d=$(awk '/VmRSS/{print $2}' "/proc/$DP/status" 2>/dev/null || echo 0)
  [ "${d:-0}" -gt "$maxd" ] && maxd=$d
  sleep 0.5
done
wait "$CP"
read -r secs copy_kb <"$WORK/time"
hwm=$(awk '/VmHWM/{print $2}' "/proc/$DP/status")
echo "### arca copy of $COUNT x $SIZE bytes of NARs (nix+file://) — $(date -u +%Y-%m-%d), $(nproc) cores"
echo
echo "| what | value |"
echo "|---|---|"
echo "| time | $secs s ($(python3 -c "print('%.0f' % ($COUNT * $SIZE / $secs / 1048576))") MiB/s) |"
echo "| \`arca copy\` peak RSS | $((copy_kb / 1024)) MiB |"
echo "| daemon peak RSS (VmHWM) | $((hwm / 1024)) MiB (sampled max $((maxd / 1024)) MiB) |"
tail -1 "$WORK/copy.err"
