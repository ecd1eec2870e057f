"""Per-module statistics of one step, so a multi-module program can be read module by module.

Pure: computed from the step's trajectories and grouping (and the update's per-module token sums).
"""
from __future__ import annotations

from typing import Sequence

from ..trace import ERROR, PARSE_FAILURE, Trajectory
from .groups import Grouping


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def module_stats(trajectories: Sequence[Trajectory], grouping: Grouping,
                 update: dict[str, dict] | None = None) -> dict[str, dict]:
    """For each module: calls and completion tokens sampled, calls cut at the token budget, parse failures (the module whose reply
    did not parse), groups used and skipped by reason, mean reward of the trajectories behind its
    calls, mean and mean |advantage| of its trained calls, the sampled tokens' mean negative log-prob
    (an estimate of the sampling entropy), and from the update its tokens, clip fraction and KL."""
    names = sorted({c.module for t in trajectories for c in t.calls} | {g.module for g in grouping.groups}
                   | {m for m, _ in grouping.skipped_by_module})
    out: dict[str, dict] = {}
    for mod in names:
        calls = [(t, c) for t in trajectories for c in t.calls if c.module == mod]
        logprobs = [lp for _, c in calls for lp in c.logprobs]
        members = [m for g in grouping.groups if g.module == mod for m in g.members]
        out[mod] = {
            "calls": len(calls),
            "completion_tokens": sum(len(c.completion_ids) for _, c in calls),
            "truncated": sum(1 for _, c in calls if c.finish_reason == "length"),  # cut at the token budget
            "parse_failures": sum(1 for t in trajectories if t.status == PARSE_FAILURE and t.calls
                                  and t.calls[-1].module == mod),
            "reward_mean": _mean([t.reward for t, _ in calls if t.status != ERROR]),
            "groups_used": sum(1 for g in grouping.groups if g.module == mod),
            "groups_skipped": {r: n for (m, r), n in sorted(grouping.skipped_by_module.items()) if m == mod},
            "advantage_mean": _mean([m.advantage for m in members]),
            "advantage_abs_mean": _mean([abs(m.advantage) for m in members]),
            "entropy": _mean([-lp for lp in logprobs]),
            **(update or {}).get(mod, {}),
        }
    return out


def sampled_entropy(trajectories: Sequence[Trajectory]) -> float | None:
    """Mean negative log-prob of every sampled token: an unbiased estimate of the entropy of the
    distribution they were drawn from (at the rollout temperature)."""
    return _mean([-lp for t in trajectories for c in t.calls for lp in c.logprobs])
