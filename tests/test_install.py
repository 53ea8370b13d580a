"""The install works: the study's models build and train a step on CPU, YOLOv8 and SAM2 build, nothing
reaches the network, and the two mmcompat fixes (mmcv without ops, torch's weights_only) hold."""

from __future__ import annotations

import importlib
import ipaddress
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks import mmcompat


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Any connect to a non-loopback address raises (and is recorded): the test fails if one happens."""
    attempts: list[object] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def _check(address: object) -> None:
        host = address[0] if isinstance(address, tuple) else None
        if host is not None:
            try:
                loopback = ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = host == "localhost"
            if not loopback:
                attempts.append(address)
                raise OSError(f"test forbids network access to {address}")

    def connect(self: socket.socket, address: object) -> None:
        _check(address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: object) -> int:
        _check(address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    return attempts


def _train_step(model: torch.nn.Module) -> float:
    """One mmseg train step (loss, backward) on a 2x3x64x64 batch; returns the loss."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    torch.manual_seed(0)
    inputs = [torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8) for _ in range(2)]
    samples = []
    for _ in range(2):
        sample = SegDataSample()
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 3, (1, 64, 64)))
        sample.set_metainfo(dict(img_shape=(64, 64), ori_shape=(64, 64), pad_shape=(64, 64)))
        samples.append(sample)
    model.train()
    data = model.data_preprocessor(dict(inputs=inputs, data_samples=samples), training=True)
    losses = model(**data, mode="loss")
    total = sum(value for key, value in losses.items() if key.startswith("loss") or ".loss" in key)
    total.backward()
    return float(total)


@pytest.mark.parametrize(
    ("experiment", "backbone"), [("h1", "ResNetV1c"), ("exp2", "MixVisionTransformer")], ids=["r50", "mit-b2"]
)
def test_study_models_build_and_train_a_step_on_cpu(experiment: str, backbone: str, no_network: list) -> None:
    from mmseg.registry import MODELS

    from tasks.train import load_experiment_config

    cfg = load_experiment_config(experiment, "full")  # the study's full-size model, no pretrained weights
    cfg.model.data_preprocessor.size = (64, 64)  # a small batch keeps the test fast; the model is unchanged
    model = MODELS.build(cfg.model)
    model.init_weights()
    assert type(model.backbone).__name__ == backbone
    assert model.decode_head.num_classes == 3
    loss = _train_step(model)
    assert loss > 0 and torch.isfinite(torch.tensor(loss))
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads[:5])
    assert no_network == []


def test_yolov8_builds_from_its_yaml_offline(tmp_path: Path, no_network: list) -> None:
    from ultralytics import YOLO

    model = YOLO("yolov8n.yaml")
    with torch.no_grad():
        out = model.model(torch.zeros(1, 3, 64, 64))
    assert out is not None
    assert not list(tmp_path.glob("*.pt"))  # nothing downloaded
    assert no_network == []


def test_sam2_builds_from_its_config_without_checkpoint(no_network: list) -> None:
    from sam2.build_sam import build_sam2

    model = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=None, device="cpu")
    assert sum(p.numel() for p in model.parameters()) > 1_000_000
    assert no_network == []


def test_mmcv_ops_are_refused_with_a_clear_error() -> None:
    mmcompat.apply()
    ops = importlib.import_module("mmcv.ops")
    if mmcompat.has_compiled_ops():  # the GPU trainer image: mmcv's real ops, nothing replaced
        assert ops.point_sample.__module__.startswith("mmcv.ops")
        assert not isinstance(ops, mmcompat._OpsPlaceholder)
        return
    # mmseg's own code path that calls an mmcv op (PointRend's point sampling)
    from mmseg.models.utils import point_sample as mmseg_point_sample

    with pytest.raises(mmcompat.MissingMmcvOpError, match=r"mmcv\.ops\.point_sample needs mmcv built with"):
        mmseg_point_sample.point_sample(torch.zeros(1, 1, 4, 4), torch.zeros(1, 2, 2))
    with pytest.raises(mmcompat.MissingMmcvOpError, match="trainer image"):
        ops.DeformConv2d(3, 3, 3)


def test_mmengine_checkpoints_are_saved_plain_and_nothing_is_unpickled_in_full(tmp_path: Path) -> None:
    mmcompat.apply()
    import mmengine.runner
    from mmengine.logging import HistoryBuffer, MessageHub
    from mmengine.runner.checkpoint import _load_checkpoint

    hub = MessageHub.get_instance("test_install_checkpoint")
    hub.update_scalar("train/loss", 0.5)  # a HistoryBuffer, as in every Runner checkpoint
    hub.update_info("best_score", np.float32(31.1))  # numpy values too
    checkpoint = {"meta": {"epoch": 1}, "state_dict": {"w": torch.ones(2)}, "message_hub": hub.state_dict()}
    ours = tmp_path / "epoch_1.pth"
    mmengine.runner.save_checkpoint(checkpoint, str(ours))  # what Runner and CheckpointHook call
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(ours)) == []  # plain data only
    loaded = _load_checkpoint(str(ours), map_location="cpu")
    assert loaded["meta"]["epoch"] == 1 and torch.equal(loaded["state_dict"]["w"], torch.ones(2))
    buffer = loaded["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(buffer, HistoryBuffer) and buffer.current() == 0.5
    assert loaded["message_hub"]["runtime_info"]["best_score"] == pytest.approx(31.1)

    # the trap torch >= 2.6 refuses (mmengine's own pickles) is refused wherever the file lies: no
    # directory is trusted for a full unpickling
    pickled = tmp_path / "pickled.pth"
    torch.save({"meta": {"epoch": 1}, "message_hub": hub.state_dict()}, pickled)
    with pytest.raises(ValueError, match="not a plain weights checkpoint"):
        _load_checkpoint(str(pickled), map_location="cpu")
    # a meta.config (mmengine's resume runs it as a Python config) is dropped when loading
    torch.save({"meta": {"epoch": 1, "config": "import os; os.system('touch x')"}}, tmp_path / "c.pth")
    assert _load_checkpoint(str(tmp_path / "c.pth"), map_location="cpu")["meta"] == {"epoch": 1}
    # plain weights (e.g. a user's pretrained backbone) load anywhere, with weights_only=True
    plain = tmp_path / "weights.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, plain)
    assert torch.equal(_load_checkpoint(str(plain), map_location="cpu")["state_dict"]["w"], torch.zeros(1))
