"""The experiment configs carry exactly the study's settings (STUDY.md), and the CPU profile keeps them.

Each config is loaded with mmengine (through tasks.train.load_experiment_config, which adds nothing
for the full profile but the dataset root) and compared with the study's numbers.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import pytest
from mmengine.config import Config

from tasks.dataset import CLASSES, IGNORE_INDEX
from tasks.errors import InputError
from tasks.experiments import CONFIG_DIR, catalogue
from tasks.train import load_experiment_config, set_max_epochs

STUDY = ("h1", "h2", "exp1", "exp2")  # the study's four; the open ideas have their own tests below

DEEPLAB = ("h1", "h2", "exp1")
STUDY_CLASS_WEIGHT = [0.0585, 1.0, 1.0]
FLIP_ONLY = ["LoadImageFromFile", "LoadAnnotations", "Resize", "RandomFlip", "PadToCrop", "PackSegInputs"]
# What every pipeline adds to the study's for images of other sizes (a no-op on 256x256 images)
PAD = dict(type="PadToCrop", crop_size=(256, 256))
STUDY_AUGMENTATION = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", reduce_zero_label=False),
    dict(type="RandomResize", scale=(256, 256), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type="RandomCrop", crop_size=(256, 256), cat_max_ratio=0.75),
    dict(type="RandomFlip", prob=0.5),
    dict(
        type="PhotoMetricDistortion",
        brightness_delta=32,
        contrast_range=(0.8, 1.2),
        saturation_range=(0.8, 1.2),
        hue_delta=18,
    ),
    PAD,
    dict(type="PackSegInputs"),
]


@functools.cache
def _loaded(experiment: str, profile: str) -> Config:
    return load_experiment_config(experiment, profile, dataset_root=Path("/data/study"))


def _load(experiment: str, profile: str = "full") -> Config:
    # parsing is slow (mmseg:: bases read mmseg's model index): parse once, hand out copies
    return copy.deepcopy(_loaded(experiment, profile))


def _find(obj: Any, key: str) -> list[Any]:
    """Every value of `key` anywhere in a nested config."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                found.append(v)
            found += _find(v, key)
    elif isinstance(obj, list | tuple):
        for item in obj:
            found += _find(item, key)
    return found


def _heads(cfg: Config) -> list[dict]:
    return [cfg.model.decode_head] + ([cfg.model.auxiliary_head] if "auxiliary_head" in cfg.model else [])


def test_every_experiment_file_exists_with_mmseg_naming() -> None:
    files = {name: experiment.config_file for name, experiment in catalogue().items()}
    assert sorted(p.name for p in CONFIG_DIR.glob("*.py")) == sorted(f.name for f in files.values())
    assert files["exp2"].name == "exp2_segformer_b2_256x256.py"
    for name, path in files.items():  # mmseg's naming: <name>_<model>_<crop>.py
        assert path.name.startswith(f"{name}_") and path.stem.endswith("_256x256"), path
    assert tuple(catalogue())[:4] == STUDY  # the study's fixed order comes first


