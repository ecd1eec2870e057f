"""MIPROv2-style search: a proposer LM drafts instructions for every module, then a Bayesian
search (Optuna's TPE) over one (instruction, demo set) choice per module, scored on seeded dev
minibatches; the few best configurations are scored on the full dev set and the winner loaded.
Demo sets mix demos bootstrapped from passing traces with labelled training examples.

Candidate 0 of every choice is what the program has now, and the first trial is the program as
it is, so the search never returns something it scored below the starting point on full dev.
"""
from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass, field
from typing import Sequence

from ..lm.base import LM, SamplingParams, using
from ..program import Example, Metric, Module, ParseError, Program
from ..rollout import evaluate
from .bootstrap import SearchResult, as_demo, bootstrap_pool

TIPS = ("", "Be concise.", "Name the step's goal first, then how to reach it.", "Mention the most common mistake.",
        "Write it for a careful beginner.", "Be specific about the output format.")

PROPOSER = Module(
    "propose_instruction", inputs=["task", "step", "current_instruction", "examples", "tip"], outputs=["instruction"],
    instruction=("You improve the instruction of one step of a language-model program. Read the task, the step's "
                 "inputs and outputs, its current instruction and examples of the step done well, then write a "
                 "better instruction for that step in one to three sentences."),
    field_notes={"instruction": "the new instruction"}, max_tokens=96, lenient=True)


@dataclass
class MiproTrial:
    index: int
    params: dict[str, int]  # "<module>.instruction" / "<module>.demos" -> candidate index
    score: float  # on this trial's dev minibatch
    n: int
    full_score: float | None = None  # on the whole dev set, for the few best configurations
    full_ci95: float | None = None


@dataclass
class Candidates:
    instructions: dict[str, list[str]] = field(default_factory=dict)
    demo_sets: dict[str, list[list[dict]]] = field(default_factory=dict)
    rejected: list[dict] = field(default_factory=list)  # proposals dropped, with the reason


def _show(d: dict) -> str:
    return "\n".join(f"{k}: {v}" for k, v in as_demo(d).items())


def _clean(text: str) -> str:
    text = text.strip().strip('"').strip()
    return text.split("\n\n")[0].strip()[:600]


def propose_instructions(program: Program, pool: dict[str, list[dict]], proposer: LM, *, n: int, description: str,
                         seed: int = 0) -> tuple[dict[str, list[str]], list[dict]]:
    """``n`` instructions per module: the current one, then up to ``n - 1`` distinct proposals."""
    rng = random.Random(seed)
    out, rejected = {}, []
    for name, mod in program.named_modules().items():
        cands = [mod.instruction]
        for k in range(max(0, n - 1) * 2):  # a few spare tries for empty or repeated drafts
            if len(cands) >= n:
                break
            shown = rng.sample(pool.get(name, []), min(3, len(pool.get(name, []))))
            values = {"task": description or "(not given)",
                      "step": f"{name}: takes {', '.join(mod.inputs)}; writes {', '.join(mod.outputs)}",
                      "current_instruction": mod.instruction,
                      "examples": "\n---\n".join(_show(d) for d in shown) or "(none yet)", "tip": TIPS[k % len(TIPS)]}
            params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=96, seed=seed * 1009 + k)
            try:
                with using(proposer, params):
                    text = _clean(PROPOSER(**values)["instruction"])
            except (ParseError, ValueError) as exc:
                rejected.append({"module": name, "reason": f"unreadable: {exc}"})
                continue
            if len(text) < 12:
                rejected.append({"module": name, "reason": "too short", "text": text})
            elif text in cands:
                rejected.append({"module": name, "reason": "repeat", "text": text})
            else:
                cands.append(text)
        out[name] = cands
    return out, rejected


def labelled_pool(program: Program, train: Sequence[Example]) -> dict[str, list[dict]]:
    """Training examples as demos, for each module whose inputs and outputs the examples carry
    (MIPROv2's labelled demos: they show answers the model does not give yet)."""
    out = {}
    for name, mod in program.named_modules().items():
        out[name] = [{**{f: ex.inputs[f] for f in mod.inputs}, **{f: ex.gold[f] for f in mod.outputs},
                      "_example": ex.id} for ex in train
                     if all(f in ex.inputs for f in mod.inputs) and all(f in ex.gold for f in mod.outputs)]
    return out


def _key(d: dict, fields: list[str]) -> str:
    return json.dumps({f: d.get(f) for f in fields}, sort_keys=True, default=str)


