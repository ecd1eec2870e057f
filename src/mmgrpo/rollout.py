"""Run a program over examples x G samples, concurrently; score; keep every failure.

A ParseError makes a ``parse_failure`` trajectory scored ``format_failure_score``; any other
exception an ``error`` trajectory scored ``failure_score``. Calls made before the failure stay.
"""
from __future__ import annotations

import contextvars
import hashlib
import math
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Sequence

from . import trace
from .lm.base import LM, SamplingParams, using
from .program import Example, Metric, ParseError, Program
from .trace import ERROR, OK, PARSE_FAILURE, Trajectory


@dataclass
class RolloutResult:
    trajectories: list[Trajectory]  # ordered by (example, sample index), whatever finished first
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)

    def by_example(self) -> dict[str, list[Trajectory]]:
        out: dict[str, list[Trajectory]] = {}
        for t in self.trajectories:
            out.setdefault(t.example_id, []).append(t)
        return out

    @property
    def lm_calls(self) -> int:
        return sum(len(t.calls) for t in self.trajectories)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.completion_ids) for t in self.trajectories for c in t.calls)

    @property
    def rewards(self) -> list[float]:
        return [t.reward for t in self.trajectories]

    @property
    def outages(self) -> list[Trajectory]:
        return [t for t in self.trajectories if is_outage(t)]


def is_outage(t: Trajectory) -> bool:
    """A run stopped by an LM server that stayed unreachable (lm.openai.LMUnavailable), in the
    program or in its metric: not the policy's doing, so never scored as a bad answer."""
    return t.status == ERROR and t.outage


def caused_by_outage(exc: BaseException) -> bool:
    """Whether LMUnavailable is ``exc`` or in its chain (__cause__ / __context__): user or DSPy code
    that wraps the outage in an exception of its own still stopped on an outage."""
    from .lm.openai import LMUnavailable

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, LMUnavailable):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def trajectory_seed(seed: int, example_id: str, sample_index: int) -> int:
    digest = hashlib.sha256(f"{seed}|{example_id}|{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def run_one(program: Program, example: Example, metric: Metric, traj: Trajectory,
            format_failure_score: float = -1.0, failure_score: float = 0.0) -> Trajectory:
    """Run the program once inside the current LM context, recording into ``traj``."""
    with trace.recording(traj):
        try:
            pred = program(**example.inputs)
            traj.prediction = dict(pred)
        except ParseError as exc:
            traj.status, traj.error, traj.reward = PARSE_FAILURE, str(exc), format_failure_score
            return traj
        except Exception as exc:  # noqa: BLE001 - a failed rollout is data, not a crash
            traj.status, traj.reward, traj.outage = ERROR, failure_score, caused_by_outage(exc)
            traj.error = f"{type(exc).__name__}: {exc}\n" + traceback.format_exc(limit=3)
            return traj
    try:
        score = float(metric(example, pred))
        if not math.isfinite(score):
            raise ValueError(f"metric returned {score}")
        traj.reward = score
    except Exception as exc:  # noqa: BLE001
        traj.status, traj.reward, traj.outage = ERROR, failure_score, caused_by_outage(exc)
        traj.error = f"metric failed: {type(exc).__name__}: {exc}"
    return traj


