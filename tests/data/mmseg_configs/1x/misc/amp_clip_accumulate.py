# mixed precision, gradient clipping and accumulation, a cosine schedule after a warmup, and
# a momentum schedule, on the PSPNet recipe
_base_ = '../pspnet/pspnet_r50-d8_4xb2-40k_cityscapes-512x1024.py'
optim_wrapper = dict(
    type='AmpOptimWrapper',
    loss_scale='dynamic',
    clip_grad=dict(max_norm=35, norm_type=2),
    accumulative_counts=2)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=1000),
    dict(type='CosineAnnealingLR', T_max=39000, eta_min=1e-6, by_epoch=False, begin=1000, end=40000),
    dict(type='CosineAnnealingMomentum', T_max=40000, eta_min=0.85, by_epoch=False, begin=0, end=40000),
]
randomness = dict(seed=42, deterministic=False)
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3, save_best='mIoU', rule='greater'))
vis_backends = [dict(type='LocalVisBackend'), dict(type='TensorboardVisBackend')]
