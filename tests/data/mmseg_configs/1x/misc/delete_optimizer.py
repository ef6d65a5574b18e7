# _delete_ replaces the base's SGD with Adam (no momentum carried over)
_base_ = '../pspnet/pspnet_r50-d8_4xb2-40k_cityscapes-512x1024.py'
optim_wrapper = dict(optimizer=dict(_delete_=True, type='Adam', lr=0.0003, weight_decay=0.0001))
param_scheduler = [
    dict(type='MultiStepLR', milestones=[30000, 36000], gamma=0.1, by_epoch=False, begin=0, end=40000),
]
