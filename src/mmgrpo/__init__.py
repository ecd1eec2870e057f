"""mmgrpo: multi-module GRPO and prompt optimization for LM programs.

``mmgrpo.optimize(program, train, dev, metric, strategy="prompts -> weights")`` returns an
``OptimizedProgram``; ``result.save(dir)`` and ``mmgrpo.load(dir)`` keep it. The heavy parts
(torch, transformers) load on first use. (The prompt optimizers live in ``mmgrpo.optimizers``:
a subpackage named ``optimize`` would shadow the function.)
"""
from typing import Any

__version__ = "0.1.0"

_LAZY = {"optimize": "api", "load": "api", "OptimizedProgram": "result", "Program": "program",
         "Module": "program", "Example": "program", "Prediction": "program", "ParseError": "program"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'mmgrpo' has no attribute {name!r}")


__all__ = sorted(_LAZY)