@pytest.mark.parametrize("experiment", STUDY)
def test_study_settings_shared_by_all_experiments(experiment: str) -> None:
    cfg = _load(experiment)
    # ComboLoss: mmseg's loss list, 0.5 CrossEntropy + 0.5 Dice, softmax over 3 classes, 255 ignored
    losses = cfg.model.decode_head.loss_decode
    assert [loss.type for loss in losses] == ["CrossEntropyLoss", "DiceLoss"]
    assert [loss.loss_weight for loss in losses] == [0.5, 0.5]
    assert [loss.use_sigmoid for loss in losses] == [False, False]
    assert losses[1].ignore_index == IGNORE_INDEX
    for head in _heads(cfg):
        assert head.num_classes == len(CLASSES) == 3
        assert head.ignore_index == IGNORE_INDEX
    # BN instead of SyncBN (one GPU per worker)
    assert "SyncBN" not in cfg.pretty_text
    assert {norm["type"] for norm in _find(cfg.to_dict()["model"], "norm_cfg")} <= {"BN", "LN"}
    # schedule: 80 epochs, validation each epoch, best checkpoint and early stopping by val mDice
    assert cfg.train_cfg.type == "EpochBasedTrainLoop"
    assert cfg.train_cfg.max_epochs == 80
    assert cfg.train_cfg.val_interval == 1
    checkpoint = cfg.default_hooks.checkpoint
    assert (checkpoint.type, checkpoint.save_best, checkpoint.rule, checkpoint.by_epoch) == (
        "CheckpointHook",
        "mDice",
        "greater",
        True,
    )
    stopping = [hook for hook in cfg.custom_hooks if "EarlyStopping" in hook.type]
    assert len(stopping) == 1 and (stopping[0].monitor, stopping[0].rule) == ("mDice", "greater")
    # metric: mmseg's IoU metric with mIoU and mDice (background included), 255 ignored
    assert set(cfg.val_evaluator.iou_metrics) == {"mIoU", "mDice"}
    assert cfg.val_evaluator.ignore_index == IGNORE_INDEX
    # dataset: the study's layout, 3 classes without reduce_zero_label
    for split in ("train", "val", "test"):
        dataset = cfg[f"{split}_dataloader"].dataset
        assert dataset.type == "StudyDataset"
        assert dataset.data_prefix == dict(img_path=f"images/{split}", seg_map_path=f"labels/{split}")
        assert dataset.data_root == "/data/study"
        assert dataset.reduce_zero_label is False and dataset.ignore_index == IGNORE_INDEX
    # no pretrained weights unless given
    assert cfg.model.pretrained is None
    assert _find(cfg.to_dict()["model"], "init_cfg") in ([], [None], [None, None])
    assert cfg.randomness.seed == 0


@pytest.mark.parametrize("experiment", STUDY)
def test_class_weights_only_in_h2(experiment: str) -> None:
    cfg = _load(experiment)
    weights = _find(cfg.to_dict()["model"], "class_weight")
    if experiment == "h2":
        assert weights == [STUDY_CLASS_WEIGHT, STUDY_CLASS_WEIGHT]  # decode head and auxiliary head CE
        assert cfg.model.decode_head.loss_decode[0].type == "CrossEntropyLoss"
        assert cfg.model.decode_head.loss_decode[0].class_weight == STUDY_CLASS_WEIGHT
    else:
        assert weights == []


@pytest.mark.parametrize("experiment", STUDY)
def test_augmentation_per_experiment(experiment: str) -> None:
    cfg = _load(experiment)
    pipeline = cfg.train_dataloader.dataset.pipeline
    if experiment in ("h1", "h2"):
        assert [t.type for t in pipeline] == FLIP_ONLY
        assert pipeline[2] == dict(type="Resize", scale=(256, 256), keep_ratio=True)  # no-op on 256x256
        assert pipeline[3] == dict(type="RandomFlip", prob=0.5)
        assert pipeline[4] == PAD
    else:
        assert [dict(t) for t in pipeline] == STUDY_AUGMENTATION
    # evaluation is never augmented: scaled and padded like training, masks loaded as stored
    for loader in ("val_dataloader", "test_dataloader"):
        test_pipeline = cfg[loader].dataset.pipeline
        assert [t.type for t in test_pipeline] == [
            "LoadImageFromFile",
            "Resize",
            "PadToCrop",
            "LoadAnnotations",
            "PackSegInputs",
        ]
        assert test_pipeline[1] == dict(type="Resize", scale=(256, 256), keep_ratio=True)
        assert test_pipeline[2] == PAD
        assert "img_padding_size" in test_pipeline[4].meta_keys


@pytest.mark.parametrize("experiment", STUDY)
def test_model_and_optimizer_per_experiment(experiment: str) -> None:
    cfg = _load(experiment)
    model, optimizer = cfg.model, cfg.optim_wrapper.optimizer
    if experiment in DEEPLAB:
        assert (model.backbone.type, model.backbone.depth) == ("ResNetV1c", 50)
        assert model.decode_head.type == "DepthwiseSeparableASPPHead"
        assert (optimizer.type, optimizer.lr) == ("SGD", 0.01)
    else:
        assert model.backbone.type == "MixVisionTransformer"
        assert (model.backbone.embed_dims, model.backbone.num_layers) == (64, [3, 4, 6, 3])  # B2
        assert model.decode_head.type == "SegformerHead"
        assert model.decode_head.in_channels == [64, 128, 320, 512]
        assert (optimizer.type, optimizer.lr, optimizer.weight_decay) == ("AdamW", 6e-5, 0.01)


