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

    .venv/bin/python bench/gpu_full_configs.py --train-epochs N [--deadline-s S] [--out FILE] ...

`--train-epochs N` trains instead: each experiment runs its config's own mmengine training
(runner.train(): the study's schedule, optimizer, loss, augmentation, validation every epoch, best
checkpoint by val mDice, early stopping), with only max_epochs capped to N (tasks.train.set_max_epochs,
which also ends the poly schedule at N); then its best checkpoint is evaluated on the test split the
way `tasks evaluate` does (tasks.evaluate.run_split: Runner.test). The experiments run concurrently,
one subprocess each (this script with --child), each capped to an equal share of the GPU's memory;
each writes its JSON row after every validation, so `--deadline-s` (from the start) can stop the
unfinished ones and still report how far they got. Child logs: <out stem>_<experiment>.log beside
--out (else a temp dir, whose tail is printed for a failed child).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from mmengine.hooks import Hook
from mmengine.runner import Runner
from torch.utils.data import DataLoader

from tasks.experiments import default_names, names
from tasks.train import (
    _published_best,
    configure_torch_threads,
    load_experiment_config,
    metrics_from_flat,
    prepare_dataset_view,
)

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


BENCH_COLUMNS = ["experiment", "model", "batch_size", "s_per_iter", "data_wait_s_per_iter", "img_per_s"]
BENCH_COLUMNS += ["peak_mem_mib", "loss_first", "loss_last", "val_mDice", "build_s"]
TRAIN_COLUMNS = ["experiment", "model", "status", "epochs", "best_epoch", "val_mDice", "test_mDice"]
# no peak memory: mmengine's LogProcessor resets CUDA's peak stats at every log line (its `memory`)
TRAIN_COLUMNS += ["test_Dice_cat", "test_Dice_dog", "wall_s", "s_per_epoch"]


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    columns = [c for c in columns if any(c in row for row in rows)]
    cells = [columns] + [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in cells)


# ---------------------------------------------------------------- --train-epochs


def _write_row(path: Path, row: dict[str, Any]) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(row) + "\n")
    partial.replace(path)  # atomic: the parent never reads half a row


def _dice_columns(split: str, doc: dict[str, Any]) -> dict[str, Any]:
    """metrics_from_flat's document -> the table's <split>_mDice and <split>_Dice_<class>."""
    columns = {f"{split}_mDice": doc["mDice"]}
    return columns | {f"{split}_Dice_{cls}": values["Dice"] for cls, values in doc["per_class"].items()}


class _ProgressHook(Hook):
    """After every validation: epochs so far and the best epoch (CheckpointHook's best_ckpt) -> the row."""

    priority = "LOWEST"  # after CheckpointHook (best checkpoint) and early stopping

    def __init__(self, row: dict[str, Any], path: Path, start: float) -> None:
        self.row, self.path, self.start = row, path, start
        self.train_start = start

    def before_train(self, runner: Runner) -> None:
        self.train_start = time.perf_counter()

    def after_val_epoch(self, runner: Runner, metrics: dict[str, Any] | None = None) -> None:
        best = os.path.basename(runner.message_hub.get_info("best_ckpt") or "")
        if best and best != self.row.get("best_checkpoint"):
            doc = metrics_from_flat(
                dict(metrics or {}), tuple(runner.val_dataloader.dataset.metainfo["classes"])
            )
            self.row |= {"best_checkpoint": best, "best_epoch": runner.epoch, **_dice_columns("val", doc)}
            self.row["val"] = doc
        now = time.perf_counter()
        self.row |= {
            "epochs": runner.epoch,
            "train_s": round(now - self.train_start, 1),
            "s_per_epoch": round((now - self.train_start) / runner.epoch, 2),
            "wall_s": round(now - self.start, 1),
        }
        _write_row(self.path, self.row)


