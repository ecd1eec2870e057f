"""Hugging Face transformers backend, in-process, with dynamic batching.

Program threads call ``chat``/``complete``; one worker thread gathers the waiting requests
into a single left-padded batch and decodes them together with a KV cache. A finished row is
answered at once; with ``continuous`` its slot is refilled by a waiting request. Each
row samples with its own seed, on the model's device (sampling.py). The trainer updates the
same ``model`` object in place: no sync.

Determinism. A row's floating-point result depends on which rows share its batch (padding,
the shared prefix, the kernel's blocking), so with batches formed by arrival time a token can
flip when the machine is busy. In deterministic mode (the default) a batch is launched only
when every program thread declared with ``clients`` is waiting on this backend, and its rows
are put in a fixed order, and a freed slot is refilled only when every such thread is decoding or
waiting: the batches are then a function of the programs alone, not of timing.
Otherwise (``deterministic=False``, e.g. a server) a batch starts after ``max_wait_s``.

Adapters. ``peft`` is the PeftModel injected into ``model`` (by the trainer, a loaded result,
or ``add_adapter``). Each request names a variant: None (the model as it is), ``BASE`` (adapter
switched off) or a loaded adapter's name; a batch runs one variant at a time.
"""
from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from .. import stopping
from . import sampling
from .base import BASE, Completion, SamplingParams, chat_prompt_ids

CANCELLED = "cancelled: the run was stopped"  # the error of requests a Ctrl-C cut short
_LIVE: weakref.WeakSet = weakref.WeakSet()  # backends whose batcher may still run


@atexit.register
def _close_all() -> None:
    """Replies are delivered before the batch leaves torch, so a program can finish while its
    daemon batcher is still mid-op; tearing the interpreter down then aborts the process
    ("terminate called without an active exception"). Join every batcher first."""
    for backend in list(_LIVE):
        backend.close()


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    future: Future
    adapter: str | None = None  # None, BASE or an adapter name (see HFBackend._variant)

    def order(self) -> tuple:
        p = self.params
        return (self.adapter is not None, self.adapter or "", p.seed is None, p.seed or 0, p.temperature,
                p.max_tokens, self.prompt_ids)


class Clients:
    """Handle of ``HFBackend.clients``: ``leave()`` gives back one declared thread early."""

    def __init__(self, backend: "HFBackend", n: int):
        self.backend, self.left = backend, n

    def leave(self) -> None:
        if self.left > 0:
            self.left -= 1
            self.backend._add_clients(-1)


