#!/usr/bin/env bash
# bench/nix.sh [TREE_SOURCE] — the Nix layer against the real Nix on the same tree:
#   `arca import` (through the daemon, fresh default store) vs `nix-store --add`
#   (fresh chroot store), and `arca nar dump` out of the daemon vs
#   `nix-store --dump` of the tree on disk (alternating, after all imports).
#   Checks the outputs agree.
#   The daemon's default blob store writes chunks raw and compresses them in
#   the background: the dump runs after that compaction finished (bounded wait
#   for data/blobs/pending-compression to empty), so it reads compressed
#   chunks, the steady state; the compaction time after the import returned is
#   reported, and an import into a store compressing inline is timed too.
# TREE_SOURCE defaults to /usr/lib/x86_64-linux-gnu. Needs nix-bin, hyperfine.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh
SRC=${1:-/usr/lib/x86_64-linux-gnu}
RUNS=${RUNS:-3}
WORK=${BENCH_WORK:-$(mktemp -d /var/tmp/arca-bench.XXXXXX)}
trap 'kill "${DAEMON_PID:-}" 2>/dev/null || true; chmod -R u+w "$WORK" 2>/dev/null; rm -rf "$WORK"' EXIT
for t in nix-store hyperfine; do command -v $t >/dev/null || { echo "missing $t" >&2; exit 2; }; done
nix_standalone
cargo build --release -q -p arca-cli
ARCA=$PWD/target/release/arca
PORT=${BENCH_PORT:-18767}
client_env

cp -a "$SRC" "$WORK/tree"
TREE=$WORK/tree
find "$TREE" -type f -print0 | xargs -0 cat >/dev/null
SIZE=$(du -sb "$TREE" | cut -f1)


NIX_ADD=(); ARCA_ADD=(); GRPC_ADD=(); INLINE_ADD=(); COMPACT=(); NIX_DUMP=(); ARCA_DUMP=(); DUMP_RATIO=()
for run in $(seq "$RUNS"); do
  retire "$WORK/nixroot"
  s=$(now); NP=$(nix-store --store "local?root=$WORK/nixroot" --add "$TREE" 2>/dev/null); sync; e=$(now)
  NIX_ADD+=("$(echo "$e - $s" | bc)")
  start_daemon --ingest-socket off --blob-service-addr "$(inline_blobs)"
  s=$(now); IP=$("${CLIENT_ENV[@]}" "$ARCA" import "$TREE"); sync; e=$(now)
  INLINE_ADD+=("$(echo "$e - $s" | bc)")
  stop_daemon
  [ "$NP" = "$IP" ] || { echo "store paths differ: nix $NP, arca (inline) $IP" >&2; exit 1; }
  start_daemon --ingest-socket off
  s=$(now); GP=$("${CLIENT_ENV[@]}" "$ARCA" import "$TREE"); sync; e=$(now)
  GRPC_ADD+=("$(echo "$e - $s" | bc)")
  stop_daemon
  [ "$NP" = "$GP" ] || { echo "store paths differ: nix $NP, arca (gRPC) $GP" >&2; exit 1; }
  start_daemon
  s=$(now); AP=$("${CLIENT_ENV[@]}" "$ARCA" import "$TREE"); sync; e=$(now)
  ARCA_ADD+=("$(echo "$e - $s" | bc)")
  [ "$NP" = "$AP" ] || { echo "store paths differ: nix $NP, arca $AP" >&2; exit 1; }
  COMPACT+=("$(wait_compacted)")
  STORED=$(du -sb "$WORK/data/blobs" | cut -f1)
  # The last run's daemon stays up for the dumps below.
  [ "$run" = "$RUNS" ] || stop_daemon
