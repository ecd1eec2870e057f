"""Peak memory and time of PAPILLON rollouts with a long request in the batch, with prefill chunks
bounded by rows only (8 rows, the backend before ``prefill_tokens``) and by tokens as well.

Usage: python benchmarks/rollout_long_prompts.py [--tokens 8192] [--long-rank 0]
One step's rollouts as the PAPILLON preset runs them: 4 training examples x G = 4, 16 programs at a
time, T = 0.8, 64 new tokens; one of the 4 is a long request (the ``--long-rank``-th longest of the
training split), the other 3 of median length. Each variant runs in its own process so that its peak
resident memory is its own. Same seed in both: the rollouts differ only by the float rounding of
the chunking, and the share of identical completions is printed.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(tokens: int, long_rank: int) -> dict:
    import torch

    from mmgrpo.lm.base import SamplingParams
    from mmgrpo.lm.hf import HFBackend
    from mmgrpo.rollout import sample
    from mmgrpo.tasks import get_task

    lm = HFBackend.load(max_batch=16, prefill_tokens=tokens)
    task = get_task("papillon")
    by_len = sorted(task.train, key=lambda ex: len(ex.inputs["user_query"]))
    long = by_len[-1 - long_rank]
    mid = len(by_len) // 2
    examples = [long] + by_len[mid:mid + 3]
    t0 = time.perf_counter()
    res = sample(task.make_program(), examples, task.reward, lm, n_samples=4, concurrency=16, seed=0,
                 params=SamplingParams(temperature=0.8, max_tokens=64), progress=False)
    seconds = time.perf_counter() - t0
    texts = [[c.text for c in t.calls] for t in res.trajectories]
    return {"prefill_tokens": tokens, "seconds": seconds, "threads": torch.get_num_threads(),
            "long_prompt_tokens": len(lm.tokenize_chat([{"role": "user", "content": long.inputs["user_query"]}])),
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "texts": texts,
            "reward": sum(t.reward for t in res.trajectories) / len(res.trajectories)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192, help="prefill_tokens of the bounded variant")
    ap.add_argument("--long-rank", type=int, default=0, help="which long request: 0 = the longest in train")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(one(0 if args.variant == "rows" else int(args.variant), args.long_rank)))
        return
    runs = {}
    for variant in ("rows", str(args.tokens)):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--long-rank", str(args.long_rank)],
                             capture_output=True, text=True, check=True).stdout
        runs[variant] = json.loads(out.strip().splitlines()[-1])
    r, t = runs["rows"], runs[str(args.tokens)]
    from common import machine

    print(machine())
    print(f"long request: {r['long_prompt_tokens']} prompt tokens; 16 programs, 4 examples x G = 4")
    for name, v in (("8 rows", r), (f"8 rows, <= {args.tokens} tokens", t)):
        print(f"{name:>24}: {v['seconds']:.1f} s, peak {v['peak_gb']:.2f} GB, mean reward {v['reward']:.3f}")
    same = sum(a == b for x, y in zip(r["texts"], t["texts"]) for a, b in zip(x, y))
    total = sum(len(x) for x in r["texts"])
    print(f"peak memory bounded/rows = {t['peak_gb'] / r['peak_gb']:.3f}; time bounded/rows = "
          f"{t['seconds'] / r['seconds']:.3f}; identical completions {same}/{total}")


if __name__ == "__main__":
    main()
