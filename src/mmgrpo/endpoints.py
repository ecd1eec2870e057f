"""What each /v1 route of `mmgrpo serve` does, in vLLM's dialect: every request checked before it reaches
the batcher (a bad one gets a 4xx and never fails its batch-mates), sampling parameters, token-exact
completions and chats, adapters loaded (only from under the adapter root), counted and unloaded.
The HTTP side (connections, keys, timeouts) is serve.py."""
from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .lm.base import BASE, SamplingParams

MAX_BODY_BYTES = 8 << 20
MAX_NEW_TOKENS = 4096


@dataclass
class Limits:
    """What one server accepts; the CLI's flags of `mmgrpo serve`."""
    api_key: str | None = None  # every /v1 route asks for it (Bearer); None: open (warned beyond loopback)
    adapter_root: str | Path | None = None  # adapters load only from folders under it; None: the working folder
    max_adapters: int = 8  # loaded at once; past it the least recently used idle one is unloaded
    adapter_api: bool = True  # /v1/load_lora_adapter and /v1/unload_lora_adapter
    prompts_api: bool = True  # GET /v1/prompts (a result's prompts: its demos may hold private data)
    read_timeout_s: float = 30.0  # a client silent this long while sending (or idle) is disconnected
    max_connections: int = 128  # open at once; more get 429 and are closed
    max_queued: int = 512  # generations waiting or running; more get 429
    unload_wait_s: float = 600.0  # how long an unload waits for the adapter's requests in flight


class BadRequest(ValueError):
    def __init__(self, message: str, code: int = 400, kind: str = "BadRequestError"):
        super().__init__(message)
        self.code, self.kind = code, kind


def _number(body: dict, key: str, default, cast, low=None, high=None):
    v = body.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (cast is int and not float(v).is_integer()):
        raise BadRequest(f"'{key}' must be a{'n integer' if cast is int else ' number'}, got {v!r}")
    v = cast(v)
    if (low is not None and v < low) or (high is not None and v > high):
        raise BadRequest(f"'{key}' must be in [{low}, {high}], got {v}")
    return v


def _params(body: dict, default_max_tokens: int = 16) -> SamplingParams:
    if body.get("stream"):
        raise BadRequest("streaming is not served: send the request with stream = false (or without it)")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
        raise BadRequest("'stop' must be a string or a list of up to 16 non-empty strings")
    if _number(body, "n", 1, int) != 1:
        raise BadRequest("only n = 1 is served; send one request per sample")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise BadRequest(f"'seed' must be a non-negative integer, got {seed!r}")
    top_p = _number(body, "top_p", 1.0, float, 0.0, 1.0)
    if top_p == 0:
        raise BadRequest("'top_p' must be > 0")
    return SamplingParams(temperature=_number(body, "temperature", 1.0, float, 0.0, 100.0), top_p=top_p,
                          max_tokens=_number(body, "max_tokens", body.get("max_completion_tokens") or default_max_tokens,
                                             int, 1, MAX_NEW_TOKENS),
                          stop=tuple(stop), seed=seed)


