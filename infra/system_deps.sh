#!/usr/bin/env bash
# Installs the Debian packages the test suite's real servers and engines need, when missing:
# one list, one apt-get call. Called by `make test` (and by `make demo` with SEGPIPE_RUNNER=docker).
# Needs root (or sudo) only when something is missing; a machine that has them all installs nothing.
set -euo pipefail

# package -> a command it provides (how we tell it is installed). Add a line per new need.
declare -A PROVIDES=(
  [docker.io]=dockerd
  [debootstrap]=debootstrap
  [postgresql]=pg_ctlcluster
  [redis-server]=redis-server
  [iproute2]=ip
  [chromium]=chromium
)

missing=()
for pkg in "${!PROVIDES[@]}"; do
  command -v "${PROVIDES[$pkg]}" >/dev/null 2>&1 || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

SUDO=()
[ "$(id -u)" -eq 0 ] || SUDO=(sudo)
echo "system_deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
