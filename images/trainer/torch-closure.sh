#!/usr/bin/env bash
# torch-closure.sh REQUIREMENTS_DIR OUT: writes to OUT the lines of REQUIREMENTS_DIR/constraints.txt
# that pin the dependency closure of REQUIREMENTS_DIR/torch.txt (torch, torchvision, the nvidia-*
# CUDA wheels, triton, sympy...), as pip's resolver finds it (a dry run: nothing is installed).
# images/trainer/Dockerfile installs torch against OUT alone, so that the 5 GB torch layer's cache key
# changes only when one of these pins does, not with every pin of the lock.
set -euo pipefail
req=$1
out=$2
venv=$(mktemp -d)
python3.11 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --dry-run --ignore-installed --report "$venv/report.json" \
  -r "$req/torch.txt" -c "$req/constraints.txt"
python3.11 - "$req/constraints.txt" "$venv/report.json" >"$out" <<'PY'
import json
import re
import sys


def key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


lock = {}
for line in open(sys.argv[1]):
    match = re.match(r"([A-Za-z0-9_.-]+)==", line)
    if match:
        lock[key(match.group(1))] = line.strip()
closure = {key(item["metadata"]["name"]) for item in json.load(open(sys.argv[2]))["install"]}
missing = [name for name in ("torch", "torchvision") if name not in closure & set(lock)]
if missing:
    sys.exit(f"torch-closure: {missing} not resolved and pinned ({sys.argv[1]})")
# Packages the lock does not pin (pip, setuptools: install_env.sh's tools part pins those) stay out.
print("\n".join(lock[name] for name in sorted(closure) if name in lock))
PY
rm -rf "$venv"
echo "torch-closure: $(wc -l <"$out") pins" >&2
