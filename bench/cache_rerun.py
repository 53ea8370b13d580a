"""What a scheduled run with no new data costs: a first full run vs a second run with a new run id.

    .venv/bin/python bench/cache_rerun.py                      # the demo's profile (make demo's run)
    .venv/bin/python bench/cache_rerun.py --train 40 --val 16 --test 16 --max-epochs 3 --experiments h1,exp2

Both runs are `airflow dags test segmentation_pipeline` (infra/airflow_local.sh, the local runner, CPU
profile, ClearML offline) against one embedded S3 server, one after the other, on the same generated
dataset, config and code: what the weekly cron does when nothing changed. The second run gets a new
Airflow run id, so nothing is reused within a run: every stage after validate finds its outputs
through the cross-run cache (tasks/stage.py) and copies them server-side. Prints both wall times,
their ratio, each run's stage outcomes from its manifest, whether the second run uploaded a model, and
where the second run's time went: each task's duration as Airflow recorded it (its metadata DB) and
the rest (`airflow dags test` starting, parsing the DAG, stopping).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _support import ROOT, s3_module


def _dags_test(conf: dict, env: dict, log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as out:
        result = subprocess.run(
            [
                "bash",
                "infra/airflow_local.sh",
                "dags",
                "test",
                "segmentation_pipeline",
                "-c",
                json.dumps(conf),
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    elapsed = time.perf_counter() - start
    if result.returncode != 0:  # the log's folder is removed on exit: show its end
        raise SystemExit(f"airflow dags test failed ({result.returncode}):\n{log.read_text()[-6000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--val", type=int, default=120)
    parser.add_argument("--test", type=int, default=120)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--max-epochs", type=int, default=None, help="default: the CPU profile's")
    parser.add_argument("--experiments", default=None, help="comma-separated; default: the default four")
    args = parser.parse_args()

    s3 = s3_module()
    py = str(ROOT / ".venv" / "bin" / "python")
    with tempfile.TemporaryDirectory(prefix="segpipe-cache-bench-") as tmp:
        base = Path(tmp)
        port = s3.free_port()
        server = s3.start(port, base / "moto.log")
        try:
            s3.create_bucket(port, "segmentation")
            work = base / "work"
            env = {
                **os.environ,
                **s3.client_env(port, "segmentation"),
                "PYTHONPATH": str(ROOT),
                "SEGPIPE_WORK_DIR": str(work),
                "CLEARML_OFFLINE_MODE": "1",
                "CLEARML_CACHE_DIR": str(work / "clearml"),
                "YOLO_OFFLINE": "1",
                "YOLO_CONFIG_DIR": str(work / "yolo"),
                "MPLCONFIGDIR": str(work / "mpl"),
                "TORCH_HOME": str(work / "torch"),
                "SEGPIPE_RUNNER": "local",
                "AIRFLOW_HOME": str(base / "airflow"),
                # as make demo: one stage at a time, so a training may use every core
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1)),
            }
            dataset = base / "dataset"
            subprocess.run(
                [py, "-m", "tasks", "synth", "--out", str(dataset), "--train", str(args.train)]
                + ["--val", str(args.val), "--test", str(args.test), "--size", str(args.size)],
                cwd=ROOT,
                env=env,
                check=True,
                capture_output=True,
            )
            conf: dict = {
                "dataset": str(dataset),
                "profile": "cpu",
                "relabel_strategy": "auto",
                "bad_masks": str(dataset / "defects.json"),
                # a short training may not pass the study's gate; select's exit 3 would fail the run
                "quality_gate": 0.0,
            }
            if args.max_epochs:
                conf["max_epochs"] = args.max_epochs
            if args.experiments:
                conf["experiments"] = args.experiments.split(",")
            first = _dags_test(conf, env, base / "first.log")
            models_before = _models(env)
            second = _dags_test(conf, env, base / "second.log")
            models_after = _models(env)
            outcomes = _outcomes(env)
            tasks = _task_durations(base / "airflow" / "airflow.db")
        finally:
            s3.stop(server)
    print(
        json.dumps({"conf": {**conf, "dataset": f"synth {args.train}/{args.val}/{args.test} at {args.size}"}})
    )
    for run_id, stages in outcomes.items():
        print(f"{run_id}: " + ", ".join(f"{name} {info['cache']}" for name, info in sorted(stages.items())))
    print(f"first run (computes every stage): {first:.1f} s")
    print(f"second run, new run id, nothing changed: {second:.1f} s")
    print(f"ratio second/first: {second / first:.3f}")
    print(f"second run uploaded or rewrote a model: {models_before != models_after}")
    if tasks:
        rows = tasks[-1]
        print("second run, per task (s, as Airflow recorded it):")
        for task, seconds in rows:
            print(f"  {task:32s} {seconds:6.1f}")
        span = sum(seconds for _, seconds in rows)
        print(f"  {'sum of tasks':32s} {span:6.1f}")
        print(f"  {'rest (dags test start/parse/stop)':32s} {second - span:6.1f}")


def _task_durations(db: Path) -> list[list[tuple[str, float]]]:
    """Per run (oldest first): (task[map index], seconds) in the order they started, from the local
    runner's SQLite metadata DB; empty when the runs used another database."""
    if not db.is_file():
        return []
    with sqlite3.connect(db) as conn:
        runs = [row[0] for row in conn.execute("SELECT run_id FROM dag_run ORDER BY id")]
        query = (
            "SELECT task_id, map_index, duration FROM task_instance "
            "WHERE run_id = ? AND duration IS NOT NULL ORDER BY start_date"
        )
        return [
            [
                (task if index < 0 else f"{task}[{index}]", seconds)
                for task, index, seconds in conn.execute(query, (r,))
            ]
            for r in runs
        ]


def _store_env(env: dict):
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in env.items() if k.startswith(("AWS_", "SEGPIPE_"))})
    sys.path.insert(0, str(ROOT))
    from tasks.store import Store

    store = Store.from_env()
    os.environ.clear()
    os.environ.update(saved)
    return store


def _models(env: dict) -> dict[str, str]:
    store = _store_env(env)
    return {
        k: store.client.head_object(Bucket=store.bucket, Key=k)["ETag"] for k in store.list_keys("models")
    }


def _outcomes(env: dict) -> dict[str, dict]:
    store = _store_env(env)
    runs = sorted(
        {m.group(1) for k in store.list_keys("runs") if (m := re.match(r"runs/([^/]+)/manifest", k))}
    )
    return {run_id: store.get_json(f"runs/{run_id}/manifest.json").get("stages", {}) for run_id in runs}


if __name__ == "__main__":
    main()