@pytest.mark.parametrize("experiment", STUDY)
def test_cpu_profile_keeps_what_the_experiment_tests(experiment: str) -> None:
    full, cpu = _load(experiment), _load(experiment, "cpu")
    # same family, loss, class weights, optimizer type, hooks; smaller and shorter
    assert cpu.model.backbone.type == full.model.backbone.type
    assert cpu.model.decode_head.type == full.model.decode_head.type
    assert cpu.model.decode_head.loss_decode == full.model.decode_head.loss_decode
    assert _find(cpu.to_dict()["model"], "class_weight") == _find(full.to_dict()["model"], "class_weight")
    assert cpu.optim_wrapper.optimizer.type == full.optim_wrapper.optimizer.type
    assert cpu.optim_wrapper.get("paramwise_cfg") == full.optim_wrapper.get("paramwise_cfg")
    assert cpu.default_hooks.checkpoint == full.default_hooks.checkpoint
    assert [h.type for h in cpu.custom_hooks] == [h.type for h in full.custom_hooks]
    assert (cpu.val_cfg, cpu.val_evaluator) == (full.val_cfg, full.val_evaluator)
    # still validates often enough to pick the best epoch and to stop early
    assert cpu.train_cfg.max_epochs // cpu.train_cfg.val_interval >= 10
    assert cpu.train_cfg.max_epochs < full.train_cfg.max_epochs
    if experiment in DEEPLAB:
        assert cpu.model.backbone.depth < full.model.backbone.depth
    else:
        assert cpu.model.backbone.embed_dims < full.model.backbone.embed_dims
    # augmentation: same transforms and parameters; only sizes shrink (256 -> 128)
    full_pipeline, cpu_pipeline = (
        full.train_dataloader.dataset.pipeline,
        cpu.train_dataloader.dataset.pipeline,
    )
    assert [t.type for t in cpu_pipeline] == [t.type for t in full_pipeline]
    for full_t, cpu_t in zip(full_pipeline, cpu_pipeline, strict=True):
        for key in set(full_t) - {"scale", "crop_size"}:
            assert cpu_t[key] == full_t[key], (full_t.type, key)
        for key in {"scale", "crop_size"} & set(full_t):
            assert cpu_t[key] == (128, 128)
    assert cpu.model.data_preprocessor.size == (128, 128)
    # the schedule still decays to the (new) last epoch
    assert max(s.end for s in cpu.param_scheduler) == cpu.train_cfg.max_epochs


def test_pretrained_weights_are_a_config_value(tmp_path: Path) -> None:
    weights = tmp_path / "resnet50_v1c.pth"
    cfg = load_experiment_config("h1", "full", pretrained=weights)
    assert cfg.model.pretrained == str(weights)
    with pytest.raises(InputError, match="cpu profile shrinks the backbone"):
        load_experiment_config("exp2", "cpu", pretrained=weights)


def test_max_epochs_moves_the_end_of_the_schedule() -> None:
    cfg = set_max_epochs(_load("exp2"), 5)
    assert cfg.train_cfg.max_epochs == 5
    assert [(s.type, s.begin, s.end) for s in cfg.param_scheduler] == [("LinearLR", 0, 2), ("PolyLR", 2, 5)]
    with pytest.raises(InputError, match="at least 1"):
        set_max_epochs(cfg, 0)


def test_unknown_experiment_and_profile_are_refused() -> None:
    with pytest.raises(InputError, match="unknown experiment 'h3'"):
        load_experiment_config("h3")
    with pytest.raises(InputError, match="unknown profile 'gpu'"):
        load_experiment_config("h1", "gpu")


# ---------------------------------------------------------------- the study's open ideas


def _without(cfg: Config, *keys: str) -> dict:
    return {key: value for key, value in cfg.to_dict().items() if key not in keys}


