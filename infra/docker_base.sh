#!/usr/bin/env bash
# Prints the name of a Debian bookworm base image the engine has, making it available first:
#   1. already in the engine (a previous run): nothing to do;
#   2. `docker pull debian:bookworm-slim` (a machine with a registry: the real base);
#   3. else (no registry reachable, as on this workplace's machines) made here: debootstrap's minbase
#      bookworm, the host's CA bundle baked in (pip behind a TLS-intercepting proxy needs it), imported
#      as segpipe-debian:bookworm. Debian's own packages, from Debian's mirror: the same distribution.
# Called by infra/build_images.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PULLED=${SEGPIPE_BASE_IMAGE:-debian:bookworm-slim}
LOCAL=segpipe-debian:bookworm
MIRROR=${SEGPIPE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
HOST_CA=/etc/ssl/certs/ca-certificates.crt

have() { docker image inspect "$1" >/dev/null 2>&1; }

for image in "$PULLED" "$LOCAL"; do
  have "$image" && { echo "$image"; exit 0; }
done
if docker pull -q "$PULLED" >/dev/null 2>&1; then
  echo "$PULLED"
  exit 0
fi
echo "docker_base: cannot pull $PULLED; making $LOCAL with debootstrap from $MIRROR" >&2
bash infra/system_deps.sh
ROOTFS=$(mktemp -d "${TMPDIR:-/tmp}/segpipe-rootfs.XXXXXX")
trap 'rm -rf "$ROOTFS"' EXIT
nice -n 10 debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" >&2
# What debian:bookworm-slim's image adds over a plain rootfs: apt's sources for updates, no caches.
cat >"$ROOTFS/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
if [ -f "$HOST_CA" ]; then
  # The host's trust store as the image's (Debian's CAs and any local proxy's CA), also as a local CA
  # file, so that installing Debian's ca-certificates in an image keeps it in the regenerated bundle.
  mkdir -p "$ROOTFS/etc/ssl/certs" "$ROOTFS/usr/local/share/ca-certificates"
  cp "$HOST_CA" "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
  cp "$HOST_CA" "$ROOTFS/usr/local/share/ca-certificates/segpipe-host.crt"
fi
tar -C "$ROOTFS" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["bash"]' \
  --message "debootstrap --variant=minbase bookworm $MIRROR (infra/docker_base.sh)" - "$LOCAL" >&2
echo "$LOCAL"
