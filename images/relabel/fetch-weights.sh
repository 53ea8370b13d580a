#!/usr/bin/env bash
# fetch-weights.sh URL SHA256 DEST: bake one weights file into the relabel image at build time.
# An empty URL is not an error: the image then has no baked file and tasks.relabel reads the weights
# from the artifact store at run time. A given SHA256 must match; the file must be a torch checkpoint
# (a zip archive), so an HTML error page saved under a .pt name fails the build instead of a later run.
set -euo pipefail
url=${1:-}
sha256=${2:-}
dest=${3:?usage: fetch-weights.sh URL SHA256 DEST}
if [ -z "$url" ]; then
  echo "fetch-weights: no URL given for $(basename "$dest"): not baked, read from the store at run time"
  exit 0
fi
mkdir -p "$(dirname "$dest")"
part="$dest.part"
trap 'rm -f "$part"' EXIT
python - "$url" "$part" <<'PY'
import shutil
import sys
import urllib.request

with urllib.request.urlopen(sys.argv[1], timeout=60) as response, open(sys.argv[2], "wb") as out:
    shutil.copyfileobj(response, out)
PY
if [ -n "$sha256" ] && ! echo "$sha256  $part" | sha256sum --check --status; then
  echo "fetch-weights: $url: sha256 $(sha256sum "$part" | cut -d' ' -f1) is not the expected $sha256" >&2
  exit 1
fi
if ! python -c 'import sys, zipfile; sys.exit(not zipfile.is_zipfile(sys.argv[1]))' "$part"; then
  echo "fetch-weights: $url: not a torch checkpoint (expected a zip archive)" >&2
  exit 1
fi
mv "$part" "$dest"
echo "fetch-weights: $dest ($(stat -c %s "$dest") bytes, sha256 $(sha256sum "$dest" | cut -d' ' -f1))"