def test_h1_focal_is_h1_with_focal_loss_only() -> None:
    h1, focal = _load("h1"), _load("h1_focal")
    losses = focal.model.decode_head.loss_decode
    assert [(loss.type, loss.loss_weight) for loss in losses] == [
        ("SoftmaxFocalLoss", 0.5),
        ("DiceLoss", 0.5),
    ]
    assert losses[0].gamma == 2.0 and losses[0].ignore_index == IGNORE_INDEX
    assert losses[1] == h1.model.decode_head.loss_decode[1]
    aux = focal.model.auxiliary_head.loss_decode
    assert dict(aux) == dict(type="SoftmaxFocalLoss", gamma=2.0, loss_weight=0.4, ignore_index=IGNORE_INDEX)
    for cfg in (h1, focal):  # everything else is H1's
        cfg.model.decode_head.pop("loss_decode")
        cfg.model.auxiliary_head.pop("loss_decode")
    assert _without(focal, "EXPERIMENT", "experiment") == _without(h1, "EXPERIMENT", "experiment")


def test_exp2_tta_trains_as_exp2_and_tests_with_mmseg_tta() -> None:
    from tasks.experiments import apply_test_time_augmentation

    exp2, tta = _load("exp2"), _load("exp2_tta")
    added = ("tta_model", "tta_pipeline", "tta_ratios")
    assert _without(tta, "EXPERIMENT", "experiment", *added) == _without(exp2, "EXPERIMENT", "experiment")
    tested = apply_test_time_augmentation(copy.deepcopy(tta))
    assert tested.model.type == "SegTTAModel" and tested.model.module == exp2.model
    load, resize, views = tested.test_dataloader.dataset.pipeline
    assert (load.type, dict(resize)) == (
        "LoadImageFromFile",
        dict(type="Resize", scale=(256, 256), keep_ratio=True),
    )
    scales, flips, pad, annotations, pack = views.transforms
    assert views.type == "TestTimeAug"
    assert [t.scale_factor for t in scales] == [0.75, 1.0, 1.25]
    assert [(t.prob, t.direction) for t in flips] == [(0.0, "horizontal"), (1.0, "horizontal")]
    assert pad[0].crop_size == (320, 320)  # the largest view: every view of any image fits one batch
    assert annotations[0].type == "LoadAnnotations" and pack[0].type == "PackSegInputs"
    # the CPU profile shrinks the views with the rest; exp2 itself is tested single-view
    cpu = apply_test_time_augmentation(_load("exp2_tta", "cpu"))
    assert cpu.test_dataloader.dataset.pipeline[1].scale == (128, 128)
    assert cpu.test_dataloader.dataset.pipeline[2].transforms[2][0].crop_size == (160, 160)
    assert apply_test_time_augmentation(_load("exp2")).model == exp2.model


def test_softmax_focal_loss() -> None:
    import torch
    import torch.nn.functional as F

    from tasks.losses import SoftmaxFocalLoss

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 4, generator=generator)
    labels = torch.randint(0, 3, (2, 5, 4), generator=generator)
    labels[0, :2] = IGNORE_INDEX
    # gamma 0 is CrossEntropy (mean over the non-ignored pixels)
    expected = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    assert torch.allclose(SoftmaxFocalLoss(gamma=0.0)(logits, labels), expected)
    # gamma 2: each pixel's -(1 - p_t)^2 log p_t, ignored pixels left out; class weights per pixel
    probs = logits.softmax(dim=1)
    valid = labels != IGNORE_INDEX
    p_t = probs.gather(1, labels.clamp(max=2).unsqueeze(1)).squeeze(1)[valid]
    weights = torch.tensor([0.5, 1.0, 2.0])[labels[valid]]
    manual = (-((1 - p_t) ** 2) * p_t.log() * weights).mean()
    loss = SoftmaxFocalLoss(gamma=2.0, class_weight=[0.5, 1.0, 2.0], loss_weight=0.5)
    assert torch.allclose(loss(logits, labels), 0.5 * manual)
    assert loss.loss_name == "loss_focal"
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        SoftmaxFocalLoss(gamma=-1.0)
