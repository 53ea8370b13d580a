# H1 with Focal loss (one of the study's open ideas): the ComboLoss's CrossEntropy half becomes a
# softmax focal loss (gamma 2), which down-weights the many easy background pixels instead of
# re-weighting classes as H2 does. The auxiliary head's CrossEntropy becomes the same focal loss (it
# trains the same backbone). tasks/losses.py says why this is not mmseg's sigmoid-only FocalLoss.
_base_ = ["./h1_deeplabv3plus_r50_d8_256x256.py"]

model = dict(
    decode_head=dict(
        loss_decode=[
            dict(type="SoftmaxFocalLoss", gamma=2.0, loss_weight=0.5, ignore_index=255),
            dict(type="DiceLoss", use_sigmoid=False, loss_weight=0.5, ignore_index=255),
        ]
    ),
    auxiliary_head=dict(
        loss_decode=dict(_delete_=True, type="SoftmaxFocalLoss", gamma=2.0, loss_weight=0.4, ignore_index=255)
    ),
)

# What the report and the params form say about this experiment (read by tasks.experiments,
# never executed there).
EXPERIMENT = dict(
    name="h1_focal",
    order=5,
    default=False,
    hypothesis="H1 with Focal loss (gamma 2) instead of CrossEntropy",
    model="DeepLabV3+ (DepthwiseSeparableASPPHead), ResNetV1c-50; SGD lr 0.01",
    augmentation="RandomFlip 0.5",
    weighting="none (focal modulation (1 - p_t)^2)",
)
