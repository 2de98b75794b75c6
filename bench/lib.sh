# Shared helpers of the bench/ scripts (sourced, not run).
# Expects ARCA, PORT and WORK to be set by the caller.

# Moves $1 (if it exists) out of the way into $WORK/retired, deleted with
# $WORK when the script exits. Not deleted now: on ext4 without a journal
# (this machine's disk) every inode freed in the last few seconds to minutes
# is skipped by the allocator after a check of its inode table block
# (`recently_deleted`), so creating files right after an `rm -rf` of a store
# cost the next run up to a third of its CPU, more the more files it creates.
# The retired tree's dirty pages are written back at once (`sync`), so that
# no timed run pays for an earlier run's writeback (nor its `sync` for it).
# Its pages are then dropped from the page cache (written back first, so
# clean: POSIX_FADV_DONTNEED), so that retired trees do not fill memory and
# make later runs pay for reclaim (runs 3–5 of a script got slower for every
# tool, `cp` included, once several GB of retired stores were cached).
retire() {
  [ -e "$1" ] || return 0
  mkdir -p "$WORK/retired"
  local dest
  dest="$WORK/retired/$(basename "$1").$(date +%s%N)"
  mv "$1" "$dest"
  sync
  python3 - "$dest" <<'PY'
import os, sys
for root, _, files in os.walk(sys.argv[1]):
    for f in files:
        try:
            fd = os.open(os.path.join(root, f), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
PY
}

# Starts `arca daemon` on 127.0.0.1:$PORT with a fresh data dir under $WORK
# (the previous one retired); extra arguments go to the daemon. The client
# env vars are removed so the daemon never points at itself.
start_daemon() {
  retire "$WORK/data"
  env -u BLOB_SERVICE_ADDR -u DIRECTORY_SERVICE_ADDR -u PATH_INFO_SERVICE_ADDR \
    "$ARCA" daemon --listen "127.0.0.1:$PORT" --data-dir "$WORK/data" "$@" 2>"$WORK/daemon.log" &
  DAEMON_PID=$!
  for _ in $(seq 100); do grep -q "listening on" "$WORK/daemon.log" 2>/dev/null && return; sleep 0.05; done
  echo "daemon did not start" >&2; cat "$WORK/daemon.log" >&2; exit 1
}

stop_daemon() { kill -TERM "$DAEMON_PID"; wait "$DAEMON_PID" || true; }

# The daemon's blob store URL with inline compression (zstd while writing),
# for comparison with the default (raw first, compressed in the background).
inline_blobs() { echo "objectstore+file://$WORK/data/blobs?compression=inline"; }

# Waits until the daemon's background compactor has dealt with every chunk
# written raw, i.e. its journal $WORK/data/blobs/pending-compression is empty
# or absent; at most $1 seconds (default 600), else fails. Prints the seconds
# waited (this includes the compactor's 1 s wait for writes to pause).
wait_compacted() {
  local limit=${1:-600} journal=$WORK/data/blobs/pending-compression s
  s=$(now)
  while [ -s "$journal" ]; do
    if [ "$(echo "$(now) - $s > $limit" | bc)" = 1 ]; then
      echo "compaction not finished after ${limit} s ($(stat -c %s "$journal") journal bytes)" >&2
      return 1
    fi
    sleep 0.05
  done
  printf '%.2f\n' "$(echo "$(now) - $s" | bc)"
}

# CPU seconds (user + system) the daemon has used so far.
daemon_cpu() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f\n", ($14 + $15) / hz }' "/proc/$DAEMON_PID/stat"; }

now() { date +%s.%N; }

# Runs Nix commands without a Nix daemon, build users or substituters.
nix_standalone() {
  export NIX_CONFIG="build-users-group =
experimental-features = nix-command
substituters ="
}

# Sets CLIENT_ENV: an `env` prefix pointing arca clients at all three
# services of the daemon on $PORT.
client_env() {
  CLIENT_ENV=(env BLOB_SERVICE_ADDR=grpc+http://127.0.0.1:$PORT DIRECTORY_SERVICE_ADDR=grpc+http://127.0.0.1:$PORT PATH_INFO_SERVICE_ADDR=grpc+http://127.0.0.1:$PORT)
}

# The median of the numbers on stdin (RUNS of them).
median() { sort -n | sed -n "$(( (RUNS + 1) / 2 ))p"; }

# a / b with two decimals.
ratio() { python3 -c "print('%.2f' % ($1 / $2))"; }
