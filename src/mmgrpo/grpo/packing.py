"""Shared-prefix packing of a training batch. Pure: token ids in, tensors out, no model.

The G completions of one prompt go into one packed sequence after a single copy of the
prompt; a block mask lets each completion see the prompt and itself only, and its position
ids restart after the prompt. The prompt is computed once instead of G times, and several
such segments share a row without padding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

Seq = tuple[list[int], list[int]]  # (prompt ids, completion ids)


def plan_packed(seqs: list[Seq], budget: int) -> list[list[int]]:
    """Micro-batches (lists of indices into seqs) whose packed length stays within budget.

    Sequences with identical prompts form a segment (prompt once + their completions); a
    segment too long for the budget is split across micro-batches, each repeating the prompt.
    """
    segments: dict[tuple, list[int]] = {}
    for i, (p, _) in enumerate(seqs):
        segments.setdefault(tuple(p), []).append(i)
    pieces: list[tuple[int, list[int]]] = []  # (packed length, indices)
    for prompt, idx in segments.items():
        cur, n = [], len(prompt)
        for i in idx:
            c = len(seqs[i][1])
            if cur and n + c > budget:
                pieces.append((n, cur))
                cur, n = [], len(prompt)
            cur.append(i)
            n += c
        pieces.append((n, cur))
    batches: list[list[int]] = []
    cur, n = [], 0
    for length, idx in pieces:
        if cur and n + length > budget:
            batches.append(cur)
            cur, n = [], 0
        cur += idx
        n += length
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


def pack(seqs: list[Seq]) -> Packed:
    """One packed row for the given sequences (plan them with ``plan_packed`` first)."""
    segments: dict[tuple, list[int]] = {}
    for i, (p, _) in enumerate(seqs):
        segments.setdefault(tuple(p), []).append(i)
    T = max(len(c) for _, c in seqs)
    ids: list[int] = []
    pos: list[int] = []
    blocks: list[tuple[int, int, list[tuple[int, int]]]] = []
    predictors, targets, rows, cols = [], [], [], []
    for prompt, idx in segments.items():
        start, P = len(ids), len(prompt)
        ids += prompt
        pos += range(P)
        spans = []
        for i in idx:
            comp = seqs[i][1]
            cstart = len(ids)
            ids += comp
            pos += range(P, P + len(comp))
            spans.append((cstart, len(comp)))
            for k, t in enumerate(comp):
                predictors.append(start + P - 1 if k == 0 else cstart + k - 1)
                targets.append(t)
                rows.append(i)
                cols.append(T - len(comp) + k)
        blocks.append((start, P, spans))
    N = len(ids)
    allow = torch.zeros((N, N), dtype=torch.bool)
    for start, P, spans in blocks:
        allow[start:start + P, start:start + P] = torch.ones(P, P, dtype=torch.bool).tril()
        for cstart, n in spans:
            allow[cstart:cstart + n, start:start + P] = True
            allow[cstart:cstart + n, cstart:cstart + n] = torch.ones(n, n, dtype=torch.bool).tril()
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
