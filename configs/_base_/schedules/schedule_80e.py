# 80 epochs, validation after every epoch, best checkpoint by val mDice, early stopping on val mDice.
# SGD + poly decay as mmseg's DeepLabV3+ schedules (converted from iterations to epochs).
optimizer = dict(type="SGD", lr=0.01, momentum=0.9, weight_decay=0.0005)
optim_wrapper = dict(type="OptimWrapper", optimizer=optimizer, clip_grad=None)
param_scheduler = [
    dict(type="PolyLR", eta_min=1e-4, power=0.9, begin=0, end=80, by_epoch=True, convert_to_iter_based=True)
]
train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=80, val_interval=1)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=10, log_metric_by_epoch=True),
    param_scheduler=dict(type="ParamSchedulerHook"),
    # keeps the latest epoch (resume) and the best by val mDice (best_mDice_epoch_N.pth); after
    # training, `published_keys` writes weights-only copies of both (what best.pth is made from)
    checkpoint=dict(
        type="CheckpointHook",
        by_epoch=True,
        interval=1,
        max_keep_ckpts=1,
        save_best="mDice",
        rule="greater",
        published_keys=["meta", "state_dict"],
    ),
    sampler_seed=dict(type="DistSamplerSeedHook"),
    visualization=dict(type="SegVisualizationHook"),
)
# patience in validations (= epochs); min_delta in mDice points (percent)
custom_hooks = [
    dict(type="ResumableEarlyStoppingHook", monitor="mDice", rule="greater", patience=10, min_delta=0.1)
]
