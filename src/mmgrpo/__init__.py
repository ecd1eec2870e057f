"""mmgrpo: multi-module GRPO and prompt optimization for LM programs.

``mmgrpo.optimize(program, train, dev, metric, strategy="prompts -> weights")`` returns an
``OptimizedProgram``; ``result.save(dir)`` and ``mmgrpo.load(dir)`` keep it. The heavy parts
(torch, transformers) load on first use. (The prompt optimizers live in ``mmgrpo.optimizers``:
a subpackage named ``optimize`` would shadow the function.)
"""
import os
from typing import Any

# torch's OpenMP threads spin ~300,000 times after each op before sleeping (libgomp's default). Beside
# another busy process each of the many small ops of decoding then waits for a scheduler tick: greedy
# decoding ran 6-22x slower beside a 2-thread torch process. 10,000 spins keep the speed of a machine to
# yourself and lose less when shared (benchmarks/omp_spin.py; docs/performance.md). Set OMP_WAIT_POLICY or
# GOMP_SPINCOUNT yourself to choose otherwise (PASSIVE: best when shared, ~25% slower decoding alone).
# Read once, when torch starts OpenMP: import mmgrpo before torch.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"

__version__ = "0.1.0"

_LAZY = {"optimize": "api", "load": "api", "OptimizedProgram": "result", "Program": "program",
         "Module": "program", "Example": "program", "Prediction": "program", "ParseError": "program"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'mmgrpo' has no attribute {name!r}")


__all__ = sorted(_LAZY)
