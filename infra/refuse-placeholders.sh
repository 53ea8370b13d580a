#!/bin/sh
# Refuses to start the stack while an environment variable still holds the placeholder that
# .env.example puts in every secret ("change-me..."): prints the variables' NAMES (never their values)
# and exits 2. Run first by the init containers (infra/airflow-init.sh, infra/minio-init.sh).
# POSIX sh and shell builtins only (plus `env`): the minio/mc image has no grep or sed.
set -eu
placeholder=change-me
bad=""
while IFS= read -r line; do
  name=${line%%=*}
  case $name in
    *[!A-Za-z0-9_]* | "") continue ;; # a continuation line of a multi-line value
  esac
  case ${line#*=} in
    *"$placeholder"*) bad="$bad $name" ;;
  esac
done <<EOF_ENV
$(env)
EOF_ENV
if [ -n "$bad" ]; then
  echo "error: these variables still hold the .env.example placeholder '$placeholder':$bad" >&2
  echo "error: put real values in .env (see .env.example for how to generate each) and start again" >&2
  exit 2
fi
