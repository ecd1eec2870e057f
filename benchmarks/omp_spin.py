"""OpenMP's wait policy, alone and beside another busy process: greedy decoding (8 rows x 24 tokens)
and 32 concurrent Banking77 programs with the embedded model, each in a fresh process, under
- spin:    libgomp's default (threads spin ~300,000 times after each op before sleeping),
- passive: OMP_WAIT_POLICY=PASSIVE (the tests' setting: they run servers beside the learner),
- short:   GOMP_SPINCOUNT=10000 (what importing mmgrpo sets unless you set either variable).
"Busy" is a second process running 2-thread torch matmuls for the length of the measurement.
Prints seconds per setting (the best of the repeats) and, last, the spin/passive and spin/short ratios
alone and beside the busy process.
Usage: python benchmarks/omp_spin.py [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

POLICIES = {"spin": {"GOMP_SPINCOUNT": "300000"}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
            "short": {"GOMP_SPINCOUNT": "10000"}}

WORK = r"""
import json, time, torch
from mmgrpo.lm.base import SamplingParams
from mmgrpo.lm.hf import HFBackend
from mmgrpo.rollout import sample
from mmgrpo.tasks import get_task
lm = HFBackend.load()
tok = lm.tokenizer
prompts = [tok.encode(f"Tell me about item {i}.") for i in range(8)]
greedy = [SamplingParams(temperature=0.0, max_tokens=24) for _ in prompts]
lm.generate_batch(prompts[:2], greedy[:2])
t0 = time.perf_counter(); lm.generate_batch(prompts, greedy); decode = time.perf_counter() - t0
task = get_task("banking77", n_labels=10, n_demos=5, reasoning=False)
res = sample(task.make_program(), task.train[:32], task.reward, lm, params=SamplingParams(temperature=1.0,
             max_tokens=16), concurrency=32, progress=False, seed=0)
print(json.dumps({"decode_s": decode, "rollout_s": res.seconds}))
"""

BUSY = "import torch\na = torch.randn(1024, 1024)\nwhile True: a @ a\n"


def clean_env(policy: str, threads: int = 2) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    return {**env, **POLICIES[policy], "OMP_NUM_THREADS": str(threads)}


def measure(policy: str, busy: bool) -> dict:
    hog = subprocess.Popen([sys.executable, "-c", BUSY], env=clean_env("spin")) if busy else None
    try:
        out = subprocess.run([sys.executable, "-c", WORK], env=clean_env(policy), capture_output=True, text=True,
                             check=True, timeout=3600)
    finally:
        if hog:
            hog.kill()
            hog.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    print(f"{os.cpu_count()} cores, python {sys.version.split()[0]}")
    best: dict = {}
    for _ in range(args.repeats):  # alternating, the best of the repeats
        for busy in (False, True):
            for policy in POLICIES:
                t0 = time.perf_counter()
                r = measure(policy, busy)
                key = (policy, busy)
                best[key] = {k: min(v, best.get(key, {}).get(k, v)) for k, v in r.items()}
                print(f"{policy:>8} {'busy' if busy else 'alone':>5}: decode {r['decode_s']:.2f}s, 32 programs "
                      f"{r['rollout_s']:.2f}s  ({time.perf_counter() - t0:.0f}s with start)", flush=True)
    for busy in (False, True):
        s, p, q = best["spin", busy], best["passive", busy], best["short", busy]
        print(f"{'busy' if busy else 'alone'}: spin/passive decode {s['decode_s'] / p['decode_s']:.2f}x, rollouts "
              f"{s['rollout_s'] / p['rollout_s']:.2f}x; spin/short decode {s['decode_s'] / q['decode_s']:.2f}x, "
              f"rollouts {s['rollout_s'] / q['rollout_s']:.2f}x")


if __name__ == "__main__":
    main()
