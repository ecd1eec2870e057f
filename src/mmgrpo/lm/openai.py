"""Any OpenAI-compatible server, for LMs that are not trained here (an outside LM, a judge).

Standard library HTTP only; the key comes from an environment variable; timeouts and retries
with backoff on connection errors, 429 and 5xx. A malformed response is an error that quotes it.
"""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

from .base import Completion, SamplingParams


class LMServerError(RuntimeError):
    """The server failed or answered with something that is not a chat completion."""


class OpenAIClient:
    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 60.0,
                 retries: int = 3, backoff_s: float = 0.5):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s

    def _post(self, path: str, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = f"{self.base_url}{path}"
        data = json.dumps(body).encode()
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
                try:
                    return json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise LMServerError(f"{url}: response is not JSON: {raw[:200]!r}") from exc
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:300]
                if exc.code != 429 and exc.code < 500:
                    raise LMServerError(f"{url}: HTTP {exc.code}: {detail!r}") from exc
                last = LMServerError(f"{url}: HTTP {exc.code}: {detail!r}")
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                last = LMServerError(f"{url}: {type(exc).__name__}: {exc}")
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2 ** attempt)
        raise LMServerError(f"gave up after {self.retries + 1} tries: {last}")

    def chat(self, messages: list[dict], params: SamplingParams) -> Completion:
        body = {"model": self.model, "messages": messages, "temperature": params.temperature, "top_p": params.top_p,
                "max_tokens": params.max_tokens}
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        out = self._post("/chat/completions", body)
        try:
            choice = out["choices"][0]
            text = choice["message"]["content"]
            if not isinstance(text, str):
                raise TypeError("content is not a string")
        except (KeyError, IndexError, TypeError) as exc:
            raise LMServerError(f"malformed chat completion ({exc}): {json.dumps(out)[:300]}") from exc
        return Completion(text=text, finish_reason=choice.get("finish_reason") or "stop")
