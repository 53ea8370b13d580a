# Runtime settings of every experiment (mmseg's default runtime, epoch-based logging, fixed seed).
default_scope = "mmseg"
env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
    dist_cfg=dict(backend="nccl"),
)
vis_backends = [dict(type="LocalVisBackend")]
visualizer = dict(type="SegLocalVisualizer", vis_backends=vis_backends, name="visualizer")
log_processor = dict(by_epoch=True)
log_level = "INFO"
load_from = None
resume = False
# same seed for every experiment; deterministic=False because CUDA's bilinear upsampling backward
# has no deterministic kernel (torch.use_deterministic_algorithms would raise on GPU workers)
randomness = dict(seed=0, deterministic=False)
