"""The configuration of a run, read by every layer: the documented schema (schema.py), the checks its
values pass (checks.py), and the loader of files, sections and ``--set`` overrides (load.py)."""
from .load import BEFORE_KEY, PATH_KEYS, SECTIONS, WHERE, flatten, from_dict, load_config, moved, with_defaults
from .schema import TIS_CAP, TrainConfig

__all__ = ["BEFORE_KEY", "PATH_KEYS", "SECTIONS", "TIS_CAP", "TrainConfig", "WHERE", "flatten", "from_dict",
           "load_config", "moved", "with_defaults"]
