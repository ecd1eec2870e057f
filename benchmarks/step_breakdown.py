"""Seconds per phase of one mmGRPO step on Banking77 with the embedded model, and the update
with shared-prefix packing against the padded per-sequence update, on the same groups.

Usage: python benchmarks/step_breakdown.py [--examples 4] [--group-size 8] [--repeats 2]
Both updates run on the same rollouts in the same process, alternating; medians are printed.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

from common import banking77_groups, machine

from mmgrpo.config import TrainConfig


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--n-labels", type=int, default=10)
    args = ap.parse_args()
    print(machine())
    trainer, grouping, t = banking77_groups(args.examples, args.group_size, args.n_labels)
    cfg = trainer.cfg
    rollout_s, group_s = t["rollout_s"], t["group_s"]
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
          f"{prompt_toks} prompt + {comp_toks} completion tokens; {len(grouping.groups)} groups")
    print(f"{'phase':<28} {'seconds':>8}")
    print(f"{'rollout':<28} {rollout_s:>8.1f}")
    print(f"{'grouping + advantages':<28} {group_s:>8.3f}")
    print(f"{'update, padded (before)':<28} {plain:>8.1f}")
    print(f"{'update, shared prefix':<28} {packed:>8.1f}")
    print(f"shared-prefix / padded update time: {packed / plain:.2f}x "
          f"(median of {args.repeats}, alternating); step {rollout_s + plain:.1f}s -> {rollout_s + packed:.1f}s")


if __name__ == "__main__":
    main()
