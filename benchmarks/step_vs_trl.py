"""One whole GRPO step on the same Banking77 batch: mmgrpo (the program's rollouts through the
batching backend, module grouping, shared-prefix update) against TRL's GRPOTrainer (its own
generation with use_vllm=False, reward, loss + backward, optimizer step).

Needs TRL (a benchmark-only extra): .venv/bin/pip install trl==1.16.0
Usage: python benchmarks/step_vs_trl.py [--examples 8] [--group-size 8] [--repeats 2]
Same model (SmolLM2-135M, fp32, CPU), same LoRA (r=16, the same target layers), the same prompts
(the demo program's rendered chat messages), the same completion cap and temperature (1.0), beta=0,
one iteration, no gradient checkpointing. The two alternate in one process; medians are printed and
the last line is ``ratio=X`` (mmgrpo step time / TRL step time).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from common import machine

from mmgrpo.config import TrainConfig
from mmgrpo.grpo.groups import assign_weights, compute_advantages, group_calls
from mmgrpo.grpo.trainer import Trainer
from mmgrpo.lm.base import SamplingParams
from mmgrpo.lm.hf import HFBackend
from mmgrpo.rollout import sample
from mmgrpo.tasks import get_task


def trl_trainer(cfg: TrainConfig, examples: int, group_size: int, labels: list[str]):
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import GRPOConfig, GRPOTrainer

    from mmgrpo.models import load

    m = load(cfg.model)
    model = get_peft_model(m.model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                               target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM"))

    def reward(completions, label, **kw):  # the label named in the reply; cheap, and it varies
        return [float(lab.lower() in (c[-1]["content"] if isinstance(c, list) else c).lower())
                for c, lab in zip(completions, label)]

    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=group_size,
                      steps_per_generation=examples, num_generations=group_size, beta=0.0, loss_type="grpo",
                      use_cpu=True, report_to=[], max_completion_length=cfg.max_tokens, temperature=1.0,
                      logging_steps=1000, gradient_checkpointing=False, learning_rate=cfg.learning_rate)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args,
                          train_dataset=Dataset.from_list([{"prompt": [{"role": "user", "content": "x"}],
                                                            "label": labels[0]}] * group_size),
                          processing_class=m.tokenizer)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = examples  # normally set inside Trainer.train's loop
    trainer.create_optimizer()
    return trainer


def main():
    from trl.trainer.utils import split_tensor_dict

    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(machine())
    task = get_task("banking77", n_labels=10, n_demos=5, reasoning=False)
    program, batch = task.make_program(), task.train[:args.examples]
    lm = HFBackend.load()
    cfg = TrainConfig(max_tokens=args.max_tokens, group_size=args.group_size, batch_examples=args.examples,
                      temperature=1.0, learning_rate=1e-4, progress=False)
    ours = Trainer(lm, cfg)
    (module,) = program.named_modules().values()
    trl_rows = []  # TRL's dataset rows: each example's rendered messages, G times in a row
    for ex in batch:
        trl_rows += [{"prompt": module.render(ex.inputs), "label": ex.gold["label"]}] * args.group_size
    trl = trl_trainer(cfg, args.examples, args.group_size, [ex.gold["label"] for ex in batch])
    n_tokens = {"mmgrpo": [], "trl": []}

    def step_mmgrpo():
        roll = sample(program, batch, task.reward, lm, n_samples=args.group_size,
                      params=SamplingParams(temperature=1.0, max_tokens=args.max_tokens), concurrency=32,
                      progress=False)
        grouping = group_calls(roll.by_example(), "truncate")
        compute_advantages(grouping)
        assign_weights(grouping)
        ours.update(grouping)
        n_tokens["mmgrpo"].append(sum(len(c.completion_ids) for t in roll.trajectories for c in t.calls))

    def step_trl():
        out = trl._generate_and_score_completions(trl_rows)
        n_tokens["trl"].append(int(out["completion_mask"].sum()))
        for part in split_tensor_dict(out, args.examples):  # one group per micro-batch, as TRL steps them
            loss = trl.compute_loss(trl.model, part)
            loss.backward()
        trl.optimizer.step()
        trl.optimizer.zero_grad(set_to_none=True)

    times = {"mmgrpo": [], "trl": []}
    step_mmgrpo()  # warm-up both
    step_trl()
    for _ in range(args.repeats):
        for name, fn in (("trl", step_trl), ("mmgrpo", step_mmgrpo)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    a, b = statistics.median(times["mmgrpo"]), statistics.median(times["trl"])
    print(f"batch: {args.examples} Banking77 prompts x G={args.group_size}, completions capped at {args.max_tokens} "
          f"tokens; completion tokens per step: mmgrpo {statistics.median(n_tokens['mmgrpo']):.0f}, "
          f"TRL {statistics.median(n_tokens['trl']):.0f} (medians)")
    print(f"whole step: mmgrpo {a:.1f}s   TRL GRPOTrainer (generate + score + loss + backward + step) {b:.1f}s "
          f"(medians of {args.repeats}, alternating)")
    print(f"ratio={a / b:.3f}")


if __name__ == "__main__":
    main()
