"""One LoRA adapter shared by every module, updated with the GRPO objective.

The adapter is injected into the backend's own model, so the backend samples with the new
weights as soon as ``update`` returns: no sync. Log-probs are of logits / T, T being the
temperature each call was sampled at (the convention of lm/base.py). Checkpoints are
safetensors + JSON, atomic. ``step`` counts loop steps, with or without an update.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..runlog import atomic_write, publish_dir, write_json, write_manifest
from . import distributed
from ..config import TIS_CAP, TrainConfig
from .groups import Grouping
from .loss import grpo_loss, normalizer_total, sequence_coefficients, token_logprobs
from .packing import pack, plan_packed, segments, unpack

KERNELS_RUN = ("packed", "cache")  # what prefix_attention = "auto" chooses between


def update_prompt(call, tokenize_chat, with_demos: bool) -> list[int]:
    """The prompt the update conditions on: the sampled one, or (with_demos = False) the module's
    system prompt and input alone (its demo pairs sit between them in the messages)."""
    if with_demos or len(call.messages) < 4:
        return call.prompt_ids
    return tokenize_chat([call.messages[0], call.messages[-1]])


def disable_dropout(model: torch.nn.Module) -> None:
    """No dropout in the policy (as TRL's disable_dropout): in training mode it would put noise into
    the log-probs, so the ratio to the sampler's would not be 1 at the first iteration. LoRA's own
    dropout (grpo.lora_dropout, added later) is the user's choice."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
        if isinstance(getattr(mod, "attention_dropout", None), float):  # the attention kernels' own
            mod.attention_dropout = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, cfg.steps - cfg.warmup_steps)
        frac = min(1.0, (step - cfg.warmup_steps) / span)
        if cfg.lr_schedule == "linear":
            return 1.0 - frac
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * frac))
        return 1.0
    return f


def _rows(cache, rows: list[int], dev):
    """A new cache holding the given rows of ``cache`` (differentiable: gradients reach the source)."""
    from transformers import DynamicCache

    out, idx = DynamicCache(), torch.tensor(rows, device=dev)
    for li, layer in enumerate(cache.layers):
        out.update(layer.keys[idx], layer.values[idx], li)
    return out


