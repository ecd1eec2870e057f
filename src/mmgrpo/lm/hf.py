"""Hugging Face transformers backend, in-process, with dynamic batching.

Program threads call ``chat``/``complete``; one worker thread gathers the waiting requests
into a single left-padded batch and decodes them together with a KV cache. Each row samples
with its own seeded generator. The trainer updates the same ``model`` object in place: no sync.

Determinism. A row's floating-point result depends on which rows share its batch (padding,
the shared prefix, the kernel's blocking), so with batches formed by arrival time a token can
flip when the machine is busy. In deterministic mode (the default) a batch is launched only
when every program thread declared with ``clients`` is waiting on this backend, and its rows
are put in a fixed order: the batches are then a function of the programs alone, not of timing.
Otherwise (``deterministic=False``, e.g. a server) a batch starts after ``max_wait_s``.

Adapters. ``peft`` is the PeftModel injected into ``model`` (by the trainer, a loaded result,
or ``add_adapter``). Each request names a variant: None (the model as it is), ``BASE`` (adapter
switched off) or a loaded adapter's name; a batch runs one variant at a time.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from .base import Completion, SamplingParams
from .remote import chat_prompt_ids

BASE = "<base>"  # a request's variant: the base model, every adapter off


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
                 prefix_cache_size: int = 4, prefill_chunk: int = 8, deterministic: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.deterministic = deterministic
        self.peft = None  # the PeftModel injected into model, once there is one
        self._plain = False  # True when adapters were added to a plain model: None then means BASE
        self.device = device or next(model.parameters()).device
        self.lock = threading.RLock()  # held while generating; the trainer holds it to update
        self.stats = {"requests": 0, "batches": 0, "generated_tokens": 0, "prompt_tokens": 0, "prefix_hits": 0}
        self.version = 0  # rises with every weight update (see weights_changed)
        self.prefix_cache_size = prefix_cache_size
        self.min_prefix = 16
        self.prefill_chunk = prefill_chunk
        self._prefix_cache: dict[tuple, list] = {}
        self._cv = threading.Condition()  # guards _pending, _active, _closed
        self._pending: list[_Request] = []
        self._closed = False
        self._active = 0  # program threads declared at work (see `clients`)
        stop_ids = {tokenizer.eos_token_id}
        for tok in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
            tid = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
                stop_ids.add(tid)
        self.stop_ids = {t for t in stop_ids if t is not None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._worker = threading.Thread(target=self._loop, name="mmgrpo-hf-batcher", daemon=True)
        self._worker.start()

    @classmethod
    def load(cls, name: str = "smollm2-135m", device: str = "auto", dtype: str = "auto", **kw) -> "HFBackend":
        from ..models import load

        m = load(name, dtype=dtype, device=device)
        return cls(m.model, m.tokenizer, **kw)

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

    def _next_batch(self) -> list[_Request] | None:
        """Wait for the next batch (None once closed and drained); see the module docstring."""
        with self._cv:
            first_seen = None
            while True:
                n = len(self._pending)
                if not n and self._closed:
                    return None
                if n and (n >= self._active or self._closed):
                    break  # everyone at work is waiting on us
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
            for adapter in variants:
                part = [r for r in batch if r.adapter == adapter]
                try:
                    results = self.generate_batch([r.prompt_ids for r in part], [r.params for r in part], adapter)
                    for r, res in zip(part, results):
                        r.future.set_result(res)
                except BaseException as exc:  # noqa: BLE001 - delivered to every waiting caller
                    for r in part:
                        if not r.future.done():
                            r.future.set_exception(exc)

    @torch.no_grad()
    def generate_batch(self, prompts: list[list[int]], params: list[SamplingParams],
                       adapter: str | None = None) -> list[Completion]:
        with self.lock, self._variant(adapter):
            was_training = self.model.training
            self.model.eval()
            try:
                return self._decode(prompts, params, adapter)
            finally:
                if was_training:
                    self.model.train()

    def weights_changed(self) -> None:
        """Call after an update: cached prompt prefixes were computed with the old weights."""
        with self.lock:
            self._prefix_cache.clear()
            self.version += 1

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
        self.model(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, use_cache=True)
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        self._prefix_cache[key] = kv
        while len(self._prefix_cache) > self.prefix_cache_size:
            self._prefix_cache.pop(next(iter(self._prefix_cache)))
        return kv

    def _prefill(self, prompts, max_new: int, adapter: str | None):
        """Build the batch's cache and last-token logits.

        A prefix shared by all rows is computed once (and kept across batches). The rest of
        each prompt is prefilled in chunks of rows sorted by length, so padding stays small,
        then right-aligned into one preallocated StaticCache: a growing cache would re-copy
        itself at every decoding step, which made batch-32 decoding memory-bound.
        """
        from transformers import DynamicCache, StaticCache

        B = len(prompts)
        P = _common_prefix_len(prompts) if self.prefix_cache_size else 0
        P = min(P, min(len(p) for p in prompts) - 1)  # every row keeps >= 1 token to produce logits
        if P < self.min_prefix:
            P = 0
        prefix = self._prefix_kv(prompts[0][:P], adapter) if P else None
        lens = [len(p) - P for p in prompts]
        S = max(lens)
        mask = torch.zeros((B, P + S + max_new), dtype=torch.long, device=self.device)
        mask[:, :P] = 1
        last_pos = torch.zeros((B, 1), dtype=torch.long, device=self.device)
        logits = [None] * B
        full_k: list[torch.Tensor] = []
        full_v: list[torch.Tensor] = []
        order = sorted(range(B), key=lambda i: lens[i])
        for c in range(0, B, self.prefill_chunk):
            rows = order[c:c + self.prefill_chunk]
            b, Sc = len(rows), max(lens[i] for i in rows)
            ids = torch.full((b, Sc), self.pad_id, dtype=torch.long)
            cmask = torch.zeros((b, P + Sc), dtype=torch.long)
            cmask[:, :P] = 1
            pos = torch.full((b, Sc), P, dtype=torch.long)
            for j, i in enumerate(rows):
                n = lens[i]
                ids[j, Sc - n:] = torch.tensor(prompts[i][P:])
                cmask[j, P + Sc - n:] = 1
                pos[j, Sc - n:] = torch.arange(P, P + n)
                mask[i, P + S - n:P + S] = 1
                last_pos[i, 0] = P + n - 1
            cache = DynamicCache()
            if prefix is not None:
                for li, (k, v) in enumerate(prefix):
                    cache.update(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1), li)
            out = self.model(input_ids=ids.to(self.device), attention_mask=cmask.to(self.device),
                             position_ids=pos.to(self.device), cache=cache, use_cache=True,
                             logits_to_keep=1)
            for j, i in enumerate(rows):
                logits[i] = out.logits[j, -1].float().cpu()
            if not full_k:
                for layer in out.cache.layers:
                    shape = (B, layer.keys.shape[1], P + S, layer.keys.shape[3])
                    full_k.append(torch.zeros(shape, dtype=layer.keys.dtype, device=self.device))
                    full_v.append(torch.zeros(shape, dtype=layer.values.dtype, device=self.device))
            idx = torch.tensor(rows, device=self.device)
            for li, layer in enumerate(out.cache.layers):  # right-align: columns P+S-Sc .. P+S
                full_k[li][idx, :, :P] = layer.keys[:, :, :P]
                full_v[li][idx, :, :P] = layer.values[:, :, :P]
                full_k[li][idx, :, P + S - Sc:] = layer.keys[:, :, P:]
                full_v[li][idx, :, P + S - Sc:] = layer.values[:, :, P:]
        cache = StaticCache(config=self.model.config, max_cache_len=P + S + max_new)
        for li in range(len(full_k)):
            cache.update(full_k[li], full_v[li], li)
        return torch.stack(logits), cache, mask, last_pos, P + S

    def _decode(self, prompts, params, adapter: str | None = None) -> list[Completion]:
        B = len(prompts)
        gens = []
        for p in params:
            g = torch.Generator(device="cpu")  # unseeded: fresh entropy, the global RNG untouched
            g.manual_seed(p.seed if p.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
            gens.append(g)
        # log-probs under the distribution each token is drawn from: softmax(logits / T)
        temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params])
        max_new = max(p.max_tokens for p in params)
        logits, cache, mask, last_pos, col = self._prefill(prompts, max_new, adapter)
        toks: list[list[int]] = [[] for _ in range(B)]
        lps: list[list[float]] = [[] for _ in range(B)]
        done = [False] * B
        finish = ["length"] * B
        live = list(range(B))  # original row of each batch position; finished rows are dropped
        for step in range(max_new):
            logp = torch.log_softmax(logits / temps[live].unsqueeze(-1), dim=-1)
            nxt = torch.empty(len(live), dtype=torch.long)
            for j, i in enumerate(live):
                nxt[j] = t = _sample(logp[j], params[i], gens[i])
                toks[i].append(t)
                lps[i].append(float(logp[j, t]))
                if t in self.stop_ids:
                    done[i], finish[i] = True, "stop"
                elif len(toks[i]) >= params[i].max_tokens:
                    done[i] = True
                elif params[i].stop:
                    text = self.tokenizer.decode(toks[i], skip_special_tokens=True)
                    if any(s in text for s in params[i].stop):
                        done[i], finish[i] = True, "stop"
            keep = [j for j, i in enumerate(live) if not done[i]]
            if not keep:
                break
            if len(keep) < len(live):  # compact: finished rows cost nothing from here on
                idx = torch.tensor(keep)
                on_dev = idx.to(self.device)
                live = [live[j] for j in keep]
                nxt, mask, last_pos = nxt[idx], mask[on_dev], last_pos[on_dev]
                for layer in cache.layers:
                    layer.keys, layer.values = layer.keys[on_dev], layer.values[on_dev]
                    layer.batch_size = len(keep)
            mask[:, col] = 1
            col += 1
            last_pos = last_pos + 1
            out = self.model(input_ids=nxt.view(-1, 1).to(self.device), attention_mask=mask, position_ids=last_pos,
                             cache=cache, use_cache=True)
            cache = out.cache
            logits = out.logits[:, -1, :].float().cpu()
        results = []
        for i in range(B):
            text = self.tokenizer.decode([t for t in toks[i] if t not in self.stop_ids], skip_special_tokens=True)
            for s in params[i].stop:
                if s in text:
                    text = text[: text.index(s)]
            results.append(Completion(text=text, token_ids=toks[i], logprobs=lps[i], prompt_ids=list(prompts[i]),
                                      finish_reason=finish[i]))
        self.stats["requests"] += B
        self.stats["batches"] += 1
        self.stats["generated_tokens"] += sum(len(t) for t in toks)
        self.stats["prompt_tokens"] += sum(len(p) for p in prompts)
        return results


def _sample(logp: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    """Draw from the tempered log-probs; top-p keeps the nucleus (the recorded log-prob stays
    the full tempered one, which is what the trainer recomputes: see lm/base.py)."""
    if p.temperature == 0:
        return int(torch.argmax(logp))
    probs = torch.exp(logp)
    if p.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = (sorted_p.cumsum(-1) - sorted_p) < p.top_p  # always keeps the top token
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        return int(order[torch.multinomial(sorted_p, 1, generator=gen)])
    return int(torch.multinomial(probs, 1, generator=gen))


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
