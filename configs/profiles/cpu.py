# CPU profile: the four experiments in minutes on 2 CPU cores (the demo), applied by
# tasks.train.apply_profile on top of an experiment's config.
#
# What it keeps, per experiment: the architecture family (DeepLabV3+ with the depthwise-separable
# ASPP head on a ResNetV1c; SegFormer's MixVisionTransformer + SegformerHead), the ComboLoss, H2's
# class weights, the augmentation pipeline with its parameters (RandomResize ratio 0.5-2.0,
# RandomCrop cat_max_ratio 0.75, RandomFlip 0.5, PhotoMetricDistortion), the optimizer type (SGD
# for DeepLabV3+, AdamW with its paramwise rules for SegFormer), validation every epoch, best
# checkpoint by val mDice and early stopping on it.
#
# What it changes:
# - image_size: every 256-pixel size (Resize/RandomResize scale, RandomCrop crop size, the
#   data preprocessor's pad size) becomes 128: images are trained and predicted at 128x128;
#   metrics stay at the masks' full 256x256 resolution (mmseg resizes predictions back).
# - models: ResNetV1c-18 at a quarter of the width, a narrower ASPP head with dilations scaled to
#   the smaller feature map; MiT with two thin stages fewer blocks (B0-like depth, narrower).
#   Both start from scratch, so the SegFormer learning rate is raised from the fine-tuning 6e-5.
# - schedule: max_epochs epochs (the poly decay ends there), early-stopping patience in epochs,
#   batch size 8, data loading in the main process (no worker processes competing for 2 cores).
image_size = 128
max_epochs = 25
early_stopping_patience = 8

common = dict(
    train_dataloader=dict(batch_size=4, num_workers=0, persistent_workers=False),
    val_dataloader=dict(batch_size=8, num_workers=0, persistent_workers=False),
    test_dataloader=dict(batch_size=8, num_workers=0, persistent_workers=False),
    default_hooks=dict(logger=dict(interval=10)),
)

models = dict(
    ResNetV1c=dict(
        model=dict(
            backbone=dict(depth=18, stem_channels=16, base_channels=16, strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2)),
            decode_head=dict(in_channels=128, channels=64, c1_in_channels=16, c1_channels=16, dilations=(1, 3, 6, 9)),
            auxiliary_head=dict(in_channels=64, channels=32),
        ),
        optim_wrapper=dict(optimizer=dict(lr=0.05)),
    ),
    MixVisionTransformer=dict(
        model=dict(
            backbone=dict(embed_dims=32, num_heads=[1, 2, 5, 8], num_layers=[1, 1, 1, 1]),
            decode_head=dict(in_channels=[32, 64, 160, 256], channels=64),
        ),
        optim_wrapper=dict(optimizer=dict(lr=2e-3)),
    ),
)
