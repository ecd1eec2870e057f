"""The update's log-prob kernels: "plain" padded micro-batches, "packed" (one row per micro-batch:
each distinct prompt once, its completions after it, a block mask) and "cache" (each distinct prefix
once, its keys/values shared by the calls that continue it); `plan` picks the kernel and micro-batches."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from .loss import token_logprobs
from .packing import pack, plan_packed, segments, unpack

KERNELS_RUN = ("packed", "cache")  # what prefix_attention = "auto" chooses between


def _rows(cache, rows: list[int], dev):
    """A new cache holding the given rows of ``cache`` (differentiable: gradients reach the source)."""
    from transformers import DynamicCache

    out, idx = DynamicCache(), torch.tensor(rows, device=dev)
    for li, layer in enumerate(cache.layers):
        out.update(layer.keys[idx], layer.values[idx], li)
    return out


def _head_in_full(mod, args):
    dev = args[0].device.type
    mod._autocast_was = torch.is_autocast_enabled(dev)
    torch.set_autocast_enabled(dev, False)
    return (args[0].to(mod.weight.dtype), *args[1:])


def _head_out(mod, args, out):
    torch.set_autocast_enabled(args[0].device.type, mod._autocast_was)


def keep_head_precise(model) -> None:
    """The output head computes outside any autocast, from hidden states cast to its weights' dtype:
    bf16 logits would round log-probs by up to ~0.1 (logits of 16-32 are 0.125 apart in bf16)."""
    head = model.get_output_embeddings()
    head.register_forward_pre_hook(_head_in_full)
    head.register_forward_hook(_head_out)


class LogprobKernels:
    """The forward half of `Trainer` (its state is set up there)."""

    def _micro_batches(self, seqs: list[tuple[list[int], list[int]]]) -> list[list[int]]:
        """Padded micro-batches of similar lengths within the padded-token budget."""
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]) + len(seqs[i][1]))
        batches, cur, cur_max = [], [], 0
        for i in order:
            n = len(seqs[i][0]) + len(seqs[i][1])
            if cur and max(cur_max, n) * (len(cur) + 1) > self.cfg.token_budget:
                batches.append(cur)
                cur, cur_max = [], 0
            cur.append(i)
            cur_max = max(cur_max, n)
        if cur:
            batches.append(cur)
        return batches

    def plan(self, seqs: list[tuple[list[int], list[int]]]) -> list[list[int]]:
        """Micro-batches for the update, and the kernel that runs them (``self.kernel``). With
        prefix_attention = "auto": "packed" while every prefix fits a packed row with its calls, "cache"
        once one does not (a prompt search's demos: such a prefix would get a row of its own, its N x N
        block mask growing past pack_tokens). Measured on this rule's two sides (docs/performance.md):
        on Banking77's 300-token prefixes packed is 1.9x faster, on many-hop's 1,500-token prefixes
        with demos cache is 2.1x faster. "cache" only while its attention blocks fit (`_cache_fits`)."""
        if not self.cfg.shared_prefix:
            self.kernel = "plain"
            return self._micro_batches(seqs)
        kernels = self.kernels()
        if "packed" in kernels:
            packed = plan_packed(seqs, self.cfg.pack_tokens, padded=False, share_rests=self.share_rests)
            fits = all(self.forward_tokens([seqs[i] for i in mb], "packed") <= self.cfg.pack_tokens for mb in packed)
            if fits or kernels == ("packed",) or not self._cache_fits(seqs):
                self.kernel = "packed"
                return packed
        self.kernel = "cache"
        return plan_packed(seqs, self.cfg.token_budget, padded=True, share_rests=self.share_rests)

    def _cache_fits(self, seqs: list[tuple[list[int], list[int]]]) -> bool:
        """Whether the "cache" kernel's largest attention block (a prefix over itself, a rest over its
        prefix and itself) stays within recompute_tokens squared: that kernel cannot recompute, so a
        long input (a PUPA request asked by the G samples) goes to "packed", which recomputes it."""
        limit = self.cfg.recompute_tokens ** 2
        for L, idx in segments([p for p, _ in seqs]):
            rests = {len(seqs[i][0]) - L for i in idx}
            if max(L * L, *(r * (L + r) for r in rests)) > limit:
                return False
        return True

    def kernels(self) -> tuple[str, ...]:
        """The kernels prefix_attention allows ("packed" needs a block mask: sdpa or eager attention)."""
        if self.cfg.prefix_attention != "auto":
            return (self.cfg.prefix_attention,)
        return KERNELS_RUN if self.attn in ("sdpa", "eager") else ("cache",)

    def logprobs(self, seqs: list[tuple[list[int], list[int]]],
                 temps: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) completion log-probs of logits / temps (one per sequence; None = 1), right-aligned,
        and their mask, by the kernel the last plan chose (before any plan: the first configured one)."""
        t = torch.tensor([x if x > 0 else 1.0 for x in temps] if temps else [1.0] * len(seqs))
        t = t.to(self.backend.device)
        kernel = self.kernel or ("plain" if not self.cfg.shared_prefix else self.kernels()[0])
        if kernel == "cache":  # its cache cannot be recomputed; token_budget bounds it
            with self._autocast():
                return self.cached_logprobs(seqs, t)
        long = self.forward_tokens(seqs, kernel) > self.cfg.recompute_tokens  # one call: the same either way
        if long and len(seqs) == 1:  # nothing to share: a causal mask needs no N x N block mask
            kernel = "plain"
        with self._recompute(long), self._autocast():
            return self.completion_logprobs(seqs, t) if kernel == "plain" else self.packed_logprobs(seqs, t)

    def _autocast(self):
        """The forward pass's matrix products in ``update_dtype`` (none: a null context); the output
        head is kept out of it (`keep_head_precise`), so logits and log-probs stay in the model's dtype."""
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(torch.device(self.backend.device).type, dtype=self.autocast)

    @staticmethod
    def forward_tokens(seqs: list[tuple[list[int], list[int]]], kernel: str) -> int:
        """Tokens the kernel's forward pass runs: padded rows ("plain") or the packed row."""
        if kernel == "plain":
            return len(seqs) * max(len(p) + len(c) for p, c in seqs)
        return sum(L + sum(len(r) for r in {tuple(seqs[i][0][L:]) for i in idx}) + sum(len(seqs[i][1]) for i in idx)
                   for L, idx in segments([p for p, _ in seqs]))

    @contextmanager
    def _recompute(self, on: bool):
        """Gradient checkpointing for this forward pass (HF checkpoints in training mode, as in
        ``update``): the backward pass recomputes each layer from its input, needing no flag then,
        so a long call's memory grows with its tokens x hidden size, not x every activation."""
        if not (on and torch.is_grad_enabled()):
            yield
            return
        self.backend.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        try:
            yield
        finally:
            self.backend.model.activation_checkpointing_disable()

    def packed_logprobs(self, seqs: list[tuple[list[int], list[int]]],
                        temps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One packed row: each distinct prompt once, its completions after it (see packing.py)."""
        pk = pack(seqs, share_rests=self.share_rests)
        dev = self.backend.device
        allow = pk.allow.to(dev)
        if self.attn == "eager":  # eager adds the mask to the scores: it must be 0 / -inf, not boolean
            allow = torch.zeros(allow.shape, dtype=self.model.dtype, device=dev).masked_fill(
                ~allow, torch.finfo(self.model.dtype).min)
        out = self.model(input_ids=pk.ids.to(dev), position_ids=pk.positions.to(dev),
                         attention_mask=allow, logits_to_keep=pk.predictors.to(dev), use_cache=False)
        rows = pk.rows.to(dev)
        flat = token_logprobs(out.logits[0] / temps[rows].unsqueeze(-1), pk.targets.to(dev))
        logp, mask = unpack(flat, pk, len(seqs))
        return logp, mask.to(dev)

    def cached_logprobs(self, seqs: list[tuple[list[int], list[int]]],
                        temps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A prompt tree in three batches, each attending to the cached keys/values of the one before:
        each shared prefix once (see packing.segments), then each distinct rest of a prompt once (the
        G samples of an example share theirs), then every completion. Each token attends only to what
        it may see, and gradients flow back into the prefixes and rests through the caches."""
        from transformers import DynamicCache

        dev, pad = self.backend.device, self.backend.pad_id
        segs = segments([p for p, _ in seqs])
        which, cut = [0] * len(seqs), [0] * len(seqs)
        for j, (L, idx) in enumerate(segs):
            for i in idx:
                which[i], cut[i] = j, L
        # the distinct prompts: rows of the second batch (the rest of each after its prefix)
        distinct: dict[tuple, int] = {}
        of = [distinct.setdefault(tuple(p) if self.share_rests else (i,), len(distinct))
              for i, (p, _) in enumerate(seqs)]
        firsts = [next(i for i in range(len(seqs)) if of[i] == d) for d in range(len(distinct))]
        B, n_p, n_d, P = len(seqs), len(segs), len(distinct), max(L for L, _ in segs)
        T = max(len(c) for _, c in seqs)
        ids = torch.full((n_p, P), pad, dtype=torch.long)
        pmask = torch.zeros((n_p, P), dtype=torch.long)
        for j, (L, idx) in enumerate(segs):
            ids[j, P - L:] = torch.tensor(seqs[idx[0]][0][:L])
            pmask[j, P - L:] = 1
        ppos = (pmask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids.to(dev), attention_mask=pmask.to(dev), position_ids=ppos.to(dev),
                         cache=DynamicCache(), use_cache=True, logits_to_keep=1)
        # the logits that predict each completion's first token: its prompt's last position
        first = out.logits[:, -1][torch.tensor([which[i] for i in firsts], device=dev)]  # (n_d, V)
        dwhich = [which[i] for i in firsts]
        cache, mask = _rows(out.cache, dwhich, dev), pmask[dwhich]  # each distinct prompt's prefix
        rests = [seqs[i][0][cut[i]:] for i in firsts]
        R = max(len(r) for r in rests)
        if R > 0:  # the rests, right-aligned after their prefix
            rids = torch.full((n_d, R), pad, dtype=torch.long)
            rmask = torch.zeros((n_d, P + R), dtype=torch.long)
            rmask[:, :P] = mask
            rpos = torch.zeros((n_d, R), dtype=torch.long)
            for d, r in enumerate(rests):
                if r:
                    rids[d, R - len(r):] = torch.tensor(r, dtype=torch.long)
                    rmask[d, P + R - len(r):] = 1
                    rpos[d, R - len(r):] = torch.arange(cut[firsts[d]], cut[firsts[d]] + len(r))
            rout = self.model(input_ids=rids.to(dev), attention_mask=rmask.to(dev), position_ids=rpos.to(dev),
                              cache=cache, use_cache=True, logits_to_keep=1)
            has_rest = torch.tensor([len(r) > 0 for r in rests], device=dev).unsqueeze(-1)
            first = torch.where(has_rest, rout.logits[:, -1], first)
            cache, mask = rout.cache, rmask
        # every completion but its last token after its prompt, right-aligned: the last W columns hold
        # the predictors of every completion token after the first
        tails = [c[:-1] for _, c in seqs]
        W = max(len(t) for t in tails)
        logits = first[torch.tensor(of, device=dev)].unsqueeze(1)  # (B, 1, V)
        if W > 0:
            C = mask.shape[1]
            cids = torch.full((B, W), pad, dtype=torch.long)
            cmask = torch.zeros((B, C + W), dtype=torch.long)
            cmask[:, :C] = mask[of]
            cpos = torch.zeros((B, W), dtype=torch.long)
            for i, t in enumerate(tails):
                if t:
                    n = len(seqs[i][0])
                    cids[i, W - len(t):] = torch.tensor(t, dtype=torch.long)
                    cmask[i, C + W - len(t):] = 1
                    cpos[i, W - len(t):] = torch.arange(n, n + len(t))
            ccache = _rows(cache, of, dev)
            tail = self.model(input_ids=cids.to(dev), attention_mask=cmask.to(dev), position_ids=cpos.to(dev),
                              cache=ccache, use_cache=True, logits_to_keep=W).logits
            logits = torch.cat([logits, tail], dim=1)  # (B, 1 + W, V)
        # right-aligned output column j of call i holds completion token k = j - (T - len(c)): the first
        # is predicted by its prompt (column 0), token k > 0 by the tail's token before it (1 + W - len(c) + k)
        col = torch.zeros((B, T), dtype=torch.long)
        targets = torch.full((B, T), pad, dtype=torch.long)
        tmask = torch.zeros((B, T), dtype=torch.bool)
        for i, (_, c) in enumerate(seqs):
            ks = torch.arange(len(c))
            col[i, T - len(c):] = torch.where(ks == 0, 0, 1 + W - len(c) + ks)
            targets[i, T - len(c):] = torch.tensor(c)
            tmask[i, T - len(c):] = True
        logits = logits.gather(1, col.to(dev).unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        lp = token_logprobs(logits / temps.view(-1, 1, 1), targets.to(dev))
        return lp * tmask.to(dev), tmask.to(dev)

    def completion_logprobs(self, seqs: list[tuple[list[int], list[int]]],
                            temps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs of each completion token given its prompt; rows left-padded so that
        every completion ends at the last column and only the completion logits are made."""
        B = len(seqs)
        L = max(len(p) + len(c) for p, c in seqs)
        T = max(len(c) for _, c in seqs)
        pad = self.backend.pad_id
        ids = torch.full((B, L), pad, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        targets = torch.full((B, T), pad, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.bool)
        for i, (p, c) in enumerate(seqs):
            row = p + c
            ids[i, L - len(row):] = torch.tensor(row)
            attn[i, L - len(row):] = 1
            targets[i, T - len(c):] = torch.tensor(c)
            mask[i, T - len(c):] = True
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        dev = self.backend.device
        out = self.model(input_ids=ids.to(dev), attention_mask=attn.to(dev), position_ids=pos.to(dev),
                         logits_to_keep=T + 1, use_cache=False)
        logits = out.logits[:, -(T + 1):-1] / temps.view(-1, 1, 1)  # position t predicts token t+1
        return token_logprobs(logits, targets.to(dev)), mask.to(dev)

    # ---- update -------------------------------------------------------------------------
