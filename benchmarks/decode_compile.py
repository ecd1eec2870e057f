"""Greedy decoding with torch.compile and a static cache vs eager with the dynamic cache the
backend uses, on the embedded model: milliseconds per token step for a batch of rows.

Usage: python benchmarks/decode_compile.py [--rows 8] [--prompt 300] [--tokens 24] [--dtype float32]
The compiled step is timed after a first, compiling pass over the same shapes (its seconds printed).
"""
from __future__ import annotations

import argparse
import time

import torch
from common import machine
from transformers import DynamicCache, StaticCache

from mmgrpo.models import load


def per_token_ms(model, forward, cache, ids: torch.Tensor, tokens: int) -> float:
    """Prefill ``ids`` into ``cache``, then time ``tokens`` greedy steps of ``forward``."""
    P = ids.shape[1]
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(P))
        tok = out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for i in range(tokens):
            out = forward(input_ids=tok, past_key_values=cache, use_cache=True, cache_position=torch.tensor([P + i]))
            tok = out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t0) / tokens * 1000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=300)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    print(machine())
    model = load("smollm2-135m", dtype=args.dtype).model
    ids = torch.randint(100, 1000, (args.rows, args.prompt), generator=torch.Generator().manual_seed(0))
    span = args.prompt + args.tokens + 8
    eager = per_token_ms(model, model, DynamicCache(), ids, args.tokens)
    static = per_token_ms(model, model, StaticCache(config=model.config, max_cache_len=span), ids, args.tokens)
    compiled = torch.compile(model, dynamic=False)
    t0 = time.perf_counter()
    per_token_ms(model, compiled, StaticCache(config=model.config, max_cache_len=span), ids, args.tokens)
    first = time.perf_counter() - t0
    timed = per_token_ms(model, compiled, StaticCache(config=model.config, max_cache_len=span), ids, args.tokens)
    print(f"{args.rows} rows, {args.prompt}-token prompt, {args.tokens} tokens, {args.dtype}: eager dynamic cache "
          f"{eager:.1f} ms/token, eager static cache {static:.1f}, compiled static cache {timed:.1f} "
          f"(first, compiling pass {first:.0f}s)")
    print(f"ratio={eager / timed:.2f} (compiled / eager decoding speed)")


if __name__ == "__main__":
    main()
