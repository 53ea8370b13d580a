#!/usr/bin/env bash
# Builds the task images (images/trainer, images/relabel) with the engine that answers and prints
# their tags as shell assignments, for `eval "$(bash infra/build_images.sh)"`:
#   SEGPIPE_TRAINER_IMAGE=segpipe-trainer:0.1.0
#   SEGPIPE_RELABEL_IMAGE=segpipe-relabel:0.1.0
# The engine first: `bash infra/docker_engine.sh start` (this script starts it when none answers).
# Settings:
#   SEGPIPE_TRAINER_IMAGE / SEGPIPE_RELABEL_IMAGE  tags (default: dags/segpipe_runners.py's)
#   MMCV_FLAVOUR=lite|ops    mmcv without / with its compiled CUDA ops (images/trainer/Dockerfile)
#   SEGPIPE_DOCKER_NO_CACHE=1  build every layer again (a cold build; bench/docker_runner.py)
#   SEGPIPE_PIP_MIRROR=auto|off  auto: where this host's pip reads packages from local folders
#                            (`pip config list`: file:// indexes, find-links), serve them on
#                            127.0.0.1:$SEGPIPE_PIP_MIRROR_PORT (default 3141) during the build, so GBs
#                            of wheels already on disk are not downloaded.
#                            Elsewhere (off, or no such folders) the build reads PyPI.
# The layers stay in the engine's data root (outside the clone): an unchanged image rebuilds nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STATE=$ROOT/.work/docker
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
default_tag() { sed -n "s/^$1 = \"\\([^\"]*\\)\".*/\\1/p" dags/segpipe_runners.py; }
TRAINER=${SEGPIPE_TRAINER_IMAGE:-$(default_tag DEFAULT_TRAINER_IMAGE)}
RELABEL=${SEGPIPE_RELABEL_IMAGE:-$(default_tag DEFAULT_RELABEL_IMAGE)}
FLAVOUR=${MMCV_FLAVOUR:-lite}
mkdir -p "$STATE"
log() { echo "build_images: $*" >&2; }

bash infra/docker_engine.sh start >&2
# One build at a time on this machine (several clones share the engine and the mirror's port).
exec 9>"${TMPDIR:-/tmp}/segpipe-build-images.lock"
flock 9
BASE=$(bash infra/docker_base.sh)

# BuildKit builds only the stages the flavour needs. Docker >= 23 clients need the buildx plugin for
# it; Debian's docker.io client (20.10, /usr/bin/docker) speaks BuildKit itself.
DOCKER=(docker)
if ! docker buildx version >/dev/null 2>&1 && [ -x /usr/bin/docker ]; then DOCKER=(/usr/bin/docker); fi
export DOCKER_BUILDKIT=1

# ---------------------------------------------------------------- local package mirror
MIRROR_ARGS=()
mirror_pid=""
stop_mirror() { [ -z "$mirror_pid" ] || kill "$mirror_pid" 2>/dev/null || true; }
trap stop_mirror EXIT
if [ "${SEGPIPE_PIP_MIRROR:-auto}" = auto ]; then
  # One web root of symlinks: d<N> -> the parent of each file:// index (its pages link ../../files/)
  # or the find-links folder itself.
  WEB=$STATE/pip-mirror
  rm -rf "$WEB" && mkdir -p "$WEB"
  readarray -t urls < <("$PY" - "$WEB" <<'EOF'
import os
import subprocess
import sys
from urllib.parse import urlparse

web = sys.argv[1]
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
indexes, links = [], []
for line in out.stdout.splitlines():
    key, _, value = line.partition("=")
    name = key.rsplit(".", 1)[-1]
    for item in value.strip("'\"").split():
        path = urlparse(item).path if item.startswith("file://") else item
        if not os.path.isdir(path) or path in indexes or path in links:
            continue
        if name in ("index-url", "extra-index-url"):
            indexes.append(path)
        elif name == "find-links":
            links.append(path)
for n, path in enumerate(indexes + links):
    is_index = n < len(indexes)
    target = os.path.dirname(path.rstrip("/")) if is_index else path
    os.symlink(target, os.path.join(web, f"d{n}"))
    tail = os.path.basename(path.rstrip("/")) + "/" if is_index else ""
    print(("index " if is_index else "links ") + f"d{n}/{tail}")
EOF
  )
  if [ ${#urls[@]} -gt 0 ]; then
    # A fixed port: the URLs are build args, part of each layer's cache key (a new port, a rebuild).
    port=${SEGPIPE_PIP_MIRROR_PORT:-3141}
    if ! "$PY" -c "import socket; socket.socket().bind(('127.0.0.1', $port))" 2>/dev/null; then
      echo "build_images: port $port is taken (SEGPIPE_PIP_MIRROR_PORT): the mirror cannot start" >&2
      exit 1
    fi
    "$PY" -m http.server --bind 127.0.0.1 --directory "$WEB" "$port" >"$STATE/pip-mirror.log" 2>&1 &
    mirror_pid=$!
    for _ in $(seq 1 50); do
      "$PY" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/')" 2>/dev/null && break
      sleep 0.1
    done
    index="" extra="" links=""
    for entry in "${urls[@]}"; do
      kind=${entry%% *} url="http://127.0.0.1:$port/${entry#* }"
      if [ "$kind" = links ]; then links+="$url "
      elif [ -z "$index" ]; then index=$url
      else extra+="$url "
      fi
    done
    # The local folders first (pip takes the first of equal candidates), PyPI for everything else.
    MIRROR_ARGS=(--build-arg "PIP_INDEX_URL=$index" --build-arg "PIP_EXTRA_INDEX_URL=${extra}https://pypi.org/simple")
    [ -z "$links" ] || MIRROR_ARGS+=(--build-arg "PIP_FIND_LINKS=${links% }")
    log "serving this host's local package folders on 127.0.0.1:$port for the build"
  fi
fi

# ---------------------------------------------------------------- the images
sha=$(git rev-parse HEAD 2>/dev/null || echo unknown)
CACHE_ARGS=()
[ "${SEGPIPE_DOCKER_NO_CACHE:-0}" != 1 ] || CACHE_ARGS=(--no-cache)
build() {
  local tag=$1 dockerfile=$2
  shift 2
  log "building $tag ($dockerfile)"
  local started=$SECONDS
  nice -n 10 "${DOCKER[@]}" build --network host --progress plain -f "$dockerfile" -t "$tag" \
    --build-arg "SEGPIPE_GIT_SHA=$sha" "${CACHE_ARGS[@]}" "$@" . >"$STATE/build-${tag//[:\/]/_}.log" 2>&1 || {
    log "building $tag failed; last lines of $STATE/build-${tag//[:\/]/_}.log:"
    tail -n 40 "$STATE/build-${tag//[:\/]/_}.log" >&2
    exit 1
  }
  log "$tag built in $((SECONDS - started)) s ($(docker image inspect -f '{{.Size}}' "$tag" | numfmt --to=iec))"
}
build "$TRAINER" images/trainer/Dockerfile --build-arg "BASE_IMAGE=$BASE" \
  --build-arg "MMCV_FLAVOUR=$FLAVOUR" "${MIRROR_ARGS[@]}"
build "$RELABEL" images/relabel/Dockerfile --build-arg "TRAINER_IMAGE=$TRAINER"
echo "SEGPIPE_TRAINER_IMAGE=$TRAINER"
echo "SEGPIPE_RELABEL_IMAGE=$RELABEL"
