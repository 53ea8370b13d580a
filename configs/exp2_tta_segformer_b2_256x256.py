# Exp2 evaluated with test-time augmentation (one of the study's open ideas): trained exactly as Exp2;
# evaluate and predict average the softmax of 6 views (scales 0.75, 1.0, 1.25 of the test scale x
# horizontal flip), mmseg's own TTA (tools/test.py --tta: SegTTAModel + mmcv's TestTimeAug), applied
# by tasks.experiments.apply_test_time_augmentation. Validation during training (checkpoint choice,
# early stopping) stays single-view.
_base_ = ["./exp2_segformer_b2_256x256.py"]

tta_ratios = [0.75, 1.0, 1.25]
tta_model = dict(type="SegTTAModel")
tta_pipeline = [
    dict(type="LoadImageFromFile"),
    # the usual test resize first (the CPU profile rescales it), then the views relative to it
    dict(type="Resize", scale=(256, 256), keep_ratio=True),
    dict(
        type="TestTimeAug",
        transforms=[
            [dict(type="Resize", scale_factor=r, keep_ratio=True) for r in tta_ratios],
            [
                dict(type="RandomFlip", prob=0.0, direction="horizontal"),
                dict(type="RandomFlip", prob=1.0, direction="horizontal"),
            ],
            # after the flip (mmseg cuts the padding off before it un-flips), to the largest view's
            # size, so images of any size share a batch (the size policy of study_256x256.py)
            [dict(type="PadToCrop", crop_size=(320, 320))],
            # after the views' resize and flip: metrics stay at the mask's own resolution
            [dict(type="LoadAnnotations", reduce_zero_label=False)],
            [dict(type="PackSegInputs", meta_keys={{_base_.test_meta_keys}})],
        ],
    ),
]

# What the report and the params form say about this experiment (read by tasks.experiments,
# never executed there).
EXPERIMENT = dict(
    name="exp2_tta",
    order=6,
    default=False,
    hypothesis="Exp2 tested with test-time augmentation (3 scales x horizontal flip)",
    model="SegFormer (SegformerHead), MixVisionTransformer-B2; AdamW lr 6e-05 wd 0.01; TTA at test",
    augmentation="RandomResize 0.5-2.0 + RandomCrop 256 (cat_max_ratio 0.75) + RandomFlip 0.5 + PhotoMetricDistortion",
    weighting="none",
)
