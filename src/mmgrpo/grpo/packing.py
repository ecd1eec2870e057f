"""Shared-prefix packing of a training batch. Pure: token ids in, tensors out, no model.

Prompts that begin alike form a segment: their longest common prefix once, then each distinct
rest of a prompt once, then the completions, each after its own prompt. Calls of one module
share its instruction and demos even when their inputs differ, which after a prompt search is
most of every prompt; the G completions of one example share its whole prompt. A block mask lets
each span see what comes before it in its own prompt (the prefix, its rest) and itself only, its
position ids continuing from there: a prompt tree of two levels, each node computed once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

Seq = tuple[list[int], list[int]]  # (prompt ids, completion ids)


def _common(a: list[int], b: list[int]) -> int:
    n, limit = 0, min(len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def segments(prompts: list[list[int]]) -> list[tuple[int, list[int]]]:
    """(shared prefix length, member indices) for the prompts, in sorted prompt order.

    Sorted, prompts that begin alike sit together, and a run of them shares the least of its
    neighbours' common prefixes. The runs are chosen to save the most tokens, (n - 1) * prefix
    summed over runs (an exact dynamic programme over the sorted order), so that a prompt sharing
    only the chat template's opening does not cut the prefix of a module's calls to that opening.
    """
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    ps = [prompts[i] for i in order]
    adj = [0] + [_common(a, b) for a, b in zip(ps, ps[1:])]
    best, start = [0] * (len(ps) + 1), [0] * (len(ps) + 1)  # over the first j prompts: savings, last run's start
    for j in range(1, len(ps) + 1):
        best[j], start[j] = best[j - 1], j - 1  # ps[j - 1] alone
        shared = len(ps[j - 1])
        for i in range(j - 2, -1, -1):  # the run ps[i : j]
            shared = min(shared, adj[i + 1])
            if shared == 0:
                break
            if best[i] + (j - 1 - i) * shared > best[j]:
                best[j], start[j] = best[i] + (j - 1 - i) * shared, i
    out: list[tuple[int, list[int]]] = []
    j = len(ps)
    while j > 0:
        i = start[j]
        shared = min([len(ps[i])] + adj[i + 1:j])
        out.append((shared, order[i:j]))
        j = i
    return out[::-1]


def plan_packed(seqs: list[Seq], budget: int, padded: bool = False, share_rests: bool = True) -> list[list[int]]:
    """Micro-batches (lists of indices into seqs) whose packed length stays within budget.

    A segment too long for the budget is split across micro-batches, each repeating its prefix
    (a call alone over the budget gets a micro-batch of its own). ``padded``: the cost is that of
    the cache kernel's three padded batches, prefixes x the longest prefix + distinct rests of
    prompts x the longest rest + calls x the longest completion, which bounds its activations as
    the budget does a row. ``share_rests``: a rest of a prompt asked by several calls is counted
    once (else once per call).
    """
    batches: list[list[int]] = []
    cur: list[int] = []
    n = n_pre = longest_pre = n_rests = longest_r = n_calls = longest_c = 0
    seen: set[tuple] = set()  # rests of prompts already in this micro-batch (computed once)
    for L, idx in segments([p for p, _ in seqs]):
        first = True  # the segment's prefix is (re)counted in every micro-batch it reaches
        for i in idx:
            r, c = len(seqs[i][0]) - L, len(seqs[i][1])
            own = tuple(seqs[i][0][L:]) if share_rests else (i,)
            new = first or own not in seen
            if padded:
                size = ((n_pre + first) * max(longest_pre, L) + (n_rests + new) * max(longest_r, r)
                        + (n_calls + 1) * max(longest_c, c))
            else:
                size = n + L * first + c + (r if new else 0)
            if cur and size > budget:
                batches.append(cur)
                cur, n, n_pre, longest_pre, n_rests, longest_r, n_calls, longest_c = [], 0, 0, 0, 0, 0, 0, 0
                first = new = True
                size = L + r + c
            if first:
                seen = set()
            seen.add(own)
            cur.append(i)
            n, n_pre, n_rests, n_calls = size, n_pre + first, n_rests + new, n_calls + 1
            longest_pre, longest_r, longest_c = max(longest_pre, L), max(longest_r, r), max(longest_c, c)
            first = False
    if cur:
        batches.append(cur)
    return batches


@dataclass
class Packed:
    ids: torch.Tensor  # (1, N)
    positions: torch.Tensor  # (1, N)
    allow: torch.Tensor  # (1, 1, N, N) bool, True = may attend
    predictors: torch.Tensor  # (K,) position whose logits predict each completion token
    targets: torch.Tensor  # (K,) the completion tokens
    rows: torch.Tensor  # (K,) which sequence each token belongs to
    cols: torch.Tensor  # (K,) its column in the (B, T) right-aligned layout
    T: int


def pack(seqs: list[Seq], share_rests: bool = True) -> Packed:
    """One packed row for the given sequences (plan them with ``plan_packed`` first)."""
    T = max(len(c) for _, c in seqs)
    ids: list[int] = []
    pos: list[int] = []
    spans: list[tuple[int, int, list[tuple[int, int]]]] = []  # (start, length, the spans it sees whole)
    predictors, targets, rows, cols = [], [], [], []
    for L, idx in segments([p for p, _ in seqs]):
        start = len(ids)
        ids += seqs[idx[0]][0][:L]
        pos += range(L)
        spans.append((start, L, []))
        rests: dict[tuple, tuple[int, int]] = {}  # each distinct rest of a prompt: (start, length)
        for i in idx:
            prompt, comp = seqs[i]
            rest = prompt[L:]
            key = tuple(rest) if share_rests else i
            if rest and key not in rests:
                rests[key] = (len(ids), len(rest))
                spans.append((len(ids), len(rest), [(start, L)]))
                ids += rest
                pos += range(L, len(prompt))
            above = [(start, L), rests[key]] if rest else [(start, L)]
            cstart = len(ids)
            ids += comp
            pos += range(len(prompt), len(prompt) + len(comp))
            spans.append((cstart, len(comp), above))
            last = sum(above[-1]) - 1  # the prompt's last token predicts the first completion token
            for k, t in enumerate(comp):
                predictors.append(cstart + k - 1 if k else last)
                targets.append(t)
                rows.append(i)
                cols.append(T - len(comp) + k)
    N = len(ids)
    allow = torch.zeros((N, N), dtype=torch.bool)
    for begin, n, above in spans:
        allow[begin:begin + n, begin:begin + n] = torch.ones(n, n, dtype=torch.bool).tril()
        for a, m in above:
            allow[begin:begin + n, a:a + m] = True
    return Packed(ids=torch.tensor([ids]), positions=torch.tensor([pos]), allow=allow[None, None],
                  predictors=torch.tensor(predictors), targets=torch.tensor(targets), rows=torch.tensor(rows),
                  cols=torch.tensor(cols), T=T)


def unpack(flat: torch.Tensor, packed: Packed, n_seqs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token values (K,) back into the (B, T) right-aligned layout, with its mask."""
    out = flat.new_zeros((n_seqs, packed.T))
    out = out.index_put((packed.rows.to(flat.device), packed.cols.to(flat.device)), flat)
    mask = torch.zeros((n_seqs, packed.T), dtype=torch.bool)
    mask[packed.rows, packed.cols] = True
    return out, mask
