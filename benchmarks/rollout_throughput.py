"""Rollout throughput on the embedded model: 1, 8 and 32 concurrent programs vs sequential,
with deterministic batching (the default: a batch waits for every running program) and without
(a batch starts after 50 ms), each with continuous batching (a finished row's slot is refilled by
the next waiting request) and without (static batches: the default, `[rollout] continuous_batching`).

Prints trajectories/s and generated tokens/s for each setting, the ratio against concurrency 1,
the gain of continuous batching and the cost of determinism, measured in the same run.
Usage: python benchmarks/rollout_throughput.py [--n 64]
"""
from __future__ import annotations

import argparse
import os
import platform

import torch

from mmgrpo.lm.base import SamplingParams
from mmgrpo.lm.hf import HFBackend
from mmgrpo.rollout import sample
from mmgrpo.tasks import get_task


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64, help="trajectories per setting")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    lm = HFBackend.load()
    task = get_task("banking77", n_labels=10, n_demos=5, reasoning=False)
    prog = task.make_program()
    exs = task.train[: args.n]
    params = SamplingParams(temperature=1.0, max_tokens=args.max_tokens)
    sample(prog, exs[:2], task.reward, lm, params=params, concurrency=2, progress=False)  # warm-up
    rows = []
    for deterministic in (True, False):
        lm.deterministic = deterministic
        for continuous in (True, False):
            lm.continuous = continuous
            for conc in (1, 8, 32):
                if conc == 1 and not continuous:
                    continue  # one program: nothing to refill
                before = lm.stats["generated_tokens"]
                res = sample(prog, exs, task.reward, lm, params=params, concurrency=conc, progress=False, seed=conc)
                toks = lm.stats["generated_tokens"] - before
                rows.append((deterministic, continuous, conc, len(exs) / res.seconds, toks / res.seconds, res.seconds))
    base = rows[0][3]
    print(f"{'deterministic':>13} {'continuous':>10} {'concurrency':>11} {'traj/s':>8} {'gen tok/s':>10} {'seconds':>8} "
          f"{'vs sequential':>14}")
    for det, cont, conc, tps, toks, secs in rows:
        print(f"{str(det):>13} {str(cont):>10} {conc:>11} {tps:>8.2f} {toks:>10.1f} {secs:>8.1f} {tps / base:>13.2f}x")
    by = {(d, c, n): t for d, c, n, t, _, _ in rows}
    for conc in (8, 32):
        print(f"continuous / static batching at concurrency {conc} (deterministic): "
              f"{by[True, True, conc] / by[True, False, conc]:.2f}x")
        print(f"deterministic / timed batching at concurrency {conc} (static): "
              f"{by[True, False, conc] / by[False, False, conc]:.2f}x")
    print(f"ratio={by[True, False, 32] / base:.2f} (the default: deterministic, static batches; 32 concurrent "
          f"programs vs sequential)")


if __name__ == "__main__":
    main()
