"""A small OpenAI-compatible server over an in-process backend, speaking vLLM's dialect.

Endpoints (field names and shapes as vLLM's OpenAI-compatible server): GET /v1/models (adapters
listed with their ``parent``); POST /v1/chat/completions; POST /v1/completions (``prompt`` as token
ids or text, ``logprobs``, ``return_token_ids``, ``return_tokens_as_token_ids``, ``model`` = an
adapter's name); POST /v1/load_lora_adapter and /v1/unload_lora_adapter; GET /v1/prompts (serving
a result). Every request is checked before it reaches the batcher, so a bad one gets a 4xx and
never fails its batch-mates. Bound to 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .lm.base import SamplingParams

MAX_BODY_BYTES = 8 << 20
MAX_NEW_TOKENS = 4096


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
    """The served state: the backend, the name it answers to, and the adapters loaded at run time."""

    def __init__(self, backend, model_name: str, prompts: dict | None = None):
        self.backend, self.model_name, self.prompts = backend, model_name, prompts
        self.vocab = len(backend.tokenizer)
        self.max_prompt = int(getattr(backend.model.config, "max_position_embeddings", 8192) or 8192)
        self.adapter_paths: dict[str, str] = {}

    def variant(self, body: dict) -> str | None:
        name = body.get("model") or self.model_name
        if not isinstance(name, str):
            raise BadRequest(f"'model' must be a string, got {name!r}")
        if name == self.model_name:
            return None
        if name in self.adapter_paths:
            return name
        raise BadRequest(f"The model `{name}` does not exist.", 404, "NotFoundError")

    def models(self) -> dict:
        now = int(time.time())
        data = [{"id": self.model_name, "object": "model", "created": now, "owned_by": "mmgrpo",
                 "root": self.model_name, "parent": None}]
        data += [{"id": n, "object": "model", "created": now, "owned_by": "mmgrpo", "root": p,
                  "parent": self.model_name} for n, p in self.adapter_paths.items()]
        return {"object": "list", "data": data}

    def load_adapter(self, body: dict) -> str:
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise BadRequest("'lora_name' and 'lora_path' must be non-empty strings")
        if name == self.model_name or name in self.adapter_paths:
            raise BadRequest(f"The lora adapter '{name}' has already been loaded.")
        folder = Path(path)
        missing = [f for f in ("adapter_config.json", "adapter_model.safetensors") if not (folder / f).is_file()]
        if missing:
            raise BadRequest(f"'{path}' is not a PEFT adapter folder readable by this server (missing {missing})")
        try:
            self.backend.add_adapter(name, str(folder))
        except ValueError as exc:
            raise BadRequest(str(exc)) from exc
        self.adapter_paths[name] = str(folder)
        return f"Success: LoRA adapter '{name}' added successfully."

    def unload_adapter(self, body: dict) -> str:
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            raise BadRequest("'lora_name' must be a non-empty string")
        if name not in self.adapter_paths:
            raise BadRequest(f"The lora adapter '{name}' cannot be found.", 404, "NotFoundError")
        del self.adapter_paths[name]
        self.backend.remove_adapter(name)
        return f"Success: LoRA adapter '{name}' removed successfully."

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
        params, variant, ids = _params(body), self.variant(body), self.prompt_ids(body)
        self.fits(ids, params)
        n_logprobs = body.get("logprobs")
        if n_logprobs is not None and (isinstance(n_logprobs, bool) or not isinstance(n_logprobs, int)
                                       or not 0 <= n_logprobs <= 20):
            raise BadRequest(f"'logprobs' must be an integer in [0, 20], got {n_logprobs!r}")
        out = self.backend.complete(ids, params, adapter=variant)
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
        params, variant = _params(body, default_max_tokens=1024), self.variant(body)  # chat: as vLLM, no short cap
        ids = self.backend.tokenize_chat(msgs)
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            params = params.with_(max_tokens=max(1, min(params.max_tokens, self.max_prompt - len(ids))))
        self.fits(ids, params)
        out = self.backend.complete(ids, params, adapter=variant)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model") or self.model_name,
                "choices": [{"index": 0, "finish_reason": out.finish_reason,
                             "message": {"role": "assistant", "content": out.text}}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(out.token_ids),
                          "total_tokens": len(ids) + len(out.token_ids)}}


def make_handler(state: Server):
    posts = {"/v1/completions": state.completion, "/v1/chat/completions": state.chat,
             "/v1/load_lora_adapter": state.load_adapter, "/v1/unload_lora_adapter": state.unload_adapter}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet: one line per request is noise in tests
            pass

        def _send(self, code: int, obj) -> None:
            text = isinstance(obj, str)
            raw = obj.encode() if text else json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain; charset=utf-8" if text else "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def _error(self, code: int, message: str, kind: str = "BadRequestError") -> None:
            self._send(code, {"error": {"message": message, "type": kind, "param": None, "code": code}})

        def do_GET(self):
            path = self.path.split("?")[0].rstrip("/")
            if path == "/v1/models":
                self._send(200, state.models())
            elif path == "/v1/prompts" and state.prompts is not None:
                self._send(200, {"model": state.model_name, "prompts": state.prompts})
            elif path == "/health":
                self._send(200, {"status": "ok"})
            else:
                self._error(404, f"no route GET {self.path}", "NotFoundError")

        def do_POST(self):
            handler = posts.get(self.path.split("?")[0].rstrip("/"))
            try:
                n = int(self.headers.get("Content-Length") or 0)
                if n > MAX_BODY_BYTES:
                    self.close_connection = True  # the body is not read: this connection is done
                    return self._error(413, f"request body of {n} bytes; the limit is {MAX_BODY_BYTES}")
                raw = self.rfile.read(n)
                if handler is None:
                    return self._error(404, f"no route POST {self.path}", "NotFoundError")
                body = json.loads(raw or b"{}")
                if not isinstance(body, dict):
                    raise BadRequest("the request body must be a JSON object")
                out = handler(body)
            except BadRequest as exc:
                return self._error(exc.code, str(exc), exc.kind)
            except (ValueError, UnicodeDecodeError) as exc:  # JSON that does not parse, a bad length
                return self._error(400, f"bad request: {exc}")
            except Exception as exc:  # noqa: BLE001 - the client gets the reason, the server lives on
                return self._error(500, f"{type(exc).__name__}: {exc}", "InternalServerError")
            self._send(200, out)

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the listen backlog: the default 5 resets clients that connect at once


def start(backend, host: str = "127.0.0.1", port: int = 0, model_name: str = "mmgrpo", prompts: dict | None = None):
    """Start serving in a daemon thread; returns the server (``server.server_address`` has the port,
    ``server.state`` the served state). ``prompts``: a result's optimized prompts, at GET /v1/prompts."""
    state = Server(backend, model_name, prompts)
    server = _Server((host, port), make_handler(state))
    server.state = state
    threading.Thread(target=server.serve_forever, name="mmgrpo-serve", daemon=True).start()
    return server