def train_child(
    experiment: str, view: Path, work: Path, row_path: Path, epochs: int, batch_size: int | None, share: float
) -> dict[str, Any]:
    """One experiment's own training (max_epochs capped), then its best checkpoint on the test split."""
    start = time.perf_counter()
    if torch.cuda.is_available():  # concurrent trainings: cudnn's benchmark workspaces stay in the share
        torch.cuda.set_per_process_memory_fraction(share)
    cfg = load_experiment_config(experiment, "full", view, work, max_epochs=epochs, pretrained=None)
    if batch_size is not None:
        cfg.train_dataloader.batch_size = batch_size
    row: dict[str, Any] = {
        "experiment": experiment,
        "status": "running",
        "model": f"{cfg.model.type}/{cfg.model.backbone.type}",
        "pretrained": cfg.model.get("pretrained"),
        "batch_size": cfg.train_dataloader.batch_size,
        "max_epochs": cfg.train_cfg.max_epochs,
        "optimizer": cfg.optim_wrapper.optimizer.type,
    }
    _write_row(row_path, row)
    runner = Runner.from_cfg(cfg)
    runner.register_hook(_ProgressHook(row, row_path, start))
    runner.train()
    if "best_checkpoint" not in row:
        raise RuntimeError(f"{experiment}: training ended without a validation (no best checkpoint)")
    row["stopped_early"] = runner.epoch < cfg.train_cfg.max_epochs
    # what `tasks train` publishes as best.pth and config.py, then what `tasks evaluate` runs on them
    checkpoint = _published_best(work, row["best_checkpoint"])
    config = runner.cfg  # what `tasks evaluate` rebuilds from the training's recorded inputs
    del runner
    gc.collect()
    from tasks.evaluate import run_split

    test_start = time.perf_counter()
    flat, _metric, classes, _palette = run_split(config, checkpoint, view, "test", work / "test")
    doc = metrics_from_flat(flat, classes)
    row |= {**_dice_columns("test", doc), "test": doc, "test_s": round(time.perf_counter() - test_start, 1)}
    row |= {"status": "done", "wall_s": round(time.perf_counter() - start, 1)}
    _write_row(row_path, row)
    return row


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each child's process group (it and its dataloader workers), SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):  # the group is gone already
                os.killpg(proc.pid, sig)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10 if sig == signal.SIGTERM else None)


