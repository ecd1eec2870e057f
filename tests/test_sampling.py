"""The vectorised sampler (lm/sampling.py): exact integer hashing, batch-independent draws, the
right distribution, top-p's nucleus and greedy rows."""
from __future__ import annotations

import torch

from mmgrpo.lm import sampling


def _hash32_py(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_hash_is_exact_32_bit_arithmetic():
    xs = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 123456789, 0xDEADBEEF]
    got = sampling._hash32(torch.tensor(xs, dtype=torch.long)).tolist()
    assert got == [_hash32_py(x) for x in xs]


def test_uniforms_lie_in_unit_interval_and_depend_on_seed_and_counter():
    seeds = sampling.seed_tensor([0, 1, 2**62 + 5, -3, 10**20], "cpu")
    u0 = sampling.uniforms(seeds, torch.zeros(5, dtype=torch.long))
    u1 = sampling.uniforms(seeds, torch.ones(5, dtype=torch.long))
    assert ((u0 >= 0) & (u0 < 1)).all() and ((u1 >= 0) & (u1 < 1)).all()
    assert len(set(u0.tolist()) | set(u1.tolist())) == 10
    many = sampling.uniforms(torch.full((20000,), 7, dtype=torch.long), torch.arange(20000))
    assert abs(many.mean().item() - 0.5) < 0.01 and abs(many.var().item() - 1 / 12) < 0.003


def test_a_row_draws_the_same_tokens_alone_or_in_any_batch():
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(6, 50, generator=g), -1)
    hot = torch.tensor([True, True, False, True, True, True])
    top_p = torch.tensor([1.0, 0.9, 1.0, 0.5, 1.0, 0.7])
    seeds = sampling.seed_tensor([11, 12, 13, 14, 11, 99], "cpu")
    counters = torch.tensor([0, 3, 1, 2, 5, 0])
    batch = sampling.draw(logp, hot, top_p, seeds, counters).tolist()
    alone = [sampling.draw(logp[i:i + 1], hot[i:i + 1], top_p[i:i + 1], seeds[i:i + 1], counters[i:i + 1]).item()
             for i in range(6)]
    assert batch == alone
    assert batch[2] == int(logp[2].argmax())  # temperature 0: the argmax
    rev = sampling.draw(logp.flip(0), hot.flip(0), top_p.flip(0), seeds.flip(0), counters.flip(0)).tolist()
    assert rev[::-1] == batch


def test_draws_follow_the_distribution_and_top_p_keeps_the_nucleus():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    n = 20000
    logp = probs.log().expand(n, -1)
    seeds = sampling.seed_tensor(list(range(n)), "cpu")
    zero = torch.zeros(n, dtype=torch.long)
    hot = torch.ones(n, dtype=torch.bool)
    full = sampling.draw(logp, hot, torch.ones(n), seeds, zero)
    freq = torch.bincount(full, minlength=5).double() / n
    assert torch.allclose(freq, probs.double(), atol=0.015), freq
    nucleus = sampling.draw(logp, hot, torch.full((n,), 0.8), seeds, zero)  # 0.5 + 0.25 < 0.8: three tokens
    freq = torch.bincount(nucleus, minlength=5).double() / n
    assert freq[3:].sum() == 0
    assert torch.allclose(freq[:3], (probs[:3] / probs[:3].sum()).double(), atol=0.015), freq
    tiny = sampling.draw(logp, hot, torch.full((n,), 0.01), seeds, zero)  # the top token is always kept
    assert (tiny == 0).all()
