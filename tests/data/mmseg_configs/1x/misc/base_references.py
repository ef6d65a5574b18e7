# MMSegmentation 1.x's references to a base's values: {{_base_.x}} and _base_.x
_base_ = '../unet/unet-s5-d16_fcn_4xb4-40k_drive-64x64.py'
crop_size = {{_base_.crop_size}}
lr = _base_.optim_wrapper.optimizer.lr * 2
train_pipeline = _base_.train_pipeline[:3] + [
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5, direction='vertical'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
optim_wrapper = dict(optimizer=dict(lr=lr))
