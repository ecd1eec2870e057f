"""Peak memory and time of the update on one long LM call (PUPA's longest request), with and
without recomputing activations in the backward pass (``recompute_tokens``).

Usage: python benchmarks/update_long_call.py [--chars 14000]
Each variant runs in its own process so that its peak resident memory is its own:
"kept" is the update before recompute_tokens (the call alone in a packed row under an N x N block
mask, every activation kept); "recomputed" is the default (a call alone over recompute_tokens runs
causal, without a block mask, and keeps each layer's input only).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(variant: str, chars: int) -> dict:
    import torch

    from mmgrpo.config import TrainConfig
    from mmgrpo.grpo.trainer import Trainer
    from mmgrpo.lm.hf import HFBackend
    from mmgrpo.tasks.papillon import load_rows

    lm = HFBackend.load()
    trainer = Trainer(lm, TrainConfig(recompute_tokens=10 ** 9 if variant == "kept" else TrainConfig.recompute_tokens))
    query = max((r.inputs["user_query"] for r in load_rows()), key=len)[:chars]
    prompt = lm.tokenize_chat([{"role": "user", "content": "Rewrite this request without private details:\n" + query}])
    reply = lm.tokenizer.encode("Please help me write a short, polite note to a colleague about the project.",
                                add_special_tokens=False)
    seqs = [(prompt, reply)]
    trainer.model.train()
    t0 = time.perf_counter()
    logp, mask = trainer.logprobs(seqs)
    (logp * mask).sum().backward()
    seconds = time.perf_counter() - t0
    grad = sum(float(p.grad.float().norm() ** 2) for p in trainer.params if p.grad is not None) ** 0.5
    return {"variant": variant, "tokens": len(prompt) + len(reply), "seconds": seconds, "grad_norm": grad,
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chars", type=int, default=14000, help="characters of the request kept")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(one(args.variant, args.chars)))
        return
    runs = {}
    for variant in ("kept", "recomputed"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--chars", str(args.chars)],
                             capture_output=True, text=True, check=True).stdout
        runs[variant] = json.loads(out.strip().splitlines()[-1])
    k, r = runs["kept"], runs["recomputed"]
    from common import machine

    print(machine())
    for v in (k, r):
        print(f"{v['variant']:>10}: {v['tokens']} tokens, {v['seconds']:.1f} s, peak {v['peak_gb']:.2f} GB, "
              f"grad norm {v['grad_norm']:.6f}")
    print(f"peak memory recomputed/kept = {r['peak_gb'] / k['peak_gb']:.3f}; time recomputed/kept = "
          f"{r['seconds'] / k['seconds']:.3f}; grad norm relative difference = "
          f"{abs(r['grad_norm'] - k['grad_norm']) / k['grad_norm']:.2e}")


if __name__ == "__main__":
    main()
