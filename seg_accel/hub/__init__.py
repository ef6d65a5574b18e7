"""Publishing to the Hugging Face Hub: model cards, background pushes, the push hook.

``push_to_hub`` in a training config (``seg_accel.hub.hook.PushToHubHook``) and
``scripts/push_to_hub.py`` (a finished run) both stage a folder with
``stage_push`` and upload it with ``HubPusher``.
"""
from seg_accel.hub.card import build_model_card
from seg_accel.hub.push import HubPusher, scrub_token, stage_push

__all__ = ["HubPusher", "build_model_card", "scrub_token", "stage_push"]
