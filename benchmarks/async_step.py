"""Overlapped rollouts: training steps per hour at max_policy_lag = 0 and 1, measured in one run.

Through a server: one `mmgrpo serve` process samples on core 0 (1 thread), the learner trains on core 1
(1 thread); at lag 0 each waits for the other, at lag 1 the server samples step t+1 while step t's update
runs. In-process: the learner's own process on both cores samples and updates (lag 1: a copy of the
weights samples during the update). Each setting is a fresh run of the Banking77 demo's program
(`--examples` x G=`--group-size` a step, `--steps` steps), the settings alternating; a run's dev
evaluations (step 0 and the last, 8 programs) are not counted.

Usage: python benchmarks/async_step.py [--steps 6] [--examples 4] [--group-size 8] [--repeats 1]
       [--modes server in-process]
The last line: `steps_per_hour server lag0=X lag1=Y ratio=R` (lag 1 / lag 0, through the server).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import machine
from remote_rollouts import start_server

from mmgrpo.config import TrainConfig
from mmgrpo.grpo.run import build, fit


def one(args, lag: int, servers: list[str]) -> dict:
    """A fresh run; seconds of its steps (dev evaluations left out) and its per-step records."""
    cfg = TrainConfig(task="banking77", task_options={"n_labels": 10, "n_demos": 5, "reasoning": False,
                                                      "valid_label_credit": 0.1},
                      batch_examples=args.examples, group_size=args.group_size, temperature=0.8, max_tokens=24,
                      learning_rate=3e-5, steps=args.steps, eval_every=10_000, eval_examples=8,
                      checkpoint_every=10_000, progress=False, seed=0, max_policy_lag=lag,
                      tis_cap="auto", servers=servers, adapter_dir=tempfile.mkdtemp(dir=tempfile.gettempdir()))
    with tempfile.TemporaryDirectory() as tmp:
        job = build(cfg, path=Path(tmp) / "run")
        t0 = time.perf_counter()
        fit(job)
        wall = time.perf_counter() - t0
        devs = job.run.read_log("dev.jsonl")
        log = job.run.read_log()
        job.backend.close()
    steps_s = wall - sum(d.get("eval_s", 0.0) for d in devs)
    return {"steps_s": steps_s, "per_hour": args.steps * 3600 / steps_s,
            "rollout_s": sum(r["rollout_s"] for r in log), "update_s": sum(r.get("update_s", 0.0) for r in log),
            "lag_max": max((r.get("policy_lag_max", 0) for r in log), default=0),
            "tis": [round(r["tis_weight_mean"], 3) for r in log if "tis_weight_mean" in r]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--examples", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--modes", nargs="+", default=["in-process", "server"], choices=["in-process", "server"])
    args = ap.parse_args()
    print(machine(), flush=True)
    result = {}
    for mode in args.modes:
        proc = None
        if mode == "server":
            proc, url = start_server(core=0)
            os.sched_setaffinity(0, {1})  # the learner on the other core
            torch.set_num_threads(1)
            servers = [url]
        else:
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
            torch.set_num_threads(os.cpu_count() or 1)
            servers = []
        try:
            runs = {0: [], 1: []}
            for _ in range(args.repeats):
                for lag in (0, 1):
                    r = one(args, lag, servers)
                    runs[lag].append(r)
                    print(f"{mode:<10} lag {lag}: {args.steps} steps in {r['steps_s']:7.1f} s = {r['per_hour']:6.1f} "
                          f"steps/h (rollouts {r['rollout_s']:.1f} s, updates {r['update_s']:.1f} s, max lag "
                          f"{r['lag_max']}, TIS weight means {r['tis']})", flush=True)
        finally:
            if proc is not None:
                proc.kill()
                proc.wait()
        med = {lag: statistics.median(r["per_hour"] for r in rs) for lag, rs in runs.items()}
        result[mode] = med
        print(f"{mode:<10} lag 1 / lag 0: {med[1] / med[0]:.2f}x", flush=True)
    for mode in reversed(args.modes):
        med = result[mode]
        print(f"steps_per_hour {mode} lag0={med[0]:.1f} lag1={med[1]:.1f} ratio={med[1] / med[0]:.2f}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
