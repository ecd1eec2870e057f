"""Any OpenAI-compatible server, for LMs that are not trained here (an outside LM, a judge).

Standard library HTTP only; the key comes from an environment variable; timeouts and retries
with backoff on connection errors, 429 and 5xx. A malformed response is an error that quotes it.
A server that stays unreachable raises ``LMUnavailable``: an outage, never a bad answer.
"""
from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.request

from .base import Completion, SamplingParams


class LMServerError(RuntimeError):
    """The server failed or answered with something that is not what was asked for."""


class LMUnavailable(LMServerError):
    """The server could not be reached (or kept failing) after every retry. The training loop
    stops the step on it instead of scoring the rollout: the model did nothing wrong."""


def error_message(raw: bytes) -> str:
    """The message of an error body: vLLM's {"error": {"message"}} or older {"message"}, else the raw text."""
    try:
        body = json.loads(raw)
        err = body.get("error", body) if isinstance(body, dict) else body
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(err, str):
            return err
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    return raw[:300].decode("utf-8", "replace")


class HTTPJSON:
    """POST/GET with retries; 4xx other than 429 is final (the request is wrong, retrying won't help)."""

    def __init__(self, base_url: str, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 60.0,
                 retries: int = 3, backoff_s: float = 0.5):
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s

    def request(self, path: str, body: dict | None = None, want_json: bool = True):
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = f"{self.base_url}{path}"
        data = None if body is None else json.dumps(body).encode()
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
                if not want_json:
                    return raw.decode("utf-8", "replace")
                try:
                    return json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise LMServerError(f"{url}: response is not JSON: {raw[:200]!r}") from exc
            except urllib.error.HTTPError as exc:
                msg = error_message(exc.read())
                if exc.code in (404, 405) and path.endswith("_adapter"):
                    raise LMServerError(f"{url}: HTTP {exc.code}: {msg} (for vLLM: start it with --enable-lora and "
                                        f"VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)") from exc
                if exc.code == 401:
                    raise LMServerError(f"{url}: HTTP 401: {msg} (the server wants an API key: set it in "
                                        f"${self.api_key_env})") from exc
                if exc.code != 429 and exc.code < 500:
                    raise LMServerError(f"{url}: HTTP {exc.code}: {msg}") from exc
                last = LMServerError(f"{url}: HTTP {exc.code}: {msg}")
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
                last = LMServerError(f"{url}: {type(exc).__name__}: {getattr(exc, 'reason', exc)}")
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2 ** attempt)
        raise LMUnavailable(f"gave up after {self.retries + 1} tries: {last}")


class OpenAIClient:
    """A fixed LM behind chat completions (text only: nothing sampled here is trained on)."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 60.0,
                 retries: int = 3, backoff_s: float = 0.5):
        self.http = HTTPJSON(base_url, api_key_env, timeout_s, retries, backoff_s)
        self.base_url, self.model = self.http.base_url, model

    def chat(self, messages: list[dict], params: SamplingParams) -> Completion:
        body = {"model": self.model, "messages": messages, "temperature": params.temperature, "top_p": params.top_p,
                "max_tokens": params.max_tokens}
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        out = self.http.request("/chat/completions", body)
        try:
            choice = out["choices"][0]
            text = choice["message"]["content"]
            if not isinstance(text, str):
                raise TypeError("content is not a string")
        except (KeyError, IndexError, TypeError) as exc:
            raise LMServerError(f"malformed chat completion ({exc}): {json.dumps(out)[:300]}") from exc
        return Completion(text=text, finish_reason=choice.get("finish_reason") or "stop")
