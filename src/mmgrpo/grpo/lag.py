"""Rollouts overlapped with updates, at a bounded policy lag (``[rollout] max_policy_lag`` = k).

Step t is sampled by policy version ``version_for(t, k)`` = max(0, t - 1 - k), version v being the
weights after step v's update; so while step t's update runs, one producer thread samples steps
t+1 ... t+k. The schedule is a function of the step alone: a run is the same whatever the timing, and
a resumed run redoes the rollouts that were in flight with the versions its checkpoint kept.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..lm.base import newest_at_most


def version_for(step: int, lag: int) -> int:
    """The policy version that samples step ``step`` (1-based) at lag ``lag``."""
    return max(0, step - 1 - lag)


def policy_lags(trajectories, step: int) -> list[int]:
    """How many versions behind the weights that step ``step`` updates (version step - 1) each
    trajectory was sampled: its oldest call's recorded policy version (none: 0)."""
    return [(step - 1) - min(c.policy_version for c in t.calls) if t.calls else 0 for t in trajectories]


def drop_stale(by_example: dict[str, list], step: int, max_lag: int) -> tuple[dict[str, list], dict]:
    """The trajectories of each example that step ``step`` may train on (sampled at most ``max_lag``
    versions ago), and the step's lag record: mean and max lag, how many were too stale."""
    lags = {id(t): lag for ts in by_example.values() for t, lag in zip(ts, policy_lags(ts, step))}
    kept = {k: [t for t in ts if lags[id(t)] <= max_lag] for k, ts in by_example.items()}
    return kept, {"policy_lag_mean": sum(lags.values()) / max(len(lags), 1),
                  "policy_lag_max": max(lags.values(), default=0),
                  "n_stale": sum(v > max_lag for v in lags.values())}


def oldest_needed(step: int, lag: int) -> int:
    """The oldest version the steps after ``step`` will sample with."""
    return version_for(step + 1, lag)


class LaggedRollouts:
    """The producer thread and the policy versions it samples with. ``job`` is the `MMGRPO` run:
    its backend takes the snapshots (in-process it pins them into the sampler copy; with servers
    the pushed adapters sample and the snapshots are for checkpoints)."""

    def __init__(self, job, lag: int):
        self.job, self.lag = job, lag
        self.versions: dict[int, dict[str, torch.Tensor]] = {}  # version -> policy snapshot
        self.pending: dict[int, Future] = {}  # step -> its rollouts
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="mmgrpo-lagged-rollouts")
        self.last = 0  # the newest step whose update has finished (its version exists)

    # ---- versions -----------------------------------------------------------------------
    def start(self, step: int, kept: dict[int, dict[str, torch.Tensor]]) -> None:
        """At the start (``step`` = 0) or a resume from step ``step``: the live weights are version
        ``step``; ``kept`` the older versions its checkpoint kept."""
        self.last = step
        self.versions = {**kept, step: self.job.backend.policy_snapshot()}

    def finished(self, step: int, updated: bool) -> None:
        """Step ``step``'s update is done: its weights are version ``step`` (a new snapshot only when
        they changed); versions no later step samples with are dropped."""
        self.last = step
        if updated:
            self.versions[step] = self.job.backend.policy_snapshot()
        keep = newest_at_most(self.versions, oldest_needed(step, self.lag))
        self.versions = {v: s for v, s in self.versions.items() if v >= keep}

    def kept(self) -> dict[int, dict[str, torch.Tensor]]:
        """The versions a checkpoint of the last finished step keeps: those older than it that later
        steps still sample with (the newest is the checkpoint's own adapter)."""
        return {v: s for v, s in self.versions.items() if v < self.last}

    def policy(self, version: int):
        """The LM that samples policy ``version`` (called on the producer thread)."""
        job = self.job
        if job.sampler is job.backend:
            return job.backend.pin(self.versions[newest_at_most(self.versions, version)], version)
        return job.sampler.at(version)

    # ---- the producer -------------------------------------------------------------------
    def take(self, step: int, last_step: int):
        """Step ``step``'s rollouts: every step up to ``step`` + k whose version exists is sent to the
        producer (in order) first, so they are sampled while this step's update runs."""
        for t in range(step, min(step + self.lag, last_step) + 1):
            if t not in self.pending and version_for(t, self.lag) <= self.last:
                self.pending[t] = self.pool.submit(self._sample, t)
        if step not in self.pending:  # cannot happen with the schedule above; a clear error if it does
            raise RuntimeError(f"the rollouts of step {step} were never started (newest version {self.last})")
        return self.pending.pop(step).result()

    def _sample(self, step: int):
        return self.job.rollouts(step, self.policy(version_for(step, self.lag)))

    def drain(self) -> None:
        """Wait for the rollouts in flight (an in-process evaluation re-syncs the sampler copy they
        sample from); their results stay kept for their steps."""
        for f in list(self.pending.values()):
            f.exception()

    def close(self) -> None:
        for f in self.pending.values():
            f.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()
