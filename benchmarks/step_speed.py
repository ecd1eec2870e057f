"""One full mmGRPO step (rollouts + update) and a dev evaluation of 30 programs, on three task shapes, by
paths one after the other in one process: "before" (float32 throughout, every row prefilled on its own,
the "packed" update kernel with each call's rest of prompt packed on its own), "defaults" (the
configuration's defaults), "bf16-sampler" (rollouts and dev sampled by a bfloat16 copy of the weights,
the update in float32), "bf16-update" (the update's matrix products autocast to bfloat16) and "bf16" (the
whole model in bfloat16). See docs/performance.md.

Usage: python benchmarks/step_speed.py [--shapes banking77 many-hop papillon]
       [--paths before defaults bf16-sampler bf16-update bf16]
       [--eval 30] [--repeats 1]
Shapes: the README demo's Banking77 step (8 examples x G=8), the compare preset's many-hop step (4 x G=4)
with the prompts of a many-hop prompt search that kept demos (benchmarks/data/multihop_search_prompts.json),
the compare preset's PAPILLON step (4 x G=4). The last line: `speedup banking77=X many-hop=Y papillon=Z`
(step + evaluation seconds, before / defaults).
"""
from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import machine

from mmgrpo.compare import PRESETS
from mmgrpo.config import TrainConfig
from mmgrpo.grpo.run import build

HERE = Path(__file__).parent
SHAPES = {
    "banking77": {"task": "banking77", "max_tokens": 24, "batch_examples": 8, "group_size": 8, "temperature": 0.8,
                  "task_options": {"n_labels": 10, "n_demos": 5, "reasoning": False, "valid_label_credit": 0.1}},
    "many-hop": {**{k: v for k, v in PRESETS["multihop"].items() if not k.startswith("prompt")},
                 "task": "multihop", "prompts": str(HERE / "data" / "multihop_search_prompts.json")},
    "papillon": {**{k: v for k, v in PRESETS["papillon"].items() if not k.startswith("prompt")}, "task": "papillon"},
}
PATHS = {"before": {"dtype": "float32", "sampler_dtype": "float32", "prefix_attention": "packed",
                    "update_dtype": "model"}, "defaults": {},
         "bf16-sampler": {"sampler_dtype": "bfloat16"}, "bf16-update": {"update_dtype": "bfloat16"},
         "bf16": {"dtype": "bfloat16"}}


def one(shape: str, path: str, eval_n: int) -> dict:
    """Seconds of each phase of step 1 and of one dev evaluation, on a fresh run of ``shape``."""
    over = {k: v for k, v in SHAPES[shape].items() if k in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig(**{**over, **PATHS[path], "eval_examples": eval_n, "progress": False, "steps": 1})
    with tempfile.TemporaryDirectory() as tmp:
        job = build(cfg, path=Path(tmp) / "run")
        if path == "before":
            job.backend.share_prompts = False
            job.trainer.share_rests = False
        t0 = time.perf_counter()
        rec = job.train_step(1)
        step_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        job.evaluate(1)
        eval_s = time.perf_counter() - t0
        out = {"rollout": rec["rollout_s"], "update": rec.get("update_s", 0.0), "step": step_s, "eval": eval_s,
               "mismatch": rec.get("mismatch_mean", float("nan")), "dtype": str(next(job.backend.model.parameters()).dtype),
               "kernel": rec.get("kernel", cfg.prefix_attention)}
        job.backend.close()
    del job
    gc.collect()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    ap.add_argument("--eval", type=int, default=30, help="dev programs scored after the step")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    paths = ["before", *[p for p in args.paths if p != "before"]]  # the ratios' reference runs first
    print(machine(), flush=True)
    speed = {p: {} for p in paths[1:]}
    for shape in args.shapes:
        runs = {p: [] for p in paths}
        for _ in range(args.repeats):
            for p in paths:  # alternating, the same batch (same seed) each time
                runs[p].append(one(shape, p, args.eval))
                r = runs[p][-1]
                print(f"{shape:<10} {p:<9} rollout {r['rollout']:7.1f}s  update {r['update']:7.1f}s  step "
                      f"{r['step']:7.1f}s  dev({args.eval}) {r['eval']:7.1f}s  [{r['dtype']}, {r['kernel']}, "
                      f"mismatch {r['mismatch']:.2e}]", flush=True)
        med = {p: {k: statistics.median(r[k] for r in rs) for k in ("rollout", "update", "step", "eval")}
               for p, rs in runs.items()}
        for p in paths[1:]:
            ratio = {k: med["before"][k] / max(med[p][k], 1e-9) for k in med["before"]}
            speed[p][shape] = (med["before"]["step"] + med["before"]["eval"]) / (med[p]["step"] + med[p]["eval"])
            print(f"{shape:<10} before/{p}: rollout {ratio['rollout']:.2f}x  update {ratio['update']:.2f}x  step "
                  f"{ratio['step']:.2f}x  dev {ratio['eval']:.2f}x  step+dev {speed[p][shape]:.2f}x", flush=True)
    for p in reversed(paths[1:]):  # the defaults' line last
        print(("speedup " if p == "defaults" else f"speedup ({p}) ") + " ".join(f"{k}={v:.2f}" for k, v in speed[p].items()))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
