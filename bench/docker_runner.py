"""What the container runtime costs: image sizes, cold and warm builds, the docker-mode DAG run against
the local-mode run of the same conf, side by side in one run.

    .venv/bin/python bench/docker_runner.py [--experiments h1,exp2] [--max-epochs 1] [--skip-cold]

1. cold build: `infra/build_images.sh` with SEGPIPE_DOCKER_NO_CACHE=1 (every layer built again; the
   base image and the host's local package mirror as in a normal build), then the sizes;
2. warm build: the same script again, every layer from the cache (what a second suite run costs);
3. `airflow dags test segmentation_pipeline` on a generated tiny dataset (the suite's: 16/8/8 images
   at 64 px) in the embedded S3 server, with SEGPIPE_RUNNER=local, then with SEGPIPE_RUNNER=docker
   (host network, no GPU), the same conf; the ratio docker / local.
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


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{(result.stdout + result.stderr)[-4000:]}"
        )
    return elapsed, result


def build(no_cache: bool) -> tuple[float, dict[str, str]]:
    env = {**os.environ, "SEGPIPE_DOCKER_NO_CACHE": "1" if no_cache else "0"}
    elapsed, result = _run(["bash", str(ROOT / "infra" / "build_images.sh")], env)
    return elapsed, dict(line.split("=", 1) for line in result.stdout.split())


def image_size(tag: str) -> int:
    out = subprocess.run(
        ["docker", "image", "inspect", "-f", "{{.Size}}", tag], capture_output=True, text=True
    )
    return int(out.stdout.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", default="h1,exp2")
    parser.add_argument("--max-epochs", type=int, default=1)
    parser.add_argument("--skip-cold", action="store_true", help="no cold build (minutes)")
    args = parser.parse_args()

    cold = None
    if not args.skip_cold:
        cold, images = build(no_cache=True)
        print(f"cold build (no layer cache): {cold:.0f} s", flush=True)
    warm, images = build(no_cache=False)
    print(f"warm build (every layer cached): {warm:.1f} s", flush=True)
    for name, tag in images.items():
        print(f"image {tag} ({name}): {image_size(tag) / 1e9:.2f} GB")

    s3 = s3_module()
    with tempfile.TemporaryDirectory(prefix="docker_runner_") as tmp:
        tmp_path = Path(tmp)
        from tasks.store import Store
        from tasks.synth import generate

        dataset = generate(tmp_path / "dataset", seed=0, n_train=16, n_val=8, n_test=8, size=64)
        port = s3.free_port()
        server = s3.start(port, tmp_path / "moto.log")
        times = {}
        try:
            for runner in ("local", "docker"):
                bucket = f"bench-{runner}"
                s3.create_bucket(port, bucket)
                env = {
                    **os.environ,
                    **s3.client_env(port, bucket),
                    **images,
                    "AIRFLOW_HOME": str(tmp_path / f"airflow-{runner}"),
                    "HOME": str(tmp_path / f"home-{runner}"),
                    "SEGPIPE_WORK_DIR": str(tmp_path / f"work-{runner}"),
                    "CLEARML_OFFLINE_MODE": "1",
                    "YOLO_OFFLINE": "1",
                    "MPLCONFIGDIR": str(tmp_path / "mpl"),
                    "SEGPIPE_RUNNER": runner,
                    "SEGPIPE_DOCKER_NETWORK": "host",
                    "SEGPIPE_GPU_IDS": "none",
                }
                os.environ.update(s3.client_env(port, bucket))
                Store.from_env().upload_dir(dataset, "datasets/tiny")
                location = f"s3://{bucket}/datasets/tiny"  # the same kind of location for both runners
                conf = {
                    "dataset": location,
                    "experiments": args.experiments.split(","),
                    "profile": "cpu",
                    "max_epochs": args.max_epochs,
                    "relabel_strategy": "morphology",
                    "bad_masks": f"{location}/defects.json",
                    "quality_gate": 0.0,
                }
                cmd = [
                    "bash",
                    str(ROOT / "infra" / "airflow_local.sh"),
                    "dags",
                    "test",
                    "segmentation_pipeline",
                ]
                times[runner], _ = _run([*cmd, "-c", json.dumps(conf)], env)
                print(f"airflow dags test, {runner} runner: {times[runner]:.0f} s", flush=True)
        finally:
            s3.stop(server)
    print(
        f"experiments {args.experiments}, cpu profile, {args.max_epochs} epoch(s), "
        "tiny dataset 16/8/8 at 64 px"
    )
    if cold is not None:
        print(f"build: cold {cold:.0f} s, warm {warm:.1f} s (ratio cold / warm {cold / warm:.0f})")
    print(f"ratio docker / local DAG run: {times['docker'] / times['local']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
