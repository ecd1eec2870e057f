"""GPU check (prepared for a lent CUDA machine; never CI): update and rollout speed of mmgrpo on
randomly initialised models of realistic shapes (no weights, no network), bf16.

Prints, per model shape: the bf16 matmul peak measured here, the shared-prefix and padded update
times on a Banking77-shaped batch of groups (8 prompts x G=8, 600-token prompts, 32-token
completions), their model-FLOP rate as a fraction of the peak, and batched-decode tokens/s.
Usage: python benchmarks/device/gpu_bench.py [--device cuda] [--shapes 0.5b,1.5b] [--tiny]
Must finish in under 5 minutes on one H100.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from mmgrpo.config import TrainConfig  # noqa: E402
from mmgrpo.grpo.groups import Grouping, Group, Member, assign_weights  # noqa: E402
from mmgrpo.grpo.trainer import Trainer  # noqa: E402
from mmgrpo.lm.base import SamplingParams  # noqa: E402
from mmgrpo.lm.hf import HFBackend  # noqa: E402
from mmgrpo.trace import ModuleCall  # noqa: E402

SHAPES = {  # Qwen2 shapes
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936),
}


class IdTokenizer:
    """Enough of a tokenizer for the backend: ids are their own text."""
    eos_token_id = pad_token_id = 0
    unk_token_id = None

    def convert_tokens_to_ids(self, tok):
        return None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def bf16_peak(device, n=8192, reps=10) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ a
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ a
    _sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def batch_of_groups(vocab, n_prompts, G, P, T, seed=0) -> Grouping:
    rng = random.Random(seed)
    g = Grouping()
    for e in range(n_prompts):
        prompt = [rng.randrange(1, vocab) for _ in range(P)]
        members = []
        for k in range(G):
            comp = [rng.randrange(1, vocab) for _ in range(rng.randrange(T // 2, T + 1))]
            call = ModuleCall("m", 0, prompt, comp, [-1.0] * len(comp), "")
            members.append(Member(call, reward=float(k % 2), trajectory=k, advantage=(-1.0) ** k))
        g.groups.append(Group(f"e{e}", "m", 0, members))
    assign_weights(g)
    return g


def model_flops(c, n_tokens_packed, pairs, lora_r=16):
    d, kv = c["hidden_size"], c["num_key_value_heads"] * c["hidden_size"] // c["num_attention_heads"]
    lin = 2 * d * d + 2 * d * kv + 3 * d * c["intermediate_size"]
    return c["num_hidden_layers"] * (4 * lin * n_tokens_packed + 8 * d * pairs)


def run_shape(name, device, args):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    c = SHAPES[name]
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = Qwen2ForCausalLM(Qwen2Config(**c, max_position_embeddings=4096, tie_word_embeddings=True)).to(device, dtype)
    backend = HFBackend(model, IdTokenizer(), max_batch=64, device=device)
    P, T = (600, 32) if name != "tiny" else (60, 8)
    grouping = batch_of_groups(c["vocab_size"], 8, 8, P, T)
    peak = bf16_peak(device) if device == "cuda" else float("nan")
    res = {}
    for kind in ("packed", "cache", "padded"):
        tr = Trainer(backend, TrainConfig(shared_prefix=kind != "padded", prefix_attention=kind if kind != "padded"
                                          else "packed", pack_tokens=4096, token_budget=8192, max_tokens=T, lora_r=16,
                                          progress=False))
        tr.update(grouping)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            tr.update(grouping)
        _sync(device)
        res[kind] = (time.perf_counter() - t0) / args.repeats
        model = backend.model = tr.model.unload()  # drop LoRA before the next trainer
    seqs = [(m.call.prompt_ids, m.call.completion_ids) for m in grouping.members]
    n_packed = sum(len(g.members[0].call.prompt_ids) + sum(len(m.call.completion_ids) for m in g.members)
                   for g in grouping.groups)
    pairs = sum(P * (P + 1) // 2 + sum(len(c2) * P + len(c2) * (len(c2) + 1) // 2 for _, c2 in seqs[i * 8:(i + 1) * 8])
                for i in range(8))
    flops = model_flops(c, n_packed, pairs)
    prompts = [m.call.prompt_ids for m in grouping.members]
    params = [SamplingParams(temperature=1.0, max_tokens=T, seed=i) for i in range(len(prompts))]
    backend.generate_batch(prompts[:8], params[:8])
    _sync(device)
    t0 = time.perf_counter()
    outs = backend.generate_batch(prompts, params)
    _sync(device)
    gen_s = time.perf_counter() - t0
    toks = sum(len(o.token_ids) for o in outs)
    def frac(secs):
        return f"{flops / secs / 1e12:.1f} TFLOP/s" + (f" = {flops / secs / 1e12 / peak:.2f} of peak" if peak == peak else "")
    print(f"{name}: update packed {res['packed']:.2f}s ({frac(res['packed'])}), cache {res['cache']:.2f}s "
          f"({frac(res['cache'])}), padded {res['padded']:.2f}s; packed / padded {res['packed'] / res['padded']:.2f}x, "
          f"cache / packed {res['cache'] / res['packed']:.2f}x"
          + (f"; bf16 peak {peak:.0f} TFLOP/s" if peak == peak else "")
          + f"; decode {toks / gen_s:.0f} tok/s at batch {len(prompts)}", flush=True)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default="0.5b,1.5b")
    ap.add_argument("--tiny", action="store_true", help="a tiny shape, to check the script on a CPU")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""))
    for name in (["tiny"] if args.tiny else args.shapes.split(",")):
        run_shape(name, args.device, args)


if __name__ == "__main__":
    main()
