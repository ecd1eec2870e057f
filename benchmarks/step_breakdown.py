"""Seconds per phase of one mmGRPO step on Banking77 with the embedded model, and the update
with shared-prefix packing against the padded per-sequence update, on the same groups.

Usage: python benchmarks/step_breakdown.py [--examples 4] [--group-size 8] [--repeats 2]
Both updates run on the same rollouts in the same process, alternating; medians are printed.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

import torch

from mmgrpo.grpo.config import TrainConfig
from mmgrpo.grpo.groups import assign_weights, compute_advantages, group_calls
from mmgrpo.grpo.trainer import Trainer
from mmgrpo.lm.base import SamplingParams
from mmgrpo.lm.hf import HFBackend
from mmgrpo.rollout import sample
from mmgrpo.tasks import get_task


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--n-labels", type=int, default=10)
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    lm = HFBackend.load()
    task = get_task("banking77", n_labels=args.n_labels, n_demos=5, reasoning=False)
    program = task.make_program()
    cfg = TrainConfig(max_tokens=16, temperature=1.0, group_size=args.group_size)
    trainer = Trainer(lm, cfg)
    t0 = time.perf_counter()
    roll = sample(program, task.train[: args.examples], task.reward, lm, n_samples=args.group_size,
                  params=SamplingParams(temperature=1.0, max_tokens=16), concurrency=32, progress=False)
    rollout_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    grouping = group_calls(roll.by_example(), "ragged")
    compute_advantages(grouping)
    assign_weights(grouping)
    group_s = time.perf_counter() - t0
    if not grouping.groups:  # timing needs members: give every call a made-up spread of rewards
        grouping = group_calls(roll.by_example(), "ragged", min_size=1)
        for g in grouping.groups:
            for k, m in enumerate(g.members):
                m.advantage = (-1) ** k
    members = grouping.members
    prompt_toks = sum(len(m.call.prompt_ids) for m in members)
    comp_toks = sum(len(m.call.completion_ids) for m in members)
    state = copy.deepcopy({k: v.detach().clone() for k, v in trainer.model.state_dict().items() if "lora" in k})
    times = {True: [], False: []}
    for _ in range(args.repeats):
        for shared in (False, True):
            trainer.cfg = TrainConfig(**{**cfg.to_dict(), "shared_prefix": shared})
            trainer.model.load_state_dict(state, strict=False)
            t0 = time.perf_counter()
            trainer.update(grouping)
            times[shared].append(time.perf_counter() - t0)
    plain, packed = statistics.median(times[False]), statistics.median(times[True])
    print(f"batch: {args.examples} examples x G={args.group_size}: {len(members)} sequences, "
          f"{prompt_toks} prompt + {comp_toks} completion tokens; groups used {len(grouping.groups)}")
    print(f"{'phase':<28} {'seconds':>8}")
    print(f"{'rollout':<28} {rollout_s:>8.1f}")
    print(f"{'grouping + advantages':<28} {group_s:>8.3f}")
    print(f"{'update, padded (before)':<28} {plain:>8.1f}")
    print(f"{'update, shared prefix':<28} {packed:>8.1f}")
    print(f"shared-prefix / padded update time: {packed / plain:.2f}x "
          f"(median of {args.repeats}, alternating); step {rollout_s + plain:.1f}s -> {rollout_s + packed:.1f}s")


if __name__ == "__main__":
    main()
