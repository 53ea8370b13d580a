#!/usr/bin/env bash
# Installs Debian bookworm's CPython 3.11 (the version of the project's lock) plus the extra apt
# packages given as arguments, in one layer with the apt lists removed. Used by the stages of
# images/trainer/Dockerfile. Debian's own python3: the base is Debian, so every shared library
# (OpenSSL, libffi, sqlite) comes from one distribution.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends ca-certificates python3.11 python3.11-venv "$@"
rm -rf /var/lib/apt/lists/*
python3.11 --version
