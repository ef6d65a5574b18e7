"""A resume with a config that differs from the checkpoint's: which keys changed, and what each
change does (docs/training.md, "Resuming with a changed config").

Every change takes effect, and the warning says how: the optimizer's settings (lr, weight
decay, betas, ...) follow the config you resume with while its moments are the checkpoint's;
the schedules are rebuilt from the config and continue at the checkpoint's step; a change of
what each step takes (the batch, the accumulation, the processes' data) or of the data order
(the seed) makes the resume no longer exact."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from seg_accel.errors import ConfigError

# keys that say where and how the run starts, not what it trains: never a change
_NOT_COMPARED = ("work_dir", "resume_from", "auto_resume", "load_from")
# (key prefix, what its change does), the first matching prefix wins
_EFFECTS = (
    ("optimizer.", "takes effect: the optimizer's settings follow the config, its moments are the checkpoint's"),
    ("lr_config.", "takes effect: the schedule is rebuilt and continues at the checkpoint's step"),
    ("momentum_config.", "takes effect: the schedule is rebuilt and continues at the checkpoint's step"),
    ("runner.", "takes effect: the run ends there"),
    ("seed", "takes effect for the data order; the random states are the checkpoint's: not an exact resume"),
    ("data.samples_per_gpu", "takes effect: the data stream continues at the checkpoint's sample; not an exact resume"),
    ("gradient_accumulation_steps", "takes effect; not an exact resume"),
    ("data.train.", "takes effect: the data stream continues at the checkpoint's sample; not an exact resume"),
    ("model.", "takes effect (weights of another shape are refused)"),
)
_DEFAULT = "takes effect"


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): value}


def effect_of(key: str) -> str:
    return next((effect for prefix, effect in _EFFECTS if key == prefix.rstrip(".") or key.startswith(prefix)),
                _DEFAULT)


def config_changes(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, Any, Any, str]]:
    """``(key, the checkpoint's value, the value now, what the change does)`` for every changed key."""
    old, new = flatten(before), flatten(after)
    changes = []
    for key in sorted(set(old) | set(new)):
        if key.split(".")[0] in _NOT_COMPARED or old.get(key, "<unset>") == new.get(key, "<unset>"):
            continue
        changes.append((key, old.get(key, "<unset>"), new.get(key, "<unset>"), effect_of(key)))
    return changes


def describe_changes(changes: list[tuple[str, Any, Any, str]], checkpoint: str) -> str:
    def short(value: Any) -> str:
        text = repr(value) if not isinstance(value, str) else value
        return text if len(text) <= 60 else text[:57] + "..."

    items = "; ".join(f"{key}: {short(was)} -> {short(now)} ({effect})" for key, was, now, effect in changes)
    return f"resuming from {checkpoint} with a config that differs from the checkpoint's: {items}"


def check_not_finished(checkpoint: Path, iteration: int, max_iters: int, max_epochs: int | None, by_epoch: bool) -> None:
    """A resume at or past the run's end is one line naming the key (it would only repeat the final
    evaluation and export)."""
    if iteration < max_iters:
        return
    what = f"runner.max_epochs {max_epochs} ({max_iters} iterations)" if by_epoch else f"runner.max_iters {max_iters}"
    raise ConfigError(f"{checkpoint.name} is at iteration {iteration}: the run has already finished ({what}); to "
                      "train on, raise it; for a new run, another --work-dir (or no auto_resume)",
                      key="runner.max_epochs" if by_epoch else "runner.max_iters")
