# Exp1: H1 with the study's augmentation (RandomResize 0.5-2.0, RandomCrop 256 cat_max_ratio 0.75,
# RandomFlip, PhotoMetricDistortion): see _base_/datasets/study_256x256_aug.py.
_base_ = [
    "./_base_/models/deeplabv3plus_r50-d8.py",
    "./_base_/datasets/study_256x256_aug.py",
    "./_base_/default_runtime.py",
    "./_base_/schedules/schedule_80e.py",
]

# What the report and the params form say about this experiment (read by tasks.experiments,
# never executed there).
EXPERIMENT = dict(
    name="exp1",
    order=3,
    default=True,
    hypothesis="H1 + heavy augmentation",
    model="DeepLabV3+ (DepthwiseSeparableASPPHead), ResNetV1c-50; SGD lr 0.01",
    augmentation="RandomResize 0.5-2.0 + RandomCrop 256 (cat_max_ratio 0.75) + RandomFlip 0.5 + PhotoMetricDistortion",
    weighting="none",
)
