"""The policy served by inference servers (vLLM, ``mmgrpo serve``), token-exact.

Chat messages become token ids here, with the policy's own tokenizer, and go to
``/v1/completions`` as a list of ids; the completion ids and their sampling log-probs come back
(vLLM: ``return_token_ids``, or ``return_tokens_as_token_ids`` tokens ``token_id:<id>``), so a
``ModuleCall`` holds what the server sampled, as from the in-process backend.

Policy versions: after each update the learner writes the adapter to a folder the servers read
and ``push`` loads it on every server under a new name (vLLM may serve stale prefix-cache blocks
for an adapter reloaded under the same name), switches requests to it and unloads the old one.
Log-probs follow lm/base.py (softmax(logits / T)): start vLLM with
``--logprobs-mode processed_logprobs`` so that its numbers are of the tempered distribution.
"""
from __future__ import annotations

import threading
import zlib
from pathlib import Path

from .base import Completion, SamplingParams, chat_prompt_ids, newest_at_most
from .openai import HTTPJSON, LMServerError

TOKEN_ID_PREFIX = "token_id:"


def completion_body(model: str, prompt_ids: list[int], params: SamplingParams) -> dict:
    """A vLLM /v1/completions request for token ids in, token ids and log-probs out."""
    body = {"model": model, "prompt": list(prompt_ids), "max_tokens": params.max_tokens,
            "temperature": params.temperature, "top_p": params.top_p, "n": 1, "logprobs": 1,
            "return_token_ids": True, "return_tokens_as_token_ids": True, "skip_special_tokens": True}
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    return body


def parse_completion(out: dict, prompt_ids: list[int]) -> Completion:
    """Token ids and log-probs of a /v1/completions answer, or an error saying what is missing."""
    try:
        choice = out["choices"][0]
        text = choice["text"]
    except (KeyError, IndexError, TypeError) as exc:
        raise LMServerError(f"malformed completion ({exc!r}): {str(out)[:300]}") from exc
    lp = choice.get("logprobs") or {}
    ids = choice.get("token_ids")
    if ids is None and lp.get("tokens") is not None:
        toks = lp["tokens"]
        if not all(isinstance(t, str) and t.startswith(TOKEN_ID_PREFIX) for t in toks):
            raise LMServerError("the server returned token text, not ids: ask with return_tokens_as_token_ids "
                                f"(vLLM) or return_token_ids (vLLM >= 0.10.2); got tokens {toks[:3]!r}")
        ids = [int(t[len(TOKEN_ID_PREFIX):]) for t in toks]
    if ids is None:
        raise LMServerError("the server returned text only, no token ids: the policy server must answer "
                            "return_token_ids or return_tokens_as_token_ids (vLLM >= 0.10.2, or mmgrpo serve)")
    logprobs = lp.get("token_logprobs")
    if logprobs is None or len(logprobs) != len(ids) or any(x is None for x in logprobs):
        raise LMServerError(f"the server returned {len(ids)} token ids but log-probs {str(logprobs)[:100]}: "
                            "ask with logprobs >= 0")
    sent_back = choice.get("prompt_token_ids")
    if sent_back is not None and list(sent_back) != list(prompt_ids):
        raise LMServerError("the server changed the prompt's token ids (did it add a BOS token?): "
                            f"sent {prompt_ids[:8]}..., it used {list(sent_back)[:8]}...")
    return Completion(text=text, token_ids=[int(t) for t in ids], logprobs=[float(x) for x in logprobs],
                      prompt_ids=list(prompt_ids), finish_reason=choice.get("finish_reason") or "stop")


