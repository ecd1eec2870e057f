"""Reading a config: files (TOML or YAML) and ``--set section.key=value`` in sections, saved run configs
flat; unknown keys, keys in the wrong section and values of the wrong type are errors that name the key."""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
import typing
from pathlib import Path
from typing import Any

from .schema import TrainConfig

# keys added since whose default is not what a run saved before them ran with
BEFORE_KEY = {"loss_denominator": "informative", "eval_max_tokens": 256, "tis_cap": None, "sampler_dtype": "model",
              "update_dtype": "model"}


def with_defaults(saved: dict) -> dict:
    """A saved config with each key added to mmgrpo since: at the value the run ran with
    (``BEFORE_KEY``), else at its default."""
    return {**TrainConfig().to_json(), **{k: v for k, v in BEFORE_KEY.items() if k not in saved}, **saved}


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (dict, list, str, bool):
        return isinstance(value, hint)
    if origin in (list, tuple) and typing.get_args(hint):
        return isinstance(value, origin) and all(_type_ok(v, typing.get_args(hint)[0]) for v in value)
    return True


# Config files, --set and mmgrpo.optimize(config=...) are written in sections; the dataclass above
# stays flat (one documented field each). Section key -> field; a key is the field's name unless
# renamed here.
SECTIONS: dict[str, dict[str, str]] = {
    "model": {"name": "model", "device": "device", "dtype": "dtype", "sampler_dtype": "sampler_dtype",
              "update_dtype": "update_dtype"},
    "task": {"name": "task", "options": "task_options", "program": "program", "metric": "metric",
             "reward": "reward", "train": "train_data", "dev": "dev_data", "test": "test_data", "prompts": "prompts"},
    "rollout": {k: k for k in ("batch_examples", "group_size", "temperature", "top_p", "max_tokens", "concurrency",
                               "format_failure_score", "failure_score", "max_error_rate", "deterministic",
                               "continuous_batching", "prefill_tokens", "max_policy_lag",
                               "servers", "server_model", "adapter_dir", "request_timeout_s", "request_retries",
                               "request_backoff_s", "workers", "ray_address")},
    "grpo": {k: k for k in ("grouping", "group_level", "scale_rewards", "per_trajectory_norm", "loss_type", "epsilon",
                            "epsilon_high", "beta", "num_iterations", "tis_cap", "mismatch_tolerance",
                            "loss_denominator", "mask_truncated",
                            "learning_rate", "lr_schedule", "warmup_steps", "weight_decay", "max_grad_norm", "max_nonfinite_steps",
                            "shared_prefix", "prefix_attention", "pack_tokens", "token_budget", "recompute_tokens", "lora_r", "lora_alpha", "lora_dropout",
                            "lora_targets", "train_with_demos")},
    "prompts": {"optimizer": "prompt_optimizer", "candidates": "prompt_candidates", "max_demos": "prompt_max_demos",
                "demo_threshold": "prompt_demo_threshold",
                "train_examples": "prompt_train_examples", "val_examples": "prompt_val_examples",
                "instructions": "prompt_instructions",
                "trials": "prompt_trials", "minibatch": "prompt_minibatch", "top_k": "prompt_top_k",
                "gepa_metric_calls": "gepa_metric_calls", "proposer_url": "proposer_url",
                "proposer_model": "proposer_model"},
    "run": {k: k for k in ("strategy", "seed", "steps", "eval_every", "eval_examples", "eval_max_tokens",
                           "checkpoint_every",
                           "keep_checkpoints", "dist_timeout_s", "out", "name", "progress", "report_to")},
}
WHERE = {f: (sec, key) for sec, keys in SECTIONS.items() for key, f in keys.items()}  # field -> (section, key)
assert set(WHERE) == {f.name for f in dataclasses.fields(TrainConfig)}, "every field belongs to one section"


def from_dict(raw: dict, source: str = "config") -> TrainConfig:
    """A config from flat field names (saved run configs, presets, code)."""
    hints = typing.get_type_hints(TrainConfig)
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
            raise ValueError(f"{source}: unknown key {key!r}{hint}")
        if key == "servers" and isinstance(value, str):  # --set rollout.servers=URL1,URL2
            value = raw[key] = [u.strip() for u in value.split(",") if u.strip()]
        if not _type_ok(value, hints[key]):
            raise ValueError(f"{source}: key {key!r} must be of type {hints[key]}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{source}: key {key!r} must be a finite number, got {value!r}")
    return TrainConfig(**raw)


def moved(key: str) -> str:
    sec, k = WHERE[key]
    return f"[{sec}] {k}"


