"""Shared-prefix packing: the plan, the mask, and equivalence with the plain padded update."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mmgrpo.config import TrainConfig
from mmgrpo.grpo.loss import grpo_loss, sequence_coefficients
from mmgrpo.grpo.packing import pack, plan_packed, segments
from mmgrpo.grpo.trainer import Trainer
from mmgrpo.lm.base import SamplingParams
from mmgrpo.lm.hf import HFBackend


def test_plan_keeps_groups_together_and_splits_what_does_not_fit():
    seqs = [([1, 2, 3], [7] * 4), ([1, 2, 3], [8] * 4), ([5, 6], [9] * 2), ([1, 2, 3], [7] * 4)]
    assert plan_packed(seqs, budget=100) == [[0, 1, 3, 2]]
    # prompt (3) + two completions (8) = 11 fits, a third does not: the group splits, the prompt repeats
    assert plan_packed(seqs, budget=11) == [[0, 1], [3, 2]]


def test_prompts_that_begin_alike_share_their_common_prefix_and_others_do_not():
    demos = list(range(100, 140))  # a module's instruction and demos, then each call's own input
    prompts = [[1] + demos + [7, 8], [1] + demos + [9], [1, 2, 3], [1] + demos + [7, 5]]
    # sorted: [1, 2, 3] alone (sharing its 1 token would cut the calls' 41 to 1), then the three calls
    assert segments(prompts) == [(3, [2]), (41, [3, 0, 1])]
    assert segments([[4, 5], [4, 5], [4, 5, 6]]) == [(2, [0, 1, 2])]  # a prompt may be the whole prefix
    seqs = [(p, [0] * 2) for p in prompts]
    # 3 + 2, then prefix 41 + rests 2 + 2 + 1 + completions 6 = 52: one micro-batch of 57; at 50 the
    # calls' segment splits after its first call (5 + 41 + 4 = 50), the rest repeating the prefix
    assert plan_packed(seqs, budget=60) == [[2, 3, 0, 1]]
    assert plan_packed(seqs, budget=50) == [[2, 3], [0, 1]]
    # the cache kernel's padded batches: every prefix as long as the longest, every rest and completion too
    # ([2] with [3]: 2 x 41 + 2 x 2 + 2 x 2 = 90), so at 60 the short prompt goes alone; at 100 all fit (98)
    assert plan_packed(seqs, budget=60, padded=True) == [[2], [3, 0, 1]]
    assert plan_packed(seqs, budget=100, padded=True) == [[2, 3, 0, 1]]


def test_pack_mask_positions_and_predictors_of_calls_with_a_common_prefix():
    pk = pack([([1, 2, 3], [4]), ([1, 2], [5, 6])])
    # prefix [1, 2]; in sorted order call 1 (nothing of its prompt left: 5, 6), then call 0 (rest [3], then 4)
    assert pk.ids.tolist() == [[1, 2, 5, 6, 3, 4]]
    assert pk.positions.tolist() == [[0, 1, 2, 3, 2, 3]]
    allow = pk.allow[0, 0].int().tolist()
    assert allow == [[1, 0, 0, 0, 0, 0],
                     [1, 1, 0, 0, 0, 0],
                     [1, 1, 1, 0, 0, 0],
                     [1, 1, 1, 1, 0, 0],
                     [1, 1, 0, 0, 1, 0],
                     [1, 1, 0, 0, 1, 1]]
    assert pk.targets.tolist() == [5, 6, 4]
    assert pk.predictors.tolist() == [1, 2, 4]  # 5 by the prefix's last token, 4 by its call's rest
    assert pk.rows.tolist() == [1, 1, 0] and pk.cols.tolist() == [0, 1, 1] and pk.T == 2


def test_the_rest_of_a_prompt_asked_by_several_calls_is_packed_once():
    """The G completions of one example: prefix [1, 2], the rest [3] once for two completions, then
    the other example's rest [9] and its completion; each span sees its own prompt only."""
    seqs = [([1, 2, 3], [4, 5]), ([1, 2, 3], [6]), ([1, 2, 9], [7])]
    pk = pack(seqs)
    assert pk.ids.tolist() == [[1, 2, 3, 4, 5, 6, 9, 7]]
    assert pk.positions.tolist() == [[0, 1, 2, 3, 4, 3, 2, 3]]
    assert pk.allow[0, 0].int().tolist() == [[1, 0, 0, 0, 0, 0, 0, 0],
                                             [1, 1, 0, 0, 0, 0, 0, 0],
                                             [1, 1, 1, 0, 0, 0, 0, 0],
                                             [1, 1, 1, 1, 0, 0, 0, 0],
                                             [1, 1, 1, 1, 1, 0, 0, 0],
                                             [1, 1, 1, 0, 0, 1, 0, 0],
                                             [1, 1, 0, 0, 0, 0, 1, 0],
                                             [1, 1, 0, 0, 0, 0, 1, 1]]
    assert pk.predictors.tolist() == [2, 3, 2, 6]  # a completion's first token: its prompt's last
    assert Trainer.forward_tokens(seqs, "packed") == 8
    assert plan_packed(seqs, budget=8) == [[0, 1, 2]]
    assert plan_packed(seqs, budget=7) == [[0, 1], [2]]  # the second row repeats the prefix: 2 + 1 + 1
    assert pack(seqs, share_rests=False).ids.tolist() == [[1, 2, 3, 4, 5, 3, 6, 9, 7]]  # a rest per call
    assert plan_packed(seqs, budget=8, share_rests=False) == [[0, 1], [2]]
    # the cache kernel's batches: the prefix (10), each distinct rest (2 x 2), each completion (4 x 1)
    seqs = [([1] * 10 + [2, 3], [9]), ([1] * 10 + [2, 3], [9]), ([1] * 10 + [4, 5], [9]), ([1] * 10 + [4, 5], [9])]
    assert plan_packed(seqs, budget=18, padded=True) == [[0, 1, 2, 3]]
    assert len(plan_packed(seqs, budget=18, padded=True, share_rests=False)) == 2  # 10 + 4 x 2 + 4 = 22


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
    lm = HFBackend.load(dtype="float32")  # exactness at 1e-5: bf16 rounds to 3 digits
    lm.model.set_attn_implementation(request.param)  # eager adds the mask to the scores: must be 0/-inf
    packed = Trainer(lm, TrainConfig(shared_prefix=True, pack_tokens=256, seed=5, update_dtype="model"))
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