class RemotePolicy:
    """The policy on one or more servers; each prompt goes to one of them, chosen by its hash."""

    def __init__(self, urls: list[str] | str, tokenizer, model: str | None = None, timeout_s: float = 300.0,
                 retries: int = 3, backoff_s: float = 1.0):
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ValueError("RemotePolicy needs at least one server URL (e.g. http://127.0.0.1:8000/v1)")
        # the servers' API key (mmgrpo serve --api-key, vllm serve --api-key) is read from MMGRPO_API_KEY
        self.servers = [HTTPJSON(u, api_key_env="MMGRPO_API_KEY", timeout_s=timeout_s, retries=retries,
                                 backoff_s=backoff_s) for u in urls]
        self.tokenizer = tokenizer
        self.base = model or self._base_model()
        self.model = self.base  # the name requests ask for: the base, or the current adapter
        self.version = 0  # policy version of self.model (the learner's step count when pushed)
        self.pushes: list[dict] = []  # every load/unload, for the step log and tests
        self.loaded: dict[int, str] = {}  # policy version -> adapter name, the versions still served
        self._lock = threading.Lock()

    def _base_model(self) -> str:
        out = self.servers[0].request("/models")
        try:
            return next(m["id"] for m in out["data"] if not m.get("parent"))
        except (KeyError, TypeError, StopIteration) as exc:
            raise LMServerError(f"{self.servers[0].base_url}/models lists no base model: {str(out)[:200]}") from exc

    def tokenize_chat(self, messages: list[dict]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages)

    def chat(self, messages: list[dict], params: SamplingParams) -> Completion:
        return self.complete(self.tokenize_chat(messages), params)

    def server_for(self, prompt_ids: list[int]):
        """The server of a prompt, by its hash: the same for every sample of it (an example's G
        rollouts), so that the server's prefix cache holds it; different prompts spread over the servers."""
        if len(self.servers) == 1:
            return self.servers[0]
        return self.servers[zlib.crc32(repr(list(prompt_ids)).encode()) % len(self.servers)]

    def complete(self, prompt_ids: list[int], params: SamplingParams, model: str | None = None) -> Completion:
        server = self.server_for(prompt_ids)
        return parse_completion(server.request("/completions", completion_body(model or self.model, prompt_ids,
                                                                                params)), prompt_ids)

    def frozen(self) -> "_BaseView":
        """The servers' base model (no adapter): a fixed LM, as ``HFBackend.frozen``."""
        return _BaseView(self)

    def at(self, version: int) -> "PolicyAt":
        """Policy ``version`` (the newest loaded version <= it: a step without an update pushes none),
        for lagged rollouts; it stays loaded while it is among the last ``keep`` pushed."""
        return PolicyAt(self, self.loaded[newest_at_most(self.loaded, version)], version)

    def push(self, adapter_dir: str | Path, name: str, version: int, keep: int = 1) -> None:
        """Serve a new policy version: load ``adapter_dir`` (readable by every server) as ``name`` on
        every server, switch requests to it, then unload the adapters older than the last ``keep``."""
        path = str(Path(adapter_dir).resolve())
        with self._lock:
            loaded = []
            try:
                for s in self.servers:
                    _load(s, name, path)
                    loaded.append(s)
            except BaseException:  # all or none: the servers loaded so far unload it again
                for s in loaded:
                    try:
                        s.request("/unload_lora_adapter", {"lora_name": name}, want_json=False)
                    except LMServerError:
                        pass
                raise
            self.model, self.version = name, version
            self.loaded[version] = name
            self.pushes.append({"load": name, "version": version})
            for v in sorted(self.loaded)[:-keep]:
                old = self.loaded.pop(v)
                for s in self.servers:
                    try:
                        s.request("/unload_lora_adapter", {"lora_name": old}, want_json=False)
                    except LMServerError as exc:  # a restarted server no longer has it: nothing to free
                        if "HTTP 404" not in str(exc) and "not found" not in str(exc).lower():
                            raise
                self.pushes.append({"unload": old})


def _load(server, name: str, path: str) -> None:
    """Load an adapter, idempotently: "already loaded" after a retry (the first try went through
    but its answer was lost) is the same adapter, since every policy version has a new name."""
    try:
        server.request("/load_lora_adapter", {"lora_name": name, "lora_path": path}, want_json=False)
    except LMServerError as exc:
        if "already" not in str(exc).lower():
            raise


class PolicyAt:
    """``RemotePolicy.at(version)``: requests ask for that version's adapter."""

    def __init__(self, policy: RemotePolicy, model: str, version: int):
        self.policy, self.model, self.version = policy, model, version

    def tokenize_chat(self, messages: list[dict]) -> list[int]:
        return self.policy.tokenize_chat(messages)

    def chat(self, messages: list[dict], params: SamplingParams) -> Completion:
        return self.complete(self.policy.tokenize_chat(messages), params)

    def complete(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        return self.policy.complete(prompt_ids, params, model=self.model)

    def frozen(self) -> "_BaseView":
        return self.policy.frozen()


class _BaseView:
    version = 0

    def __init__(self, policy: RemotePolicy):
        self.policy = policy

    def chat(self, messages: list[dict], params: SamplingParams) -> Completion:
        return self.policy.complete(self.policy.tokenize_chat(messages), params, model=self.policy.base)
