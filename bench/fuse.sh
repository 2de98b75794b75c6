#!/usr/bin/env bash
# bench/fuse.sh [TREE_SOURCE] — read performance of `arca mount` over a daemon
# (gRPC on loopback), against reading the same files from local disk:
#   - sequential read (`cat > /dev/null`) of one large file (BIG_MB, default
#     1024 MiB of random bytes, imported with `arca import`): first read on a
#     fresh mount (every byte fetched from the daemon), second read on the same
#     mount (once fetched: the kernel's page cache, kept across opens), and
#     `cat` of the file on local disk (warm in the page cache);
#   - reading every file of a tree (`find -type f -print0 | xargs -0 cat`;
#     TREE_SOURCE defaults to /usr/include, ≈ 7900 files): first pass on a
#     fresh mount (cold: lookups, directories and blobs fetched), second pass
#     on the same mount (warm), and the same command on the local copy (warm).
# Medians of RUNS (default 3); every cold run gets a fresh mount. Caches are
# never dropped (other work shares this machine): "local disk" means files
# warm in the page cache, and the daemon's own store is warm there too.
# Needs root, /dev/fuse and fusermount3 (apt-get install fuse3). Prints Markdown.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh
SRC=${1:-/usr/include}
RUNS=${RUNS:-3}
BIG_MB=${BIG_MB:-1024}
WORK=${BENCH_WORK:-$(mktemp -d /var/tmp/arca-bench-fuse.XXXXXX)}
MNT=$WORK/mnt
cleanup() {
  local rc=$?
  [ "$rc" -eq 0 ] || { echo "failed ($rc); mount log:" >&2; cat "$WORK/mount.log" >&2 2>/dev/null || true; }
  if [ -n "${MOUNT_PID:-}" ]; then kill -TERM "$MOUNT_PID" 2>/dev/null || true; wait "$MOUNT_PID" 2>/dev/null || true; fi
  grep -q " $MNT " /proc/mounts 2>/dev/null && { fusermount3 -u -z "$MNT" 2>/dev/null || umount -l "$MNT" || true; }
  kill "${DAEMON_PID:-}" 2>/dev/null || true
  wait "${DAEMON_PID:-}" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

command -v fusermount3 >/dev/null || { echo "missing fusermount3: apt-get install -y fuse3" >&2; exit 2; }
cargo build --release -q -p arca-cli
ARCA=$PWD/target/release/arca
PORT=${BENCH_PORT:-18791}
export BLOB_SERVICE_ADDR=grpc+http://127.0.0.1:$PORT DIRECTORY_SERVICE_ADDR=grpc+http://127.0.0.1:$PORT \
  PATH_INFO_SERVICE_ADDR=grpc+http://127.0.0.1:$PORT ARCA_DATA_DIR=$WORK/client

start_mount() {
  mkdir -p "$MNT"
  "$ARCA" mount "$MNT" 2>"$WORK/mount.log" &
  MOUNT_PID=$!
  for _ in $(seq 200); do grep -q "mounted on" "$WORK/mount.log" 2>/dev/null && return; sleep 0.05; done
  echo "arca mount did not start" >&2; cat "$WORK/mount.log" >&2; exit 1
}
stop_mount() { kill -TERM "$MOUNT_PID"; wait "$MOUNT_PID"; MOUNT_PID=; }

# Seconds taken by a shell command.
timed() { local s e; s=$(now); bash -c "$1"; e=$(now); echo "$e - $s" | bc; }
mbps() { python3 -c "print('%.0f' % ($1 / 1e6 / $2))"; }

start_daemon
mkdir -p "$WORK/big" "$WORK/client"
head -c $((BIG_MB * 1024 * 1024)) /dev/urandom >"$WORK/big/big.bin"
BIG_BYTES=$(stat -c %s "$WORK/big/big.bin")
BIG_PATH=$("$ARCA" import "$WORK/big/big.bin")
cp -a "$SRC" "$WORK/tree"
FILES=$(find "$WORK/tree" -type f | wc -l)
TREE_BYTES=$(find "$WORK/tree" -type f -printf '%s\n' | awk '{s+=$1} END {print s}')
TREE_PATH=$("$ARCA" import "$WORK/tree")
# Steady state: the daemon's background compression done before anything is timed.
T_COMPACT=$(wait_compacted)
BIG_M=$MNT/${BIG_PATH#/nix/store/}
TREE_M=$MNT/${TREE_PATH#/nix/store/}
READ_TREE='find "$0" -type f -print0 | xargs -0 cat >/dev/null'
# Local references: warm the page cache first.
cat "$WORK/big/big.bin" >/dev/null
bash -c "$READ_TREE" "$WORK/tree"

BIG_LOCAL=() BIG_COLD=() BIG_WARM=() TREE_LOCAL=() TREE_COLD=() TREE_WARM=()
for _ in $(seq "$RUNS"); do
  BIG_LOCAL+=("$(timed "cat '$WORK/big/big.bin' >/dev/null")")
  TREE_LOCAL+=("$(bash -c 's=$(date +%s.%N); '"$READ_TREE"'; e=$(date +%s.%N); echo "$e - $s" | bc' "$WORK/tree")")
  start_mount
  BIG_COLD+=("$(timed "cat '$BIG_M' >/dev/null")")
  BIG_WARM+=("$(timed "cat '$BIG_M' >/dev/null")")
  cmp "$BIG_M" "$WORK/big/big.bin"
  TREE_COLD+=("$(bash -c 's=$(date +%s.%N); '"$READ_TREE"'; e=$(date +%s.%N); echo "$e - $s" | bc' "$TREE_M")")
  TREE_WARM+=("$(bash -c 's=$(date +%s.%N); '"$READ_TREE"'; e=$(date +%s.%N); echo "$e - $s" | bc' "$TREE_M")")
  RSS_KB=$(ps -o rss= -p "$MOUNT_PID" | tr -d ' ')
  stop_mount
done
med() { printf "%s\n" "$@" | median; }
T_BL=$(med "${BIG_LOCAL[@]}"); T_BC=$(med "${BIG_COLD[@]}"); T_BW=$(med "${BIG_WARM[@]}")
T_TL=$(med "${TREE_LOCAL[@]}"); T_TC=$(med "${TREE_COLD[@]}"); T_TW=$(med "${TREE_WARM[@]}")

cat <<EOF
### \`bash bench/fuse.sh $SRC\` — $(date +%Y-%m-%d), $(nproc) cores, RUNS=$RUNS

Large file: $BIG_BYTES bytes of random data. Tree: \`$SRC\`, $FILES files, $TREE_BYTES bytes.
The daemon's background compression of both had finished before timing (${T_COMPACT} s after the imports).

| what | median time (s) | throughput | vs local disk |
|---|---|---|---|
| \`cat\` large file, local disk (page cache) | $T_BL | $(mbps "$BIG_BYTES" "$T_BL") MB/s | 1.00 |
| \`cat\` large file through the mount, first read (fetched from the daemon) | $T_BC | $(mbps "$BIG_BYTES" "$T_BC") MB/s | $(ratio "$T_BC" "$T_BL") |
| \`cat\` large file through the mount, second read (once fetched) | $T_BW | $(mbps "$BIG_BYTES" "$T_BW") MB/s | $(ratio "$T_BW" "$T_BL") |
| every file of the tree, local disk (page cache) | $T_TL | $(mbps "$TREE_BYTES" "$T_TL") MB/s | 1.00 |
| every file of the tree through the mount, first pass (fresh mount: all fetched) | $T_TC | $(mbps "$TREE_BYTES" "$T_TC") MB/s | $(ratio "$T_TC" "$T_TL") |
| every file of the tree through the mount, second pass (warm) | $T_TW | $(mbps "$TREE_BYTES" "$T_TW") MB/s | $(ratio "$T_TW" "$T_TL") |

Runs (s): big local ${BIG_LOCAL[*]}; big cold ${BIG_COLD[*]}; big warm ${BIG_WARM[*]};
tree local ${TREE_LOCAL[*]}; tree cold ${TREE_COLD[*]}; tree warm ${TREE_WARM[*]}.
\`arca mount\` RSS after the last run: $((RSS_KB / 1024)) MiB.
EOF
