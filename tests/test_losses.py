"""The registered policy losses on hand-made tensors: values, gradients, micro-batch invariance."""
from __future__ import annotations

import math

import pytest
import torch

from mmgrpo.grpo.loss import LOSSES, grpo_loss, normalizer_total, sequence_coefficients


def _ratios_2_and_1():
    logp = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.double)).requires_grad_()
    old = torch.log(torch.tensor([[0.25, 0.5]], dtype=torch.double))  # per-token ratios 2 and 1
    return logp, old, torch.ones(1, 2, dtype=torch.bool)


def test_every_loss_is_registered_with_a_normalization_and_a_reference():
    assert {"grpo", "dapo", "dr_grpo", "gspo", "cispo"} <= set(LOSSES)
    for name, loss in LOSSES.items():
        assert loss.normalization in ("sequence", "token", "fixed") and "arXiv" in loss.reference, name


def test_gspo_clips_one_ratio_per_sequence_hand_computed():
    logp, old, mask = _ratios_2_and_1()
    coefs = torch.tensor(sequence_coefficients([2], [1.0], "gspo"), dtype=torch.double)  # 1/2: a token mean
    s = math.sqrt(2.0)  # exp(mean(log 2, 0)): the geometric mean of the token ratios
    up = grpo_loss(logp, old, torch.tensor([1.0], dtype=torch.double), mask, coefs, 0.2, loss_type="gspo")
    assert float(up.loss.detach()) == pytest.approx(-1.2) and up.clipped_tokens == 2.0  # min(s, 1.2) on both tokens
    down = grpo_loss(logp, old, torch.tensor([-1.0], dtype=torch.double), mask, coefs, 0.2, loss_type="gspo")
    assert float(down.loss.detach()) == pytest.approx(s) and down.clipped_tokens == 0.0
    down.loss.backward()
    # the sequence objective -A * exp(mean_t(logp_t - old_t)): d/d logp_t = s / T on every token
    assert logp.grad[0].tolist() == pytest.approx([s / 2, s / 2])


def test_cispo_keeps_the_gradient_of_a_clipped_token_hand_computed():
    logp, old, mask = _ratios_2_and_1()
    coefs = torch.tensor(sequence_coefficients([2], [1.0], "cispo"), dtype=torch.double)  # token mean: 1/2
    out = grpo_loss(logp, old, torch.tensor([1.0], dtype=torch.double), mask, coefs, 0.2, loss_type="cispo")
    w = [1.2, 1.0]  # sg[min(r, 1 + eps)]
    assert float(out.loss.detach()) == pytest.approx(-0.5 * (w[0] + w[1]) * math.log(0.5)) and out.clipped_tokens == 1.0
    out.loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([-0.5 * w[0], -0.5 * w[1]])  # the clipped token too
    # PPO's clip gives the same clipped token (A > 0, r = 2 > 1.2) no gradient at all
    logp2, old2, _ = _ratios_2_and_1()
    grpo_loss(logp2, old2, torch.tensor([1.0], dtype=torch.double), mask, coefs, 0.2, loss_type="dapo").loss.backward()
    assert logp2.grad[0, 0] == 0.0 and logp2.grad[0, 1] != 0.0


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_micro_batches_sum_to_the_whole_batch_for_every_loss(loss_type):
    g = torch.Generator().manual_seed(1)
    B, T = 6, 5
    logp = (-torch.rand(B, T, generator=g, dtype=torch.double) * 2).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(B, T, generator=g, dtype=torch.double)
    ref = logp.detach() - 0.1
    mask = torch.ones(B, T, dtype=torch.bool)
    lengths = [5, 3, 4, 1, 2, 5]
    for i, n in enumerate(lengths):
        mask[i, : T - n] = False  # right-aligned completions
    adv = torch.randn(B, generator=g, dtype=torch.double)
    weights = [1.0, 0.5, 0.5, 1.0, 0.25, 0.75]
    coefs = torch.tensor(sequence_coefficients(lengths, weights, loss_type, max_len=T), dtype=torch.double)
    isw = torch.rand(B, T, generator=g, dtype=torch.double) + 0.5
    whole = grpo_loss(logp, old, adv, mask, coefs, 0.2, 0.28, 0.04, ref, isw, loss_type=loss_type)
    (grad_whole,) = torch.autograd.grad(whole.loss, logp)
    parts = [grpo_loss(logp[idx], old[idx], adv[idx], mask[idx], coefs[idx], 0.2, 0.28, 0.04, ref[idx], isw[idx],
                       loss_type=loss_type).loss for idx in ([0, 3], [1, 2, 4], [5])]
    (grad_parts,) = torch.autograd.grad(sum(parts), logp)
    assert float(sum(parts).detach()) == pytest.approx(float(whole.loss.detach()), rel=1e-12, abs=1e-12)
    assert torch.allclose(grad_parts, grad_whole, rtol=1e-10, atol=1e-12) and grad_whole.abs().sum() > 0


def test_importance_weights_scale_the_policy_term_and_never_the_kl():
    logp, old, mask = _ratios_2_and_1()
    ref = logp.detach() - 0.5
    coefs = torch.tensor([0.5], dtype=torch.double)
    twice = torch.full((1, 2), 2.0, dtype=torch.double)
    adv = torch.tensor([1.0], dtype=torch.double)
    plain = grpo_loss(logp, old, adv, mask, coefs, 0.2, beta=0.1, ref_logp=ref)
    weighted = grpo_loss(logp, old, adv, mask, coefs, 0.2, beta=0.1, ref_logp=ref, is_weights=twice)
    assert weighted.pg_loss == pytest.approx(2 * plain.pg_loss) and plain.pg_loss != 0
    assert weighted.kl_loss == pytest.approx(plain.kl_loss) and plain.kl_loss > 0


def test_a_batch_total_divides_every_coefficient_by_the_sampled_population():
    # two trained sequences among four sampled (lengths 2, 4 trained; 3, 3 without signal)
    assert normalizer_total([2, 4, 3, 3], [1.0] * 4, "grpo") == 4.0
    assert sequence_coefficients([2, 4], [1.0, 1.0], "grpo", total=4.0) == pytest.approx([1 / 8, 1 / 16])
    assert normalizer_total([2, 4, 3, 3], [1.0] * 4, "dapo") == 12.0
    assert sequence_coefficients([2, 4], [1.0, 1.0], "cispo", total=12.0) == pytest.approx([1 / 12, 1 / 12])
    assert sequence_coefficients([2, 4], [1.0, 1.0], "dr_grpo", max_len=8, total=4.0) == pytest.approx([1 / 32] * 2)
    with pytest.raises(ValueError, match="unknown loss_type 'ppo'"):
        sequence_coefficients([2], [1.0], "ppo")
