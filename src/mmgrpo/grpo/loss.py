"""The clipped GRPO objective and its normalizations. Pure tensor math, no model.

Normalization is expressed as one coefficient per sequence (``sequence_coefficients``),
computed over the whole batch, so the loss summed over micro-batches equals the loss of
the whole batch: gradient accumulation changes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch


def _grpo(lengths, weights, max_len):  # mean over each sequence's tokens, weighted mean over sequences
    total = sum(weights)
    return [w / (n * total) for n, w in zip(lengths, weights)]


def _dapo(lengths, weights, max_len):  # token mean over the batch
    total = sum(w * n for n, w in zip(lengths, weights))
    return [w / total for w in weights]


def _dr_grpo(lengths, weights, max_len):  # a fixed length: no length bias
    total = sum(weights)
    return [w / (max_len * total) for w in weights]


NORMALIZATIONS: dict[str, Callable] = {"grpo": _grpo, "dapo": _dapo, "dr_grpo": _dr_grpo}


def sequence_coefficients(lengths: Sequence[int], weights: Sequence[float], loss_type: str = "grpo",
                          max_len: int | None = None) -> list[float]:
    if loss_type not in NORMALIZATIONS:
        raise ValueError(f"unknown loss_type {loss_type!r}; use one of {sorted(NORMALIZATIONS)}")
    if any(n <= 0 for n in lengths):
        raise ValueError("every sequence needs at least one completion token")
    if loss_type == "dr_grpo" and not max_len:
        raise ValueError("loss_type 'dr_grpo' needs max_len (the completion token budget)")
    return NORMALIZATIONS[loss_type](list(lengths), list(weights), max_len)


@dataclass
class LossOutput:
    loss: torch.Tensor
    clipped_tokens: float
    kl_sum: float
    tokens: float
    pg_loss: float = 0.0  # the policy-gradient part of loss
    kl_loss: float = 0.0  # beta * KL part of loss
    per_seq: torch.Tensor | None = None  # (B, 3) detached: tokens, clipped tokens, KL sum of each sequence


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position, in at least float32 whatever the logits' dtype."""
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              coefs: torch.Tensor, epsilon: float = 0.2, epsilon_high: float | None = None,
              beta: float = 0.0, ref_logp: torch.Tensor | None = None,
              is_weights: torch.Tensor | None = None) -> LossOutput:
    """Clipped surrogate (+ beta * k3 KL to the reference) summed with per-sequence coefficients.

    Shapes: logp, old_logp, mask, ref_logp, is_weights: (B, T); advantages, coefs: (B,).
    ``is_weights``: truncated importance-sampling weights (detached) for sampler/trainer mismatch.
    """
    eps_hi = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(-1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + eps_hi) * adv
    per_token = -torch.min(unclipped, clipped)
    if is_weights is not None:
        per_token = per_token * is_weights
    kl = torch.zeros_like(logp)
    if beta:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
    m = mask.to(per_token.dtype)
    pg = ((per_token * m).sum(-1) * coefs).sum()
    kl_part = ((beta * kl * m).sum(-1) * coefs).sum()
    loss = pg + kl_part if beta else pg
    was_clipped = ((clipped < unclipped) & mask.bool()).float()
    per_seq = torch.stack([m.sum(-1), was_clipped.sum(-1), (kl.detach() * m).sum(-1)], dim=-1).detach().cpu()
    return LossOutput(loss=loss, clipped_tokens=float(was_clipped.sum()), kl_sum=float((kl.detach() * m).sum()),
                      tokens=float(m.sum()), pg_loss=float(pg.detach()), kl_loss=float(kl_part.detach()),
                      per_seq=per_seq)
