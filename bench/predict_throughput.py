"""predict's throughput (images/s) and peak memory on this machine, against the bare model forward.

    .venv/bin/python bench/predict_throughput.py [--experiments h1 exp2 exp2_tta] [--batch-sizes 8 1]
                                                 [--images 16] [--profile full]

For each experiment the study's full config (or --profile cpu) is built with freshly initialised
weights (throughput does not depend on what the weights learned) and published as a training
`runs/bench/train/<exp>/` in an embedded S3 server (moto, as in tests), so `predict --model bench/<exp>`
runs its whole path: download and sha256 checks, config rebuilt from the repository, images read and
checked under validate's rules, the model's test pipeline, batched forward passes, mask and overlay
PNGs, predictions.json. Half the images are the study's 256x256 PNGs, half 640x480 JPEGs (any size is
scaled to the test scale and padded). Each run is its own process: "peak MB" is that process's peak
resident memory (ru_maxrss). "model load s" is predict's start (download, checks, config, weights);
"predict img/s" its loop over the images; "forward" times only `model.test_step` on the same images,
already through the pipeline, in the same batches, so predict / forward is the model's share of
predict's loop. Rounds of the two alternate (--repeats) and the fastest of each counts. Torch uses the threads
tasks.train.configure_torch_threads gives it (one fewer than the cores on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _support import ROOT, s3_module

RUN_ID = "bench"


def make_images(folder: Path, count: int) -> Path:
    """count images: half the generated 256x256 PNGs, half of them enlarged to 640x480 JPEGs."""
    from PIL import Image

    from tasks.synth import generate

    dataset = folder / "dataset"
    generate(dataset, seed=1, n_train=1, n_val=1, n_test=count, size=256)
    images = folder / "images"
    images.mkdir()
    for index, path in enumerate(sorted((dataset / "images" / "test").iterdir())):
        if index % 2:
            Image.open(path).convert("RGB").resize((640, 480)).save(images / f"{path.stem}.jpg", quality=90)
        else:
            (images / path.name).write_bytes(path.read_bytes())
    return images


def publish_untrained(experiment: str, profile: str, folder: Path) -> None:
    """runs/bench/train/<exp>/ as the train stage publishes it, with initialised, untrained weights."""
    import torch
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    from tasks import store as st
    from tasks.train import load_experiment_config

    cfg = load_experiment_config(experiment, profile)
    init_default_scope("mmseg")
    model = MODELS.build(cfg.model)
    model.init_weights()
    out = folder / experiment
    out.mkdir(parents=True)
    meta = {"dataset_meta": {"classes": ("background", "cat", "dog")}}
    torch.save({"meta": meta, "state_dict": model.state_dict()}, out / "best.pth")
    cfg.dump(str(out / "config.py"))
    (out / "val_metrics.json").write_text(json.dumps({"experiment": experiment, "profile": profile}))
    inputs = {"experiment": experiment, "profile": profile, "max_epochs": None, "cfg_options": {}}
    st.Store.from_env().publish(out, st.stage_prefix(RUN_ID, "train", experiment), inputs)


def child(experiment: str, batch_size: int, images: Path, out: Path, repeats: int) -> dict:
    """One measurement in this process: predict's model loading, then `repeats` alternating rounds of
    its loop over the images (read, check, pipeline, forward, write) and of the bare forward on the
    same images in the same batches; the fastest round of each counts (the first pays the warm-up,
    and other work shares the CPUs)."""
    import torch
    from mmengine.dataset import pseudo_collate

    from tasks import predict
    from tasks.store import Store
    from tasks.train import configure_torch_threads

    configure_torch_threads()
    start = time.perf_counter()
    loaded = predict.load_model(Store.from_env(), f"{RUN_ID}/{experiment}", "cpu", out.parent / "model")
    load_s = time.perf_counter() - start
    inputs = predict.collect_images(images)
    prepared = [loaded.pipeline(dict(img_path=str(path))) for path in inputs.images.values()]
    predict_s, forward_s = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        summary = predict.predict(loaded, inputs, out, batch_size, progress=False)
        predict_s.append(time.perf_counter() - start)
        assert summary["written"] == len(prepared) and not summary["failed"], summary["failed"]
        start = time.perf_counter()
        with torch.no_grad():
            for first in range(0, len(prepared), batch_size):
                loaded.model.test_step(pseudo_collate(prepared[first : first + batch_size]))
        forward_s.append(time.perf_counter() - start)
    return {
        "experiment": experiment,
        "batch": batch_size,
        "images": len(prepared),
        "load_s": load_s,
        "predict_img_s": len(prepared) / min(predict_s),
        "forward_img_s": len(prepared) / min(forward_s),
        "rounds_s": {"predict": predict_s, "forward": forward_s},
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", nargs="+", default=["h1", "exp2", "exp2_tta"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 1])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", default="full", choices=["full", "cpu"])
    parser.add_argument(
        "--child", nargs=5, metavar=("EXP", "BATCH", "IMAGES", "OUT", "N"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        experiment, batch, images, out, repeats = args.child
        print(json.dumps(child(experiment, int(batch), Path(images), Path(out), int(repeats))))
        return 0

    s3 = s3_module()
    port = s3.free_port()
    with tempfile.TemporaryDirectory(prefix="segpipe-predict-bench-") as tmp:
        tmp = Path(tmp)
        server = s3.start(port, tmp / "moto.log")
        try:
            s3.create_bucket(port, "bench")
            env = {**os.environ, **s3.client_env(port, "bench"), "SEGPIPE_WORK_DIR": str(tmp / "work")}
            env |= {"CLEARML_OFFLINE_MODE": "1", "PYTHONPATH": str(ROOT)}
            os.environ.update(env)
            images = make_images(tmp, args.images)
            for experiment in args.experiments:
                publish_untrained(experiment, args.profile, tmp / "published")
            rows = []
            for experiment in args.experiments:
                for batch in args.batch_sizes:
                    out = tmp / "runs" / f"{experiment}-{batch}" / "out"
                    child_args = [experiment, str(batch), str(images), str(out), str(args.repeats)]
                    command = [sys.executable, __file__, "--child", *child_args]
                    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
                    if result.returncode != 0:
                        raise SystemExit(f"{experiment} batch {batch} failed:\n{result.stderr[-3000:]}")
                    rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        finally:
            s3.stop(server)
    print(
        f"predict on {args.images} images (half 256x256 PNG, half 640x480 JPEG), {args.profile} profile, CPU"
    )
    print(
        "| experiment | batch | model load s | predict img/s | forward img/s | predict / forward | peak MB |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        ratio = row["predict_img_s"] / row["forward_img_s"]
        print(
            f"| {row['experiment']} | {row['batch']} | {row['load_s']:.1f} | {row['predict_img_s']:.2f} "
            f"| {row['forward_img_s']:.2f} | {ratio:.2f} | {row['peak_mb']:.0f} |"
        )
    print(f"torch threads: {rows[0]['threads']}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
