"""Whoever can write to the bucket cannot run code on a worker: evaluate rebuilds the config from the
repository and the training's recorded inputs (checked again), and loads checkpoints as data only.

On the old main evaluate ran `Config.fromfile` on the store's config.py (its custom_imports imported a
module planted that way: reproduced with `--cfg-options custom_imports.imports=[somemodule]`) and
trusted every downloaded checkpoint for a full unpickling.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from tasks import cli
from tasks.store import Store, stage_prefix


class _Payload:
    """Unpickling this creates a file: what a forged checkpoint could do with a full unpickling."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _republish(store: Store, prefix: str, local: Path, **inputs_changes: object) -> None:
    """Replace a published stage as a bucket writer could: files, marker and all (checksums match)."""
    marker = store.marker(prefix)
    store.publish(local, prefix, {**marker["inputs"], **inputs_changes})


def _evaluate(capsys: pytest.CaptureFixture, dataset: Path) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(["evaluate", "--experiment", "h1", "--run-id", "trust", "--dataset", str(dataset)])
    return code, capsys.readouterr().err


@pytest.mark.slow
def test_forged_training_outputs_run_no_code_in_evaluate(
    s3_env: dict, tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from tasks.train import train_experiment

    train_experiment("h1", "trust", str(tiny_dataset), profile="cpu", max_epochs=1)
    store = Store.from_env()
    prefix = stage_prefix("trust", "train", "h1")
    local = store.fetch(prefix, tmp_path / "train")

    # 1. recorded overrides that would build a subprocess: checked again, refused (exit 2)
    _republish(store, prefix, local, cfg_options={"default_hooks.timer.type": "subprocess.Popen"})
    code, err = _evaluate(capsys, tiny_dataset)
    assert code == 2
    assert "recorded --cfg-options default_hooks.timer.type=subprocess.Popen: a `type` names" in err

    # 2. config.py with code in it: never executed, the evaluation runs on the rebuilt config
    ran = tmp_path / "config_ran"
    original = (local / "config.py").read_text()
    (local / "config.py").write_text(f"import pathlib\npathlib.Path({str(ran)!r}).touch()\n{original}")
    _republish(store, prefix, local, cfg_options={})
    code, err = _evaluate(capsys, tiny_dataset)
    assert code == 0, err[-3000:]
    assert not ran.exists()
    metrics = json.loads(store.get_text(f"{stage_prefix('trust', 'eval', 'h1')}/test_metrics.json"))
    assert 0 <= metrics["mDice"] <= 100

    # 3. a checkpoint whose unpickling would create a file: refused as data, nothing created (exit 2)
    import torch

    unpickled = tmp_path / "unpickled"
    torch.save({"meta": {"epoch": 1}, "state_dict": {}, "payload": _Payload(unpickled)}, local / "best.pth")
    pickle.loads(pickle.dumps(_Payload(tmp_path / "probe"))).close()
    assert (tmp_path / "probe").exists()  # the payload is live: a full unpickling runs it
    _republish(store, prefix, local)
    code, err = _evaluate(capsys, tiny_dataset)
    assert code == 2
    assert "best.pth: does not fit the h1 model" in err and "weights_only" in err
    assert not unpickled.exists()
