"""What a task is: a program, an evaluation metric, a training reward, and seeded splits."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

from ..program import Example, Metric, Program


@dataclass
class Task:
    name: str
    make_program: Callable[[], Program]
    metric: Metric  # what is reported
    reward: Metric  # what is trained on (may give partial credit)
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    description: str = ""
    settings: dict[str, Any] = field(default_factory=dict)  # what was narrowed, for the report

    def split(self, name: str) -> list[Example]:
        if name not in ("train", "dev", "test"):
            raise ValueError(f"unknown split {name!r}: use train, dev or test")
        return getattr(self, name)


def data_path(*parts: str) -> Path:
    return Path(str(resources.files("mmgrpo.tasks").joinpath("data", *parts)))


def seeded_split(items: Sequence, sizes: Sequence[int], seed: int) -> list[list]:
    """Shuffle once with the seed and cut consecutive, disjoint slices."""
    order = list(items)
    random.Random(seed).shuffle(order)
    if sum(sizes) > len(order):
        raise ValueError(f"asked for {sum(sizes)} examples ({list(sizes)}) but only {len(order)} exist")
    out, start = [], 0
    for n in sizes:
        out.append(order[start:start + n])
        start += n
    return out
