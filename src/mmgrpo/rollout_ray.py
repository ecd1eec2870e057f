"""Rollouts in Ray actors, for programs whose tools, retrieval or outside LMs outgrow one machine.

Each actor holds a copy of the program (its factory and metric shipped by Ray's pickling, its
prompts sent with every call) and a ``RemotePolicy`` over the same inference servers as the
driver. Work is spread by example (G samples each); results come back in the order of local
rollouts. An actor that dies has its examples run again on another one (counted in
``RolloutResult.counts['worker_retries']``); its replacement is started in the background. Ray is
an optional dependency (``pip install 'mmgrpo[ray]'``), imported only here.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, Sequence

from .lm.base import SamplingParams
from .program import Example, Metric
from .rollout import RolloutResult, sample, status_counts


def _ray():
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("rollout.workers > 0 runs rollouts in Ray actors: pip install 'mmgrpo[ray]' "
                          "(or set rollout.workers = 0 for in-process rollouts)") from exc
    return ray


class RolloutWorkersFailed(RuntimeError):
    """Rollout workers raised, kept dying or never answered: the step is not trained on."""


def runtime_env(address: str | None, make_program: Callable, metric: Metric) -> dict:
    """What the workers need to import the program and metric: on a local cluster the driver's own
    import path; on another machine the source of their top-level packages (Ray's py_modules),
    unless they are installed packages there as here."""
    if not address or address == "local":
        return {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}}
    modules = []
    for obj in (make_program, metric):
        mod = sys.modules.get(getattr(obj, "__module__", "") or "")
        top = sys.modules.get((getattr(mod, "__name__", "") or "").split(".")[0])
        path = getattr(top, "__file__", None)
        if path and "site-packages" not in path and "dist-packages" not in path:
            src = os.path.dirname(path) if os.path.basename(path) == "__init__.py" else path
            if src not in modules:
                modules.append(src)
    return {"py_modules": modules} if modules else {}


class RolloutWorker:
    """One actor: a program and a client of the policy servers."""

    def __init__(self, make_program: Callable, metric: Metric, policy: dict):
        from .lm.remote import RemotePolicy

        self.make_program, self.metric = make_program, metric
        self.policy = RemotePolicy(**policy)

    def pid(self) -> int:
        return os.getpid()

    def run(self, examples: list[Example], prompts: dict, model: str, version: int, n_samples: int,
            params: SamplingParams, seed: int, format_failure_score: float, failure_score: float,
            concurrency: int) -> RolloutResult:
        program = self.make_program()
        program.load_prompt_state(prompts)
        self.policy.model, self.policy.version = model, version  # the version the driver pushed
        return sample(program, examples, self.metric, self.policy, n_samples=n_samples, params=params,
                      concurrency=concurrency, seed=seed, format_failure_score=format_failure_score,
                      failure_score=failure_score, progress=False)


class RaySampler:
    """``n_workers`` rollout actors on a Ray cluster (``address``: None starts a local one)."""

    def __init__(self, n_workers: int, make_program: Callable, metric: Metric, policy: dict,
                 address: str | None = None, cpus_per_worker: float = 1.0, timeout_s: float = 3600.0):
        ray = _ray()
        if not ray.is_initialized():
            ray.init(address=address or None, runtime_env=runtime_env(address, make_program, metric),
                     include_dashboard=False, log_to_driver=False, configure_logging=False)
        self.ray, self.timeout_s = ray, timeout_s
        self.actor_cls = ray.remote(num_cpus=cpus_per_worker, max_concurrency=64)(RolloutWorker)
        self.args = (make_program, metric, policy)
        self.workers = [self._start() for _ in range(n_workers)]
        self.last_retried: list[str] = []  # examples run again in the last call, their worker having died

    def _start(self):
        return self.actor_cls.remote(*self.args)

    @property
    def actor_pids(self) -> list[int]:
        return self.ray.get([w.pid.remote() for w in self.workers])

    def sample(self, program, examples: Sequence[Example], *, n_samples: int, params: SamplingParams, seed: int,
               model: str, version: int, format_failure_score: float = -1.0, failure_score: float = 0.0,
               concurrency: int = 8, max_tries: int = 3) -> RolloutResult:
        """The same trajectories, in the same order, as ``rollout.sample`` on these examples."""
        if not examples:
            raise ValueError("no examples to run: the data set (or the split/limit chosen) is empty")
        t0 = time.perf_counter()
        prompts = program.prompt_state()

        def submit(k: int, w: int, tries: int) -> None:
            # the seed of sample s of example e is trajectory_seed(seed, e.id, s) wherever it runs
            actor = self.workers[w]
            ref = actor.run.remote([examples[k]], prompts, model, version, n_samples, params, seed,
                                   format_failure_score, failure_score, concurrency)
            pending[ref] = (k, w, actor, tries)

        pending: dict = {}
        for k in range(len(examples)):
            submit(k, k % len(self.workers), 1)
        done: dict[int, RolloutResult] = {}
        retried: list[str] = []  # ids of the examples run again: every one in flight on a dead worker
        deadline = time.monotonic() + self.timeout_s
        while pending:
            ready, _ = self.ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:  # a worker that never answers is a failure, not a wait without end: replaced
                for ref, (_, w, actor, _) in pending.items():
                    if self.workers[w] is actor:
                        self.ray.kill(actor)
                        self.workers[w] = self._start()
                first = examples[next(iter(pending.values()))[0]].id
                raise RolloutWorkersFailed(f"{len(pending)} examples (first: {first}) got no answer from their "
                                           f"rollout workers in {self.timeout_s:.0f} s")
            k, w, actor, tries = pending.pop(ready[0])
            try:
                done[k] = self.ray.get(ready[0])
            except self.ray.exceptions.RayTaskError as exc:  # the worker's code raised: not the policy's doing
                for ref in pending:
                    try:
                        self.ray.cancel(ref)
                    except Exception:  # noqa: BLE001 - already finished or gone
                        pass
                raise RolloutWorkersFailed(f"example {examples[k].id}: its rollout worker raised "
                                           f"{str(exc).strip().splitlines()[-1][:300]}") from exc
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.WorkerCrashedError) as exc:
                if tries >= max_tries:
                    raise RolloutWorkersFailed(f"example {examples[k].id}: its rollout worker died {tries} times; "
                                               f"last: {type(exc).__name__}: {exc}") from exc
                retried.append(examples[k].id)
                if self.workers[w] is actor:  # the first of its examples to report: start a replacement
                    self.workers[w] = self._start()
                submit(k, (w + 1) % len(self.workers), tries + 1)  # another worker (the new one if alone)
        self.last_retried = retried
        trajs = [t for k in range(len(examples)) for t in done[k].trajectories]
        return RolloutResult(trajectories=trajs, seconds=time.perf_counter() - t0,
                             counts={**status_counts(trajs), "worker_retries": len(retried)})

    def close(self) -> None:
        for w in self.workers:
            try:
                self.ray.kill(w)
            except Exception:  # noqa: BLE001
                pass
        self.workers = []


def policy_settings(policy) -> dict:
    """What a worker needs to reach the driver's policy servers (the tokenizer travels pickled)."""
    s = policy.servers[0]
    return {"urls": [h.base_url for h in policy.servers], "tokenizer": policy.tokenizer, "model": policy.base,
            "timeout_s": s.timeout_s, "retries": s.retries, "backoff_s": s.backoff_s}

