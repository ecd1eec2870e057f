"""Examples from what users have: ``Example``s, dicts, JSONL files; programs and metrics by import path.

A flat dict is split by the program's own inputs (the parameters of its ``forward``): those keys
are inputs, the rest gold fields; an ``id`` key names the example. ``{"inputs": ..., "gold": ...}``
is taken as it is. A malformed row is an error naming its file and line.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from .program import Example, Program, program_inputs, spec_of  # noqa: F401 - re-exported
from .textfiles import lines


def to_example(row: Any, input_fields: Sequence[str] | None, where: str) -> Example:
    if isinstance(row, Example):
        return row
    if callable(getattr(row, "inputs", None)) and callable(getattr(row, "toDict", None)):  # a dspy.Example
        fields = dict(row.toDict())
        try:
            keys = list(row.inputs().keys())
        except ValueError:  # no .with_inputs(...): split by the program's inputs
            keys = list(input_fields or [])
        if not keys:
            raise ValueError(f"{where}: a dspy.Example without .with_inputs(...); mark its inputs or pass "
                             f"input_fields=[...]")
        return to_example({"inputs": {k: fields[k] for k in keys if k in fields},
                           "gold": {k: v for k, v in fields.items() if k not in keys and k != "id"},
                           **({"id": fields["id"]} if "id" in fields else {})}, input_fields, where)
    if not isinstance(row, dict):
        raise ValueError(f"{where}: an example must be an Example or a JSON object/dict, got {type(row).__name__}")
    rid = str(row.get("id", where))
    if "inputs" in row and isinstance(row["inputs"], dict):
        gold = row.get("gold", {})
        if not isinstance(gold, dict):
            raise ValueError(f"{where}: 'gold' must be an object, got {type(gold).__name__}")
        return Example(rid, dict(row["inputs"]), dict(gold))
    if input_fields is None:
        raise ValueError(f"{where}: cannot tell inputs from gold fields: give input_fields=[...] or rows of the "
                         f"form {{\"inputs\": {{...}}, \"gold\": {{...}}}}")
    missing = [f for f in input_fields if f not in row]
    if missing:
        raise ValueError(f"{where}: missing input field(s) {missing}; the program takes {list(input_fields)}, "
                         f"the row has {sorted(row)}")
    inputs = {f: row[f] for f in input_fields}
    gold = {k: v for k, v in row.items() if k not in inputs and k != "id"}
    return Example(rid, inputs, gold)


def to_examples(rows: Iterable[Any], input_fields: Sequence[str] | None, name: str = "data") -> list[Example]:
    out = [to_example(r, input_fields, f"{name}[{i}]") for i, r in enumerate(rows)]
    ids = [e.id for e in out]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"{name}: example ids must be unique; repeated: {dup}")
    return out


def read_jsonl(path: str | Path, input_fields: Sequence[str] | None) -> list[Example]:
    """One JSON object per line (blank lines skipped); ids default to 'FILE:LINE'."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    out = []
    for n, line in lines(path):
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if isinstance(row, dict) and "id" not in row:
            row = {**row, "id": f"{path.name}:{n}"}
        out.append(to_example(row, input_fields, where))
    if not out:
        raise ValueError(f"{path}: no examples in the file")
    return to_examples(out, input_fields, str(path))


def import_object(spec: str, what: str = "object") -> Any:
    """'package.module:attr' (or 'package.module.attr') -> the object, or an error naming what was tried."""
    if ":" in spec:
        mod_name, attr = spec.split(":", 1)
    elif "." in spec:
        mod_name, attr = spec.rsplit(".", 1)
    else:
        raise ValueError(f"{what} {spec!r}: write an import path like 'my_pkg.my_module:name'")
    if os.getcwd() not in sys.path and "" not in sys.path:  # the current folder, as `python -m` has it
        sys.path.append(os.getcwd())
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ValueError(f"{what} {spec!r}: cannot import module {mod_name!r} ({exc}); it must be importable "
                         f"from the current directory or the Python path") from None
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n in vars(mod) if not n.startswith("_"))[:20]
            raise ValueError(f"{what} {spec!r}: module {mod_name!r} has no attribute {attr!r}; it has {names}")
        obj = getattr(obj, part)
    return obj


def make_program(spec: str) -> Program:
    """A program from an import path: a Program subclass or a factory, called with no arguments."""
    obj = import_object(spec, "program")
    program = as_program(obj() if callable(obj) and not isinstance(obj, Program) else obj)
    if not callable(getattr(program, "named_modules", None)):
        raise ValueError(f"program {spec!r} gave a {type(program).__name__}, not an mmgrpo Program")
    return program


def is_dspy_module(obj: Any) -> bool:
    """A dspy.Module instance (checked without importing dspy, which is an optional extra)."""
    return any(c.__module__.split(".")[0] == "dspy" and c.__name__ == "Module" for c in type(obj).__mro__)


def as_program(obj: Any) -> Any:
    """An mmgrpo Program: ``obj`` itself, or a dspy.Module wrapped as one (needs mmgrpo[dspy])."""
    if is_dspy_module(obj):
        from .integrations.dspy import DSPyProgram

        return DSPyProgram(obj)
    return obj
