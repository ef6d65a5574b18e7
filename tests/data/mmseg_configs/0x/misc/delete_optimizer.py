# _delete_ replaces the base's SGD with Adam (no momentum carried over)
_base_ = '../pspnet/pspnet_r50-d8_512x1024_40k_cityscapes.py'
optimizer = dict(_delete_=True, type='Adam', lr=0.0003, weight_decay=0.0001)
lr_config = dict(_delete_=True, policy='step', step=[30000, 36000], by_epoch=False)
