"""GEPA (reflective prompt evolution) through the ``gepa`` package's adapter seam.

A candidate is one instruction per module; demos are kept as they are. The adapter runs the
program greedily on a batch, and turns each module's calls into reflection records (inputs,
reply, feedback from the metric and the gold fields) for the reflection LM, which is any LM of
this package: the policy model by default, or an OpenAI-compatible endpoint.

GEPA's own run_dir is not used: it pickles its state. The step is made resumable one level up
(compose.py saves its JSON result).
"""
from __future__ import annotations

import itertools
import json
from typing import Any, Callable, Sequence

from ..lm.base import LM, SamplingParams
from ..program import Example, Metric, Program
from ..rollout import sample
from ..trace import OK, PARSE_FAILURE, Trajectory
from .bootstrap import SearchResult


def default_feedback(example: Example, traj: Trajectory) -> str:
    if traj.status == PARSE_FAILURE:
        return (f"Score 0: the reply could not be read ({traj.error.splitlines()[0][:200]}). "
                "The reply must give every output as a 'field: value' line.")
    if traj.status != OK:
        return f"Score 0: the run failed ({(traj.error or '').splitlines()[0][:200]})."
    verdict = "correct" if traj.reward >= 1.0 else "not correct"
    return f"Score {traj.reward:.2f} ({verdict}). The expected answer: {json.dumps(example.gold, default=str)[:300]}"


class ProgramAdapter:
    """gepa.GEPAAdapter over a Program: evaluate a candidate, build reflection records."""

    propose_new_texts = None  # gepa's own reflective proposer, with our ReflectionLM

    def __init__(self, program: Program, metric: Metric, lm: LM, *, concurrency: int = 16, seed: int = 0,
                 feedback: Callable[[Example, Trajectory], str] = default_feedback, records_per_module: int = 4):
        self.program, self.metric, self.lm = program, metric, lm
        self.concurrency, self.seed, self.feedback = concurrency, seed, feedback
        self.records_per_module = records_per_module
        self.lm_calls = 0

    def load(self, candidate: dict[str, str]) -> None:
        state = self.program.prompt_state()
        for name, text in candidate.items():
            state[name]["instruction"] = text
        self.program.load_prompt_state(state)

    def evaluate(self, batch: list[Example], candidate: dict[str, str], capture_traces: bool = False):
        from gepa import EvaluationBatch

        self.load(candidate)
        res = sample(self.program, batch, self.metric, self.lm, n_samples=1,
                     params=SamplingParams(temperature=0.0, max_tokens=256), concurrency=self.concurrency,
                     seed=self.seed, format_failure_score=0.0, failure_score=0.0, progress=False)
        self.lm_calls += res.lm_calls
        trajs = res.trajectories
        return EvaluationBatch(outputs=[t.prediction for t in trajs], scores=[t.reward for t in trajs],
                               trajectories=list(zip(batch, trajs)) if capture_traces else None)

    def make_reflective_dataset(self, candidate: dict[str, str], eval_batch, components_to_update: list[str]):
        out: dict[str, list[dict[str, Any]]] = {}
        for name in components_to_update:
            records = []
            for ex, traj in eval_batch.trajectories or []:
                for call in [c for c in traj.calls if c.module == name][:2]:
                    records.append({"Inputs": {k: str(v)[:500] for k, v in call.inputs.items()},
                                    "Generated Outputs": call.text[:500], "Feedback": self.feedback(ex, traj)})
            # failures first: they say most about what the instruction should fix
            records.sort(key=lambda r: not r["Feedback"].startswith("Score 0"))
            out[name] = records[: self.records_per_module]
        return out


class ReflectionLM:
    """gepa's LanguageModel (prompt -> text) over an LM of this package; each call its own seed."""

    def __init__(self, lm: LM, temperature: float = 0.7, max_tokens: int = 256, seed: int = 0):
        self.lm, self.temperature, self.max_tokens = lm, temperature, max_tokens
        self._seeds = itertools.count(seed * 7919)
        self.calls = 0

    def __call__(self, prompt: str | list[dict]) -> str:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        self.calls += 1
        params = SamplingParams(temperature=self.temperature, top_p=0.95, max_tokens=self.max_tokens,
                                seed=next(self._seeds))
        return self.lm.chat(messages, params).text


class _Log:
    def __init__(self):
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(str(message))


def gepa_search(program: Program, train: Sequence[Example], dev: Sequence[Example], metric: Metric, lm: LM, *,
                reflection_lm: LM | None = None, max_metric_calls: int = 150, minibatch: int = 4,
                concurrency: int = 16, seed: int = 0, progress: bool = False) -> SearchResult:
    """Evolve every module's instruction with GEPA; load and return the best on ``dev``."""
    import gepa

    adapter = ProgramAdapter(program, metric, lm, concurrency=concurrency, seed=seed)
    seed_candidate = {name: s["instruction"] for name, s in program.prompt_state().items()}
    reflector = ReflectionLM(reflection_lm or lm, seed=seed)
    log = _Log()
    res = gepa.optimize(seed_candidate=seed_candidate, trainset=list(train), valset=list(dev), adapter=adapter,
                        reflection_lm=reflector, max_metric_calls=max_metric_calls,
                        reflection_minibatch_size=minibatch, seed=seed, logger=log,
                        display_progress_bar=progress, raise_on_exception=True)
    adapter.load(res.best_candidate)
    state = program.prompt_state()
    trials = [{"index": i, "instructions": c, "score": s, "parents": p}
              for i, (c, s, p) in enumerate(zip(res.candidates, res.val_aggregate_scores, res.parents))]
    return SearchResult(best=state, best_score=res.val_aggregate_scores[res.best_idx], trials=trials,
                        extra={"metric_calls": res.total_metric_calls, "reflection_calls": reflector.calls,
                               "program_lm_calls": adapter.lm_calls, "log": log.lines[-200:]})
