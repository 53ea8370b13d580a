"""The study's full experiment configs on the current device: s/iteration, peak memory, losses.

    .venv/bin/python bench/gpu_full_configs.py [--iters 30] [--warmup 5] [--val] [--out FILE]
        [--dataset DIR | --synth TRAIN VAL TEST] [--experiments h1 h2 exp1 exp2] [--batch-size N]

Each experiment's config is loaded as `tasks train --profile full` loads it (load_experiment_config,
no pretrained weights: from scratch) and pointed at a dataset view (prepare_dataset_view) of the
given dataset, by default a generated one at study scale (tasks.synth: 200/120/120 images, 256 px).
mmengine's Runner builds the model on the current device (CUDA when there is one), the config's
optimizer and train dataloader (its real batch size and 256 crop); the bench then runs `--iters`
train steps (model.train_step: data preprocessing, forward, backward, optimizer step) and times
those after `--warmup` (synchronized), with the time spent waiting for data shown apart. `--val`
runs one pass over the val split with the config's evaluator (mmseg's IoUMetric, per class too).
Prints one table and writes it as JSON to `--out`. `--batch-size` overrides the config's (CPU smoke
tests only: the GPU numbers are meant at the real one).
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from mmengine.runner import Runner
from torch.utils.data import DataLoader

from tasks.train import EXPERIMENTS, configure_torch_threads, load_experiment_config, prepare_dataset_view

MIB = 1024 * 1024


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _batches(loader: DataLoader) -> Iterator[Any]:
    while True:  # the train split can be shorter than --iters batches: start another epoch
        yield from loader


def _validate(runner: Runner, model: torch.nn.Module) -> dict[str, float]:
    loader = Runner.build_dataloader(runner.cfg.val_dataloader)
    evaluator = runner.build_evaluator(runner.cfg.val_evaluator)
    evaluator.dataset_meta = loader.dataset.metainfo
    model.eval()
    with torch.no_grad():
        for batch in loader:
            evaluator.process(data_samples=model.val_step(batch), data_batch=batch)
    metrics = evaluator.evaluate(len(loader.dataset))
    return {key: round(float(metrics[key]), 2) for key in ("mDice", "mIoU", "aAcc")}


def bench_experiment(
    experiment: str, view: Path, work: Path, iters: int, warmup: int, val: bool, batch_size: int | None
) -> dict[str, Any]:
    cfg = load_experiment_config(experiment, "full", view, work / experiment, pretrained=None)
    cfg.log_level = "WARNING"  # no config/environment dump per experiment
    if batch_size is not None:
        cfg.train_dataloader.batch_size = batch_size
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    runner = Runner.from_cfg(cfg)  # builds the model and moves it to the current device
    model = runner.model
    model.init_weights()  # what runner.train() does first: the configs' from-scratch initialisation
    optim = runner.build_optim_wrapper(cfg.optim_wrapper)
    loader = Runner.build_dataloader(cfg.train_dataloader, seed=runner.seed)
    build_s = time.perf_counter() - start

    model.train()
    batches = _batches(loader)
    losses: list[float] = []
    data_s = 0.0
    timed_from = 0.0
    for i in range(iters):
        if i == warmup:
            _sync()
            timed_from, data_s = time.perf_counter(), 0.0
        fetched = time.perf_counter()
        batch = next(batches)
        data_s += time.perf_counter() - fetched
        log_vars = model.train_step(batch, optim_wrapper=optim)
        if i in (0, iters - 1):
            losses.append(float(log_vars["loss"]))  # a sync, outside the timed span's middle only
    _sync()
    timed = iters - warmup
    step_s = (time.perf_counter() - timed_from) / timed
    peak = torch.cuda.max_memory_allocated() / MIB if torch.cuda.is_available() else None
    row: dict[str, Any] = {
        "experiment": experiment,
        "model": f"{cfg.model.type}/{cfg.model.backbone.type}",
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "pretrained": cfg.model.get("pretrained"),
        "batch_size": cfg.train_dataloader.batch_size,
        "crop": list(cfg.crop_size),
        "optimizer": cfg.optim_wrapper.optimizer.type,
        "device": str(next(model.parameters()).device),
        "build_s": round(build_s, 2),
        "timed_iters": timed,
        "s_per_iter": round(step_s, 4),
        "data_wait_s_per_iter": round(data_s / timed, 4),
        "img_per_s": round(cfg.train_dataloader.batch_size / step_s, 1),
        "peak_mem_mib": None if peak is None else round(peak),
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
    }
    if val:
        start = time.perf_counter()
        row |= {f"val_{key}": value for key, value in _validate(runner, model).items()}
        row["val_s"] = round(time.perf_counter() - start, 2)
    del batches, loader, optim, model, runner
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def _table(rows: list[dict[str, Any]]) -> str:
    columns = ["experiment", "model", "batch_size", "s_per_iter", "data_wait_s_per_iter", "img_per_s"]
    columns += ["peak_mem_mib", "loss_first", "loss_last", "val_mDice", "build_s"]
    columns = [c for c in columns if any(c in row for row in rows)]
    cells = [columns] + [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in cells)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--iters", type=int, default=30, help="train iterations per experiment")
    parser.add_argument("--warmup", type=int, default=5, help="untimed first iterations (< --iters)")
    parser.add_argument("--val", action="store_true", help="one val pass with IoUMetric: mDice")
    parser.add_argument("--out", type=Path, help="write the table as JSON here")
    parser.add_argument("--dataset", type=Path, help="a dataset in the study's layout (default: generated)")
    parser.add_argument(
        "--synth",
        type=int,
        nargs=3,
        default=[200, 120, 120],
        metavar=("TRAIN", "VAL", "TEST"),
        help="images per split of the generated dataset (256 px; default: study scale 200 120 120)",
    )
    parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), choices=list(EXPERIMENTS))
    parser.add_argument("--batch-size", type=int, help="override the configs' batch size (smoke tests)")
    args = parser.parse_args()
    if not 0 <= args.warmup < args.iters:
        parser.error("--warmup must be at least 0 and less than --iters")

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    threads = configure_torch_threads()
    print(f"device: {device}; torch {torch.__version__} (CUDA {torch.version.cuda}); threads {threads}")
    with tempfile.TemporaryDirectory(prefix="gpu_full_configs_") as tmp:
        tmp_path = Path(tmp)
        dataset = args.dataset
        if dataset is None:
            from tasks.synth import generate

            start = time.perf_counter()
            n_train, n_val, n_test = args.synth
            dataset = generate(tmp_path / "dataset", seed=0, n_train=n_train, n_val=n_val, n_test=n_test)
            print(f"generated {dataset} ({n_train}/{n_val}/{n_test}) in {time.perf_counter() - start:.1f} s")
        view = prepare_dataset_view(dataset, dataset / "labels" / "train", tmp_path / "view")
        rows = []
        for experiment in args.experiments:
            row = bench_experiment(
                experiment, view, tmp_path / "work", args.iters, args.warmup, args.val, args.batch_size
            )
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(_table(rows))
    if args.out:
        result = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda}
        result |= {"iters": args.iters, "warmup": args.warmup, "rows": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
