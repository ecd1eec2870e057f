"""Tasks by name."""
from __future__ import annotations

from typing import Any

from .base import Task

TASKS = ("banking77", "multihop", "papillon")


def get_task(name: str, **options: Any) -> Task:
    if name == "banking77":
        from .banking77 import make_task
    elif name == "multihop":
        from .multihop import make_task
    elif name == "papillon":
        from .papillon import make_task
    else:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    try:
        return make_task(**options)
    except TypeError as exc:
        raise ValueError(f"bad option for task {name!r}: {exc}") from exc
