# Exp2: SegFormer-B2 with Exp1's augmentation, AdamW lr 6e-5 weight decay 0.01 (mmseg's SegFormer
# optimizer: no decay on norms and position blocks, head at 10x lr), linear warm-up then poly decay.
_base_ = [
    "./_base_/models/segformer_mit-b2.py",
    "./_base_/datasets/study_256x256_aug.py",
    "./_base_/default_runtime.py",
    "./_base_/schedules/schedule_80e.py",
]

optim_wrapper = dict(
    _delete_=True,
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(
        custom_keys={
            "pos_block": dict(decay_mult=0.0),
            "norm": dict(decay_mult=0.0),
            "head": dict(lr_mult=10.0),
        }
    ),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=1e-6, by_epoch=True, begin=0, end=2, convert_to_iter_based=True),
    dict(type="PolyLR", eta_min=0.0, power=1.0, begin=2, end=80, by_epoch=True, convert_to_iter_based=True),
]

# What the report and the params form say about this experiment (read by tasks.experiments,
# never executed there).
EXPERIMENT = dict(
    name="exp2",
    order=4,
    default=True,
    hypothesis="SegFormer-B2 with Exp1's augmentation",
    model="SegFormer (SegformerHead), MixVisionTransformer-B2; AdamW lr 6e-05 wd 0.01",
    augmentation="RandomResize 0.5-2.0 + RandomCrop 256 (cat_max_ratio 0.75) + RandomFlip 0.5 + PhotoMetricDistortion",
    weighting="none",
)
