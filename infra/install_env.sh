#!/usr/bin/env bash
# Builds the Python environment in $1 (default .venv): Airflow side + task side + dev tools.
# Idempotent: pip skips what is already installed at the pinned version. Called by `make setup`.
# The trainer image (images/trainer/Dockerfile) runs this same script, a few parts per layer:
#   install_env.sh VENV [PART...]   parts, in this order: tools torch tasks airflow dev mmcv sam2
#                                   project check (default: all of them, the local environment)
# MMCV_OPS=1 builds mmcv with its compiled ops instead of installing mmcv-lite (needs a C++ compiler,
# and nvcc for the CUDA ops: the image's `ops` build stage has both); SAM2_BUILD_CUDA=1 likewise
# builds sam2's CUDA extension. WHEELS_DIR=DIR: the mmcv and sam2 parts build wheels into DIR
# instead of installing them (the image builds them in one stage and installs them in another).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
shift || true
ALL_PARTS=" tools torch tasks airflow dev mmcv sam2 project check "
PARTS=" ${*:-$ALL_PARTS} "
for part in $PARTS; do
  [[ $ALL_PARTS == *" $part "* ]] || { echo "install_env.sh: unknown part '$part' (parts:$ALL_PARTS)" >&2; exit 2; }
done
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
want() { [[ $PARTS == *" $1 "* ]]; }

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
LOCK=(-c requirements/constraints.txt)

# setuptools must stay < 81: mmcv's setup.py needs pkg_resources, removed in 81.
want tools && "${PIP[@]}" --upgrade "pip==25.3" "setuptools==80.10.2" wheel
# torch first, so nothing below pulls another (CUDA) torch build.
want torch && "${PIP[@]}" -r requirements/torch.txt "${LOCK[@]}"
REQS=()
for part in tasks airflow dev; do
  want "$part" && REQS+=(-r "requirements/$part.txt")
done
[ ${#REQS[@]} -eq 0 ] || "${PIP[@]}" "${REQS[@]}" "${LOCK[@]}"

# mmcv: requirements/mmcv.txt pins the version (2.1.0; mmseg 1.2.2 asserts mmcv < 2.2.0). PyPI has
# mmcv only as a source distribution whose compiled ops take ~38 min to build on 2 cores (CPU ops
# only; longer with CUDA). By default we install the same version's pure-Python wheel, mmcv-lite
# (what mmcv's setup.py itself produces with MMCV_WITH_OPS=0): neither study model calls an mmcv op,
# and tasks/mmcompat.py makes mmseg's four unguarded `mmcv.ops` imports resolve to ops that raise a
# clear error if ever called.
want mmcv && MMCV_VERSION=$(sed -n 's/^mmcv==//p' requirements/mmcv.txt)
if want mmcv && [ "${MMCV_OPS:-0}" = 1 ]; then
  # mmcv 2.1.0's setup.py asks for -std=c++17, torch 2.14's headers need C++20 ("C++20 or later
  # compatible compiler is required to use ATen"): patched in the unpacked source before the build.
  src=$(mktemp -d)
  "$VENV/bin/python" -m pip download --quiet --no-deps --no-binary mmcv -d "$src" "mmcv==${MMCV_VERSION}"
  tar -xzf "$src/mmcv-${MMCV_VERSION}.tar.gz" -C "$src"
  sed -i 's/-std=c++17/-std=c++20/g' "$src/mmcv-${MMCV_VERSION}/setup.py"
  grep -q -- '-std=c++20' "$src/mmcv-${MMCV_VERSION}/setup.py"
  MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "$VENV/bin/python" -m pip wheel --quiet --no-deps \
    --no-build-isolation -w "${WHEELS_DIR:-$src/wheels}" "$src/mmcv-${MMCV_VERSION}"
  [ -n "${WHEELS_DIR:-}" ] || "${PIP[@]}" "$src"/wheels/mmcv-*.whl "${LOCK[@]}"
  rm -rf "$src"
elif want mmcv && [ -n "${WHEELS_DIR:-}" ]; then
  "$VENV/bin/python" -m pip download --quiet --no-deps -d "$WHEELS_DIR" "mmcv-lite==${MMCV_VERSION}"
elif want mmcv; then
  "${PIP[@]}" "mmcv-lite==${MMCV_VERSION}"
fi
# sam2 builds an optional CUDA extension (SAM2_BUILD_CUDA, default off here); without isolation it
# builds against the torch above instead of pulling a second 5.5 GB torch into an isolated build env.
if want sam2; then
  export SAM2_BUILD_CUDA=${SAM2_BUILD_CUDA:-0}
  # With the extension asked for, a failed build fails the install (instead of a sam2 without it).
  [ "$SAM2_BUILD_CUDA" = 1 ] && export SAM2_BUILD_ALLOW_ERRORS=0
  if [ -n "${WHEELS_DIR:-}" ]; then
    "$VENV/bin/python" -m pip wheel --quiet --no-deps --no-build-isolation --no-binary sam2 \
      -w "$WHEELS_DIR" -r requirements/sam2.txt "${LOCK[@]}"
  else
    "${PIP[@]}" --no-build-isolation -r requirements/sam2.txt "${LOCK[@]}"
  fi
fi
# The project itself, editable, so `python -m tasks` works from any directory (built with the
# setuptools installed above: no download).
want project && "${PIP[@]}" --no-deps --no-build-isolation -e .
want check && "$VENV/bin/python" -m pip check
exit 0
