"""Hugging Face transformers backend, in-process, with dynamic batching.

Program threads call ``chat``/``complete``; one worker thread gathers the waiting requests
into a single left-padded batch and decodes them together with a KV cache. A finished row is
answered at once; with ``continuous`` its slot is refilled by a waiting request. Each
row samples with its own seed, on the model's device (sampling.py). The trainer updates the
same ``model`` object in place: no sync.

Batching and its determinism: batcher.py; prefill and decoding: decode.py.

Adapters. ``peft`` is the PeftModel injected into ``model`` (by the trainer, a loaded result,
or ``add_adapter``). Each request names a variant: None (the model as it is), ``BASE`` (adapter
switched off) or a loaded adapter's name; a batch runs one variant at a time. ``PINNED`` (see `pin`)
samples the trained variant of an earlier policy version from the sampler copy while the trainer
updates the live weights (``[rollout] max_policy_lag``).
"""
from __future__ import annotations

import threading
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext

import torch

from .base import BASE, PINNED, Completion, SamplingParams, chat_prompt_ids
from .batcher import _LIVE, Batcher, _Request
from .decode import Decoder


class HFBackend(Batcher, Decoder):
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
        self._base = None
        if sampler_dtype and getattr(torch, sampler_dtype) != next(model.parameters()).dtype:
            self.add_sampler_copy(sampler_dtype)
        self.pinned_version: int | None = None  # the policy version the sampler copy holds for PINNED
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
        if adapter not in (None, BASE, PINNED) and adapter not in self.adapters():
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

    def weights_changed(self) -> None:
        """Call after an update: cached prompt prefixes of the trained variant were computed with the
        old weights (the dict is replaced, not cleared: a lagged rollout may be reading it)."""
        with self.lock:
            self._prefix_cache = {k: v for k, v in self._prefix_cache.items() if k[0] in (BASE, PINNED)}
            self.version += 1

    def add_sampler_copy(self, dtype: str | None = None) -> None:
        """A copy of the weights (in ``dtype``; None: the model's) that samples the trained variant,
        and one of the base weights for the adapter-off variant (an outside LM, a judge). Made
        before an adapter is injected: lagged rollouts (max_policy_lag) need one even in the model's
        own dtype, to sample while the live weights are updated."""
        import copy

        if any("lora_" in n for n, _ in self.model.named_parameters()):
            raise RuntimeError("a sampler copy is made from the plain model, before an adapter is injected")
        with self.lock:
            self._sampler = copy.deepcopy(self.model).to(getattr(torch, dtype) if dtype else self.model.dtype).eval()
            self._sampler.requires_grad_(False)
            self._base = copy.deepcopy(self._sampler)
            self._sampler_version = -1

    # ---- lagged rollouts (max_policy_lag) -----------------------------------------------
    def runs_apart(self, adapter: str | None) -> bool:
        """Whether a batch of ``adapter`` runs on a copy of the weights, never touching the live model
        (so it needs neither the lock nor an adapter switch, and may run during an update)."""
        return not self._plain and (adapter == PINNED or (adapter == BASE and self._base is not None))

    @torch.no_grad()
    def policy_snapshot(self) -> dict[str, torch.Tensor]:
        """The live adapter's LoRA factors, copied, keyed ``"<module>@A@<adapter>"`` and ``"<module>@B@<adapter>"``
        (small; what `pin` merges and a checkpoint keeps for a lagged policy version)."""
        from peft.tuners.lora import LoraLayer

        out = {}
        with self.lock:
            for name, mod in self.model.named_modules():
                if isinstance(mod, LoraLayer):
                    for a in self._lora_names(mod):
                        out[f"{name}@A@{a}"] = mod.lora_A[a].weight.detach().clone()
                        out[f"{name}@B@{a}"] = mod.lora_B[a].weight.detach().clone()
        return out

    @torch.no_grad()
    def pin(self, snapshot: dict[str, torch.Tensor], version: int) -> "PinnedView":
        """Load policy ``version`` (a `policy_snapshot`) into the sampler copy and return the view that
        samples it. The copy holds it, whatever the trainer does to the live weights meanwhile, until
        the next pin or a request of the live trained variant (which re-syncs the copy). Call it when
        no PINNED request is in flight."""
        if self._sampler is None or self.peft is None or self._plain:
            raise RuntimeError("pinned policy versions need a trained adapter and a sampler copy of the weights "
                               "(`add_sampler_copy()` before the adapter is injected)")
        self._merge_into_sampler(lambda name, mod, a: (snapshot[f"{name}@B@{a}"] @ snapshot[f"{name}@A@{a}"])
                                 * mod.scaling[a])
        self._sampler_version = -1  # no longer the live weights
        self.pinned_version = version
        self._prefix_cache = {k: v for k, v in self._prefix_cache.items() if k[0] != PINNED}
        return PinnedView(self, version)

    @staticmethod
    def _lora_names(mod) -> list[str]:
        return [a for a in (mod.active_adapters if not mod.disable_adapters else ()) if a in mod.lora_A]

    @property
    def has_sampler_copy(self) -> bool:
        return self._sampler is not None

    @property
    def samples_apart(self) -> bool:
        """Whether a copy of the weights in another dtype samples the trained variant."""
        return self._sampler is not None and next(self._sampler.parameters()).dtype != next(
            self.model.parameters()).dtype

    def _net(self, adapter: str | None):
        """The weights that run a batch of ``adapter``: the sampler copy for the trained variant (the
        live weights with the adapter merged, cast; refreshed after each update), the base weights
        in the sampler's dtype for the adapter-off variant, else the live model."""
        if self._sampler is None or self._plain:
            return self.model
        if adapter == BASE:
            return self._base if self._base is not None else self.model
        if adapter == PINNED:
            return self._sampler
        if adapter is not None:
            return self.model
        if self._sampler_version != self.version:
            self._sync_sampler()
        return self._sampler

    @torch.no_grad()
    def _sync_sampler(self) -> None:
        self._merge_into_sampler(lambda name, mod, a: mod.get_delta_weight(a))
        self._sampler_version = self.version
        self.pinned_version = None  # the copy now holds the live weights

    @torch.no_grad()
    def _merge_into_sampler(self, delta) -> None:
        """Each adapted layer of the sampler copy := its base weight + ``delta(name, module, adapter)``
        summed over the active adapters (the live ones, or a kept version's: `pin`)."""
        from peft.tuners.lora import LoraLayer

        copies = dict(self._sampler.named_modules())
        for name, mod in self.model.named_modules():
            if isinstance(mod, LoraLayer):
                w = mod.get_base_layer().weight
                for a in self._lora_names(mod):
                    w = w + delta(name, mod, a)
                copies[name].weight.copy_(w)


