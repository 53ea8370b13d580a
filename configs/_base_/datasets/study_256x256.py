# The study's dataset: images/{train,val,test}/<stem>.jpg|png, labels/{split}/<stem>.png,
# 3 classes (background, cat, dog; names and palette come from StudyDataset), 255 = ignore.
# `data_root` is a placeholder: tasks.train points it at the run's dataset view, whose
# labels/train is the chosen train-label source (relabeled, labels_sam2 or the original).
custom_imports = dict(imports=["tasks.mmseg_setup"], allow_failed_imports=False)

dataset_type = "StudyDataset"
data_root = "data/study"
ignore_index = 255
img_scale = (256, 256)
crop_size = (256, 256)

# Image sizes: any, square or not. Every image is scaled, keeping its aspect ratio, to fit img_scale
# (a no-op on the study's 256x256 images) and padded at the bottom and right to crop_size by
# PadToCrop (image 0, mask 255 = ignored by the loss), so images of different sizes share a batch.
# The augmented pipelines (study_256x256_aug.py) jitter the scale and random-crop first, as the study.
# Validation and test: the same scaling and padding; mmseg cuts the padding off each prediction
# (img_padding_size) and resizes it to the mask's own resolution, so metrics are always computed
# on the original masks.
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", reduce_zero_label=False),
    dict(type="Resize", scale=img_scale, keep_ratio=True),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PadToCrop", crop_size=crop_size),
    dict(type="PackSegInputs"),
]
# PackSegInputs' own meta keys plus the padding PadToCrop records
test_meta_keys = (
    "img_path",
    "seg_map_path",
    "ori_shape",
    "img_shape",
    "pad_shape",
    "scale_factor",
    "flip",
    "flip_direction",
    "reduce_zero_label",
    "img_padding_size",
)
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=img_scale, keep_ratio=True),
    dict(type="PadToCrop", crop_size=crop_size),
    # annotations after Resize and PadToCrop: metrics are computed at the mask's own resolution
    dict(type="LoadAnnotations", reduce_zero_label=False),
    dict(type="PackSegInputs", meta_keys=test_meta_keys),
]

train_dataloader = dict(
    batch_size=8,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type="DefaultSampler", shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path="images/train", seg_map_path="labels/train"),
        reduce_zero_label=False,
        ignore_index=ignore_index,
        pipeline=train_pipeline,
    ),
)
val_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path="images/val", seg_map_path="labels/val"),
        reduce_zero_label=False,
        ignore_index=ignore_index,
        pipeline=test_pipeline,
    ),
)
test_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path="images/test", seg_map_path="labels/test"),
        reduce_zero_label=False,
        ignore_index=ignore_index,
        pipeline=test_pipeline,
    ),
)

# mmseg's IoUMetric (mIoU and mDice, background included), plus its per-class values
val_evaluator = dict(type="PerClassIoUMetric", iou_metrics=["mIoU", "mDice"], ignore_index=ignore_index)
test_evaluator = val_evaluator
