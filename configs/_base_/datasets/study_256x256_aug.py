# The study's augmentation (Exp1, reused by Exp2): scale jitter, crop, flip, photometric distortion;
# then PadToCrop brings crops of smaller or non-square images to the crop size (see study_256x256.py).
_base_ = ["./study_256x256.py"]

train_pipeline = [
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
    dict(type="PadToCrop", crop_size=(256, 256)),
    dict(type="PackSegInputs"),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
