# H1: DeepLabV3+ R50-D8, 256x256, RandomFlip 0.5 as the only augmentation, 80 epochs + early stop.
_base_ = [
    "./_base_/models/deeplabv3plus_r50-d8.py",
    "./_base_/datasets/study_256x256.py",
    "./_base_/default_runtime.py",
    "./_base_/schedules/schedule_80e.py",
]
