# DeepLabV3+ (DepthwiseSeparableASPPHead) on ResNetV1c-50, mmseg's own model file with the study's
# changes: BN instead of SyncBN (one GPU per worker), 3 classes, the study's ComboLoss.
_base_ = ["mmseg::_base_/models/deeplabv3plus_r50-d8.py"]

norm_cfg = dict(type="BN", requires_grad=True)
num_classes = 3
# ComboLoss = 0.5 CrossEntropy + 0.5 Dice as mmseg's own loss list (the losses are summed).
# mmseg 1.2.2's DiceLoss defaults to use_sigmoid=True (binary); a 3-class softmax head needs False.
loss_decode = [
    dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.5),
    dict(type="DiceLoss", use_sigmoid=False, loss_weight=0.5, ignore_index=255),
]
data_preprocessor = dict(size=(256, 256))
model = dict(
    data_preprocessor=data_preprocessor,
    # a user-supplied ImageNet ResNet-50 V1c file (tasks.train --pretrained); None = from scratch
    pretrained=None,
    backbone=dict(norm_cfg=norm_cfg),
    decode_head=dict(num_classes=num_classes, norm_cfg=norm_cfg, ignore_index=255, loss_decode=loss_decode),
    # mmseg's auxiliary FCN head on stage 3 stays (CrossEntropy, weight 0.4), as in mmseg's model
    auxiliary_head=dict(num_classes=num_classes, norm_cfg=norm_cfg, ignore_index=255),
)