def demo_sets(program: Program, pool: dict[str, list[dict]], n: int, max_demos: int, seed: int,
              labelled: dict[str, list[dict]] | None = None) -> dict:
    """Set 0: the module's demos as they are; each other set adds up to ``max_demos`` bootstrapped
    and up to ``max_demos`` labelled demos to them, never repeating an input already shown."""
    rng = random.Random(seed)
    out = {}
    for name, mod in program.named_modules().items():
        sets = [list(mod.demos)]
        shown = {_key(d, mod.inputs) for d in mod.demos}
        boot = [d for d in pool.get(name, []) if _key(d, mod.inputs) not in shown]
        lab = [d for d in (labelled or {}).get(name, []) if _key(d, mod.inputs) not in shown]
        for _ in range(n - 1):
            if not boot and not lab:
                break
            pick = rng.sample(boot, min(max_demos, len(boot)))
            taken = {_key(d, mod.inputs) for d in pick}
            rest = [d for d in lab if _key(d, mod.inputs) not in taken]
            pick += rng.sample(rest, min(max_demos, len(rest)))
            sets.append(list(mod.demos) + [as_demo(d) for d in pick])
        out[name] = sets
    return out


def mipro(program: Program, train: Sequence[Example], dev: Sequence[Example], metric: Metric, lm: LM, *,
          proposer: LM | None = None, description: str = "", n_instructions: int = 4, n_demo_sets: int = 4,
          max_demos: int = 4, trials: int = 10, minibatch: int = 20, top_k: int = 3, threshold: float = 1.0,
          concurrency: int = 16, seed: int = 0, progress: bool = False) -> SearchResult:
    import optuna

    pool = bootstrap_pool(program, train, metric, lm, threshold=threshold, concurrency=concurrency, seed=seed,
                          progress=progress)
    instructions, rejected = propose_instructions(program, pool, proposer or lm, n=n_instructions,
                                                  description=description, seed=seed)
    sets = demo_sets(program, pool, n_demo_sets, max_demos, seed, labelled=labelled_pool(program, train))
    base = copy.deepcopy(program.prompt_state())

    def state_for(params: dict[str, int]) -> dict:
        state = copy.deepcopy(base)
        for name in state:
            state[name]["instruction"] = instructions[name][params[f"{name}.instruction"]]
            state[name]["demos"] = copy.deepcopy(sets[name][params[f"{name}.demos"]])
        return state

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    start = {f"{n}.{kind}": 0 for n in base for kind in ("instruction", "demos")}
    study.enqueue_trial(start)
    rng = random.Random(seed + 1)
    record: list[MiproTrial] = []
    from tqdm.auto import tqdm

    for t in tqdm(range(trials), desc="mipro", disable=not progress, leave=False):
        trial = study.ask()
        params = {f"{n}.instruction": trial.suggest_categorical(f"{n}.instruction", list(range(len(instructions[n]))))
                  for n in base}
        params.update({f"{n}.demos": trial.suggest_categorical(f"{n}.demos", list(range(len(sets[n])))) for n in base})
        batch = rng.sample(list(dev), min(minibatch, len(dev)))
        program.load_prompt_state(state_for(params))
        ev = evaluate(program, batch, metric, lm, concurrency=concurrency, seed=seed, progress=False)
        study.tell(trial, ev.mean)
        record.append(MiproTrial(t, params, ev.mean, ev.n))

    # the best few distinct configurations by mean minibatch score, then the full dev set decides
    by_config: dict[tuple, list[MiproTrial]] = {}
    for tr in record:
        by_config.setdefault(tuple(sorted(tr.params.items())), []).append(tr)
    ranked = sorted(by_config.values(), key=lambda trs: -sum(x.score for x in trs) / len(trs))
    if not any(tuple(sorted(start.items())) == tuple(sorted(trs[0].params.items())) for trs in ranked[:top_k]):
        ranked = ranked[: max(top_k - 1, 0)] + [by_config[tuple(sorted(start.items()))]]  # keep the start in
    result = SearchResult(best=base, best_score=float("-inf"), pool_sizes={m: len(d) for m, d in pool.items()})
    finalists = ranked[:top_k]
    for i, trs in enumerate(finalists):
        state = state_for(trs[0].params)
        program.load_prompt_state(state)
        ev = evaluate(program, dev, metric, lm, concurrency=concurrency, seed=seed, progress=progress,
                      desc=f"mipro: re-score {i + 1}/{len(finalists)}")
        for tr in trs:
            tr.full_score, tr.full_ci95 = ev.mean, ev.ci95
        if ev.mean > result.best_score:
            result.best, result.best_score = state, ev.mean
    result.trials = record
    result.extra = {"instructions": instructions, "demo_sets": {n: len(s) for n, s in sets.items()},
                    "rejected_proposals": rejected}
    program.load_prompt_state(result.best)
    return result
