#!/usr/bin/env bash
# Installs CPython 3.11 (the version of the project's lock) plus the extra apt packages given as
# arguments, in one layer with the apt lists removed. Used by both stages of images/trainer/Dockerfile.
#
# Why deadsnakes: the CUDA 13.0 images are Ubuntu 24.04, whose own python3 is 3.12, and
# requirements/constraints.txt is a Python 3.11 lock. The deadsnakes PPA builds 3.11 for 24.04 against the
# distribution's own libraries (OpenSSL, libffi, sqlite) and ships python3.11-dev, which the mmcv and
# sam2 extension builds need. Copying /usr/local from a python:3.11 (Debian) image instead would mix two
# distributions' shared libraries in one image.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends ca-certificates gpg-agent software-properties-common
add-apt-repository -y ppa:deadsnakes/ppa
apt-get install -y --no-install-recommends python3.11 python3.11-venv "$@"
# add-apt-repository is only needed to add the PPA: drop it (and the python3.12 it pulled in).
apt-get purge -y --auto-remove gpg-agent software-properties-common
rm -rf /var/lib/apt/lists/*
python3.11 --version
