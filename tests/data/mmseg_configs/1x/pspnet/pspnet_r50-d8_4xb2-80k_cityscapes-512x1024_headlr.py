# a fourth level of the chain: the OHEM config, with 10x the lr for the heads, 80k iterations
_base_ = './pspnet_r50-d8_4xb2-40k_cityscapes-512x1024_ohem.py'
max_iters = 80000
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'head': dict(lr_mult=10.)}))
param_scheduler = [
    dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=max_iters, by_epoch=False)
]
train_cfg = dict(max_iters=max_iters, val_interval=max_iters // 10)
default_hooks = dict(checkpoint=dict(interval=max_iters // 10))
