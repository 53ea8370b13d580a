"""The stack's Airflow pools and connections, built from the environment by the airflow-init container.

    python infra/airflow_setup.py OUT_DIR

writes OUT_DIR/pools.json (infra/pools.json with the `gpu` pool sized to the GPUs) and
OUT_DIR/connections.json (`segpipe_s3`, plus `segpipe_clearml` when ClearML credentials are set), in the
formats of `airflow pools import` and `airflow connections import`; infra/airflow-init.sh imports them
and deletes them. Exit 2 with one line per problem when a setting is missing or malformed.

Connections (what the DAG's docker runner passes to the task containers):
- segpipe_s3 (type aws): login/password = the pipeline's MinIO user (created by infra/minio-init.sh),
  extra {"endpoint_url": SEGPIPE_S3_ENDPOINT_URL, "region_name": AWS_DEFAULT_REGION}.
- segpipe_clearml (type generic), only when CLEARML_API_ACCESS_KEY is set: login/password = access/secret
  key, schema/host/port = CLEARML_API_HOST's parts, extra {"api_host", "web_host", "files_host"} = the
  CLEARML_*_HOST URLs. Without it the tasks track offline.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

POOLS_FILE = Path(__file__).with_name("pools.json")
GPU_POOL = "gpu"
S3_CONN_ID = "segpipe_s3"
CLEARML_CONN_ID = "segpipe_clearml"
DEFAULT_REGION = "us-east-1"


class SetupError(Exception):
    """Settings that cannot make a working stack; one message per problem, each naming the variable."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def gpu_slots(env: Mapping[str, str]) -> int:
    """Slots of the `gpu` pool: SEGPIPE_GPU_POOL_SLOTS (all GPU workers together), else one per id in
    SEGPIPE_GPU_IDS (the GPUs of the single worker host)."""
    explicit = env.get("SEGPIPE_GPU_POOL_SLOTS", "").strip()
    if explicit:
        if not explicit.isdigit() or int(explicit) < 1:
            raise SetupError([f"SEGPIPE_GPU_POOL_SLOTS={explicit!r}: expected a whole number >= 1"])
        return int(explicit)
    ids = [gpu.strip() for gpu in env.get("SEGPIPE_GPU_IDS", "").split(",")]
    if not any(ids):
        raise SetupError(
            [
                "SEGPIPE_GPU_IDS is empty: list the worker host's GPU ids (e.g. 0,1,2,3) "
                "or set SEGPIPE_GPU_POOL_SLOTS"
            ]
        )
    if "" in ids or len(set(ids)) != len(ids):
        raise SetupError(
            [f"SEGPIPE_GPU_IDS={env['SEGPIPE_GPU_IDS']!r}: expected distinct ids separated by commas"]
        )
    return len(ids)


def pools(env: Mapping[str, str], pools_file: Path = POOLS_FILE) -> dict:
    """The pool definitions of `pools_file`, the `gpu` pool's slots set from the environment."""
    try:
        definitions = json.loads(pools_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SetupError([f"{pools_file}: {err}"]) from err
    if not isinstance(definitions.get(GPU_POOL), dict):
        raise SetupError([f"{pools_file}: no '{GPU_POOL}' pool definition"])
    definitions[GPU_POOL] = {**definitions[GPU_POOL], "slots": gpu_slots(env)}
    return definitions


def _missing(env: Mapping[str, str], names: tuple[str, ...]) -> list[str]:
    return [f"{name} is not set (see .env.example)" for name in names if not env.get(name, "").strip()]


def connections(env: Mapping[str, str]) -> dict:
    """Connection definitions in `airflow connections import` JSON form."""
    problems = _missing(env, ("SEGPIPE_S3_ACCESS_KEY", "SEGPIPE_S3_SECRET_KEY", "SEGPIPE_S3_ENDPOINT_URL"))
    endpoint = env.get("SEGPIPE_S3_ENDPOINT_URL", "").strip()
    if endpoint and not endpoint.startswith(("http://", "https://")):
        problems.append(f"SEGPIPE_S3_ENDPOINT_URL={endpoint!r}: expected http://host:port or https://...")
    result = {
        S3_CONN_ID: {
            "conn_type": "aws",
            "description": "segmentation_pipeline artifact store (MinIO); passed to the task containers",
            "login": env.get("SEGPIPE_S3_ACCESS_KEY", ""),
            "password": env.get("SEGPIPE_S3_SECRET_KEY", ""),
            "extra": {
                "endpoint_url": endpoint,
                "region_name": env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION,
            },
        }
    }
    if env.get("CLEARML_API_ACCESS_KEY", "").strip():
        problems += _missing(env, ("CLEARML_API_SECRET_KEY", "CLEARML_API_HOST"))
        api_host = env.get("CLEARML_API_HOST", "").strip()
        api = urlsplit(api_host)
        if api_host and not (api.scheme and api.hostname):
            problems.append(f"CLEARML_API_HOST={api_host!r}: expected http://host:port")
        result[CLEARML_CONN_ID] = {
            "conn_type": "generic",
            "description": "ClearML server of the tasks' experiment tracking (absent: offline sessions)",
            # The URL's parts in the connection's fields, and whole in extra.api_host (what the DAG reads).
            "host": api.hostname or "",
            "schema": api.scheme,
            "port": api.port,
            "login": env["CLEARML_API_ACCESS_KEY"],
            "password": env.get("CLEARML_API_SECRET_KEY", ""),
            "extra": {
                "api_host": api_host,
                "web_host": env.get("CLEARML_WEB_HOST", "").strip(),
                "files_host": env.get("CLEARML_FILES_HOST", "").strip(),
            },
        }
    if problems:
        raise SetupError(problems)
    return result


def write_private_json(path: Path, obj: dict) -> None:
    """Write JSON readable by the owner only: the connections file holds credentials."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(obj, out, indent=2)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python infra/airflow_setup.py OUT_DIR", file=sys.stderr)
        return 2
    out_dir = Path(args[0])
    problems = []
    results = {}
    for name, build in (("pools.json", pools), ("connections.json", connections)):
        try:
            results[name] = build(os.environ)
        except SetupError as err:
            problems += err.problems
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    for name, obj in results.items():
        write_private_json(out_dir / name, obj)
    pool_names, conn_ids = sorted(results["pools.json"]), sorted(results["connections.json"])
    print(f"airflow_setup: pools {pool_names}, connections {conn_ids}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
