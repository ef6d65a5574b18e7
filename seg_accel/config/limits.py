"""What the config readers share: the limits that keep a hostile or broken file from exhausting
the machine, where the shipped configs are, and the bookkeeping of where each key came from."""
from __future__ import annotations

from pathlib import Path
from typing import Any

PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DELETE_KEY = "_delete_"

# Limits that keep a hostile or broken file from exhausting the machine before any check runs.
MAX_CONFIG_BYTES = 4 * 2**20  # a real config is a few KB (the ADE20K recipe with 150 classes and palette: 8 KB)
MAX_CONFIG_VALUES = 100_000  # values after expanding YAML aliases or repeated names (a real config: a few thousand)
MAX_CONFIG_DEPTH = 64  # nesting of mappings and lists


def record_origins(obj: Any, key: str, file: str, origins: dict[str, str]) -> None:
    """``origins[key] = file`` for ``key`` and every key below it."""
    origins[key] = file
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k != DELETE_KEY:
                record_origins(v, f"{key}.{k}", file, origins)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            record_origins(v, f"{key}.{i}", file, origins)


def forget_origins(key: str, origins: dict[str, str]) -> None:
    for k in [k for k in origins if k == key or k.startswith(key + ".")]:
        del origins[k]
