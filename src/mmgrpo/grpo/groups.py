"""Module-level grouping of LM calls across the G trajectories of one example. Pure.

A group is the calls that share (example, module, invocation index); each member carries
its trajectory's reward, and its advantage is relative to the other members of its group.
Trajectories with status ``error`` (an exception, a dead judge, a crashing metric) are not the
model's doing and join no group; parse failures are, and keep their score.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from ..trace import ERROR, ModuleCall, Trajectory

MODES = ("truncate", "fill", "ragged")
LEVELS = ("module", "trajectory")
DENOMINATORS = ("batch", "informative")  # what the loss normalizes over (see [grpo] loss_denominator)


@dataclass
class Member:
    call: ModuleCall
    reward: float
    trajectory: int  # index of the trajectory within its example's G
    advantage: float = 0.0
    weight: float = 1.0  # per-trajectory normalization (see assign_weights)


@dataclass
class Group:
    example_id: str
    module: str
    index: int  # invocation index; -1 for trajectory-level groups
    members: list[Member]


@dataclass
class Grouping:
    groups: list[Group] = field(default_factory=list)  # the informative groups: trained on
    candidates: list[Group] = field(default_factory=list)  # every group formed, informative or not
    skipped: Counter = field(default_factory=Counter)  # reason -> number of groups
    skipped_by_module: Counter = field(default_factory=Counter)  # (module, reason) -> number of groups

    def __post_init__(self):
        if self.groups and not self.candidates:  # made by hand from informative groups alone
            self.candidates = list(self.groups)

    def skip(self, module: str, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n
        self.skipped_by_module[(module, reason)] += n

    @property
    def members(self) -> list[Member]:
        return [m for g in self.groups for m in g.members]

    @property
    def sampled(self) -> list[Member]:
        """Every sampled call that formed a group, with or without signal: the batch a loss
        normalizes over when every sampled completion counts (a zero advantage adds nothing else)."""
        return [m for g in self.candidates for m in g.members]

    def counts(self) -> dict[str, int]:
        return {"groups_used": len(self.groups), "samples": len(self.members),
                **{f"groups_skipped_{k}": v for k, v in sorted(self.skipped.items())}}


def _module_groups(example_id: str, trajs: Sequence[tuple[int, Trajectory]], mode: str,
                   grouping: Grouping) -> list[Group]:
    modules = sorted({c.module for _, t in trajs for c in t.calls})
    out = []
    for mod in modules:
        per = [(ti, t.calls_of(mod), t.reward) for ti, t in trajs]
        per = [p for p in per if p[1]]  # a trajectory that never reached the module has nothing to train
        lengths = [len(calls) for _, calls, _ in per]
        n_idx = min(lengths) if mode == "truncate" else max(lengths)
        if mode == "truncate" and max(lengths) > n_idx:  # later invocations some rollouts never reached
            grouping.skip(mod, "truncated", max(lengths) - n_idx)
        for i in range(n_idx):
            members = []
            for ti, calls, reward in per:
                if i < len(calls):
                    members.append(Member(calls[i], reward, ti))
                elif mode == "fill":  # pad with this trajectory's own last call of the module
                    members.append(Member(calls[-1], reward, ti))
            out.append(Group(example_id, mod, i, members))
    return out


def group_calls(by_example: dict[str, Sequence[Trajectory]], mode: str = "truncate", level: str = "module",
                min_size: int = 2) -> Grouping:
    """Form groups for every example; drop (and count) the groups that carry no signal."""
    if mode not in MODES:
        raise ValueError(f"unknown grouping mode {mode!r}; use one of {MODES}")
    if level not in LEVELS:
        raise ValueError(f"unknown grouping level {level!r}; use one of {LEVELS}")
    result = Grouping()
    for ex_id, all_trajs in by_example.items():
        trajs = [(ti, t) for ti, t in enumerate(all_trajs) if t.status != ERROR]
        failed = [t for t in all_trajs if t.status == ERROR]
        if level == "module":
            candidates = _module_groups(ex_id, trajs, mode, result)
        else:
            members = [Member(c, t.reward, ti) for ti, t in trajs for c in t.calls]
            candidates = [Group(ex_id, "*", -1, members)] if members else []
        if not candidates and all_trajs:
            result.skip("*", "errors" if failed and not trajs else "no_calls")  # "*": no module was reached
        result.candidates.extend(candidates)
        for g in candidates:
            rewards = [m.reward for m in g.members]
            size = len({m.trajectory for m in g.members})
            if size < min_size:
                # "errors" only when the failed rollouts had reached this call and would have made it big enough
                reached = sum(1 for t in failed if (len(t.calls) > 0 if g.index < 0 else len(t.calls_of(g.module)) > g.index))
                result.skip(g.module, "errors" if size + reached >= min_size else "too_small")
            elif max(rewards) - min(rewards) < 1e-12:
                result.skip(g.module, "equal_rewards")
            else:
                result.groups.append(g)
    return result


def compute_advantages(grouping: Grouping, scale_rewards: bool = True, eps: float = 1e-4) -> None:
    """Advantage = reward - group mean, divided by (group std + eps) when scale_rewards.

    Mean and std are over the group's trajectories, one reward each, however many calls a
    trajectory has in the group (trajectory-level groups hold all of its calls)."""
    for g in grouping.groups:
        rs = list({m.trajectory: m.reward for m in g.members}.values())
        mean = sum(rs) / len(rs)
        std = math.sqrt(sum((r - mean) ** 2 for r in rs) / len(rs))
        for m in g.members:
            m.advantage = (m.reward - mean) / (std + eps) if scale_rewards else m.reward - mean


def assign_weights(grouping: Grouping, per_trajectory: bool = True, denominator: str = "informative") -> None:
    """With per_trajectory, each trajectory's calls share a total weight of 1 per example, so a
    trajectory with many calls does not outweigh one with few: its calls in informative groups
    (denominator "informative"), or all its grouped calls (denominator "batch", where the calls
    without signal count too)."""
    if denominator not in DENOMINATORS:
        raise ValueError(f"unknown loss denominator {denominator!r}; use one of {DENOMINATORS}")
    pool = grouping.candidates if denominator == "batch" else grouping.groups
    if not per_trajectory:
        for g in pool:
            for m in g.members:
                m.weight = 1.0
        return
    count = Counter((g.example_id, m.trajectory) for g in pool for m in g.members)
    for g in pool:
        for m in g.members:
            m.weight = 1.0 / count[(g.example_id, m.trajectory)]