def sample(program: Program, examples: Sequence[Example], metric: Metric, lm: LM, *, n_samples: int = 1,
           params: SamplingParams = SamplingParams(), concurrency: int = 8, seed: int = 0,
           format_failure_score: float = -1.0, failure_score: float = 0.0,
           progress: bool | None = None, desc: str = "rollouts") -> RolloutResult:
    if not examples:
        raise ValueError("no examples to run: the data set (or the split/limit chosen) is empty")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    jobs = [(ex, Trajectory(example_id=ex.id, sample_index=s, seed=trajectory_seed(seed, ex.id, s)))
            for ex in examples for s in range(n_samples)]
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    bar = tqdm(total=len(jobs), desc=desc, disable=(None if progress is None else not progress), leave=False)
    n_workers = max(1, min(concurrency, len(jobs)))
    trajs: list[Trajectory | None] = [None] * len(jobs)
    next_job = iter(range(len(jobs)))
    take = threading.Lock()
    stop = threading.Event()  # Ctrl-C: no program starts after it
    clients = getattr(lm, "clients", None)
    # every worker is declared before any starts and leaves only when no job is left, so a
    # deterministic backend's batches hold one request of every trajectory in flight
    with (clients(n_workers) if clients else nullcontext()) as slots:
        def worker():
            try:
                while not stop.is_set():
                    with take:
                        k = next(next_job, None)
                    if k is None:
                        return
                    ex, traj = jobs[k]
                    with using(lm, params):
                        trajs[k] = run_one(program, ex, metric, traj, format_failure_score, failure_score)
                    bar.update(1)
            finally:
                if slots is not None:
                    slots.leave()

        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            futures = [pool.submit(contextvars.copy_context().run, worker) for _ in range(n_workers)]
            try:
                for fut in futures:
                    fut.result()
            except KeyboardInterrupt:  # stop in seconds: the running batch ends, nothing new starts
                stop.set()
                if hasattr(lm, "cancel"):
                    lm.cancel()
                bar.close()
                raise
    bar.close()
    return RolloutResult(trajectories=trajs, seconds=time.perf_counter() - t0, counts=status_counts(trajs))


def status_counts(trajs: Sequence[Trajectory]) -> dict[str, int]:
    counts = {OK: 0, PARSE_FAILURE: 0, ERROR: 0}
    for t in trajs:
        counts[t.status] += 1
    return counts


@dataclass
class EvalResult:
    mean: float
    ci95: float  # half-width of the normal-approximation 95% interval
    n: int
    counts: dict[str, int]
    seconds: float
    scores: list[float]
    outages: int = 0  # runs stopped by an unreachable LM server (scored failure_score here)
    max_tokens: int = 0  # the completion budget of every LM call (a module's own cap may lower it)

    @property
    def errors(self) -> int:
        """Runs that raised an error other than a parse failure: scored 0, and said so."""
        return self.counts.get(ERROR, 0)

    def __str__(self) -> str:
        ci = "n/a" if self.ci95 is None or not math.isfinite(self.ci95) else f"{self.ci95:.3f}"
        return f"{self.mean:.3f} ± {ci} (95% CI, n={self.n})"


def mean_ci(xs: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    if n == 0:
        raise ValueError("no scores to average")
    m = sum(xs) / n
    if n < 2:
        return m, float("nan")
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, 1.96 * math.sqrt(var / n)


EVAL_MAX_TOKENS = 256  # evaluate()'s budget when no training budget is given (mmgrpo eval without a run)


def evaluate(program: Program, examples: Sequence[Example], metric: Metric, lm: LM, *, concurrency: int = 8,
             max_tokens: int | None = None, seed: int = 0, progress: bool | None = None,
             desc: str = "eval") -> EvalResult:
    """Greedy decoding, one run per example, at ``max_tokens`` a call (a training run passes its own
    budget, so that dev and test are scored as the policy was trained); a failed run scores 0 and
    is counted (``errors``)."""
    budget = max_tokens or EVAL_MAX_TOKENS
    params = SamplingParams(temperature=0.0, max_tokens=budget)
    res = sample(program, examples, metric, lm, n_samples=1, params=params, concurrency=concurrency, seed=seed,
                 format_failure_score=0.0, failure_score=0.0, progress=progress, desc=desc)
    scores = res.rewards
    m, ci = mean_ci(scores)
    return EvalResult(mean=m, ci95=ci, n=len(scores), counts=res.counts, seconds=res.seconds, scores=scores,
                      outages=len(res.outages), max_tokens=budget)
