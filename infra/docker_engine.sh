#!/usr/bin/env bash
# A Docker engine for the docker runner, the image builds and the container tests.
#
#   bash infra/docker_engine.sh start    # use the engine that answers, else start one (idempotent)
#   bash infra/docker_engine.sh status   # exit 0 when an engine answers
#   bash infra/docker_engine.sh stop     # stop the engine this script started (none other)
#
# Where an engine already answers (Docker Desktop, a system dockerd, DOCKER_HOST), `start` uses it and
# changes nothing. Elsewhere (this workplace's machines start without one) it installs Debian's
# docker.io when missing (infra/system_deps.sh) and starts `dockerd` as root:
#   - pid file, log and exec root under .work/docker/ (per clone: `stop` stops only what this clone
#     started); the exec root holds containerd's unix sockets, whose paths may not exceed 104 bytes, so
#     where .work/docker/exec is longer than 60 it is /run/segpipe-docker-<hash of the state dir>;
#   - data root (images, layer cache) OUTSIDE the clone, SEGPIPE_DOCKER_DATA_ROOT (default
#     ~/.cache/segpipe/docker of the account): a fresh clone on the same machine finds its images built;
#   - socket: DOCKER_HOST's unix socket, default /var/run/docker.sock (docker's standard, so every
#     client and the DockerOperator's default docker_url find it);
#   - SEGPIPE_DOCKERD_ARGS: more dockerd options (e.g. "--bridge=none --iptables=false" for an engine
#     whose containers use the host network only).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STATE=${SEGPIPE_DOCKER_STATE:-$ROOT/.work/docker}
# The account's home from the passwd database, not $HOME: a caller's sandbox HOME (the test suite sets
# one per test) must not move the image cache into a temporary folder.
ACCOUNT_HOME=$(getent passwd "$(id -u)" | cut -d: -f6)
DATA_ROOT=${SEGPIPE_DOCKER_DATA_ROOT:-${XDG_CACHE_HOME:-${ACCOUNT_HOME:-$HOME}/.cache}/segpipe/docker}
PIDFILE=$STATE/dockerd.pid
EXEC_ROOT=$STATE/exec
if [ ${#EXEC_ROOT} -gt 60 ]; then
  EXEC_ROOT=/run/segpipe-docker-$(printf %s "$STATE" | sha256sum | cut -c1-12)
fi
LOG=$STATE/dockerd.log
HOST_URL=${DOCKER_HOST:-unix:///var/run/docker.sock}

answers() { docker info --format '{{.ServerVersion}}' >/dev/null 2>&1; }

our_pid() {
  [ -f "$PIDFILE" ] || return 1
  local pid
  pid=$(cat "$PIDFILE")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

start() {
  # One start at a time per engine state (parallel test workers, make demo beside make test): the
  # second waits, then finds the first's engine answering.
  mkdir -p "$STATE"
  exec 8>"$STATE/start.lock"
  flock 8
  if answers; then
    echo "docker_engine: engine at $HOST_URL answers ($(docker info --format '{{.ServerVersion}}'))" >&2
    return 0
  fi
  case $HOST_URL in
    unix://*) ;;
    *) echo "docker_engine: DOCKER_HOST=$HOST_URL does not answer and is not a local socket" >&2; exit 1 ;;
  esac
  bash infra/system_deps.sh
  command -v dockerd >/dev/null || { echo "docker_engine: dockerd not found after install" >&2; exit 1; }
  if [ "$(id -u)" -ne 0 ]; then
    echo "docker_engine: no engine answers at $HOST_URL and starting dockerd needs root" >&2
    exit 1
  fi
  mkdir -p "$STATE" "$EXEC_ROOT" "$DATA_ROOT"
  echo "docker_engine: starting dockerd (data root $DATA_ROOT, exec root $EXEC_ROOT, log $LOG)" >&2
  # setsid: the engine outlives the shell that started it (make test, make demo) until `stop`;
  # 8>&-: it must not hold the start lock.
  # shellcheck disable=SC2086 # SEGPIPE_DOCKERD_ARGS: options, split on spaces
  setsid dockerd --data-root "$DATA_ROOT" --exec-root "$EXEC_ROOT" --pidfile "$PIDFILE" \
    -H "$HOST_URL" ${SEGPIPE_DOCKERD_ARGS:-} >>"$LOG" 2>&1 </dev/null 8>&- &
  started=$!
  for _ in $(seq 1 120); do
    answers && { echo "docker_engine: up ($(docker info --format '{{.ServerVersion}}'))" >&2; return 0; }
    sleep 0.5
  done
  echo "docker_engine: dockerd did not answer within 60 s; last lines of $LOG:" >&2
  tail -n 20 "$LOG" >&2
  kill -TERM "$started" 2>/dev/null || true  # nothing half-started is left running
  exit 1
}

stop() {
  local pid
  if ! pid=$(our_pid); then
    echo "docker_engine: no engine started by this clone is running" >&2
    rm -f "$PIDFILE"
    return 0
  fi
  # SIGTERM: dockerd stops its containers (each with its own grace period), then itself.
  kill -TERM "$pid"
  for _ in $(seq 1 120); do
    if ! kill -0 "$pid" 2>/dev/null; then
      # dockerd leaves its default network namespace bind-mounted under the exec root.
      if mountpoint -q "$EXEC_ROOT/netns/default" 2>/dev/null; then umount "$EXEC_ROOT/netns/default"; fi
      echo "docker_engine: stopped" >&2
      rm -f "$PIDFILE"
      return 0
    fi
    sleep 0.5
  done
  echo "docker_engine: dockerd $pid still running after 60 s" >&2
  exit 1
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status)
    if answers; then
      echo "engine at $HOST_URL: $(docker info --format '{{.ServerVersion}} data root {{.DockerRootDir}}')"
    else
      echo "no engine answers at $HOST_URL" >&2
      exit 1
    fi
    ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