class Server:
    """The served state: the backend, the name it answers to, and the adapters loaded at run time,
    with their requests in flight (an adapter is unloaded only once none is left)."""

    def __init__(self, backend, model_name: str, prompts: dict | None = None, limits: Limits | None = None,
                 base_name: str | None = None):
        self.backend, self.model_name, self.prompts = backend, model_name, prompts
        self.base_name = base_name if base_name != model_name else None  # a result's base model, served beside it
        self.limits = limits or Limits()
        self.root = Path(self.limits.adapter_root or Path.cwd()).resolve()
        self.vocab = len(backend.tokenizer)
        self.max_prompt = int(getattr(backend.model.config, "max_position_embeddings", 8192) or 8192)
        self.adapter_paths: dict[str, str] = {}  # loaded and serving
        self.last_used: dict[str, float] = {}
        self.inflight: dict[str | None, int] = {}
        self.unloading: set[str] = set()
        self.queued = 0
        self.cv = threading.Condition()  # guards everything above

    def acquire(self, body: dict) -> str | None:
        """The variant a request asks for, counted in flight (``release`` when done); a 404 for an
        unknown adapter or one being unloaded, a 429 past max_queued."""
        name = body.get("model") or self.model_name
        if not isinstance(name, str):
            raise BadRequest(f"'model' must be a string, got {name!r}")
        with self.cv:
            if name == self.model_name:
                variant = None
            elif name == self.base_name:
                variant = BASE
            elif name in self.adapter_paths and name not in self.unloading:
                variant = name
                self.last_used[name] = time.monotonic()
            else:
                raise BadRequest(f"The model `{name}` does not exist.", 404, "NotFoundError")
            if self.queued >= self.limits.max_queued:
                raise BadRequest(f"{self.queued} generations are queued (the limit, --max-queued); retry later",
                                 429, "TooManyRequestsError")
            self.queued += 1
            self.inflight[variant] = self.inflight.get(variant, 0) + 1
        return variant

    def release(self, variant: str | None) -> None:
        with self.cv:
            self.queued -= 1
            self.inflight[variant] -= 1
            self.cv.notify_all()

    def generate(self, ids: list[int], params: SamplingParams, variant: str | None):
        try:
            return self.backend.complete(ids, params, adapter=variant)
        finally:
            self.release(variant)

    def models(self) -> dict:
        now = int(time.time())
        if self.base_name:  # a result: listed as vLLM lists a LoRA adapter, its base model beside it
            data = [{"id": self.base_name, "object": "model", "created": now, "owned_by": "mmgrpo",
                     "root": self.base_name, "parent": None},
                    {"id": self.model_name, "object": "model", "created": now, "owned_by": "mmgrpo",
                     "root": self.model_name, "parent": self.base_name}]
        else:
            data = [{"id": self.model_name, "object": "model", "created": now, "owned_by": "mmgrpo",
                     "root": self.model_name, "parent": None}]
        with self.cv:
            loaded = [(n, p) for n, p in self.adapter_paths.items() if n not in self.unloading]
        data += [{"id": n, "object": "model", "created": now, "owned_by": "mmgrpo", "root": p,
                  "parent": self.model_name} for n, p in loaded]
        return {"object": "list", "data": data}

    def load_adapter(self, body: dict) -> str:
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise BadRequest("'lora_name' and 'lora_path' must be non-empty strings")
        folder = Path(path).expanduser()
        try:
            folder = folder.resolve()
            inside = folder.is_relative_to(self.root)
        except (OSError, ValueError, RuntimeError):
            inside = False
        if not inside:  # says nothing of what exists outside the root
            raise BadRequest("'lora_path' must be a folder under this server's adapter root (--adapter-root)",
                             403, "PermissionDeniedError")
        missing = [f for f in ("adapter_config.json", "adapter_model.safetensors") if not (folder / f).is_file()]
        if missing:
            raise BadRequest(f"'{path}' is not a PEFT adapter folder (missing {missing})")
        with self.cv:
            if name == self.model_name or name in self.adapter_paths:
                if self.adapter_paths.get(name) == str(folder) and name not in self.unloading:
                    return f"Success: LoRA adapter '{name}' added successfully."  # a retried load: the same
                raise BadRequest(f"The lora adapter '{name}' has already been loaded.")
            self.adapter_paths[name] = str(folder)
            self.unloading.add(name)  # reserved: not served until it is loaded
            evict = None
            if len(self.adapter_paths) > self.limits.max_adapters:
                idle = [n for n in self.adapter_paths if n not in self.unloading and not self.inflight.get(n)]
                if not idle:
                    del self.adapter_paths[name]
                    self.unloading.discard(name)
                    raise BadRequest(f"{self.limits.max_adapters} adapters are loaded and in use (--max-adapters); "
                                     f"unload one first", 429, "TooManyRequestsError")
                evict = min(idle, key=lambda n: self.last_used.get(n, 0.0))
        try:
            if evict is not None:
                self._unload(evict)
            self.backend.add_adapter(name, str(folder))
        except ValueError as exc:
            with self.cv:
                del self.adapter_paths[name]
                self.unloading.discard(name)
            raise BadRequest(str(exc)) from exc
        except BaseException:
            with self.cv:
                del self.adapter_paths[name]
                self.unloading.discard(name)
            raise
        with self.cv:
            self.unloading.discard(name)
            self.last_used[name] = time.monotonic()
        return f"Success: LoRA adapter '{name}' added successfully."

    def unload_adapter(self, body: dict) -> str:
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            raise BadRequest("'lora_name' must be a non-empty string")
        with self.cv:
            if name not in self.adapter_paths or name in self.unloading:
                raise BadRequest(f"The lora adapter '{name}' cannot be found.", 404, "NotFoundError")
        self._unload(name)
        return f"Success: LoRA adapter '{name}' removed successfully."

    def _unload(self, name: str) -> None:
        """New requests for ``name`` get a 404 from now on; those in flight finish first."""
        with self.cv:
            self.unloading.add(name)
            deadline = time.monotonic() + self.limits.unload_wait_s
            while self.inflight.get(name):
                left = deadline - time.monotonic()
                if left <= 0:
                    self.unloading.discard(name)
                    raise BadRequest(f"the lora adapter '{name}' still has requests in flight after "
                                     f"{self.limits.unload_wait_s:.0f} s; try again", 409, "ConflictError")
                self.cv.wait(left)
        try:
            self.backend.remove_adapter(name)
        finally:
            with self.cv:
                self.adapter_paths.pop(name, None)
                self.last_used.pop(name, None)
                self.unloading.discard(name)

    def prompt_ids(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (list, str)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str) and prompt:
            ids = self.backend.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                        for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.vocab]
            if bad:
                raise BadRequest(f"token ids out of the vocabulary [0, {self.vocab}): {bad[:5]}")
            ids = list(prompt)
        else:
            raise BadRequest("'prompt' must be a non-empty string or a non-empty list of token ids "
                             "(one prompt per request)")
        return ids

    def fits(self, ids: list[int], params: SamplingParams) -> None:
        """vLLM's check: prompt and completion together within the model's context."""
        if len(ids) + params.max_tokens > self.max_prompt:
            raise BadRequest(f"This model's maximum context length is {self.max_prompt} tokens. However, you "
                             f"requested {len(ids) + params.max_tokens} tokens ({len(ids)} in the prompt, "
                             f"{params.max_tokens} for the completion). Please reduce the length of the prompt "
                             f"or the completion.")

    def completion(self, body: dict) -> dict:
        params, ids = _params(body), self.prompt_ids(body)
        self.fits(ids, params)
        n_logprobs = body.get("logprobs")
        if n_logprobs is not None and (isinstance(n_logprobs, bool) or not isinstance(n_logprobs, int)
                                       or not 0 <= n_logprobs <= 20):
            raise BadRequest(f"'logprobs' must be an integer in [0, 20], got {n_logprobs!r}")
        out = self.generate(ids, params, self.acquire(body))
        choice = {"index": 0, "text": out.text, "logprobs": None, "finish_reason": out.finish_reason,
                  "stop_reason": None}
        if n_logprobs is not None:
            as_ids = bool(body.get("return_tokens_as_token_ids"))
            toks = [f"token_id:{t}" if as_ids else self.backend.tokenizer.decode([t]) for t in out.token_ids]
            offsets, at = [], 0
            for t in out.token_ids:
                offsets.append(at)
                at += len(self.backend.tokenizer.decode([t]))
            choice["logprobs"] = {"text_offset": offsets, "token_logprobs": out.logprobs, "tokens": toks,
                                  "top_logprobs": [{tok: lp} for tok, lp in zip(toks, out.logprobs)]}
        if body.get("return_token_ids"):
            choice["prompt_token_ids"], choice["token_ids"] = list(ids), out.token_ids
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.get("model") or self.model_name, "choices": [choice],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(out.token_ids),
                          "total_tokens": len(ids) + len(out.token_ids)}}

    def chat(self, body: dict) -> dict:
        msgs = body.get("messages")
        if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                        and isinstance(m.get("content"), str) for m in msgs)):
            raise BadRequest("'messages' must be a non-empty list of {'role': str, 'content': str}")
        params = _params(body, default_max_tokens=1024)  # chat: as vLLM, no short cap
        ids = self.backend.tokenize_chat(msgs)
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            params = params.with_(max_tokens=max(1, min(params.max_tokens, self.max_prompt - len(ids))))
        self.fits(ids, params)
        out = self.generate(ids, params, self.acquire(body))
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model") or self.model_name,
                "choices": [{"index": 0, "finish_reason": out.finish_reason,
                             "message": {"role": "assistant", "content": out.text}}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(out.token_ids),
                          "total_tokens": len(ids) + len(out.token_ids)}}
