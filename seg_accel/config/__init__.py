"""Config loading (YAML, ``_base_``, ``--cfg-options``) and validation."""
from seg_accel.config.loader import (
    Config,
    default_work_dir,
    import_custom_modules,
    load_config,
    parse_cfg_options,
    parse_option_value,
    resolve_work_dir,
)

__all__ = [
    "Config",
    "default_work_dir",
    "import_custom_modules",
    "load_config",
    "parse_cfg_options",
    "parse_option_value",
    "resolve_work_dir",
]
