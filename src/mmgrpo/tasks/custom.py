"""Your own program as a task: a program, a metric (and reward) and examples, by import path and JSONL."""
from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

from ..data import import_object, make_program, program_inputs, read_jsonl, to_examples
from ..program import Example, Program
from .base import Task


def program_task(program: Program, train: Sequence[Any], dev: Sequence[Any], metric: Callable,
                 reward: Callable | None = None, test: Sequence[Any] | None = None, name: str = "program",
                 input_fields: Sequence[str] | None = None, settings: dict | None = None) -> Task:
    """A Task around a program instance; each run gets a deep copy, so the caller's stays as it was."""
    fields = list(input_fields) if input_fields else program_inputs(program)
    train_ex = to_examples(train, fields, "train")
    dev_ex = to_examples(dev, fields, "dev")
    test_ex = to_examples(test, fields, "test") if test else []
    if not train_ex or not dev_ex:
        raise ValueError("optimize needs at least one training and one dev example")
    return Task(name=name, make_program=lambda: copy.deepcopy(program), metric=metric, reward=reward or metric,
                train=train_ex, dev=dev_ex, test=test_ex, description=(type(program).__doc__ or "").strip(),
                settings={"input_fields": fields, **(settings or {})})


def task_from_paths(program: str, metric: str, train: str, dev: str, test: str | None = None,
                    reward: str | None = None) -> Task:
    from pathlib import Path

    from ..runlog import file_sha256

    train, dev, test = (str(Path(p).resolve()) if p else None for p in (train, dev, test))  # from any folder
    prog = make_program(program)
    fields = program_inputs(prog)
    rows: dict[str, list[Example]] = {k: read_jsonl(p, fields) for k, p in (("train", train), ("dev", dev),
                                                                              ("test", test)) if p}
    return program_task(prog, rows["train"], rows["dev"], import_object(metric, "metric"),
                        import_object(reward, "reward") if reward else None, rows.get("test"),
                        name=program.rsplit(":", 1)[-1].rsplit(".", 1)[-1], input_fields=fields,
                        settings={"program": program, "metric": metric, "data": {"train": train, "dev": dev,
                                                                                 "test": test},
                                  "data_sha256": {k: file_sha256(p) for k, p in (("train", train), ("dev", dev),
                                                                                 ("test", test)) if p}})