class HFBackend:
    def __init__(self, model, tokenizer, max_batch: int = 32, max_wait_s: float = 0.05, device: str | None = None,
                 prefix_cache_size: int = 4, prefill_chunk: int = 8, prefill_tokens: int = 8192,
                 deterministic: bool = True, continuous: bool = False, share_prompts: bool = True,
                 sampler_dtype: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.deterministic = deterministic
        self.peft = None  # the PeftModel injected into model, once there is one
        self._plain = False  # True when adapters were added to a plain model: None then means BASE
        self.device = device or next(model.parameters()).device
        # held while generating; hold it to use `model` yourself (the trainer does to update): a reply
        # is delivered while its batch may still run under its variant (an adapter set or switched off)
        self.lock = threading.RLock()
        self.stats = {"requests": 0, "batches": 0, "generated_tokens": 0, "prompt_tokens": 0, "prefix_hits": 0,
                      "refills": 0}
        self.version = 0  # rises with every weight update (see weights_changed)
        self.prefix_cache_size = prefix_cache_size
        self.min_prefix = 16
        self.prefill_chunk = prefill_chunk
        self.prefill_tokens = prefill_tokens  # a chunk's rows x its longest row stay under this (0: rows only)
        self.share_prompts = share_prompts  # rows asking the same prompt share its prefill (see _prefill)
        self._prefix_cache: dict[tuple, list] = {}
        # a copy of the weights in another dtype that samples the trained variant (see _sampler_net)
        self._sampler, self._sampler_version = None, -1
        if sampler_dtype and getattr(torch, sampler_dtype) != next(model.parameters()).dtype:
            import copy

            self._sampler = copy.deepcopy(model).to(getattr(torch, sampler_dtype)).eval()
            self._sampler.requires_grad_(False)
        # the adapter-off variant (an outside LM, a judge) in the sampler's dtype too: the base weights
        self._base = None
        if self._sampler is not None and not any("lora_" in n for n, _ in model.named_parameters()):
            self._base = copy.deepcopy(self._sampler)
        self._cv = threading.Condition()  # guards _pending, _active, _closed
        self._pending: list[_Request] = []
        self._closed = False
        self._cancelled = False  # Ctrl-C: the batch decoding stops at its next token step
        self._active = 0  # program threads declared at work (see `clients`)
        stop_ids = {tokenizer.eos_token_id}
        for tok in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
            tid = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
                stop_ids.add(tid)
        self.stop_ids = {t for t in stop_ids if t is not None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.continuous = continuous  # freed batch slots are refilled by waiting requests (see _decode)
        self._worker = threading.Thread(target=self._loop, name="mmgrpo-hf-batcher", daemon=True)
        self._worker.start()
        _LIVE.add(self)

    @classmethod
    def load(cls, name: str = "smollm2-135m", device: str = "auto", dtype: str = "auto",
             sampler_dtype: str = "model", **kw) -> "HFBackend":
        from ..models import load, pick_sampler_dtype

        m = load(name, dtype=dtype, device=device)
        return cls(m.model, m.tokenizer, sampler_dtype=pick_sampler_dtype(m.model, sampler_dtype), **kw)

    # ---- public API -------------------------------------------------------------------
    def tokenize_chat(self, messages: list[dict]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages)

    def chat(self, messages: list[dict], params: SamplingParams) -> Completion:
        return self.complete(self.tokenize_chat(messages), params)

    def complete(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None) -> Completion:
        if not prompt_ids:
            raise ValueError("empty prompt: nothing to complete")
        if adapter not in (None, BASE) and adapter not in self.adapters():
            raise KeyError(f"no adapter {adapter!r} is loaded (loaded: {self.adapters()})")
        fut: Future = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("this backend was closed; load a new one")
            self._pending.append(_Request(list(prompt_ids), params, fut, adapter))
            self._cv.notify_all()
        return fut.result()

    def frozen(self) -> "FrozenView":
        """The same model with the adapter switched off: a fixed LM (a judge, an outside LM)
        that costs no second copy of the weights and batches with the policy's requests."""
        return FrozenView(self)

    # ---- adapters ---------------------------------------------------------------------
    def adapter_off(self):
        """A context with every adapter switched off (the reference / frozen base model)."""
        return self.peft.disable_adapter() if self.peft is not None else nullcontext()

    def adapters(self) -> list[str]:
        return list(self.peft.peft_config) if self.peft is not None and self._plain else []

    def add_adapter(self, name: str, path: str) -> None:
        """Load a PEFT adapter folder as a named variant (the serving side of a policy push)."""
        from peft import PeftModel

        if name in (BASE, "") or name in self.adapters():
            raise ValueError(f"an adapter named {name!r} is already loaded" if name else "an adapter needs a name")
        with self.lock:
            if self.peft is None:
                self.peft, self._plain = PeftModel.from_pretrained(self.model, path, adapter_name=name), True
            elif not self._plain:
                raise ValueError("this backend holds a trained or served adapter already; named adapters are "
                                 "loaded on a plain model (mmgrpo serve --model, without --run)")
            else:
                self.peft.load_adapter(path, adapter_name=name)
            self.peft.eval()
            self._prefix_cache.clear()

    def remove_adapter(self, name: str) -> None:
        if name not in self.adapters():
            raise KeyError(f"no adapter {name!r} is loaded (loaded: {self.adapters()})")
        with self.lock:
            others = [a for a in self.adapters() if a != name]
            if not others:  # the last one: back to the plain model (PEFT keeps no adapter-less state that serves)
                self.model, self.peft, self._plain = self.peft.unload(), None, False
            else:
                if name in self.peft.active_adapters:  # else PEFT warns as it picks another itself
                    self.peft.set_adapter(others[-1])
                self.peft.delete_adapter(name)
            self._prefix_cache = {k: v for k, v in self._prefix_cache.items() if k[0] != name}

    @contextmanager
    def _variant(self, adapter: str | None):
        if adapter is None and self._plain:
            adapter = BASE
        if adapter is None or (adapter == BASE and self.peft is None):
            yield
        elif adapter == BASE:
            with self.peft.disable_adapter():
                yield
        else:
            self.peft.set_adapter(adapter)
            yield

    @contextmanager
    def clients(self, n: int = 1):
        """Declare n program threads at work: a deterministic batch waits for all of them to ask.
        Each thread that runs out of work calls ``leave()`` on the handle."""
        handle = Clients(self, n)
        self._add_clients(n)
        try:
            yield handle
        finally:
            self._add_clients(-handle.left)
            handle.left = 0

    def _add_clients(self, n: int) -> None:
        with self._cv:
            self._active += n
            self._cv.notify_all()

    # ---- batching -----------------------------------------------------------------------
    def close(self) -> None:
        """Stop the batching thread (it holds the model); later requests are an error."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._worker.join(timeout=30)
        self._prefix_cache.clear()

    def cancel(self) -> None:
        """Ctrl-C: fail every waiting request and refuse new ones; the batch decoding now stops at its
        next token step. The backend is closed after it."""
        with self._cv:
            self._closed = self._cancelled = True
            for r in self._pending:
                r.future.set_exception(RuntimeError(CANCELLED))
            self._pending = []
            self._cv.notify_all()

    def _next_batch(self) -> list[_Request] | None:
        """Wait for the next batch (None once closed and drained); see the module docstring."""
        with self._cv:
            first_seen = None
            while True:
                n = len(self._pending)
                if not n and self._closed:
                    return None
                if n and (self._closed or ((self.deterministic or self._active) and n >= self._active)):
                    break  # everyone at work is waiting on us (deterministic: none declared, so none to wait for)
                if n and not self.deterministic:
                    first_seen = first_seen or time.monotonic()
                    left = first_seen + self.max_wait_s - time.monotonic()
                    if n >= self.max_batch or left <= 0:
                        break
                    self._cv.wait(left)
                else:
                    self._cv.wait()
            if self.deterministic:
                self._pending.sort(key=_Request.order)
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch:]
            return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            variants = list(dict.fromkeys(r.adapter for r in batch))  # in the batch's (sorted) order
            for k, adapter in enumerate(variants):  # one variant at a time
                part = [r for r in batch if r.adapter == adapter]
                if adapter not in (None, BASE) and adapter not in self.adapters():  # unloaded while queued
                    for r in part:  # their own error; the other variants' requests go on
                        r.future.set_exception(KeyError(f"no adapter {adapter!r} is loaded (loaded: {self.adapters()})"))
                    continue
                held = sum(r.adapter in variants[k + 1:] for r in batch)  # waiting for their variant's turn
                self._generate(part, adapter, admit=self.continuous, held=held)

    def _admit(self, adapter: str | None, free: int, waiting: int, joined: list[_Request]) -> list[_Request]:
        """Waiting requests of the running variant for the slots that rows freed (continuous
        batching). Deterministic mode first waits until every declared program thread is decoding
        or waiting (``waiting``: the requests this batcher holds), so which requests join at which
        step is a function of the programs."""
        if free <= 0:
            return []
        with self._cv:
            if self.deterministic:
                while not self._closed and len(self._pending) + waiting < self._active:
                    self._cv.wait()
                self._pending.sort(key=_Request.order)
            take = [r for r in self._pending if r.adapter == adapter][:free]
            if take:
                taken = {id(r) for r in take}
                self._pending = [r for r in self._pending if id(r) not in taken]
        joined += take
        return take

    @torch.no_grad()
    def generate_batch(self, prompts: list[list[int]], params: list[SamplingParams],
                       adapter: str | None = None) -> list[Completion]:
        reqs = [_Request(list(p), sp, Future(), adapter) for p, sp in zip(prompts, params, strict=True)]
        self._generate(reqs, adapter, admit=False)
        return [r.future.result() for r in reqs]

    @torch.no_grad()
    def _generate(self, reqs: list[_Request], adapter: str | None, admit: bool, held: int = 0) -> None:
        """Decode ``reqs`` (and, with ``admit``, the requests that join them); every result or the
        error that stopped the batch reaches its request's future."""
        joined: list[_Request] = []
        try:
            with self.lock, self._variant(adapter):
                was_training = self.model.training
                self.model.eval()
                try:
                    self._decode(reqs, adapter, admit, joined, held)
                finally:
                    if was_training:
                        self.model.train()
        except BaseException as exc:  # noqa: BLE001 - delivered to every caller still waiting
            for r in reqs + joined:
                if not r.future.done():
                    r.future.set_exception(exc)

    def weights_changed(self) -> None:
        """Call after an update: cached prompt prefixes were computed with the old weights."""
        with self.lock:
            self._prefix_cache.clear()
            self.version += 1

    @property
    def samples_apart(self) -> bool:
        """Whether a copy of the weights in another dtype samples the trained variant."""
        return self._sampler is not None

    def _net(self, adapter: str | None):
        """The weights that run a batch of ``adapter``: the sampler copy for the trained variant (the
        live weights with the adapter merged, cast; refreshed after each update), the base weights
        in the sampler's dtype for the adapter-off variant, else the live model."""
        if self._sampler is None or self._plain:
            return self.model
        if adapter == BASE:
            return self._base if self._base is not None else self.model
        if adapter is not None:
            return self.model
        if self._sampler_version != self.version:
            self._sync_sampler()
        return self._sampler

    @torch.no_grad()
    def _sync_sampler(self) -> None:
        from peft.tuners.lora import LoraLayer

        copies = dict(self._sampler.named_modules())
        for name, mod in self.model.named_modules():
            if isinstance(mod, LoraLayer):
                w = mod.get_base_layer().weight
                for a in mod.active_adapters if not mod.disable_adapters else ():
                    if a in mod.lora_A:
                        w = w + mod.get_delta_weight(a)
                copies[name].weight.copy_(w)
        self._sampler_version = self.version

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
        self._net(adapter)(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, use_cache=True)
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
            out = self._net(adapter)(input_ids=ids.to(self.device), attention_mask=cmask.to(self.device),
                             position_ids=pos.to(self.device), cache=chunk, use_cache=True,
                             logits_to_keep=1)
            src = [j for j, u in enumerate(rows) for _ in groups[u]]
            dst = [i for u in rows for i in groups[u]]
            last = out.logits[:, -1].float()  # stays on the device: sampling runs there
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
            del out, chunk
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


class FrozenView:
    """``HFBackend.frozen()``: the base model, adapter off; requests share the policy's batcher."""

    version = 0

    def __init__(self, backend: HFBackend):
        self.backend = backend

    def chat(self, messages: list[dict], params: SamplingParams) -> Completion:
        return self.complete(self.backend.tokenize_chat(messages), params)

    def complete(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        return self.backend.complete(prompt_ids, params, adapter=BASE)
