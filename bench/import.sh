#!/usr/bin/env bash
# bench/import.sh [TREE_SOURCE] — import throughput of `arca castore import`
# through `arca daemon` into its default store (objectstore+file blobs, sled
# directories), against references measured in the same run:
#   - b3sum of every file (hashing alone),
#   - cp -a + sync of the same tree (copying alone),
#   - the same import with the blob store compressing inline
#     (objectstore+file://…?compression=inline), runs alternating with the default,
# and the stored bytes against the logical size, first import and re-import.
# The default store writes chunks raw and compresses them in the background once
# writes pause: the stored bytes are measured after that compaction finished
# (bounded wait for the journal data/blobs/pending-compression to empty), and
# the time it took after the import returned is reported.
#
# TREE_SOURCE defaults to /usr/lib/x86_64-linux-gnu (≈ 660 MB of shared libraries).
# Needs: b3sum, hyperfine (apt-get install b3sum hyperfine). Prints a Markdown report.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh
SRC=${1:-/usr/lib/x86_64-linux-gnu}
RUNS=${RUNS:-3}
WORK=${BENCH_WORK:-$(mktemp -d /var/tmp/arca-bench.XXXXXX)}
trap 'kill "${DAEMON_PID:-}" 2>/dev/null || true; rm -rf "$WORK"' EXIT

for t in b3sum hyperfine; do command -v $t >/dev/null || { echo "missing $t: apt-get install -y $t" >&2; exit 2; }; done
cargo build --release -q -p arca-cli
ARCA=$PWD/target/release/arca

# A private copy of the tree (so every tool reads the same files, warm in the page cache).
cp -a "$SRC" "$WORK/tree"
TREE=$WORK/tree
FILES=$(find "$TREE" -type f | wc -l)
LOGICAL=$(find "$TREE" -type f -printf '%s\n' | awk '{s+=$1} END {print s}')
cat "$(find "$TREE" -type f | head -1)" >/dev/null
find "$TREE" -type f -print0 | xargs -0 cat >/dev/null

PORT=${BENCH_PORT:-18765}
export BLOB_SERVICE_ADDR=grpc+http://127.0.0.1:$PORT DIRECTORY_SERVICE_ADDR=grpc+http://127.0.0.1:$PORT

JSON=$WORK/hf.json
hyperfine --runs "$RUNS" --warmup 1 --export-json "$JSON" \
  -n b3sum "find $TREE -type f -print0 | xargs -0 b3sum >/dev/null" \
  >/dev/null
hf_median() { python3 -c "import json,sys; r={x['command']:x for x in json.load(open('$JSON'))['results']}; print('%.3f' % r[sys.argv[1]]['median'])" "$1"; }
T_B3=$(hf_median b3sum)
# cp -a + sync is timed in the loop below, between the arca runs, in the same
# conditions (the previous copy retired and its pages written back first).
T_CP_ALL=()
cp -a "$TREE" "$WORK/copy" && sync  # warm-up

