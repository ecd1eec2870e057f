"""One LoRA adapter shared by every module, updated with the GRPO objective.

The adapter is injected into the backend's own model, so the backend samples with the new
weights as soon as ``update`` returns: no sync. Log-probs are of logits / T, T being the
temperature each call was sampled at (the convention of lm/base.py); the kernels that compute them are
in logprobs.py, checkpoints in checkpoint.py. ``step`` counts loop steps, with or without an update.
"""
from __future__ import annotations

import math
import time
import warnings

import torch
from tqdm.auto import tqdm

from ..config import TIS_CAP, TrainConfig
from ..models import pick_update_dtype, return_freed_memory
from . import distributed
from .checkpoint import Checkpoints
from .groups import Grouping
from .logprobs import LogprobKernels, keep_head_precise
from .loss import grpo_loss, normalizer_total, sequence_coefficients


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


class Trainer(LogprobKernels, Checkpoints):
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
        self.autocast = pick_update_dtype(self.model, cfg.update_dtype)  # the update's matmuls (logprobs.py)
        if self.autocast is not None:
            keep_head_precise(self.model)
        self.share_rests = True  # a rest of a prompt asked by several calls is computed once (both kernels)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        distributed.sync_params(self.params)
        self.opt = torch.optim.AdamW(self.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.step = 0
        self.kernel: str | None = None  # the update kernel of the last plan (see plan)

    def update(self, grouping: Grouping, version: int | None = None) -> dict:
        """One optimizer step (num_iterations of them) on the grouping's members; ``finish_step``
        closes the loop step whether or not this ran. ``version``: the policy version being updated,
        where rollouts may lag (max_policy_lag): calls sampled by an older one are weighted by
        truncated importance sampling (cap: tis_cap, "auto" = TIS_CAP) even where the rest are not."""
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
        if tis_cap is None and cfg.tis_cap == "auto" and (getattr(self.backend, "samples_apart", False)
                                                          or self.autocast is not None):
            tis_cap = TIS_CAP  # a sampler copy in another dtype drew the tokens, or the learner autocasts
        # which calls get importance weights: all (tis_cap in force) or the lagged ones (None: none)
        lagged = [version is not None and m.call.policy_version < version for m in members]
        weigh = [True] * len(members) if tis_cap is not None else lagged if any(lagged) else None
        cap = tis_cap or TIS_CAP  # tis_cap None: the cap of the lagged calls alone
        all_seqs = [(update_prompt(m.call, self.backend.tokenize_chat, cfg.train_with_demos), m.call.completion_ids)
                    for m in members]
        temps = [m.call.temperature for m in members]
        batches = self.plan(all_seqs)
        mine = distributed.share(batches)  # all of them in a single process
        old: dict[int, torch.Tensor] = {}
        stats = {"loss": 0.0, "clipped": 0.0, "kl": 0.0, "tokens": 0.0, "mismatch_sum": 0.0, "mismatch_max": 0.0,
                 "ratio_dev": 0.0, "tis_sum": 0.0, "tis_capped": 0.0, "tis_tokens": 0.0, "pg_loss": 0.0, "kl_loss": 0.0}
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
                    if weigh is not None:
                        rows = torch.tensor([weigh[i] for i in mb], device=dev).unsqueeze(-1)
                        isw = torch.where(rows, torch.clamp(torch.exp(old_lp - sampler), max=cap), 1.0).detach()
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
                            weighed = mask.bool() & rows
                            stats["tis_sum"] += float((isw * weighed).sum())
                            stats["tis_capped"] += float(((isw >= cap) & weighed).sum())
                            stats["tis_tokens"] += float(weighed.sum())
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
        return_freed_memory()  # the activations of this update, freed in many small blocks
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
                **({"tis_weight_mean": stats["tis_sum"] / max(stats["tis_tokens"], 1.0),
                    "tis_capped_frac": stats["tis_capped"] / max(stats["tis_tokens"], 1.0),
                    "tis_tokens": int(stats["tis_tokens"])} if weigh is not None else {}),
                **({"lagged_calls": sum(lagged)} if version is not None else {}),
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
