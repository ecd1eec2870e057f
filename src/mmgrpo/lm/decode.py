"""Prefill and decoding of one batch with a KV cache: shared prefixes and prompts computed once,
rows sampled on the device each with its own seed (sampling.py), finished rows answered at once and
their slots refilled by joining rows (continuous batching)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .. import stopping
from . import sampling
from .base import Completion
from .batcher import CANCELLED, _Request


def last_logits(net, **inputs) -> torch.Tensor:
    """(B, V) logits of each row's last position. Not the model's own ``logits_to_keep=1``: it hands the
    output head a strided view of the last positions, which torch.matmul multiplies by a batch-expanded
    copy of the head (8 rows x 576 x 49,152 values copied: 1.9 s in bfloat16 on the 2-core CPU, against
    21 ms for the same product on a contiguous copy of the 8 rows; the same values)."""
    hidden = net.get_decoder()(**inputs).last_hidden_state
    return net.get_output_embeddings()(hidden[:, -1].contiguous())


class Decoder:
    """The decoding half of `HFBackend` (its state is set up there); the queue is `Batcher`'s."""

    def _prefix_kv(self, prefix: list[int], adapter: str | None):
        """Per-layer (keys, values) of a shared prompt prefix, computed once and kept (LRU);
        keyed by the variant too, since each adapter computes its own."""
        from transformers import DynamicCache

        key = (adapter, tuple(prefix))
        if key in self._prefix_cache:
            self._prefix_cache[key] = self._prefix_cache.pop(key)  # most recent last
            self.stats["prefix_hits"] += 1
            return self._prefix_cache[key]
        cache = DynamicCache()
        ids = torch.tensor([prefix], device=self.device)
        # the decoder alone: a prefix's keys and values are needed, not its logits
        self._net(adapter).get_decoder()(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, use_cache=True)
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        self._prefix_cache[key] = kv
        while len(self._prefix_cache) > self.prefix_cache_size:
            self._prefix_cache.pop(next(iter(self._prefix_cache)))
        return kv

    def _prefill(self, prompts, max_new: int, adapter: str | None):
        """Build the batch's cache and last-token logits.

        A prefix shared by all rows is computed once (and kept across batches), and so is each
        distinct prompt (``share_prompts``: the G samples of one example ask with the same prompt):
        its keys/values are copied to every row that asks it. The rest of each distinct prompt is
        prefilled in chunks of rows sorted by length (at most prefill_chunk rows and prefill_tokens
        padded tokens, see `_chunks`), so padding and activations stay small, then right-aligned into
        one preallocated StaticCache: a growing cache would re-copy itself at every decoding step,
        which made batch-32 decoding memory-bound.
        """
        from transformers import DynamicCache, StaticCache

        B = len(prompts)
        shortest = min(len(p) for p in prompts) - 1  # every row keeps >= 1 token to produce logits
        P = min(_common_prefix_len(prompts), shortest) if self.prefix_cache_size and B > 1 else 0
        # a kept prefix the prompts start with (rows joining a running batch one at a time reuse it)
        kept = max((len(k) for a, k in self._prefix_cache if a == adapter and len(k) <= shortest
                    and all(tuple(p[:len(k)]) == k for p in prompts)), default=0)
        P = max(P, kept)
        if P < self.min_prefix:
            P = 0
        prefix = self._prefix_kv(prompts[0][:P], adapter) if P else None
        # rows asking the same prompt: computed once (members[u]: the rows of distinct prompt u)
        members: dict[tuple, list[int]] = {}
        for i, p in enumerate(prompts):
            members.setdefault(tuple(p) if self.share_prompts else (i,), []).append(i)
        groups = list(members.values())
        self.stats["shared_prompt_rows"] = self.stats.get("shared_prompt_rows", 0) + B - len(groups)
        lens = [len(prompts[g[0]]) - P for g in groups]
        S = max(lens)
        mask = torch.zeros((B, P + S + max_new), dtype=torch.long, device=self.device)
        mask[:, :P] = 1
        last_pos = torch.zeros((B, 1), dtype=torch.long, device=self.device)
        logits = [None] * B
        cache = StaticCache(config=self.model.config, max_cache_len=P + S + max_new)
        order = sorted(range(len(groups)), key=lambda u: lens[u])
        for rows in _chunks(order, lens, self.prefill_chunk, self.prefill_tokens):
            b, Sc = len(rows), max(lens[u] for u in rows)
            ids = torch.full((b, Sc), self.pad_id, dtype=torch.long)
            cmask = torch.zeros((b, P + Sc), dtype=torch.long)
            cmask[:, :P] = 1
            pos = torch.full((b, Sc), P, dtype=torch.long)
            for j, u in enumerate(rows):
                n = lens[u]
                ids[j, Sc - n:] = torch.tensor(prompts[groups[u][0]][P:])
                cmask[j, P + Sc - n:] = 1
                pos[j, Sc - n:] = torch.arange(P, P + n)
                for i in groups[u]:
                    mask[i, P + S - n:P + S] = 1
                    last_pos[i, 0] = P + n - 1
            chunk = DynamicCache()
            if prefix is not None:
                for li, (k, v) in enumerate(prefix):
                    chunk.update(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1), li)
            last = last_logits(self._net(adapter), input_ids=ids.to(self.device), attention_mask=cmask.to(self.device),
                               position_ids=pos.to(self.device), cache=chunk, use_cache=True).float()
            src = [j for j, u in enumerate(rows) for _ in groups[u]]
            dst = [i for u in rows for i in groups[u]]
            # `last` stays on the device: sampling runs there
            for j, i in zip(src, dst):
                logits[i] = last[j]
            src_idx = torch.tensor(src, device=self.device)
            dst_idx = torch.tensor(dst, device=self.device)
            for layer, part in zip(cache.layers, chunk.layers):  # written in place: no second copy
                if not layer.is_initialized:  # (B, heads, P + S + max_new, dim) zeros
                    layer.lazy_initialization(part.keys[:1].expand(B, -1, -1, -1),
                                              part.values[:1].expand(B, -1, -1, -1))
                for name in ("keys", "values"):  # right-align: columns P+S-Sc .. P+S
                    dst_t, src_t = getattr(layer, name), getattr(part, name)
                    if P:
                        dst_t[dst_idx, :, :P] = src_t[src_idx, :, :P]
                    dst_t[dst_idx, :, P + S - Sc:P + S] = src_t[src_idx, :, P:]
            del chunk
        for layer in cache.layers:
            layer.cumulative_length.fill_(P + S)
        return torch.stack(logits), cache, mask, last_pos, P + S

    def _decode(self, reqs: list[_Request], adapter: str | None, admit: bool, joined: list[_Request],
                held: int = 0) -> None:
        """Decode ``reqs`` one token per step for every row; a row's result is delivered the step it
        finishes, and with ``admit`` waiting requests take the freed slots (joining with their own
        prefill, see `_join`) instead of the batch waiting for its longest row. Finished rows stay in
        the batch (their tokens ignored) until a quarter of it has finished: dropping them and merging
        newcomers copies the whole cache, so it is done for several rows at once."""
        dev = self.device
        rows: list[_Row] = []
        state = None  # (logits, cache, mask, last_pos, col) of the rows
        new = reqs
        while True:
            stopping.check()  # Ctrl-C reaches this thread only as a flag
            if self._cancelled:
                raise RuntimeError(CANCELLED)
            if new:
                rows, state = self._join(rows, state, [_Row(r) for r in new], adapter)
            if not rows:
                break
            logits, cache, mask, last_pos, col = state
            p = [r.req.params for r in rows]
            # log-probs under the distribution each token is drawn from: softmax(logits / T)
            temps = torch.tensor([x.temperature if x.temperature > 0 else 1.0 for x in p], device=dev)
            logp = torch.log_softmax(logits / temps.unsqueeze(-1), dim=-1)
            nxt = sampling.draw(logp, torch.tensor([x.temperature > 0 for x in p], device=dev),
                                torch.tensor([x.top_p for x in p], device=dev),
                                sampling.seed_tensor([r.seed for r in rows], dev),
                                torch.tensor([len(r.toks) for r in rows], dtype=torch.long, device=dev))
            chosen = logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
            for r, t, lp in zip(rows, nxt.tolist(), chosen.tolist()):  # the only copy to the host
                if not r.done and self._step(r, t, lp):
                    r.done = True
                    self._deliver(r)
            dead = sum(r.done for r in rows)
            drop = dead >= max(1, len(rows) // 4)  # (all finished is always enough)
            if drop:  # compact: finished rows cost nothing from here on
                keep = [j for j, r in enumerate(rows) if not r.done]
                idx = torch.tensor(keep, dtype=torch.long, device=dev)
                rows = [rows[j] for j in keep]
                nxt, mask, last_pos = nxt[idx], mask[idx], last_pos[idx]
                for layer in cache.layers:
                    layer.keys, layer.values = layer.keys[idx], layer.values[idx]
                    layer.batch_size = len(keep)
            if rows:
                mask[:, col] = 1
                col += 1
                last_pos = last_pos + 1
                out = self._net(adapter)(input_ids=nxt.view(-1, 1), attention_mask=mask, position_ids=last_pos,
                                 cache=cache, use_cache=True)
                state = (out.logits[:, -1, :].float(), out.cache, mask, last_pos, col)
            else:
                state = None
            new = self._admit(adapter, self.max_batch - len(rows), len(rows) + held, joined) if admit and drop else []

    def _step(self, row: "_Row", t: int, lp: float) -> bool:
        """Record a sampled token; True when the row is finished."""
        row.toks.append(t)
        row.lps.append(lp)
        p = row.req.params
        if t in self.stop_ids:
            row.finish = "stop"
            return True
        if len(row.toks) >= p.max_tokens:
            return True
        if p.stop and any(s in self.tokenizer.decode(row.toks, skip_special_tokens=True) for s in p.stop):
            row.finish = "stop"
            return True
        return False

    def _deliver(self, row: "_Row") -> None:
        p, toks = row.req.params, row.toks
        text = self.tokenizer.decode([t for t in toks if t not in self.stop_ids], skip_special_tokens=True)
        for s in p.stop:
            if s in text:
                text = text[: text.index(s)]
        self.stats["requests"] += 1
        self.stats["generated_tokens"] += len(toks)
        self.stats["prompt_tokens"] += len(row.req.prompt_ids)
        row.req.future.set_result(Completion(text=text, token_ids=toks, logprobs=row.lps,
                                             prompt_ids=list(row.req.prompt_ids), finish_reason=row.finish))

    def _join(self, rows: list["_Row"], state, new: list["_Row"], adapter: str | None):
        """Prefill ``new`` rows and merge them into the running rows' cache: both blocks are
        right-aligned at the same column (the running rows' keys shift right when the new prompts
        are longer), columns no row attends to any more are dropped, and the cache is sized for the
        most tokens any row may still write."""
        self.stats["batches"] += 1
        budget = max(r.req.params.max_tokens - len(r.toks) for r in rows + new)
        nl, ncache, nmask, npos, ncol = self._prefill([r.req.prompt_ids for r in new], budget, adapter)
        if not rows:
            return new, (nl, ncache, nmask, npos, ncol)
        self.stats["refills"] += len(new)
        logits, cache, mask, last_pos, col = state
        top = max(col, ncol)
        trim = min(min(r.start for r in rows) + top - col, top - ncol)  # columns dead for every row
        C = top - trim
        L = C + budget
        so, sn = top - col - trim, top - ncol - trim  # where each block's column 0 lands
        for r in rows:
            r.start += so
        for r in new:
            r.start = sn
        lo = max(0, trim - (top - col))  # the first running column kept
        B = len(rows) + len(new)
        for layer, nlayer in zip(cache.layers, ncache.layers):
            for name in ("keys", "values"):
                old, add = getattr(layer, name), getattr(nlayer, name)
                grid = old.new_zeros((B, old.shape[1], L, old.shape[3]))
                grid[:len(rows), :, so + lo:so + col] = old[:, :, lo:col]
                grid[len(rows):, :, sn:sn + ncol] = add[:, :, :ncol]
                setattr(layer, name, grid)
            layer.max_cache_len, layer.batch_size = L, B
            layer.cumulative_length = torch.tensor(C, dtype=layer.cumulative_length.dtype,
                                                   device=layer.cumulative_length.device)
        grid_mask = mask.new_zeros((B, L))
        grid_mask[:len(rows), so + lo:so + col] = mask[:, lo:col]
        grid_mask[len(rows):, sn:sn + ncol] = nmask[:, :ncol]
        return rows + new, (torch.cat([logits, nl]), cache, grid_mask, torch.cat([last_pos, npos]), C)


@dataclass
class _Row:
    """A request being decoded: its tokens so far, and the first cache column it attends to."""
    req: _Request
    toks: list = None
    lps: list = None
    finish: str = "length"
    start: int = 0
    seed: int = 0
    done: bool = False  # delivered; its slot is dropped with others' (see _decode)

    def __post_init__(self):
        self.toks, self.lps = [], []
        s = self.req.params.seed  # unseeded rows get fresh entropy (the global RNG untouched)
        self.seed = s if s is not None else int.from_bytes(os.urandom(8), "little")


def _chunks(order: list[int], lens: list[int], rows: int, tokens: int) -> list[list[int]]:
    """Split rows sorted by length into prefill chunks of at most ``rows`` rows whose padded size
    (rows x the longest) stays under ``tokens`` (0: no bound); a row longer than that is a chunk alone. Long prompts
    then cost a few rows' activations at a time instead of a full chunk's."""
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < rows and (not tokens or (len(out[-1]) + 1) * lens[i] <= tokens):
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _common_prefix_len(seqs: list[list[int]]) -> int:
    first, n = seqs[0], min(len(s) for s in seqs)
    for j in range(n):
        t = first[j]
        if any(s[j] != t for s in seqs):
            return j
    return n
