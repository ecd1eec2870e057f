"""Policy losses as registered pure functions, and their normalizations. Tensor math, no model.

A loss is a per-token term (``LOSSES``) plus a normalization: one coefficient per sequence,
computed over the whole batch before it is split (``sequence_coefficients``), so the loss summed
over micro-batches equals the loss of the whole batch: gradient accumulation changes nothing.

Notation: r_t = exp(logp_t - old_logp_t), A the sequence's advantage, eps / eps_hi the clip range.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

# ---- normalizations: coefficient of sequence i (n_i tokens, weight w_i) from the batch total ----
# sequence: the mean over each sequence's tokens, a weighted mean over sequences (GRPO, GSPO)
# token: one mean over every token of the batch (DAPO, CISPO)
# fixed: every sequence divided by the same length, the completion budget (Dr. GRPO: no length bias)
NORMALIZATIONS: dict[str, tuple[Callable, Callable]] = {  # name -> (total(lengths, weights), coef(n, w, total, L))
    "sequence": (lambda ns, ws: sum(ws), lambda n, w, total, L: w / (n * total)),
    "token": (lambda ns, ws: sum(n * w for n, w in zip(ns, ws)), lambda n, w, total, L: w / total),
    "fixed": (lambda ns, ws: sum(ws), lambda n, w, total, L: w / (L * total)),
}


@dataclass(frozen=True)
class PolicyLoss:
    terms: Callable  # (logp, old_logp, adv (B, 1), mask, eps, eps_hi) -> (per-token loss, clipped bool)
    normalization: str
    reference: str


LOSSES: dict[str, PolicyLoss] = {}


def register(name: str, normalization: str, reference: str):
    def add(fn: Callable) -> Callable:
        LOSSES[name] = PolicyLoss(fn, normalization, reference)
        return fn
    return add


def _clipped_surrogate(logp, old_logp, adv, mask, eps, eps_hi):
    """-min(r_t A, clip(r_t, 1 - eps, 1 + eps_hi) A) per token (PPO's clipped objective)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps, 1 + eps_hi) * adv
    return -torch.min(unclipped, clipped), clipped < unclipped


register("grpo", "sequence", "Shao et al. 2024, arXiv 2402.03300")(_clipped_surrogate)
register("dapo", "token", "Yu et al. 2025, arXiv 2503.14476")(_clipped_surrogate)
register("dr_grpo", "fixed", "Liu et al. 2025, arXiv 2503.20783")(_clipped_surrogate)


@register("gspo", "sequence", "Zheng et al. 2025, arXiv 2507.18071")
def _gspo(logp, old_logp, adv, mask, eps, eps_hi):
    """One ratio per sequence, s = exp(mean_t (logp_t - old_logp_t)), clipped as a whole:
    -min(s A, clip(s, 1 - eps, 1 + eps_hi) A). Written per token as GSPO-token does,
    s_t = sg[s] * exp(logp_t - sg[logp_t]), so each token's value is s and their mean's gradient is
    the sequence objective's. The paper's clip range is far narrower (eps about 3e-4 to 4e-4)."""
    m = mask.to(logp.dtype)
    seq = torch.exp(((logp - old_logp) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1))
    ratio = seq.detach() * torch.exp(logp - logp.detach())
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps, 1 + eps_hi) * adv
    return -torch.min(unclipped, clipped), clipped < unclipped


@register("cispo", "token", "MiniMax 2025, arXiv 2506.13585")
def _cispo(logp, old_logp, adv, mask, eps, eps_hi):
    """-sg[min(r_t, 1 + eps_hi)] A logp_t: the importance weight is clipped and held constant, so
    every token keeps its gradient (none is zeroed by clipping, as PPO's clip does); no lower bound,
    as in the paper. The value is a surrogate: only its gradient is the objective's."""
    ratio = torch.exp(logp - old_logp).detach()
    weight = torch.clamp(ratio, max=1 + eps_hi)
    return -weight * adv * logp, ratio > 1 + eps_hi


def _check(loss_type: str) -> PolicyLoss:
    if loss_type not in LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; use one of {sorted(LOSSES)}")
    return LOSSES[loss_type]


def normalizer_total(lengths: Sequence[int], weights: Sequence[float], loss_type: str = "grpo") -> float:
    """The batch total a loss divides by, over the sequences given (trained or sampled)."""
    return NORMALIZATIONS[_check(loss_type).normalization][0](list(lengths), list(weights))


def sequence_coefficients(lengths: Sequence[int], weights: Sequence[float], loss_type: str = "grpo",
                          max_len: int | None = None, total: float | None = None) -> list[float]:
    """One coefficient per sequence. ``total``: the normalizer of a larger population (every sampled
    completion, see [grpo] loss_denominator); unset = over these sequences alone."""
    norm = _check(loss_type).normalization
    if any(n <= 0 for n in lengths):
        raise ValueError("every sequence needs at least one completion token")
    if norm == "fixed" and not max_len:
        raise ValueError(f"loss_type {loss_type!r} needs max_len (the completion token budget)")
    total_of, coef = NORMALIZATIONS[norm]
    if total is None:
        total = total_of(list(lengths), list(weights))
    return [coef(n, w, total, max_len) for n, w in zip(lengths, weights)]


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
              is_weights: torch.Tensor | None = None, loss_type: str = "grpo") -> LossOutput:
    """The registered policy loss ``loss_type`` (+ beta * k3 KL to the reference), summed with
    per-sequence coefficients.

    Shapes: logp, old_logp, mask, ref_logp, is_weights: (B, T); advantages, coefs: (B,).
    ``is_weights``: truncated importance-sampling weights (detached) for a sampler/learner
    mismatch; they scale the policy term only, never the KL.
    """
    eps_hi = epsilon if epsilon_high is None else epsilon_high
    per_token, was_clipped = _check(loss_type).terms(logp, old_logp, advantages.unsqueeze(-1), mask, epsilon, eps_hi)
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
    was_clipped = (was_clipped & mask.bool()).float()
    per_seq = torch.stack([m.sum(-1), was_clipped.sum(-1), (kl.detach() * m).sum(-1)], dim=-1).detach().cpu()
    return LossOutput(loss=loss, clipped_tokens=float(was_clipped.sum()), kl_sum=float((kl.detach() * m).sum()),
                      tokens=float(m.sum()), pg_loss=float(pg.detach()), kl_loss=float(kl_part.detach()),
                      per_seq=per_seq)
