"""One update on the same batch of groups: mmgrpo (shared-prefix packing) against TRL's
GRPOTrainer computing its loss and gradients on the same sequences.

Needs TRL (a benchmark-only extra): .venv/bin/pip install trl==1.16.0
Usage: python benchmarks/update_vs_trl.py [--examples 8] [--group-size 8] [--repeats 3]
Same model (SmolLM2-135M, fp32), same LoRA (r=16, all linear layers), same loss settings
(grpo normalization, beta=0, one iteration, no gradient checkpointing); alternating in one process, medians printed.
TRL's side is timed for compute_loss + backward over micro-batches of one group each (G
sequences, padded as TRL pads them); mmgrpo's for Trainer.update (which also steps AdamW).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from common import banking77_groups, machine


def trl_trainer(model_name: str, cfg, group_size: int):
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import GRPOConfig, GRPOTrainer

    from mmgrpo.models import load

    m = load(model_name)
    model = get_peft_model(m.model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                               target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM"))
    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=group_size,
                      num_generations=group_size, beta=0.0, loss_type="grpo", use_cpu=True, report_to=[],
                      max_completion_length=cfg.max_tokens, logging_steps=1000,
                      gradient_checkpointing=False)  # TRL's default is True: off, as in mmgrpo
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                          args=args, train_dataset=Dataset.from_list([{"prompt": "x"}] * group_size),
                          processing_class=m.tokenizer)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # normally set inside Trainer.train's loop
    return trainer


def trl_inputs(members, pad_id: int) -> dict:
    P = max(len(m.call.prompt_ids) for m in members)
    T = max(len(m.call.completion_ids) for m in members)
    B = len(members)
    prompt_ids = torch.full((B, P), pad_id)
    prompt_mask = torch.zeros((B, P), dtype=torch.long)
    completion_ids = torch.full((B, T), pad_id)
    completion_mask = torch.zeros((B, T), dtype=torch.long)
    for i, m in enumerate(members):
        p, c = m.call.prompt_ids, m.call.completion_ids
        prompt_ids[i, P - len(p):] = torch.tensor(p)
        prompt_mask[i, P - len(p):] = 1
        completion_ids[i, :len(c)] = torch.tensor(c)
        completion_mask[i, :len(c)] = 1
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "advantages": torch.tensor([m.advantage for m in members]),
            "num_items_in_batch": int(completion_mask.sum())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(machine())
    ours, grouping, _ = banking77_groups(args.examples, args.group_size)
    trl = trl_trainer("smollm2-135m", ours.cfg, args.group_size)
    batches = [trl_inputs(g.members, ours.backend.pad_id) for g in grouping.groups]
    n_seq = sum(len(g.members) for g in grouping.groups)

    def run_trl():
        trl.model.zero_grad(set_to_none=True)
        for inputs in batches:
            loss = trl.compute_loss(trl.model, inputs)
            loss.backward()

    times = {"mmgrpo": [], "trl": []}
    run_trl()  # warm-up both
    ours.update(grouping)
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run_trl()
        times["trl"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ours.update(grouping)
        times["mmgrpo"].append(time.perf_counter() - t0)
    a, b = statistics.median(times["mmgrpo"]), statistics.median(times["trl"])
    print(f"batch: {len(grouping.groups)} groups, {n_seq} sequences")
    print(f"mmgrpo update: {a:.1f}s   TRL compute_loss+backward: {b:.1f}s   (medians of {args.repeats})")
    print(f"mmgrpo / TRL time: {a / b:.2f}x")
    print(f"ratio={a / b:.3f}")


if __name__ == "__main__":
    main()