# arca: a fresh daemon store for every run (first import), the variants
# alternating within each run; then a re-import into the last (default) store.
#   default: local ingest (the client hands the daemon open files) into a
#            store writing large blobs whole (chunked + compressed later);
#   grpc:    the same store, files uploaded over gRPC (--ingest-socket off);
#   chunks:  over gRPC into a store cutting chunks while writing, compressed
#            later (?chunking=inline: the default before whole-first ingest);
#   inline:  over gRPC, chunked and compressed while writing (?compression=inline).
T_ARCA_ALL=(); T_GRPC_ALL=(); T_CHUNKS_ALL=(); T_INLINE_ALL=(); T_COMPACT_ALL=()
CPU_IMPORT_ALL=(); CPU_COMPACT_ALL=(); CPU_GRPC_ALL=(); CPU_CHUNKS_ALL=(); CPU_INLINE_ALL=()
CPU_CLIENT_ALL=(); CPU_CLIENT_GRPC_ALL=()
# Runs one import with the daemon started by the caller; sets T, CPU (daemon)
# and CPU_CLIENT (the client's user + system seconds).
timed_import() {
  local c s e
  c=$(daemon_cpu); s=$(now)
  /usr/bin/time -f "%U %S" -o "$WORK/client.time" "$ARCA" castore import "$TREE" >"$1"
  sync
  e=$(now)
  T=$(echo "$e - $s" | bc)
  CPU=$(echo "$(daemon_cpu) - $c" | bc)
  CPU_CLIENT=$(awk '{ printf "%.2f\n", $1 + $2 }' "$WORK/client.time")
}
# nix-store --add of the same tree into a fresh chroot store, when Nix is here
# (the other reference of the target).
T_NIX_ALL=()
if command -v nix-store >/dev/null; then nix_standalone; fi
for i in $(seq "$RUNS"); do
  retire "$WORK/copy"
  s=$(now); cp -a "$TREE" "$WORK/copy"; sync; e=$(now)
  T_CP_ALL+=("$(echo "$e - $s" | bc)")
  if command -v nix-store >/dev/null; then
    retire "$WORK/nixroot"
    s=$(now); nix-store --store "local?root=$WORK/nixroot" --add "$TREE" >/dev/null 2>&1; sync; e=$(now)
    T_NIX_ALL+=("$(echo "$e - $s" | bc)")
  fi

  start_daemon --ingest-socket off --blob-service-addr "$(inline_blobs)"
  timed_import "$WORK/out-inline.json"
  T_INLINE_ALL+=("$T"); CPU_INLINE_ALL+=("$CPU")
  STORED_INLINE=$(du -sb "$WORK/data/blobs" | cut -f1)
  stop_daemon

  start_daemon --ingest-socket off --blob-service-addr "objectstore+file://$WORK/data/blobs?chunking=inline"
  timed_import "$WORK/out-chunks.json"
  T_CHUNKS_ALL+=("$T"); CPU_CHUNKS_ALL+=("$CPU")
  stop_daemon

  start_daemon --ingest-socket off
  timed_import "$WORK/out-grpc.json"
  T_GRPC_ALL+=("$T"); CPU_GRPC_ALL+=("$CPU"); CPU_CLIENT_GRPC_ALL+=("$CPU_CLIENT")
  stop_daemon

  start_daemon
  timed_import "$WORK/out.json"
  T_ARCA_ALL+=("$T"); CPU_IMPORT_ALL+=("$CPU"); CPU_CLIENT_ALL+=("$CPU_CLIENT")
  c2=$(daemon_cpu)
  STORED_RAW=$(du -sb "$WORK/data/blobs" | cut -f1)
  T_COMPACT_ALL+=("$(wait_compacted)")
  CPU_COMPACT_ALL+=("$(echo "$(daemon_cpu) - $c2" | bc)")
  for o in inline chunks grpc; do
    cmp -s "$WORK/out.json" "$WORK/out-$o.json" || { echo "the $o import gave another root" >&2; exit 1; }
  done
  if [ "$i" -lt "$RUNS" ]; then stop_daemon; fi