done
# Dumps: `nix-store --dump` and `arca nar dump` out of the last daemon, in
# pairs once all imports are done (who goes first alternates) (dumps taken right after each
# run's imports paid for their writeback, nix's and arca's unequally: the
# later runs of one invocation came out slower and slower). Each dump writes
# a new file (the previous output is retired, not overwritten: truncating a
# 1 GB file on this disk, mounted with `discard`, costs about 1 s inside the
# timed command) and starts with nothing left to write back.
nix_dump() {
  local s e
  s=$(now); nix-store --dump "$TREE" >"$WORK/nix.nar"; e=$(now)
  NIX_DUMP+=("$(echo "$e - $s" | bc)")
  sync
}
arca_dump() {
  local s e
  s=$(now); "${CLIENT_ENV[@]}" "$ARCA" nar dump "$AP" >"$WORK/arca.nar"; e=$(now)
  ARCA_DUMP+=("$(echo "$e - $s" | bc)")
  sync
}
for pair in $(seq "$RUNS"); do
  retire "$WORK/nix.nar"; retire "$WORK/arca.nar"
  # Who goes first alternates from pair to pair.
  if [ $((pair % 2)) = 1 ]; then nix_dump; arca_dump; else arca_dump; nix_dump; fi
  cmp -s "$WORK/nix.nar" "$WORK/arca.nar" || { echo "NARs differ" >&2; exit 1; }
  DUMP_RATIO+=("$(ratio "${ARCA_DUMP[-1]}" "${NIX_DUMP[-1]}")")
done
stop_daemon
# The machine's load swings within seconds: each pair's own ratio, and their median.
DR=$(printf '%s\n' "${DUMP_RATIO[@]}" | median)
NA=$(printf '%s\n' "${NIX_ADD[@]}" | median); AA=$(printf '%s\n' "${ARCA_ADD[@]}" | median)
IA=$(printf '%s\n' "${INLINE_ADD[@]}" | median); GA=$(printf '%s\n' "${GRPC_ADD[@]}" | median); CT=$(printf '%s\n' "${COMPACT[@]}" | median)
ND=$(printf '%s\n' "${NIX_DUMP[@]}" | median); AD=$(printf '%s\n' "${ARCA_DUMP[@]}" | median)
NARSIZE=$(stat -c %s "$WORK/nix.nar")
cat <<EOF
### Nix layer on \`$SRC\` ($((SIZE / 1000000)) MB on disk, NAR $((NARSIZE / 1000000)) MB) — $(date -u +%Y-%m-%d), $(nproc) cores

| what | median time (s) | ratio |
|---|---|---|
| \`nix-store --add\` (fresh chroot store) + \`sync\` | $NA | 1.00 |
| \`arca import\` through the daemon (fresh default store; local ingest: open files handed over) + \`sync\` | $AA | $(ratio "$AA" "$NA") of nix-store --add |
| same, files uploaded over gRPC (\`--ingest-socket off\`) + \`sync\` | $GA | $(ratio "$GA" "$NA") of nix-store --add |
| over gRPC into a store chunking and compressing inline (\`?compression=inline\`) + \`sync\` | $IA | $(ratio "$IA" "$NA") of nix-store --add |
| background chunking and compression done, after \`arca import\` returned (incl. the 1 s idle wait) | $CT | |
| \`nix-store --dump\` of the tree on disk | $ND | 1.00 |
| \`arca nar dump\` out of the daemon (after compaction: compressed chunks; the daemon writes into the command's standard output) | $AD | $(ratio "$AD" "$ND") of nix-store --dump (median of the pairs' ratios: $DR) |

Store path and NAR bytes were checked equal to Nix's in every run ($AP).
Runs (s): arca import ${ARCA_ADD[*]}; gRPC ${GRPC_ADD[*]}; inline ${INLINE_ADD[*]}; compaction ${COMPACT[*]}; nix-store --dump ${NIX_DUMP[*]}; arca nar dump ${ARCA_DUMP[*]}; pair ratios ${DUMP_RATIO[*]}.
Stored blob bytes after compaction: $STORED ($(ratio "$STORED" "$NARSIZE") of the NAR).
EOF