QUESTIONS = ("Name a color.", "What is two plus two?", "Say hello.", "Count to three.")


@pytest.mark.parametrize("prefix_attention", ["packed", "cache"])
@pytest.mark.parametrize("shape", ["one prompt", "two prompts", "distinct prompts"])
def test_shared_prefix_gives_the_same_loss_and_gradients_as_padding(trainers, prefix_attention, shape):
    """One prompt (its completions share all of it: the first token is predicted by the prefix),
    two prompts with three completions each, or six distinct prompts sharing the chat template's
    opening (each call's rest of prompt after the common prefix)."""
    lm, trainer = trainers
    tok = lm.tokenizer
    chat = [lm.tokenize_chat([{"role": "user", "content": q}]) for q in QUESTIONS + ("Why?", "A fruit?")]
    prompts = {"one prompt": [chat[0]] * 6, "two prompts": [chat[0]] * 3 + [chat[1]] * 3,
               "distinct prompts": chat[:6]}[shape]
    replies = ["Blue.", "Red, I think", "green", "Four.", "2 + 2 = 4", "It is four, of course."]
    seqs = [(p, tok.encode(r, add_special_tokens=False) + [tok.eos_token_id]) for p, r in zip(prompts, replies)]
    seqs.append((prompts[0], [tok.eos_token_id]))  # a one-token completion
    segs = segments([p for p, _ in seqs])
    if shape == "one prompt":
        assert segs == [(len(chat[0]), segs[0][1])]
    if shape == "distinct prompts":  # one prefix, shorter than every prompt
        assert len(segs) == 1 and segs[0][0] < min(len(p) for p in chat[:6])
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


def test_attention_without_a_block_mask_is_refused_for_packed_and_auto_picks_the_cache():
    lm = HFBackend.load(dtype="float32")
    lm.model.config._attn_implementation = "flash_attention_2"  # as a GPU user might load it
    with pytest.raises(ValueError, match="shared_prefix = true needs 'sdpa' or 'eager' attention"):
        Trainer(lm, TrainConfig(shared_prefix=True, prefix_attention="packed"))
    trainer = Trainer(HFBackend.load(dtype="float32"), TrainConfig(shared_prefix=True))
    trainer.attn = "flash_attention_2"
    seqs = [([1, 2, 3, 4], [5, 6]), ([1, 2, 3, 4], [7])]
    trainer.plan(seqs)
    assert trainer.kernel == "cache"


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


