"""Model FLOPs of one mmGRPO update (forward + backward, LoRA) per second, against the
machine's matmul peak in the dtype the update's matrix products run in (`update_dtype`: float32, or
bfloat16 where "auto" autocasts them), measured in the same run.

Usage: python benchmarks/update_mfu.py [--examples 8] [--group-size 8] [--repeats 2]
       [--update-dtype auto|model|bfloat16]
Both shared-prefix kernels (prefix_attention "packed" and "cache") run on the same batch, alternating;
the useful FLOPs are the same for both, so their fractions of the peak compare their speed.
FLOPs counted: linear layers 2*params*tokens forward and the same again backward (input
gradients through the frozen weights), LoRA 3x its forward, the LM head on predicted positions,
and attention over the (query, key) pairs the mask allows (the useful work, not the dense mask).
"""
from __future__ import annotations

import argparse
import statistics
import time

from common import banking77_groups, machine, mm_peak_gflops

from mmgrpo.config import TrainConfig
from mmgrpo.grpo.packing import pack


def update_flops(model_cfg, lora_r: int, seqs, plan) -> tuple[float, int]:
    d, L = model_cfg.hidden_size, model_cfg.num_hidden_layers
    kv = model_cfg.num_key_value_heads * (d // model_cfg.num_attention_heads)
    ff = model_cfg.intermediate_size
    lin = 2 * d * d + 2 * d * kv + 3 * d * ff  # q, o, k, v, gate, up, down
    lora = lora_r * (2 * (d + d) + 2 * (d + kv) + 2 * (d + ff) + (ff + d))
    flops, tokens = 0.0, 0
    for mb in plan:
        pk = pack([seqs[i] for i in mb])
        n = pk.ids.shape[1]
        pairs = int(pk.allow.sum())
        k = len(pk.targets)
        tokens += n
        flops += L * (4 * lin * n + 6 * lora * n + 8 * d * pairs) + 4 * d * model_cfg.vocab_size * k
    return flops, tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--pack-tokens", type=int, default=None, help="override the config's pack_tokens")
    ap.add_argument("--update-dtype", default="auto", choices=["auto", "model", "bfloat16"])
    args = ap.parse_args()
    print(machine())
    over = {"update_dtype": args.update_dtype, **({"pack_tokens": args.pack_tokens} if args.pack_tokens else {})}
    trainer, grouping, _ = banking77_groups(args.examples, args.group_size, **over)
    mm_dtype = trainer.autocast or next(trainer.model.parameters()).dtype  # what its products compute in
    seqs = [(m.call.prompt_ids, m.call.completion_ids) for m in grouping.members]
    flops, tokens = update_flops(trainer.backend.model.config, trainer.cfg.lora_r, seqs, trainer.plan(seqs))
    peak_before = mm_peak_gflops(dtype=mm_dtype)
    times = {"packed": [], "cache": []}
    base = trainer.cfg.to_dict()
    for _ in range(args.repeats):
        for mode in times:
            trainer.cfg = TrainConfig(**{**base, "prefix_attention": mode})
            t0 = time.perf_counter()
            trainer.update(grouping)
            times[mode].append(time.perf_counter() - t0)
    peak = max(peak_before, mm_peak_gflops(dtype=mm_dtype))
    print(f"update: {len(seqs)} sequences, {tokens} tokens with each prompt once, {flops / 1e12:.2f} TFLOP of "
          f"useful work; {str(mm_dtype)[6:]} torch.mm peak {peak:.0f} GFLOP/s (measured before and after)")
    frac = {}
    for mode, ts in times.items():
        secs = statistics.median(ts)
        frac[mode] = flops / secs / 1e9 / peak
        print(f"prefix_attention = {mode:<6}: median {secs:.1f}s of {args.repeats}, {flops / secs / 1e9:.0f} GFLOP/s, "
              f"fraction of peak {frac[mode]:.2f}")
    best = max(frac, key=frac.get)
    print(f"cache / packed update time: {frac['packed'] / frac['cache']:.2f}x")
    print(f"ratio={frac[best]:.3f} (fraction of the {str(mm_dtype)[6:]} matmul peak, prefix_attention = {best})")

if __name__ == "__main__":
    main()
