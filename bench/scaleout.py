"""Scale-out bench: what the Celery topology (infra/scaleout.py) costs in scheduling against `airflow
dags test`, and what the second slot of the `gpu` pool buys, measured side by side in one session.

    .venv/bin/python bench/scaleout.py [--epochs 1] [--out bench/results/scaleout.json]

One tiny dataset (16/8/8 images at 64x64), the DAG's four experiments, the CPU profile:
1. the topology with the `gpu` pool at 2 slots: one run triggered over the REST API;
2. the same topology, pool set to 1 slot (PATCH /api/v2/pools/gpu): the same run again;
3. `airflow dags test` (SQLite, tasks run in its own process, one after another) with the same conf.
Scheduling overhead: for every task instance, the gap between the end of its last upstream instance
and its start (mapped instances wait for their own map index); the median over a run. Training wall
time: first training's start to last training's end. Needs root (the GPU host's network namespace).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "infra"))
import s3_server  # noqa: E402
import scaleout  # noqa: E402

EXPERIMENTS = ["h1", "h2", "exp1", "exp2"]
GROUP = "experiment."  # the mapped task group's tasks: their upstreams inside it share the map index


def _when(stamp: str | datetime) -> float:
    if isinstance(stamp, datetime):
        return stamp.timestamp()
    return datetime.fromisoformat(stamp.replace("Z", "+00:00").replace(" ", "T")).timestamp()


def upstreams(api: scaleout.Api) -> dict[str, set[str]]:
    """task id -> its upstream task ids, from the DAG the API serves."""
    tasks = api.get(f"/api/v2/dags/{scaleout.DAG_ID}/tasks")["tasks"]
    result: dict[str, set[str]] = {task["task_id"]: set() for task in tasks}
    for task in tasks:
        for down in task["downstream_task_ids"]:
            result[down].add(task["task_id"])
    return result


def gaps(tis: list[dict], ups: dict[str, set[str]]) -> list[float]:
    """Seconds from the end of each instance's last upstream instance to its start."""
    ends: dict[tuple[str, int], float] = {(t["task_id"], t["map_index"]): _when(t["end_date"]) for t in tis}
    result = []
    for ti in tis:
        upstream_ends = [
            end
            for (task_id, index), end in ends.items()
            if task_id in ups[ti["task_id"]]
            and (
                index == ti["map_index"]
                or not (task_id.startswith(GROUP) and ti["task_id"].startswith(GROUP))
            )
        ]
        if upstream_ends:
            result.append(_when(ti["start_date"]) - max(upstream_ends))
    return result


def training_wall(tis: list[dict]) -> float:
    trainings = [t for t in tis if t["task_id"] == f"{GROUP}train"]
    assert len(trainings) == len(EXPERIMENTS), trainings
    return max(_when(t["end_date"]) for t in trainings) - min(_when(t["start_date"]) for t in trainings)


def celery_runs(dataset: Path, conf: dict) -> tuple[dict[str, list[dict]], dict[str, set[str]]]:
    state = scaleout.start(ROOT / ".work" / "scaleout-bench", net=250, gpu_slots=2)
    try:
        uri = scaleout.publish_dataset(state, dataset)
        api = scaleout.Api(state)
        api.wait_for_dag()
        ups = upstreams(api)
        runs = {}
        for slots in (2, 1):
            pool = {"pool": "gpu", "slots": slots, "include_deferred": False}
            status, body = api.request("PATCH", "/api/v2/pools/gpu?update_mask=slots", pool)
            assert status == 200, body
            run_id = f"bench-{slots}-slots"
            api.trigger(run_id, {**conf, "dataset": uri})
            run = api.wait_for_run(run_id, 3600)
            assert run["state"] == "success", api.task_instances(run_id)
            runs[run_id] = api.task_instances(run_id)
            print(f"{run_id}: {_when(run['end_date']) - _when(run['start_date']):.0f}s", flush=True)
        return runs, ups
    finally:
        scaleout.stop(state)


def dags_test_run(dataset: Path, conf: dict, work: Path) -> list[dict]:
    work.mkdir(parents=True)
    server = s3_server.start(port := s3_server.free_port(), work / "moto.log")
    try:
        s3_server.create_bucket(port, scaleout.BUCKET)
        env = {
            **os.environ,
            **s3_server.client_env(port, scaleout.BUCKET),
            "AIRFLOW_HOME": str(work / "airflow"),
            "SEGPIPE_RUNNER": "local",
            "SEGPIPE_WORK_DIR": str(work / "cache"),
            "CLEARML_OFFLINE_MODE": "1",
            "CLEARML_CACHE_DIR": str(work / "clearml"),
            "YOLO_OFFLINE": "1",
            "PYTHONPATH": str(ROOT),
        }
        for key in [k for k in env if k.startswith("AIRFLOW__")]:
            del env[key]
        started = time.monotonic()
        subprocess.run(
            [
                "bash",
                str(ROOT / "infra" / "airflow_local.sh"),
                "dags",
                "test",
                scaleout.DAG_ID,
                "-c",
                json.dumps({**conf, "dataset": str(dataset)}),
            ],
            env=env,
            check=True,
            capture_output=True,
        )
        print(f"airflow dags test: {time.monotonic() - started:.0f}s", flush=True)
    finally:
        s3_server.stop(server)
    with sqlite3.connect(work / "airflow" / "airflow.db") as db:
        rows = db.execute("SELECT task_id, map_index, start_date, end_date FROM task_instance").fetchall()
    return [dict(zip(("task_id", "map_index", "start_date", "end_date"), row, strict=True)) for row in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scaleout.json")
    args = parser.parse_args()
    conf = {
        "experiments": EXPERIMENTS,
        "profile": "cpu",
        "max_epochs": args.epochs,
        "relabel_strategy": "morphology",
        "quality_gate": 0.0,
        "promote": False,
    }
    with tempfile.TemporaryDirectory(prefix="segpipe-bench-scaleout-") as tmp:
        work = Path(tmp)
        os.environ["SEGPIPE_WORK_DIR"] = str(work / "client")
        from tasks.synth import generate

        dataset = work / "pets"
        generate(dataset, seed=0, n_train=16, n_val=8, n_test=8, size=64)
        runs, ups = celery_runs(dataset, conf)
        local = dags_test_run(dataset, conf, work / "dags-test")
    celery_gap = statistics.median(gaps(runs["bench-2-slots"], ups))
    local_gap = statistics.median(gaps(local, ups))
    two, one = training_wall(runs["bench-2-slots"]), training_wall(runs["bench-1-slots"])
    result = {
        "conf": conf,
        "median_gap_s": {"celery": round(celery_gap, 2), "dags_test": round(local_gap, 2)},
        "gap_ratio_celery_to_dags_test": round(celery_gap / local_gap, 2),
        "training_wall_s": {"2_slots": round(two, 1), "1_slot": round(one, 1)},
        "training_wall_ratio_2_to_1_slots": round(two / one, 2),
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
