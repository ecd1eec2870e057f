"""Shared-prefix packing: the plan, the mask, and equivalence with the plain padded update."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mmgrpo.grpo.config import TrainConfig
from mmgrpo.grpo.loss import grpo_loss, sequence_coefficients
from mmgrpo.grpo.packing import pack, plan_packed
from mmgrpo.grpo.trainer import Trainer
from mmgrpo.lm.base import SamplingParams
from mmgrpo.lm.hf import HFBackend


def test_plan_keeps_groups_together_and_splits_what_does_not_fit():
    seqs = [([1, 2, 3], [7] * 4), ([1, 2, 3], [8] * 4), ([5, 6], [9] * 2), ([1, 2, 3], [7] * 4)]
    assert plan_packed(seqs, budget=100) == [[0, 1, 3, 2]]
    # prompt (3) + two completions (8) = 11 fits, a third does not: the group splits, the prompt repeats
    assert plan_packed(seqs, budget=11) == [[0, 1], [3, 2]]


def test_pack_mask_positions_and_predictors():
    pk = pack([([1, 2], [3, 4]), ([1, 2], [5])])
    assert pk.ids.tolist() == [[1, 2, 3, 4, 5]]
    assert pk.positions.tolist() == [[0, 1, 2, 3, 2]]  # each completion restarts after the prompt
    allow = pk.allow[0, 0].int().tolist()
    assert allow == [[1, 0, 0, 0, 0],
                     [1, 1, 0, 0, 0],
                     [1, 1, 1, 0, 0],
                     [1, 1, 1, 1, 0],
                     [1, 1, 0, 0, 1]]  # the second completion sees the prompt and itself, not the first
    assert pk.predictors.tolist() == [1, 2, 1] and pk.targets.tolist() == [3, 4, 5]
    assert pk.rows.tolist() == [0, 0, 1] and pk.cols.tolist() == [0, 1, 1] and pk.T == 2


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def trainers(request):
    lm = HFBackend.load()
    lm.model.set_attn_implementation(request.param)  # eager adds the mask to the scores: must be 0/-inf
    packed = Trainer(lm, TrainConfig(shared_prefix=True, pack_tokens=256, seed=5))
    torch.manual_seed(0)
    with torch.no_grad():  # a non-zero adapter, so gradients reach both LoRA matrices
        for p in packed.params:
            p.add_(0.02 * torch.randn_like(p))
    return lm, packed


def _loss_and_grads(trainer, seqs, adv, coefs, temps=None):
    trainer.model.zero_grad(set_to_none=True)
    total = 0.0
    for mb in trainer.plan(seqs):
        logp, mask = trainer.logprobs([seqs[i] for i in mb], [temps[i] for i in mb] if temps else None)
        out = grpo_loss(logp, logp.detach() - 0.05, adv[mb], mask, coefs[mb], beta=0.0)
        out.loss.backward()
        total += float(out.loss.detach())
    return total, [p.grad.clone() for p in trainer.params]


@pytest.mark.parametrize("prefix_attention", ["packed", "cache"])
def test_shared_prefix_gives_the_same_loss_and_gradients_as_padding(trainers, prefix_attention):
    lm, trainer = trainers
    tok = lm.tokenizer
    prompts = [lm.tokenize_chat([{"role": "user", "content": q}]) for q in ("Name a color.", "What is two plus two?")]
    replies = [["Blue.", "Red, I think", "green"], ["Four.", "2 + 2 = 4", "It is four, of course."]]
    seqs = [(p, tok.encode(r, add_special_tokens=False) + [tok.eos_token_id]) for p, rs in zip(prompts, replies) for r in rs]
    seqs.append((prompts[0], [tok.eos_token_id]))  # a one-token completion: predicted by the prompt alone
    adv = torch.tensor([1.0, -0.5, -0.5, 0.8, -1.2, 0.4, 0.3])
    coefs = torch.tensor(sequence_coefficients([len(c) for _, c in seqs], [1.0] * 7, "grpo"))
    temps = [0.7, 1.0, 0.7, 1.3, 1.0, 0.9, 1.0]
    base = trainer.cfg
    try:
        trainer.cfg = dataclasses.replace(base, shared_prefix=True, prefix_attention=prefix_attention)
        shared_loss, shared_grads = _loss_and_grads(trainer, seqs, adv, coefs, temps)
        plans = trainer.plan(seqs)
        trainer.cfg = dataclasses.replace(base, shared_prefix=False)
        plain_loss, plain_grads = _loss_and_grads(trainer, seqs, adv, coefs, temps)
    finally:
        trainer.cfg = base
    assert len(plans) >= 1 and sum(len(b) for b in plans) == 7
    assert shared_loss == pytest.approx(plain_loss, abs=1e-5)
    num = sum(float((a - b).norm() ** 2) for a, b in zip(shared_grads, plain_grads)) ** 0.5
    den = sum(float(b.norm() ** 2) for b in plain_grads) ** 0.5
    assert den > 0 and num / den < 1e-3, (num, den)


def test_attention_without_a_block_mask_is_refused_with_a_clear_error():
    lm = HFBackend.load()
    lm.model.config._attn_implementation = "flash_attention_2"  # as a GPU user might load it
    with pytest.raises(ValueError, match="shared_prefix = true needs 'sdpa' or 'eager' attention"):
        Trainer(lm, TrainConfig(shared_prefix=True))


def test_the_frozen_view_is_the_base_model_whatever_the_adapter(trainers):
    lm, trainer = trainers  # its adapter is non-zero
    p = lm.tokenize_chat([{"role": "user", "content": "Name a color."}])
    g = SamplingParams(temperature=0.0, max_tokens=8)
    policy = lm.complete(p, g)
    judge = lm.frozen().complete(p, g)

    def forward_logprobs(ids):  # a plain forward pass over prompt + reply
        with torch.no_grad():  # (the caller holds lm.lock: the batcher delivers a reply before leaving its variant)
            logits = trainer.model(input_ids=torch.tensor([p + ids])).logits[0, len(p) - 1:-1]
        return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(ids)[:, None])[:, 0].tolist()

    with lm.lock, trainer.model.disable_adapter():
        assert judge.logprobs == pytest.approx(forward_logprobs(judge.token_ids), abs=2e-3)
    with lm.lock:
        assert policy.logprobs == pytest.approx(forward_logprobs(policy.token_ids), abs=2e-3)
    with lm.lock, trainer.model.disable_adapter():
        assert policy.logprobs != pytest.approx(forward_logprobs(policy.token_ids), abs=1e-2)
