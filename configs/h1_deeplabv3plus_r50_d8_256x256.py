# H1: DeepLabV3+ R50-D8, 256x256, RandomFlip 0.5 as the only augmentation, 80 epochs + early stop.
_base_ = [
    "./_base_/models/deeplabv3plus_r50-d8.py",
    "./_base_/datasets/study_256x256.py",
    "./_base_/default_runtime.py",
    "./_base_/schedules/schedule_80e.py",
]

# What the report and the params form say about this experiment (read by tasks.experiments,
# never executed there).
EXPERIMENT = dict(
    name="h1",
    order=1,
    default=True,
    hypothesis="baseline: DeepLabV3+ R50 with the ComboLoss, flip only",
    model="DeepLabV3+ (DepthwiseSeparableASPPHead), ResNetV1c-50; SGD lr 0.01",
    augmentation="RandomFlip 0.5",
    weighting="none",
)
