"""Vectorised, seeded token sampling on the model's device.

Every row draws with its own seed, yet the whole batch samples in a few tensor operations and only
the chosen ids and their log-probs leave the device. The randomness is counter-based: the uniform
behind a row's k-th token is a hash of (seed, k), so a row draws the same tokens whichever rows
share its batch, whenever it joined it, and on any device (integer arithmetic, exact in int64).
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """(x * m) mod 2**32 for 0 <= x < 2**32, in int64 without overflow (products stay < 2**49)."""
    return (x * (m & 0xFFFF) + (((x * (m >> 16)) & 0xFFFF) << 16)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A well-mixed 32-bit integer hash (Wellons' lowbias32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniforms(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One uniform in [0, 1) per row (float64, 53 bits) from its seed (int64 >= 0) and counter."""
    h = _hash32((seeds & _M32) ^ 0x9E3779B9)  # constants: no fixed point at zero
    h = _hash32(h ^ ((seeds >> 32) & _M32) ^ 0x85EBCA6B)
    h = _hash32(h ^ (counters & _M32) ^ 0xC2B2AE35)
    lo = _hash32(h ^ 0x68E31DA4)
    return ((h << 21) + (lo >> 11)).double() / float(1 << 53)


def seed_tensor(seeds: list[int], device) -> torch.Tensor:
    return torch.tensor([s % (1 << 63) for s in seeds], dtype=torch.long, device=device)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    cdf = probs.double().cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True)
    return idx.clamp_(max=cdf.shape[-1] - 1).squeeze(-1)


def draw(logp: torch.Tensor, hot: torch.Tensor, top_p: torch.Tensor, seeds: torch.Tensor,
         counters: torch.Tensor) -> torch.Tensor:
    """Next token per row from tempered log-probs ``logp`` (B, V): a draw where ``hot`` (the row's
    temperature > 0), restricted to the top-p nucleus where top_p < 1 (the top token always kept),
    else the argmax. Inverse-CDF sampling with each row's counter-based uniform; rows with and
    without top-p are drawn apart, so no row's token depends on its batch-mates."""
    out = logp.argmax(-1)
    if not bool(hot.any()):
        return out
    u = uniforms(seeds, counters)
    plain = (hot & (top_p >= 1.0)).nonzero().squeeze(-1)
    if plain.numel():
        out[plain] = _inverse_cdf(logp[plain].exp(), u[plain])
    nucleus = (hot & (top_p < 1.0)).nonzero().squeeze(-1)
    if nucleus.numel():
        probs, order = torch.sort(logp[nucleus].exp(), dim=-1, descending=True)
        keep = (probs.cumsum(-1) - probs) < top_p[nucleus].unsqueeze(-1)  # the mass before a token < top_p
        idx = _inverse_cdf(torch.where(keep, probs, 0.0), u[nucleus])
        out[nucleus] = order.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    return out