def _tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def train_all(
    experiments: list[str],
    view: Path,
    tmp: Path,
    epochs: int,
    batch_size: int | None,
    stop_at: float,
    log_stem: Path,
) -> list[dict[str, Any]]:
    """One child per experiment, all at once; at stop_at (monotonic) the unfinished ones are stopped."""
    share = round(0.9 / len(experiments), 4)  # of the GPU's memory, per child
    (tmp / "rows").mkdir()
    children: dict[str, tuple[subprocess.Popen, Path, Path, float]] = {}
    for experiment in experiments:
        row_path, log_path = tmp / "rows" / f"{experiment}.json", Path(f"{log_stem}_{experiment}.log")
        command = [sys.executable, str(Path(__file__).resolve()), "--child", experiment]
        command += [
            "--dataset",
            str(view),
            "--work-dir",
            str(tmp / "work" / experiment),
            "--out",
            str(row_path),
        ]
        command += ["--train-epochs", str(epochs), "--gpu-share", str(share)]
        command += ["--batch-size", str(batch_size)] if batch_size is not None else []
        with log_path.open("w") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        children[experiment] = (proc, row_path, log_path, time.monotonic())
        print(f"{experiment}: started (pid {proc.pid}, log {log_path})", flush=True)

    deadline = [stop_at]

    def on_signal(signum: int, _frame: object) -> None:  # a SIGTERM/Ctrl-C: stop now, still report
        print(f"signal {signum}: stopping the trainings", flush=True)
        deadline[0] = 0.0

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    stopped: set[str] = set()
    try:
        last_report = time.monotonic()
        while any(proc.poll() is None for proc, *_ in children.values()):
            if time.monotonic() >= deadline[0]:
                stopped = {experiment for experiment, (proc, *_) in children.items() if proc.poll() is None}
                print(f"deadline: stopping {', '.join(sorted(stopped))}", flush=True)
                _stop([children[experiment][0] for experiment in stopped])
                break
            if time.monotonic() - last_report >= 30:
                last_report = time.monotonic()
                for experiment, (_proc, row_path, *_) in children.items():
                    row = json.loads(row_path.read_text()) if row_path.exists() else {}
                    print(
                        f"  {experiment}: {row.get('status', 'starting')}, epoch {row.get('epochs', 0)}, "
                        f"best val mDice {row.get('val_mDice')} (epoch {row.get('best_epoch')})",
                        flush=True,
                    )
            time.sleep(0.5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop([proc for proc, *_ in children.values() if proc.poll() is None])  # on an error here

    rows = []
    for experiment, (proc, row_path, log_path, started) in children.items():
        row = json.loads(row_path.read_text()) if row_path.exists() else {"experiment": experiment}
        if row.get("status") != "done":
            row["status"] = "unfinished" if experiment in stopped else f"failed (exit {proc.returncode})"
            row["wall_s"] = round(time.monotonic() - started, 1)
            if experiment not in stopped:
                print(f"--- {experiment} failed; the end of {log_path}:\n{_tail(log_path)}", flush=True)
        rows.append(row)
    return rows


def main() -> int:
    started = time.monotonic()
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
    parser.add_argument("--experiments", nargs="+", default=list(default_names()), choices=names())
    parser.add_argument("--batch-size", type=int, help="override the configs' batch size (smoke tests)")
    parser.add_argument(
        "--train-epochs",
        type=int,
        metavar="N",
        help="train each experiment (its own runner.train(), max_epochs capped to N), concurrently, "
        "then test its best checkpoint; instead of timing --iters steps",
    )
    parser.add_argument(
        "--deadline-s",
        type=float,
        help="with --train-epochs: seconds from the start after which unfinished trainings are stopped "
        "(reported as unfinished, with their epochs and best val so far)",
    )
    # one training of --train-epochs, run by the parent: --dataset is the view, --out its row
    parser.add_argument("--child", choices=names(), help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--gpu-share", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 0 <= args.warmup < args.iters:
        parser.error("--warmup must be at least 0 and less than --iters")
    if args.train_epochs is not None and args.train_epochs < 1:
        parser.error("--train-epochs must be at least 1")
    if args.deadline_s is not None and args.train_epochs is None:
        parser.error("--deadline-s goes with --train-epochs")

    threads = configure_torch_threads()
    if args.child:
        if None in (args.dataset, args.work_dir, args.out, args.train_epochs):
            parser.error("--child needs --dataset (a view), --work-dir, --out and --train-epochs")
        print(f"{args.child}: torch threads {threads}", flush=True)
        row = train_child(
            args.child,
            args.dataset,
            args.work_dir,
            args.out,
            args.train_epochs,
            args.batch_size,
            args.gpu_share,
        )
        print(json.dumps(row), flush=True)
        return 0

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "cpu"
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
        if args.train_epochs is not None:
            stop_at = started + args.deadline_s if args.deadline_s is not None else float("inf")
            log_stem = args.out.parent / args.out.stem if args.out else tmp_path / "train"
            log_stem.parent.mkdir(parents=True, exist_ok=True)
            rows = train_all(
                args.experiments, view, tmp_path, args.train_epochs, args.batch_size, stop_at, log_stem
            )
        else:
            for experiment in args.experiments:
                row = bench_experiment(
                    experiment, view, tmp_path / "work", args.iters, args.warmup, args.val, args.batch_size
                )
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(_table(rows, TRAIN_COLUMNS if args.train_epochs is not None else BENCH_COLUMNS))
    if args.out:
        result: dict[str, Any] = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda}
        if args.train_epochs is not None:
            result |= {"train_epochs": args.train_epochs, "deadline_s": args.deadline_s}
            result |= {"wall_s": round(time.monotonic() - started, 1)}
        else:
            result |= {"iters": args.iters, "warmup": args.warmup}
        result |= {"dataset": str(args.dataset) if args.dataset else {"synth": args.synth}, "rows": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
