#!/usr/bin/env bash
# bench/copy.sh — copying a closure out of a far-away Nix binary cache (issue 4):
#   `arca copy --from nix+http://…` into a fresh `arca daemon` against
#   `nix copy --from http://…` into a fresh chroot store, both from the same
#   synthetic cache (bench/synthetic_cache.py: PATHS store paths, dependency depth
#   DEPTH) served on 127.0.0.1 by bench/cache_server.py, which answers every request
#   after DELAY_MS. Reports median times, the server's request counts, and the
#   ratios against the bound (DEPTH + 1) x delay (one round trip per level of the
#   closure: nothing can be fetched before its referrer's narinfo names it) and
#   performance.md's target 3.5 x (DEPTH + 1) x delay. Checks both results against
#   the cache (every path with the cache's NarHash, NarSize, references; NAR bytes of
#   a few paths via `arca nar dump`).
#
# Environment (all optional):
#   PATHS=1000 DEPTH=10 DELAY_MS=50 SEED=1 COMPRESSION=none|xz
#   RUNS=3        runs of each tool (median reported); NIX_RUNS=$RUNS for nix alone
#                 (nix copy fetches one file at a time: ~2 x PATHS x DELAY per run)
#   JOBS=         passed as `arca copy --jobs JOBS` when set
#   CHECK_SIGS=1  the cache is signed (ed25519, key from SEED; needs python3's
#                 `cryptography`) and both tools verify: nix with trusted-public-keys,
#                 arca with nix+http://…?trusted-public-keys=…; CHECK_SIGS=0 (or an
#                 unsigned cache) uses `nix copy --no-check-sigs` and no key for arca
#   NIX_TTL0=0    1 adds narinfo-cache-{positive,negative}-ttl = 0 to nix's settings.
#                 Off by default: with a positive TTL of 0 Nix 2.8 also ignores its
#                 in-memory narinfo cache and fetched every narinfo 4 times (4003
#                 narinfo GETs for 1000 paths, 267 s instead of 106 s). A fresh
#                 XDG_CACHE_HOME and NIX_STATE_DIR per run keep Nix's sqlite cache cold.
#   SKIP_ARCA=0 / SKIP_NIX=0   1 leaves that tool out
#   ARCA=path     an arca binary (else `cargo build --release -p arca-cli`)
#   DAEMON_ARGS=  extra `arca daemon` arguments (split on spaces), e.g. other backends
#   BENCH_WORK, BENCH_PORT=18768 (the daemon's gRPC port)
#   ARCA_TIMEOUT=300, NIX_TIMEOUT (default from PATHS and DELAY_MS)  seconds per copy
# Needs python3, curl, nix-bin (for the nix side and the NAR check), xz for COMPRESSION=xz.
set -euo pipefail
export LC_ALL=C
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh

PATHS=${PATHS:-1000}
DEPTH=${DEPTH:-10}
DELAY_MS=${DELAY_MS:-50}
SEED=${SEED:-1}
COMPRESSION=${COMPRESSION:-none}
RUNS=${RUNS:-3}
NIX_RUNS=${NIX_RUNS:-$RUNS}
JOBS=${JOBS:-}
CHECK_SIGS=${CHECK_SIGS:-1}
NIX_TTL0=${NIX_TTL0:-0}
SKIP_ARCA=${SKIP_ARCA:-0}
SKIP_NIX=${SKIP_NIX:-0}
ARCA_TIMEOUT=${ARCA_TIMEOUT:-300}
NIX_TIMEOUT=${NIX_TIMEOUT:-$(( 120 + 3 * (2 * PATHS + 10) * (DELAY_MS + 5) / 1000 ))}
PORT=${BENCH_PORT:-18768}
WORK=${BENCH_WORK:-$(mktemp -d /var/tmp/arca-bench-copy.XXXXXX)}
mkdir -p "$WORK"
SERVER_PID=
DAEMON_PID=

# Sends SIGTERM to a pid and waits for it at most $2 seconds, then SIGKILL.
stop_pid() {
  local pid=$1 limit=${2:-10}
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq $(( limit * 20 ))); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.05
  done
  echo "pid $pid did not stop in ${limit}s: killing it" >&2
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  stop_pid "$DAEMON_PID" 10
  stop_pid "$SERVER_PID" 5
  chmod -R u+w "$WORK" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

need() { command -v "$1" >/dev/null || { echo "missing $1: $2" >&2; exit 2; }; }
need python3 "install python3"
need curl "apt-get install -y curl"
need timeout "coreutils"
[ "$SKIP_NIX" = 1 ] || need nix "apt-get install -y --no-install-recommends nix-bin"
[ "$COMPRESSION" != xz ] || need xz "apt-get install -y xz-utils"