done
T_ARCA=$(printf "%s\n" "${T_ARCA_ALL[@]}" | median)
T_CP=$(printf "%s\n" "${T_CP_ALL[@]}" | median)
if [ ${#T_NIX_ALL[@]} -gt 0 ]; then T_NIX=$(printf "%s\n" "${T_NIX_ALL[@]}" | median); fi
T_INLINE=$(printf "%s\n" "${T_INLINE_ALL[@]}" | median)
T_GRPC=$(printf "%s\n" "${T_GRPC_ALL[@]}" | median)
T_CHUNKS=$(printf "%s\n" "${T_CHUNKS_ALL[@]}" | median)
CPU_GRPC=$(printf "%s\n" "${CPU_GRPC_ALL[@]}" | median)
CPU_CHUNKS=$(printf "%s\n" "${CPU_CHUNKS_ALL[@]}" | median)
CPU_CLIENT=$(printf "%s\n" "${CPU_CLIENT_ALL[@]}" | median)
CPU_CLIENT_GRPC=$(printf "%s\n" "${CPU_CLIENT_GRPC_ALL[@]}" | median)
T_COMPACT=$(printf "%s\n" "${T_COMPACT_ALL[@]}" | median)
CPU_IMPORT=$(printf "%s\n" "${CPU_IMPORT_ALL[@]}" | median)
CPU_COMPACT=$(printf "%s\n" "${CPU_COMPACT_ALL[@]}" | median)
CPU_INLINE=$(printf "%s\n" "${CPU_INLINE_ALL[@]}" | median)
STORED=$(du -sb "$WORK/data/blobs" | cut -f1)
DIRS=$(du -sb "$WORK/data/directories.sled" | cut -f1)
s=$(now)
"$ARCA" castore import "$TREE" >"$WORK/out2.json"
sync
e=$(now)
T_REIMPORT=$(echo "$e - $s" | bc)
STORED2=$(du -sb "$WORK/data/blobs" | cut -f1)
cmp -s "$WORK/out.json" "$WORK/out2.json" || { echo "re-import gave another root" >&2; exit 1; }
RSS=$(ps -o rss= -p "$DAEMON_PID" | tr -d ' ')
stop_daemon

cat <<EOF
### Import of \`$SRC\` ($FILES files, $(( LOGICAL / 1000000 )) MB) — $(date -u +%Y-%m-%d), $(nproc) cores

| what | median time (s) | vs arca |
|---|---|---|
| \`b3sum\` of every file | $T_B3 | $(ratio "$T_B3" "$T_ARCA") |
| \`cp -a\` + \`sync\` | $T_CP | $(ratio "$T_CP" "$T_ARCA") |
$(if [ -n "${T_NIX:-}" ]; then echo "| \`nix-store --add\` (fresh chroot store) + \`sync\` | $T_NIX | $(ratio "$T_NIX" "$T_ARCA") |"; fi)
| \`arca castore import\` through the daemon (fresh default store; local ingest: open files handed over) + \`sync\` | $T_ARCA | 1.00 |
| same, files uploaded over gRPC (\`--ingest-socket off\`) + \`sync\` | $T_GRPC | $(ratio "$T_GRPC" "$T_ARCA") |
| over gRPC, chunks cut while writing (\`?chunking=inline\`, compressed later) + \`sync\` | $T_CHUNKS | $(ratio "$T_CHUNKS" "$T_ARCA") |
| over gRPC, chunked and compressed while writing (\`?compression=inline\`) + \`sync\` | $T_INLINE | $(ratio "$T_INLINE" "$T_ARCA") |
| default store: chunking and compaction done, after the import returned (incl. the 1 s idle wait) | $T_COMPACT | |
| same import again (everything already stored) | $T_REIMPORT | |

- runs (s): cp -a + sync ${T_CP_ALL[*]}; nix-store --add ${T_NIX_ALL[*]:-}; default ${T_ARCA_ALL[*]}; grpc ${T_GRPC_ALL[*]}; chunks ${T_CHUNKS_ALL[*]}; inline ${T_INLINE_ALL[*]}; compaction ${T_COMPACT_ALL[*]}
- throughput: $(python3 -c "print('%.0f' % ($LOGICAL / 1e6 / $T_ARCA))") MB/s; arca / (cp -a + sync) = $(ratio "$T_ARCA" "$T_CP") (grpc: $(ratio "$T_GRPC" "$T_CP"), chunks: $(ratio "$T_CHUNKS" "$T_CP"), inline: $(ratio "$T_INLINE" "$T_CP"))
- CPU (median): default import daemon $CPU_IMPORT s + client $CPU_CLIENT s, then compaction $CPU_COMPACT s; grpc daemon $CPU_GRPC s + client $CPU_CLIENT_GRPC s; chunks daemon $CPU_CHUNKS s; inline daemon $CPU_INLINE s
- stored blob bytes after compaction: $STORED of $LOGICAL logical = $(ratio "$STORED" "$LOGICAL"); right after the import (whole files and raw chunks): $STORED_RAW = $(ratio "$STORED_RAW" "$LOGICAL"); inline: $STORED_INLINE = $(ratio "$STORED_INLINE" "$LOGICAL"); directories (sled): $DIRS bytes
- re-import added $(( STORED2 - STORED )) blob bytes; daemon RSS after the imports: $(( RSS / 1024 )) MiB
- root: $(cat "$WORK/out.json")
EOF
