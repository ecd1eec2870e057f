"""How far the old log-prob convention was from the sampled policy, on the demo's program.

Samples the README demo's Banking77 program (8 examples x G = 8, T = 0.8) and prints, over the
sampled completion tokens: the mean |log p_sampler - log p_learner| with the learner at logits / T
(today's convention: float noise), and with the learner at T = 1 (what the update used before the
temperature fix, while the sampler drew from T = 0.8).
Usage: python studies/temperature_gap.py [--temperature 0.8]
"""
from __future__ import annotations

import argparse

import torch

from mmgrpo.config import TrainConfig
from mmgrpo.grpo.trainer import Trainer
from mmgrpo.lm.base import SamplingParams
from mmgrpo.lm.hf import HFBackend
from mmgrpo.rollout import sample
from mmgrpo.tasks import get_task


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--temperature", type=float, default=0.8)
    args = ap.parse_args()
    lm = HFBackend.load()
    task = get_task("banking77", n_labels=10, n_demos=5, reasoning=False, valid_label_credit=0.1)
    trainer = Trainer(lm, TrainConfig(max_tokens=24))
    roll = sample(task.make_program(), task.train[:8], task.reward, lm, n_samples=8, seed=0, progress=False,
                  params=SamplingParams(temperature=args.temperature, max_tokens=24))
    calls = [c for t in roll.trajectories for c in t.calls]
    seqs = [(c.prompt_ids, c.completion_ids) for c in calls]
    sums, n = {"tempered": 0.0, "T=1": 0.0}, 0
    for k in range(0, len(seqs), 16):
        chunk, cc = seqs[k:k + 16], calls[k:k + 16]
        with torch.no_grad():
            tempered, mask = trainer.logprobs(chunk, [c.temperature for c in cc])
            plain, _ = trainer.logprobs(chunk)
        for j, c in enumerate(cc):
            sampled = torch.tensor(c.logprobs)
            sums["tempered"] += float((tempered[j][mask[j]] - sampled).abs().sum())
            sums["T=1"] += float((plain[j][mask[j]] - sampled).abs().sum())
            n += len(c.logprobs)
    print(f"{len(calls)} calls, {n} sampled tokens at T = {args.temperature}")
    print(f"mean |log p_sampler - log p_learner|, learner at logits / T (now): {sums['tempered'] / n:.2e}")
    print(f"mean |log p_sampler - log p_learner|, learner at T = 1 (before the fix): {sums['T=1'] / n:.4f}")


if __name__ == "__main__":
    main()