def _saved_bytes(trainer, seqs):
    """Bytes autograd keeps from the forward pass for the backward pass, and the log-probs."""
    total = 0

    def keep(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        logp, mask = trainer.logprobs(seqs)
    return total, logp, mask


@pytest.mark.parametrize("shape", ["a call alone", "a packed row"])
def test_a_long_forward_is_recomputed_in_the_backward_pass_with_the_same_gradients(trainers, shape):
    """Over recompute_tokens, a micro-batch keeps each layer's input only (gradient checkpointing):
    far less kept for the backward pass, the same log-probs and gradients, and the model is left
    without checkpointing for the short micro-batches after it."""
    lm, trainer = trainers
    tok = lm.tokenizer
    long_q = "Please rewrite this request without the names in it: " + "Anna Smith met Bob Jones in Paris. " * 12
    prompts = [lm.tokenize_chat([{"role": "user", "content": long_q}])] * (1 if shape == "a call alone" else 3)
    replies = ["Someone met someone in a city.", "A met B.", "They met"][:len(prompts)]
    seqs = [(p, tok.encode(r, add_special_tokens=False) + [tok.eos_token_id]) for p, r in zip(prompts, replies)]
    n = trainer.forward_tokens(seqs, "plain" if len(seqs) == 1 else "packed")
    base = trainer.cfg
    results = {}
    trainer.model.train()  # as in Trainer.update: HF checkpoints layers in training mode only
    try:
        for name, limit in (("kept", 10 ** 6), ("recomputed", n - 1)):
            trainer.cfg = dataclasses.replace(base, recompute_tokens=limit)
            trainer.model.zero_grad(set_to_none=True)
            saved, logp, mask = _saved_bytes(trainer, seqs)
            assert not any(getattr(m, "gradient_checkpointing", False) for m in lm.model.modules())  # off again
            (logp * mask).sum().backward()
            results[name] = saved, logp.detach(), [p.grad.clone() for p in trainer.params]
    finally:
        trainer.cfg = base
        trainer.model.eval()
        trainer.model.zero_grad(set_to_none=True)
    (kept, lp_kept, g_kept), (rec, lp_rec, g_rec) = results["kept"], results["recomputed"]
    assert rec < kept / 3, (rec, kept)
    assert torch.allclose(lp_rec, lp_kept, atol=1e-5)
    num = sum(float((a - b).norm() ** 2) for a, b in zip(g_rec, g_kept)) ** 0.5
    den = sum(float(b.norm() ** 2) for b in g_kept) ** 0.5
    assert den > 0 and num / den < 1e-4, (num, den)


def test_recompute_tokens_must_not_be_negative():
    with pytest.raises(ValueError, match="recompute_tokens"):
        TrainConfig(recompute_tokens=-1)


def test_auto_packs_prefixes_that_fit_a_row_and_caches_longer_ones():
    from conftest import tiny_backend

    trainer = Trainer(tiny_backend(), TrainConfig(shared_prefix=True, pack_tokens=64))
    short = [([7] * 20 + [i], [5, 6]) for i in range(4)]  # 20 shared tokens + 4 calls of 3: one 33-token row
    batches = trainer.plan(short)
    assert trainer.kernel == "packed" and sorted(i for mb in batches for i in mb) == [0, 1, 2, 3]
    long = [([7] * 80 + [i], [5, 6]) for i in range(4)]  # an 80-token prefix cannot share a 64-token row
    batches = trainer.plan(long)
    assert trainer.kernel == "cache" and sorted(i for mb in batches for i in mb) == [0, 1, 2, 3]
    logp, mask = trainer.logprobs(long)  # by the kernel chosen
    assert logp.shape[0] == 4 and int(mask.sum()) == 8
    # an input whose attention block the cache kernel could not recompute goes packed (recomputed)
    bounded = Trainer(tiny_backend(), TrainConfig(shared_prefix=True, pack_tokens=64, recompute_tokens=60))
    batches = bounded.plan(long)
    assert bounded.kernel == "packed" and sorted(i for mb in batches for i in mb) == [0, 1, 2, 3]
    fits = Trainer(tiny_backend(), TrainConfig(shared_prefix=True, pack_tokens=64, recompute_tokens=90))
    fits.plan(long)
    assert fits.kernel == "cache"
    fixed = Trainer(tiny_backend(), TrainConfig(shared_prefix=True, pack_tokens=64, prefix_attention="packed"))
    fixed.plan(long)
    assert fixed.kernel == "packed"  # a kernel named in the config is kept


def test_the_cache_kernel_keeps_each_prompt_with_its_own_keys_when_no_rest_is_left():
    """Two prompts with nothing in common, each its own segment and asked whole, seen first in the
    order opposite to the segments' sorted order: the same log-probs as the padded forward."""
    from conftest import tiny_backend

    trainer = Trainer(tiny_backend(), TrainConfig(shared_prefix=True, prefix_attention="cache"))
    seqs = [([900, 800, 700], [11, 12]), ([5, 6, 7, 8], [13]), ([900, 800, 700], [14, 15, 16])]
    temps = torch.ones(3)
    with torch.no_grad():
        cached, cmask = trainer.cached_logprobs(seqs, temps)
        plain, pmask = trainer.completion_logprobs(seqs, temps)
    assert torch.equal(cmask, pmask)
    assert torch.allclose(cached[cmask], plain[pmask], atol=1e-5)
