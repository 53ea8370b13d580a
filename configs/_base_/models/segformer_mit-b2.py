# SegFormer-B2: MixVisionTransformer + SegformerHead, mmseg's own model file with B2's sizes
# (as mmseg's segformer_mit-b2 config sets them) and the study's changes: BN, 3 classes, ComboLoss.
_base_ = ["mmseg::_base_/models/segformer_mit-b0.py"]

norm_cfg = dict(type="BN", requires_grad=True)
num_classes = 3
# ComboLoss = 0.5 CrossEntropy + 0.5 Dice (see deeplabv3plus_r50-d8.py for use_sigmoid=False)
loss_decode = [
    dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.5),
    dict(type="DiceLoss", use_sigmoid=False, loss_weight=0.5, ignore_index=255),
]
data_preprocessor = dict(size=(256, 256))
model = dict(
    data_preprocessor=data_preprocessor,
    # a user-supplied MiT-B2 ImageNet file (tasks.train --pretrained); None = from scratch
    pretrained=None,
    backbone=dict(embed_dims=64, num_heads=[1, 2, 5, 8], num_layers=[3, 4, 6, 3]),
    decode_head=dict(
        in_channels=[64, 128, 320, 512],
        num_classes=num_classes,
        norm_cfg=norm_cfg,
        ignore_index=255,
        loss_decode=loss_decode,
    ),
)
