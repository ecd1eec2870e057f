"""Shared set-up of the benchmarks: a real Banking77 batch of groups from the embedded model."""
from __future__ import annotations

import os
import platform
import time

import torch

from mmgrpo.config import TrainConfig
from mmgrpo.grpo.groups import assign_weights, compute_advantages, group_calls
from mmgrpo.grpo.trainer import Trainer
from mmgrpo.lm.base import SamplingParams
from mmgrpo.lm.hf import HFBackend
from mmgrpo.rollout import sample
from mmgrpo.tasks import get_task


def machine() -> str:
    return (f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}")


def banking77_groups(examples: int, group_size: int, n_labels: int = 10, max_tokens: int = 16, **cfg):
    """Roll out the demo program and group the calls (``cfg``: more TrainConfig fields of the
    trainer). Returns (trainer, grouping, timings)."""
    lm = HFBackend.load()
    task = get_task("banking77", n_labels=n_labels, n_demos=5, reasoning=False)
    program = task.make_program()
    trainer = Trainer(lm, TrainConfig(max_tokens=max_tokens, group_size=group_size, **cfg))
    t0 = time.perf_counter()
    roll = sample(program, task.train[:examples], task.reward, lm, n_samples=group_size,
                  params=SamplingParams(temperature=1.0, max_tokens=max_tokens), concurrency=32, progress=False)
    rollout_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    grouping = group_all(roll)
    group_s = time.perf_counter() - t0
    return trainer, grouping, {"rollout_s": rollout_s, "group_s": group_s}


def group_all(roll):
    """Module-level groups with advantages, every call in one: timing needs every sequence, so
    groups of equal rewards get spread rewards instead of being skipped."""
    by_example = roll.by_example()
    for trajs in by_example.values():
        if len({t.reward for t in trajs}) == 1:
            for k, t in enumerate(trajs):
                t.reward = float(k % 2)
    grouping = group_calls(by_example, "ragged")
    compute_advantages(grouping)
    assign_weights(grouping)
    return grouping


def mm_peak_gflops(sizes=(2048, 4096), repeats: int = 3, dtype=torch.float32) -> float:
    """Best torch.mm rate in ``dtype`` over square sizes (the machine's practical matmul limit)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return best