class Trainer:
    def __init__(self, backend, cfg: TrainConfig):
        from peft import LoraConfig, get_peft_model

        self.backend, self.cfg = backend, cfg
        torch.manual_seed(cfg.seed)
        disable_dropout(backend.model)
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM")
        with backend.lock:
            self.model = get_peft_model(backend.model, lora)  # injects into backend.model in place
            backend.peft = self.model  # the backend's frozen view switches it off
            backend.weights_changed()
        attn = getattr(self.model.config, "_attn_implementation", "sdpa")
        if cfg.shared_prefix and cfg.prefix_attention == "packed" and attn not in ("sdpa", "eager"):
            raise ValueError(f"shared_prefix = true needs 'sdpa' or 'eager' attention (a block mask); the model "
                             f"uses {attn!r}: set prefix_attention = \"cache\" (no block mask), shared_prefix = "
                             "false, or load the model with sdpa")
        self.attn = attn
        self.share_rests = True  # a rest of a prompt asked by several calls is computed once (both kernels)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        distributed.sync_params(self.params)
        self.opt = torch.optim.AdamW(self.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.step = 0
        self.kernel: str | None = None  # the update kernel of the last plan (see plan)

    # ---- forward ------------------------------------------------------------------------
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
        with demos cache is 2.1x faster."""
        if not self.cfg.shared_prefix:
            self.kernel = "plain"
            return self._micro_batches(seqs)
        kernels = self.kernels()
        if "packed" in kernels:
            packed = plan_packed(seqs, self.cfg.pack_tokens, padded=False, share_rests=self.share_rests)
            fits = all(self.forward_tokens([seqs[i] for i in mb], "packed") <= self.cfg.pack_tokens for mb in packed)
            if fits or kernels == ("packed",):
                self.kernel = "packed"
                return packed
        self.kernel = "cache"
        return plan_packed(seqs, self.cfg.token_budget, padded=True, share_rests=self.share_rests)

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
            return self.cached_logprobs(seqs, t)
        long = self.forward_tokens(seqs, kernel) > self.cfg.recompute_tokens  # one call: the same either way
        if long and len(seqs) == 1:  # nothing to share: a causal mask needs no N x N block mask
            kernel = "plain"
        with self._recompute(long):
            return self.completion_logprobs(seqs, t) if kernel == "plain" else self.packed_logprobs(seqs, t)

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
    def update(self, grouping: Grouping) -> dict:
        """One optimizer step (num_iterations of them) on the grouping's members; ``finish_step``
        closes the loop step whether or not this ran."""
        cfg = self.cfg
        members = grouping.members
        if not members:
            return {"updated": False}
        t0 = time.perf_counter()
        dev = self.backend.device
        pool = grouping.sampled if cfg.loss_denominator == "batch" else members
        total = normalizer_total([len(m.call.completion_ids) for m in pool], [m.weight for m in pool], cfg.loss_type)
        coefs = sequence_coefficients([len(m.call.completion_ids) for m in members], [m.weight for m in members],
                                      cfg.loss_type, max_len=cfg.max_tokens, total=total)
        masked = 0
        if cfg.mask_truncated:  # out of the update, still in the denominator
            keep = [i for i, m in enumerate(members) if m.call.finish_reason != "length"]
            masked = len(members) - len(keep)
            members, coefs = [members[i] for i in keep], [coefs[i] for i in keep]
            if not members:
                return {"updated": False, "truncated_masked": masked}
        tis_cap = cfg.tis
        if tis_cap is None and cfg.tis_cap == "auto" and getattr(self.backend, "samples_apart", False):
            tis_cap = TIS_CAP  # a sampler copy in another dtype drew the tokens
        all_seqs = [(update_prompt(m.call, self.backend.tokenize_chat, cfg.train_with_demos), m.call.completion_ids)
                    for m in members]
        temps = [m.call.temperature for m in members]
        batches = self.plan(all_seqs)
        mine = distributed.share(batches)  # all of them in a single process
        old: dict[int, torch.Tensor] = {}
        stats = {"loss": 0.0, "clipped": 0.0, "kl": 0.0, "tokens": 0.0, "mismatch_sum": 0.0, "mismatch_max": 0.0,
                 "ratio_dev": 0.0, "tis_sum": 0.0, "tis_capped": 0.0, "pg_loss": 0.0, "kl_loss": 0.0}
        modules = sorted({m.call.module for m in members})  # the same list on every rank
        per_module = torch.zeros(len(modules), 3, dtype=torch.float64)  # tokens, clipped, KL sum
        self.model.train()
        nonfinite = False
        ref_cache: dict[int, torch.Tensor] = {}  # reference log-probs by micro-batch: the same every iteration
        snapshot = self._snapshot() if cfg.num_iterations > 1 else None  # a later iteration may be non-finite
        with self.backend.lock:
            bar = tqdm(total=len(mine) * cfg.num_iterations, desc="update micro-batches", leave=False,
                       disable=not (cfg.progress and distributed.rank() == 0))
            for it in range(cfg.num_iterations):
                self.opt.zero_grad(set_to_none=True)
                it_loss = 0.0
                for b, mb in enumerate(mine):
                    bar.update(1)
                    seqs = [all_seqs[i] for i in mb]
                    logp, mask = self.logprobs(seqs, [temps[i] for i in mb])
                    T = logp.shape[1]
                    sampler = torch.zeros_like(logp)
                    for j, i in enumerate(mb):
                        lp = members[i].call.logprobs
                        sampler[j, T - len(lp):] = torch.tensor(lp, dtype=sampler.dtype)
                    if it == 0:
                        for j, i in enumerate(mb):
                            old[i] = logp[j].detach()
                        diff = ((logp.detach() - sampler).abs() * mask)
                        stats["mismatch_sum"] += float(diff.sum())
                        stats["mismatch_max"] = max(stats["mismatch_max"], float(diff.max()))
                    old_lp = torch.stack([old[i] for i in mb])
                    ref = None
                    if cfg.beta:
                        if b not in ref_cache:
                            with torch.no_grad(), self.model.disable_adapter():
                                ref_cache[b] = self.logprobs(seqs, [temps[i] for i in mb])[0]
                        ref = ref_cache[b]
                    isw = None
                    if tis_cap is not None:
                        isw = torch.clamp(torch.exp(old_lp - sampler), max=tis_cap).detach()
                    out = grpo_loss(logp, old_lp, torch.tensor([members[i].advantage for i in mb], device=dev),
                                    mask, torch.tensor([coefs[i] for i in mb], device=dev), cfg.epsilon,
                                    cfg.epsilon_high, cfg.beta, ref, isw, loss_type=cfg.loss_type)
                    out.loss.backward()
                    it_loss += float(out.loss.detach())
                    if it == cfg.num_iterations - 1:
                        stats["loss"] += float(out.loss.detach())
                        stats["pg_loss"] += out.pg_loss
                        stats["kl_loss"] += out.kl_loss
                        for j, i in enumerate(mb):
                            per_module[modules.index(members[i].call.module)] += out.per_seq[j].double()
                        stats["clipped"] += out.clipped_tokens
                        stats["kl"] += out.kl_sum
                        stats["tokens"] += out.tokens
                        stats["ratio_dev"] += float(((logp.detach() - old_lp).exp() - 1).abs().mul(mask).sum())
                        if isw is not None:
                            stats["tis_sum"] += float((isw * mask).sum())
                            stats["tis_capped"] += float(((isw >= tis_cap) & mask.bool()).sum())
                distributed.sum_grads(self.params)
                it_loss = distributed.sum_values([it_loss], dev)[0]
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
                if not (math.isfinite(grad_norm) and math.isfinite(it_loss)):  # skip: the weights stay as they are
                    self.opt.zero_grad(set_to_none=True)
                    if it > 0:  # earlier iterations stepped: back to the weights and optimizer state before them
                        self._restore(snapshot)
                    nonfinite = True
                    break
                self.opt.step()
            bar.close()
            self.backend.weights_changed()
        self.model.eval()
        if distributed.active():  # every rank's share of the statistics
            keys = [k for k in stats if k != "mismatch_max"]
            summed = distributed.sum_values([stats[k] for k in keys] + per_module.flatten().tolist(), dev)
            stats.update(zip(keys, summed[:len(keys)]))
            per_module = torch.tensor(summed[len(keys):], dtype=torch.float64).view(len(modules), 3)
            stats["mismatch_max"] = distributed.max_value(stats["mismatch_max"], dev)
        n_tok = max(stats["tokens"], 1.0)
        mismatch = stats["mismatch_sum"] / n_tok
        if nonfinite:
            return {"updated": False, "nonfinite_skipped": True, "loss": it_loss, "grad_norm": grad_norm,
                    "update_s": time.perf_counter() - t0}
        by_module = {mod: {"train_tokens": int(t), "clip_frac": float(c) / max(float(t), 1.0),
                           "kl": float(k) / max(float(t), 1.0)} for mod, (t, c, k) in zip(modules, per_module.tolist())}
        return {"updated": True, "loss": stats["loss"], "pg_loss": stats["pg_loss"], "kl_loss": stats["kl_loss"],
                "modules_update": by_module, "clip_frac": stats["clipped"] / n_tok,
                "kl": stats["kl"] / n_tok, "grad_norm": grad_norm, "lr": self.sched.get_last_lr()[0],
                "ratio_dev": stats["ratio_dev"] / n_tok,
                **({"tis_weight_mean": stats["tis_sum"] / n_tok, "tis_capped_frac": stats["tis_capped"] / n_tok}
                   if tis_cap is not None else {}),
                **({"truncated_masked": masked} if cfg.mask_truncated else {}),
                "train_tokens": int(stats["tokens"]), "micro_batches": len(batches), "kernel": self.kernel,
                "mismatch_mean": mismatch, "mismatch_max": stats["mismatch_max"],
                "mismatch_warning": cfg.train_with_demos and mismatch > cfg.mismatch_tolerance,
                "update_s": time.perf_counter() - t0}

    def _snapshot(self) -> tuple[list[torch.Tensor], dict]:
        """The trainable weights and the optimizer state, copied (the LoRA parameters: small)."""
        import copy

        return [p.detach().clone() for p in self.params], copy.deepcopy(self.opt.state_dict())

    def _restore(self, snapshot: tuple[list[torch.Tensor], dict]) -> None:
        params, opt = snapshot
        with torch.no_grad():
            for p, saved in zip(self.params, params):
                p.copy_(saved)
        self.opt.load_state_dict(opt)

    def finish_step(self) -> None:
        """Close a loop step: the schedule and the step count follow loop steps, so a step whose
        groups all had equal rewards (no update) still counts, and resume lands where it left. Such a
        step makes PyTorch warn of a schedule step before any optimizer step: intended, so not shown."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.sched.step()
        self.step += 1

    # ---- checkpoints --------------------------------------------------------------------
    def save(self, folder: str | Path, extra: dict, best_adapter: Path | None = None) -> Path:
        """Adapter (PEFT safetensors) + optimizer + scheduler + RNG + extra state (+ a copy of the
        best adapter so far) + a manifest of their hashes, atomically."""
        folder = Path(folder)
        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self._write(tmp, extra, best_adapter)
            publish_dir(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed write leaves nothing half-done behind
            raise
        return folder

    def _write(self, tmp: Path, extra: dict, best_adapter: Path | None) -> None:
        from safetensors.torch import save_file

        tmp.mkdir(parents=True)
        self.model.save_pretrained(tmp, safe_serialization=True)
        if best_adapter is not None and best_adapter.is_dir():
            shutil.copytree(best_adapter, tmp / "best_adapter")
        opt = self.opt.state_dict()
        tensors, scalars = {}, {}
        for idx, st in opt["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"{idx}.{k}"] = v.contiguous()
                else:
                    scalars[f"{idx}.{k}"] = v
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for i, st in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = st
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        state = {"step": self.step, "param_groups": opt["param_groups"], "opt_scalars": scalars,
                 "scheduler": self.sched.state_dict(), "rng_python": random.getstate(), **extra}
        write_json(tmp / "trainer_state.json", state)
        write_manifest(tmp)

    def load(self, folder: str | Path) -> dict:
        from safetensors.torch import load_file

        folder = Path(folder)
        state = json.loads((folder / "trainer_state.json").read_text())
        self.load_adapter(folder)
        tensors = load_file(str(folder / "optimizer.safetensors"))
        torch.set_rng_state(tensors.pop("rng.torch"))
        cuda = [tensors.pop(k) for k in sorted((k for k in list(tensors) if k.startswith("rng.cuda.")),
                                               key=lambda k: int(k.rsplit(".", 1)[1]))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
        opt_state: dict = {}
        for key, v in tensors.items():
            idx, name = key.split(".", 1)
            opt_state.setdefault(int(idx), {})[name] = v
        for key, v in state["opt_scalars"].items():
            idx, name = key.split(".", 1)
            opt_state.setdefault(int(idx), {})[name] = v
        self.opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
        self.sched.load_state_dict(state["scheduler"])
        rs = state["rng_python"]
        random.setstate((rs[0], tuple(rs[1]), rs[2]))
        self.step = state["step"]
        return state

    def load_adapter(self, folder: str | Path) -> None:
        """Put a saved adapter's weights (e.g. best_adapter/) back into the policy."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        with self.backend.lock:
            set_peft_model_state_dict(self.model, load_file(str(Path(folder) / "adapter_model.safetensors")))
            self.backend.weights_changed()

    def save_adapter(self, folder: str | Path) -> None:
        folder = Path(folder)
        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp, safe_serialization=True)
        publish_dir(tmp, folder)


def write_latest(run_path: Path, name: str) -> None:
    atomic_write(run_path / "checkpoints" / "latest", name + "\n")
