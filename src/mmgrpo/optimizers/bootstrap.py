"""Few-shot bootstrapping: demos from the program's own successful traces, then a random search
over demo sets scored on a dev minibatch.

A multi-module program gets demos for every module from the same successful runs: each call
of a passing trajectory becomes a demo (its inputs and parsed outputs) for its own module.
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from typing import Sequence

from ..lm.base import LM, SamplingParams
from ..program import Example, Metric, Program
from ..rollout import evaluate, sample
from ..trace import OK


def bootstrap_pool(program: Program, examples: Sequence[Example], metric: Metric, lm: LM, *,
                   threshold: float = 1.0, temperature: float = 0.0, concurrency: int = 16,
                   seed: int = 0, progress: bool = False) -> dict[str, list[dict]]:
    """Every module's candidate demos, from trajectories whose metric is >= threshold."""
    res = sample(program, examples, metric, lm, n_samples=1, concurrency=concurrency, seed=seed,
                 params=SamplingParams(temperature=temperature, max_tokens=256), format_failure_score=0.0,
                 progress=progress, desc="bootstrap: demo pool")
    pool: dict[str, list[dict]] = {name: [] for name in program.named_modules()}
    for t in res.trajectories:
        if t.status != OK or t.reward < threshold:
            continue
        for call in t.calls:
            if call.outputs is not None and call.module in pool:
                pool[call.module].append({**call.inputs, **call.outputs, "_example": t.example_id})
    return pool


def as_demo(entry: dict) -> dict:
    """A pool entry without its bookkeeping (the id of the example it came from)."""
    return {f: v for f, v in entry.items() if f != "_example"}


@dataclass
class Trial:
    index: int
    demos: dict[str, list[str]]  # module -> example ids of its demos
    score: float
    ci95: float


@dataclass
class SearchResult:
    best: dict[str, dict]  # the winning prompt state
    best_score: float
    trials: list = field(default_factory=list)  # every configuration scored, in order
    pool_sizes: dict[str, int] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # optimizer-specific record (proposals, ...)


def random_search(program: Program, train: Sequence[Example], dev: Sequence[Example], metric: Metric, lm: LM, *,
                  n_candidates: int = 6, max_demos: int = 4, threshold: float = 1.0, concurrency: int = 16,
                  seed: int = 0, progress: bool = False) -> SearchResult:
    """Score the current prompts and ``n_candidates - 1`` seeded demo sets on ``dev``; load the best."""
    from tqdm.auto import tqdm

    pool = bootstrap_pool(program, train, metric, lm, threshold=threshold, concurrency=concurrency, seed=seed,
                          progress=progress)
    base = copy.deepcopy(program.prompt_state())
    rng = random.Random(seed)
    result = SearchResult(best=base, best_score=float("-inf"), pool_sizes={m: len(d) for m, d in pool.items()})
    for k in tqdm(range(n_candidates), desc="bootstrap candidates", disable=not progress, leave=False):
        state = copy.deepcopy(base)
        chosen: dict[str, list[str]] = {}
        if k > 0:  # candidate 0 is the program as it is
            for mod, demos in pool.items():
                pick = rng.sample(demos, min(max_demos, len(demos)))
                state[mod]["demos"] = [as_demo(d) for d in pick]
                chosen[mod] = [d["_example"] for d in pick]
        program.load_prompt_state(state)
        ev = evaluate(program, dev, metric, lm, concurrency=concurrency, seed=seed, progress=False)
        result.trials.append(Trial(k, chosen, ev.mean, ev.ci95))
        if ev.mean > result.best_score:
            result.best, result.best_score = state, ev.mean
    program.load_prompt_state(result.best)
    return result
