# H2: H1 with CrossEntropy class weights [0.0585, 1.0, 1.0] (background / 17: background is ~90%
# of the pixels). The auxiliary head's CrossEntropy gets the same weights: it trains the same backbone.
_base_ = ["./h1_deeplabv3plus_r50_d8_256x256.py"]

class_weight = [0.0585, 1.0, 1.0]
model = dict(
    decode_head=dict(
        loss_decode=[
            dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.5, class_weight=class_weight),
            dict(type="DiceLoss", use_sigmoid=False, loss_weight=0.5, ignore_index=255),
        ]
    ),
    auxiliary_head=dict(loss_decode=dict(class_weight=class_weight)),
)

# What the report and the params form say about this experiment (read by tasks.experiments,
# never executed there).
EXPERIMENT = dict(
    name="h2",
    order=2,
    default=True,
    hypothesis="H1 + CrossEntropy class weights against the background's 90% share",
    model="DeepLabV3+ (DepthwiseSeparableASPPHead), ResNetV1c-50; SGD lr 0.01",
    augmentation="RandomFlip 0.5",
    weighting="CE class_weight [0.0585, 1.0, 1.0]",
)