if [ "$SKIP_ARCA" != 1 ]; then
  if [ -z "${ARCA:-}" ]; then
    cargo build --release -q -p arca-cli
    ARCA=$PWD/target/release/arca
  fi
  # A private copy: a rebuild during the run must not swap the binary under it.
  cp "$ARCA" "$WORK/arca"
  ARCA=$WORK/arca
  "$ARCA" copy --help >/dev/null 2>&1 || {
    echo "$ARCA has no \`copy\` command yet: run with SKIP_ARCA=1 to measure nix copy alone" >&2; exit 2; }
fi

# --- the cache and its server --------------------------------------------------------
SYN=$WORK/synth
VERIFY=()
command -v nix-store >/dev/null && VERIFY=(--verify-with-nix 5)
python3 bench/synthetic_cache.py "$SYN" --paths "$PATHS" --depth "$DEPTH" --seed "$SEED" \
  --compression "$COMPRESSION" "${VERIFY[@]}"
ROOT=$(cat "$SYN/ROOT_PATH")
SIGNED=0
if [ "$CHECK_SIGS" = 1 ] && [ -s "$SYN/public-key" ]; then SIGNED=1; PUBKEY=$(cat "$SYN/public-key"); fi

python3 bench/cache_server.py "$SYN/cache" --delay-ms "$DELAY_MS" --ready-file "$WORK/http.port" \
  2>"$WORK/server.log" &
SERVER_PID=$!
for _ in $(seq 200); do [ -s "$WORK/http.port" ] && break; sleep 0.05; done
[ -s "$WORK/http.port" ] || { echo "cache server did not start" >&2; cat "$WORK/server.log" >&2; exit 1; }
HTTP=http://127.0.0.1:$(cat "$WORK/http.port")
curl -sf --max-time 10 "$HTTP/nix-cache-info" | grep -q "StoreDir: /nix/store" || {
  echo "cache server does not answer" >&2; exit 1; }

