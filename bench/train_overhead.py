"""What our train task costs on top of mmengine: the same config, the same iterations, side by side.

    .venv/bin/python bench/train_overhead.py [--experiment h1] [--epochs 3] [--repeat 2] [--dataset DIR]

"ours" is `python -m tasks train --profile cpu` against an embedded S3 server (moto, as in tests):
dataset upload, label choice, the dataset view, the per-epoch resume checkpoint and its upload,
ClearML offline tracking, publishing. "bare" is a fresh process that loads the config.py ours just
published (the exact resolved config: same data, model, schedule, hooks from the config) into a bare
mmengine Runner and calls train(), nothing else. Both are timed as whole processes (start-up
included). Runs alternate ours/bare; the fastest of each counts, since other work shares the CPUs.
Both must run the same number of iterations, or the bench fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _support import ROOT, s3_module


def bare_train(config_path: Path, work_dir: Path) -> dict:
    """Runner.from_cfg(config).train() and nothing else; prints iterations and train seconds."""
    from mmengine.config import Config
    from mmengine.runner import Runner

    from tasks import mmcompat

    mmcompat.apply()
    cfg = Config.fromfile(config_path)
    cfg.work_dir = str(work_dir)
    start = time.perf_counter()
    runner = Runner.from_cfg(cfg)
    runner.train()
    return {"iterations": runner.iter, "epochs": runner.epoch, "runner_s": time.perf_counter() - start}


def _timed(cmd: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return elapsed, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="h1", choices=["h1", "h2", "exp1", "exp2"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dataset", type=Path, help="default: a generated 48/24/24 dataset at 128 px")
    parser.add_argument("--bare", nargs=2, metavar=("CONFIG", "WORK_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:  # the child process of a "bare" run
        print(json.dumps(bare_train(Path(args.bare[0]), Path(args.bare[1]))))
        return 0

    s3 = s3_module()
    with tempfile.TemporaryDirectory(prefix="train_overhead_") as tmp:
        tmp_path = Path(tmp)
        dataset = args.dataset
        if dataset is None:
            from tasks.synth import generate

            dataset = generate(tmp_path / "dataset", seed=0, n_train=48, n_val=24, n_test=24, size=128)
        port = s3.free_port()
        server = s3.start(port, tmp_path / "moto.log")
        try:
            s3.create_bucket(port, "bench")
            env = {
                **os.environ,
                **s3.client_env(port, "bench"),
                "SEGPIPE_WORK_DIR": str(tmp_path / "work"),
                "CLEARML_OFFLINE_MODE": "1",
                "CLEARML_CACHE_DIR": str(tmp_path / "clearml"),
                "MPLCONFIGDIR": str(tmp_path / "mpl"),
            }
            times: dict[str, list[float]] = {"ours": [], "bare": []}
            iterations = set()
            for attempt in range(args.repeat):
                run_id = f"bench{attempt}"
                ours_cmd = [sys.executable, "-m", "tasks", "train", "--experiment", args.experiment]
                ours_cmd += ["--run-id", run_id, "--dataset", str(dataset), "--profile", "cpu"]
                ours_cmd += ["--max-epochs", str(args.epochs)]
                times["ours"].append(_timed(ours_cmd, env)[0])
                published = tmp_path / "work" / "runs" / run_id / "train" / args.experiment / "publish"
                summary = json.loads((published / "val_metrics.json").read_text())
                iterations.add(summary["iterations"])

                bare_cmd = [sys.executable, __file__, "--bare", str(published / "config.py")]
                bare_cmd.append(str(tmp_path / f"bare{attempt}"))
                elapsed, result = _timed(bare_cmd, env)
                times["bare"].append(elapsed)
                bare = json.loads(result.stdout.strip().splitlines()[-1])
                iterations.add(bare["iterations"])
                print(
                    f"run {attempt + 1}: ours {times['ours'][-1]:.1f} s "
                    f"(val mDice {summary['mDice']}), bare {elapsed:.1f} s "
                    f"(runner {bare['runner_s']:.1f} s), {bare['iterations']} iterations"
                )
        finally:
            s3.stop(server)
    if len(iterations) != 1:
        raise SystemExit(f"ours and bare ran different numbers of iterations: {sorted(iterations)}")
    ours, bare = min(times["ours"]), min(times["bare"])
    print(f"experiment {args.experiment}, cpu profile, {args.epochs} epochs, {iterations.pop()} iterations")
    print(f"ours (python -m tasks train): {ours:.1f} s")
    print(f"bare mmengine Runner:         {bare:.1f} s")
    print(f"ratio ours / bare:            {ours / bare:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