class PinnedView:
    """``HFBackend.pin(...)``: the trained variant as of policy ``version``, sampled by the sampler copy;
    requests share the backend's batcher (and its ``clients``), and run during updates."""

    def __init__(self, backend: HFBackend, version: int):
        self.backend, self.version = backend, version

    def tokenize_chat(self, messages: list[dict]) -> list[int]:
        return self.backend.tokenize_chat(messages)

    def chat(self, messages: list[dict], params: SamplingParams) -> Completion:
        return self.complete(self.backend.tokenize_chat(messages), params)

    def complete(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        if self.backend.pinned_version != self.version:
            raise RuntimeError(f"policy version {self.version} is no longer pinned (the sampler copy holds "
                               f"{self.backend.pinned_version}); pin it again")
        return self.backend.complete(prompt_ids, params, adapter=PINNED)

    def clients(self, n: int):
        return self.backend.clients(n)

    def frozen(self) -> "FrozenView":
        return self.backend.frozen()


class FrozenView:
    """``HFBackend.frozen()``: the base model, adapter off; requests share the policy's batcher."""

    version = 0

    def __init__(self, backend: HFBackend):
        self.backend = backend

    def chat(self, messages: list[dict], params: SamplingParams) -> Completion:
        return self.complete(self.backend.tokenize_chat(messages), params)

    def complete(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        return self.backend.complete(prompt_ids, params, adapter=BASE)