reset_stats() { curl -sf --max-time 10 "$HTTP/_bench/reset" >/dev/null; }
save_stats() { curl -sf --max-time 10 "$HTTP/_bench/stats" >"$1"; }
# The JSON field $2 of file $1 (by_kind entries as "by_kind.GET narinfo").
jget() { python3 -c 'import json,sys
v = json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."): v = v.get(k, 0)
print(v)' "$1" "$2"; }
# "N (a narinfo, b nar, c other)" for a stats file.
requests() { python3 -c 'import json,sys
s = json.load(open(sys.argv[1])); k = s["by_kind"]
ni = sum(v for n, v in k.items() if n.endswith(" narinfo")); nar = sum(v for n, v in k.items() if n.endswith(" nar"))
print("%d (%d narinfo, %d nar, %d other%s)" % (s["requests"], ni, nar, s["requests"] - ni - nar,
      ", %d not found" % s["not_found"] if s["not_found"] else ""))' "$1"; }

# --- arca ----------------------------------------------------------------------------
ARCA_TIMES=()
if [ "$SKIP_ARCA" != 1 ]; then
  FROM="nix+$HTTP"
  [ "$SIGNED" = 1 ] && FROM="$FROM?trusted-public-keys=$PUBKEY"
  COPY_ARGS=(copy --from "$FROM")
  [ -n "$JOBS" ] && COPY_ARGS+=(--jobs "$JOBS")
  # A few paths whose NARs are compared byte for byte: the root, the first of every
  # third level, the last path of level 0.
  mapfile -t SAMPLE < <(python3 -c 'import json,sys
m = json.load(open(sys.argv[1]))["paths"]
firsts = {}
for p in m: firsts.setdefault(p["level"], p)
picks = [m[-1]] + [firsts[l] for l in sorted(firsts) if l % 3 == 0] + [[p for p in m if p["level"] == 0][-1]]
for p in picks: print(p["path"], p["url"])' "$SYN/manifest.json")
fi
for i in $(seq "$RUNS"); do
  [ "$SKIP_ARCA" != 1 ] || break
  read -ra daemon_args <<<"${DAEMON_ARGS:-}"
  start_daemon "${daemon_args[@]}"
  rm -rf "$WORK/client"
  CLIENT_ENV=(env ARCA_DATA_DIR="$WORK/client" BLOB_SERVICE_ADDR="grpc+http://127.0.0.1:$PORT"
    DIRECTORY_SERVICE_ADDR="grpc+http://127.0.0.1:$PORT" PATH_INFO_SERVICE_ADDR="grpc+http://127.0.0.1:$PORT")
  reset_stats
  s=$(now)
  rc=0
  timeout "$ARCA_TIMEOUT" "${CLIENT_ENV[@]}" "$ARCA" "${COPY_ARGS[@]}" "$ROOT" >"$WORK/arca-copy.log" 2>&1 || rc=$?
  if [ "$rc" != 0 ]; then
    [ "$rc" = 124 ] && echo "arca copy timed out after ${ARCA_TIMEOUT}s (run $i); the server saw $(requests <(curl -sf --max-time 10 "$HTTP/_bench/stats"))" >&2
    echo "arca copy failed with exit code $rc (run $i):" >&2; tail -20 "$WORK/arca-copy.log" >&2; exit 1
  fi
  e=$(now)
  save_stats "$WORK/stats-arca-$i.json"
  ARCA_TIMES+=("$(printf '%.3f' "$(echo "$e - $s" | bc)")")
  # Correctness: the closure with the cache's hashes, and NAR bytes of the sample.
  timeout 120 "${CLIENT_ENV[@]}" "$ARCA" path-info --json --recursive "$ROOT" >"$WORK/arca-pathinfo.json"
  python3 bench/synthetic_cache.py "$SYN" --check-path-info "$WORK/arca-pathinfo.json" 2>"$WORK/check.log" || {
    cat "$WORK/check.log" >&2; exit 1; }
  for line in "${SAMPLE[@]}"; do
    p=${line%% *}; url=${line#* }
    timeout 60 "${CLIENT_ENV[@]}" "$ARCA" nar dump "$p" >"$WORK/dump.nar"
    if [ "$COMPRESSION" = xz ]; then xz -dc "$SYN/cache/$url" >"$WORK/want.nar"; else cp "$SYN/cache/$url" "$WORK/want.nar"; fi
    cmp -s "$WORK/want.nar" "$WORK/dump.nar" || { echo "arca nar dump $p differs from the cache's NAR" >&2; exit 1; }
  done
  stop_pid "$DAEMON_PID" 10
  DAEMON_PID=
  echo "arca copy run $i: ${ARCA_TIMES[-1]} s, $(requests "$WORK/stats-arca-$i.json")" >&2
done

# --- nix -----------------------------------------------------------------------------
NIX_TIMES=()
NIX_SETTINGS="build-users-group =
experimental-features = nix-command
substituters ="
[ "$NIX_TTL0" = 1 ] && NIX_SETTINGS="$NIX_SETTINGS
narinfo-cache-negative-ttl = 0
narinfo-cache-positive-ttl = 0"
NIX_SIG=(--no-check-sigs)
if [ "$SIGNED" = 1 ]; then
  NIX_SIG=()
  NIX_SETTINGS="$NIX_SETTINGS
trusted-public-keys = $PUBKEY"
fi
for i in $(seq "$NIX_RUNS"); do
  [ "$SKIP_NIX" != 1 ] || break
  N=$WORK/nix-$i
  mkdir -p "$N/cache" "$N/state"
  NIX_ENV=(env NIX_CONFIG="$NIX_SETTINGS" XDG_CACHE_HOME="$N/cache" NIX_STATE_DIR="$N/state")
  reset_stats
  s=$(now)
  rc=0
  timeout "$NIX_TIMEOUT" "${NIX_ENV[@]}" nix copy --from "$HTTP" --to "local?root=$N/root" "${NIX_SIG[@]}" \
    "$ROOT" >"$WORK/nix-copy.log" 2>&1 || rc=$?
  if [ "$rc" != 0 ]; then
    [ "$rc" = 124 ] && echo "nix copy timed out after ${NIX_TIMEOUT}s (run $i)" >&2
    echo "nix copy failed with exit code $rc (run $i):" >&2; tail -20 "$WORK/nix-copy.log" >&2; exit 1
  fi
  e=$(now)
  save_stats "$WORK/stats-nix-$i.json"
  NIX_TIMES+=("$(printf '%.3f' "$(echo "$e - $s" | bc)")")
  timeout 120 "${NIX_ENV[@]}" nix path-info --store "local?root=$N/root" --json --recursive "$ROOT" \
    >"$WORK/nix-pathinfo.json" 2>/dev/null
  python3 bench/synthetic_cache.py "$SYN" --check-path-info "$WORK/nix-pathinfo.json" 2>"$WORK/check.log" || {
    cat "$WORK/check.log" >&2; exit 1; }
  chmod -R u+w "$N"; rm -rf "$N"
  echo "nix copy run $i: ${NIX_TIMES[-1]} s, $(requests "$WORK/stats-nix-$i.json")" >&2
done

# --- report --------------------------------------------------------------------------
BOUND=$(python3 -c "print('%.3f' % (($DEPTH + 1) * $DELAY_MS / 1000))")
TARGET=$(python3 -c "print('%.3f' % (3.5 * ($DEPTH + 1) * $DELAY_MS / 1000))")
NARBYTES=$(python3 -c 'import json,sys; print(sum(p["narSize"] for p in json.load(open(sys.argv[1]))["paths"]))' "$SYN/manifest.json")
if [ "$SIGNED" = 1 ]; then SIGS="signed narinfos; nix with \`trusted-public-keys\`, arca with \`?trusted-public-keys=\`: both verify every signature"
else SIGS="unsigned check: \`nix copy --no-check-sigs\`, arca without trusted keys"; fi
row() { # tool times-array-name runs last-stats-file
  local -n times=$2
  local med
  med=$(printf '%s\n' "${times[@]}" | RUNS=$3 median)
  echo "| $1 | $med | $(requests "$4") | $(jget "$4" max_in_flight) | $(jget "$4" connections) | $(ratio "$med" "$BOUND") |"
}
cat <<EOF
### Copy of a $PATHS-path closure of depth $DEPTH from a binary cache answering after $DELAY_MS ms — $(date -u +%Y-%m-%d), $(nproc) cores

Cache: \`bench/synthetic_cache.py --paths $PATHS --depth $DEPTH --seed $SEED --compression $COMPRESSION\`
($((NARBYTES / 1000)) kB of NARs), served by \`bench/cache_server.py --delay-ms $DELAY_MS\`; $SIGS.
Requests, most in flight and connections are the server's counts for the last run.

| what | median time (s) | requests | most in flight | connections | vs bound |
|---|---|---|---|---|---|
| bound: (D + 1) × delay | $BOUND | | | | 1.00 |
| target: 3.5 × (D + 1) × delay | $TARGET | | | | 3.50 |
EOF
[ "${#ARCA_TIMES[@]}" = 0 ] || row "\`arca copy --from nix+http://…${JOBS:+ --jobs $JOBS}\` into a fresh daemon${DAEMON_ARGS:+ (\`$DAEMON_ARGS\`)}" ARCA_TIMES "$RUNS" "$WORK/stats-arca-$RUNS.json"
[ "${#NIX_TIMES[@]}" = 0 ] || row "\`nix copy --from http://…\` into a fresh chroot store" NIX_TIMES "$NIX_RUNS" "$WORK/stats-nix-$NIX_RUNS.json"
echo
[ "${#ARCA_TIMES[@]}" = 0 ] || echo "- arca runs (s): ${ARCA_TIMES[*]}"
[ "${#NIX_TIMES[@]}" = 0 ] || echo "- nix runs (s): ${NIX_TIMES[*]}"
if [ "${#ARCA_TIMES[@]}" != 0 ] && [ "${#NIX_TIMES[@]}" != 0 ]; then
  AM=$(printf '%s\n' "${ARCA_TIMES[@]}" | RUNS=$RUNS median); NM=$(printf '%s\n' "${NIX_TIMES[@]}" | RUNS=$NIX_RUNS median)
  echo "- arca / nix = $(ratio "$AM" "$NM")"
fi
if [ "${#ARCA_TIMES[@]}" != 0 ]; then
  AM=$(printf '%s\n' "${ARCA_TIMES[@]}" | RUNS=$RUNS median)
  if python3 -c "import sys; sys.exit(0 if $AM <= $TARGET else 1)"; then
    echo "- target ≤ $TARGET s: **met** (arca / bound = $(ratio "$AM" "$BOUND"))"
  else
    echo "- target ≤ $TARGET s: **missed** by $(ratio "$AM" "$TARGET")x (arca / bound = $(ratio "$AM" "$BOUND"))"
  fi
  echo "- every arca run: \`arca path-info --json --recursive\` listed all $PATHS paths with the cache's NarHash, NarSize and references; \`arca nar dump\` of ${#SAMPLE[@]} paths equalled the cache's NARs"
fi
[ "${#NIX_TIMES[@]}" = 0 ] || echo "- every nix run: \`nix path-info --json --recursive\` listed all $PATHS paths with the cache's NarHash, NarSize and references"