def flatten(raw: dict, source: str = "config") -> dict:
    """Sections -> flat fields; an old flat key, an unknown section or key is an error naming it."""
    flat: dict = {}
    for sec, body in raw.items():
        if not isinstance(sec, str):
            raise ValueError(f"{source}: section names are strings, got {sec!r}")
        if sec not in SECTIONS:
            if sec in WHERE:
                raise ValueError(f"{source}: key {sec!r} belongs in a section now: write it as {moved(sec)} "
                                 f"(or --set {WHERE[sec][0]}.{WHERE[sec][1]}=...)")
            close = difflib.get_close_matches(sec, list(SECTIONS), n=1)
            hint = f"did you mean [{close[0]}]?" if close else f"sections: {', '.join(SECTIONS)}"
            raise ValueError(f"{source}: unknown section {sec!r}; {hint}")
        if not isinstance(body, dict):
            raise ValueError(f"{source}: [{sec}] must be a table of keys, got {body!r}")
        for key, value in body.items():
            if not isinstance(key, str):
                raise ValueError(f"{source}: [{sec}] has a key that is not a string: {key!r}")
            if key not in SECTIONS[sec]:
                if key in WHERE or any(key in keys for keys in SECTIONS.values()):
                    field_name = key if key in WHERE else next(k2 for keys in SECTIONS.values()
                                                               for k1, k2 in keys.items() if k1 == key)
                    raise ValueError(f"{source}: [{sec}] has no key {key!r}; it is {moved(field_name)}")
                close = difflib.get_close_matches(key, list(SECTIONS[sec]), n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"keys of [{sec}]: {', '.join(SECTIONS[sec])}"
                raise ValueError(f"{source}: unknown key {key!r} in [{sec}]; {hint}")
            flat[SECTIONS[sec][key]] = value
    return flat


def _merge(into: dict, flat: dict) -> None:
    for k, v in flat.items():
        if k == "task_options" and isinstance(v, dict) and isinstance(into.get(k), dict):
            into[k] = {**into[k], **v}
        else:
            into[k] = v


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _read_config_file(p: Path) -> Any:
    import yaml

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10: the tomli backport, a dependency there (pyproject.toml)
        import tomli as tomllib
    kind = "TOML" if p.suffix == ".toml" else "YAML"
    try:
        text = p.read_text(encoding="utf-8")
        return tomllib.loads(text) if kind == "TOML" else (yaml.safe_load(text) or {})
    except (ValueError, yaml.YAMLError) as exc:  # TOMLDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{p}: not valid {kind} ({' '.join(str(exc).split())[:300]})") from None


def load_config(path: str | Path | None, overrides: list[str] = (), defaults: dict | None = None,
                defaults_sections: dict | None = None, sections: dict | None = None) -> TrainConfig:
    """Defaults (flat, e.g. a task preset; then in sections), the file's sections, ``sections``
    (a dict, from Python), then ``section.key=value`` overrides; later ones win."""
    raw: dict = json.loads(json.dumps(defaults or {}))
    _merge(raw, flatten(defaults_sections or {}, "defaults"))
    source = str(path) if path else "config"
    if path:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"config file {p} does not exist")
        if p.suffix not in (".toml", ".yaml", ".yml"):
            raise ValueError(f"{p}: use a .toml, .yaml or .yml config file")
        loaded = _read_config_file(p)
        if not isinstance(loaded, dict):
            raise ValueError(f"{p}: the config must be a mapping of sections to keys")
        _merge(raw, flatten(loaded, source))
    _merge(raw, flatten(sections or {}, "config"))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like SECTION.KEY=VALUE, e.g. rollout.temperature=0.8")
        k, v = item.split("=", 1)
        parts = k.split(".")
        if parts[:2] == ["task", "options"] and len(parts) == 3:
            _merge(raw, {"task_options": {parts[2]: _parse_value(v)}})
        elif parts[0] == "task_options":
            raise ValueError(f"--set {item}: task options are task.options now: --set task.options.{parts[-1]}={v}")
        elif len(parts) == 2:
            _merge(raw, flatten({parts[0]: {parts[1]: _parse_value(v)}}, f"--set {item}"))
        elif len(parts) == 1 and k in WHERE:
            raise ValueError(f"--set {item}: {k!r} belongs in a section now: --set {WHERE[k][0]}.{WHERE[k][1]}={v}")
        else:
            raise ValueError(f"--set {item}: write SECTION.KEY=VALUE (sections: {', '.join(SECTIONS)})")
    for key in PATH_KEYS:  # saved as absolute paths: a run is resumed and evaluated from any folder
        if isinstance(raw.get(key), str) and raw[key]:
            raw[key] = str(Path(raw[key]).expanduser().resolve())
    return from_dict(raw, source)


PATH_KEYS = ("train_data", "dev_data", "test_data", "prompts")
