"""The mmGRPO update after a prompt search: many-hop calls whose prompts carry the search's demos.

Every call of a module then begins with the same instruction and demos, and only its input
differs. The update computes each shared prefix once (grpo/packing.py): this prints the tokens
the update processes with no sharing, with the G completions of one prompt sharing it (all an
identical-prompt scheme can share here), and with every call sharing its common prefix; then
times the update on the same groups with the "cache" kernel at each token budget, the "packed"
kernel (pack_tokens 1024), and the padded update if asked (`--padded`: slow, one sequence per call).

`--profile N` instead profiles the forward and backward passes of the default kernel's first N
micro-batches (torch.profiler) and prints where their time goes: attention, matrix products, the rest.

Usage: python benchmarks/update_demos.py [--examples 2] [--group-size 8] [--repeats 1] [--padded]
       [--budgets 2048 4096] [--profile N]
       [--prompts benchmarks/data/multihop_search_prompts.json]
The default prompts are a many-hop `mipro` search's result (seed 0 of the compare preset: 21
`notes` and 14 `query` demos in the pool, its chosen demo sets in the prompts); `--prompts none`: the
untouched program (its instructions alone).
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import time
from pathlib import Path

from common import group_all, machine

from mmgrpo.config import TrainConfig
from mmgrpo.grpo.packing import segments
from mmgrpo.grpo.trainer import Trainer
from mmgrpo.lm.base import SamplingParams
from mmgrpo.lm.hf import HFBackend
from mmgrpo.rollout import sample
from mmgrpo.tasks import get_task


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--padded", action="store_true")
    ap.add_argument("--budgets", type=int, nargs="+", default=[2048, 4096],
                    help="token_budget values of the cache kernel to time (padded tokens per micro-batch)")
    ap.add_argument("--profile", type=int, default=0, help="profile this many micro-batches instead of timing")
    ap.add_argument("--prompts", default=str(Path(__file__).parent / "data" / "multihop_search_prompts.json"))
    args = ap.parse_args()
    print(machine())
    lm = HFBackend.load()
    task = get_task("multihop", first_k=1)
    program = task.make_program()
    if args.prompts != "none":
        program.load_prompt_state(json.loads(Path(args.prompts).read_text()))
    trainer = Trainer(lm, TrainConfig(group_size=args.group_size, max_tokens=48))
    t0 = time.perf_counter()
    roll = sample(program, task.train[:args.examples], task.reward, lm, n_samples=args.group_size,
                  params=SamplingParams(temperature=0.8, max_tokens=48), concurrency=32, progress=False)
    rollout_s = time.perf_counter() - t0
    grouping = group_all(roll)
    seqs = [(m.call.prompt_ids, m.call.completion_ids) for m in grouping.members]
    comp = sum(len(c) for _, c in seqs)
    padded = sum(len(p) for p, _ in seqs) + comp
    identical = sum(len(p) for p in {tuple(p) for p, _ in seqs}) + comp
    common = sum(L + sum(len(seqs[i][0]) - L for i in idx) for L, idx in segments([p for p, _ in seqs])) + comp
    print(f"{len(seqs)} calls of {args.examples} examples x G={args.group_size} ({rollout_s:.0f}s of rollouts); "
          f"prompt lengths {min(len(p) for p, _ in seqs)}-{max(len(p) for p, _ in seqs)} tokens")
    print(f"tokens through the update: one sequence per call {padded}, identical prompts once {identical} "
          f"({padded / identical:.2f}x fewer), common prefixes once {common} ({padded / common:.2f}x fewer)")
    if args.profile:
        profile(trainer, grouping, args.profile)
        return
    state = copy.deepcopy({k: v.detach().clone() for k, v in trainer.model.state_dict().items() if "lora" in k})
    base = trainer.cfg.to_dict()
    # the cache kernel first, smallest budget first: the peak RSS printed after each mode is the process's so far
    modes = {f"cache {b}": {"prefix_attention": "cache", "token_budget": b} for b in sorted(args.budgets)}
    modes["packed"] = {"prefix_attention": "packed"}
    if args.padded:
        modes["padded"] = {"shared_prefix": False}
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode, over in modes.items():
            trainer.cfg = TrainConfig(**{**base, **over})
            trainer.model.load_state_dict(state, strict=False)
            t0 = time.perf_counter()
            trainer.update(grouping)
            times[mode].append(time.perf_counter() - t0)
            print(f"  {mode}: {times[mode][-1]:.1f}s, {len(trainer.plan(seqs))} micro-batches, peak RSS so far "
                  f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB", flush=True)
    med = {m: statistics.median(ts) for m, ts in times.items()}
    for m, s in med.items():
        print(f"update, {m:<10}: median {s:.1f}s of {args.repeats}")
    print("ratio " + " ".join(f"packed/({m})={med['packed'] / s:.2f}" for m, s in med.items() if m != "packed"))


def profile(trainer, grouping, n: int) -> None:
    """Self CPU time by op of the first n micro-batches' log-probs and backward pass, grouped."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    seqs = [(m.call.prompt_ids, m.call.completion_ids) for m in grouping.members]
    temps = [m.call.temperature for m in grouping.members]
    batches = trainer.plan(seqs)[:n]
    trainer.model.train()
    t0 = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for mb in batches:
            logp, mask = trainer.logprobs([seqs[i] for i in mb], [temps[i] for i in mb])
            (logp * mask).sum().backward()
    wall = time.perf_counter() - t0
    ops = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    total = sum(ops.values())
    kinds = {"attention": [k for k in ops if "scaled_dot_product" in k],
             "matrix products": [k for k in ops if k in ("aten::mm", "aten::bmm", "aten::addmm")]}
    print(f"{len(batches)} micro-batches of kernel {trainer.kernel!r}: {wall:.1f}s ({total:.1f}s of op time)")
    for kind, keys in kinds.items():
        secs = sum(ops[k] for k in keys)
        print(f"  {kind:<16} {secs:6.1f}s  {secs / total:5.1%}")
    named = {k for keys in kinds.values() for k in keys}
    rest = total - sum(ops[k] for k in named)
    largest = [f"{k} {v:.1f}s" for k, v in sorted(ops.items(), key=lambda kv: -kv[1]) if k not in named][:4]
    print(f"  {'the rest':<16} {rest:6.1f}s  {rest / total:5.1%}; largest: {', '.join(largest)}")


if __name__ == "__main__":
    main()
