"""A small OpenAI-compatible server over an in-process backend (bound to 127.0.0.1 by default).

Endpoints: GET /v1/models; GET /v1/prompts (serving a result); POST /v1/chat/completions; POST /v1/completions (a prompt of token
ids returns token ids and log-probs). Requests from many clients are batched by the backend.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .lm.base import SamplingParams


def _params(body: dict) -> SamplingParams:
    stop = body.get("stop") or ()
    return SamplingParams(temperature=float(body.get("temperature", 1.0)), top_p=float(body.get("top_p", 1.0)),
                          max_tokens=int(body.get("max_tokens", 128)),
                          stop=tuple([stop] if isinstance(stop, str) else stop), seed=body.get("seed"))


def make_handler(backend, model_name: str, prompts: dict | None = None):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet: one line per request is noise in tests
            pass

        def _send(self, code: int, obj: dict) -> None:
            raw = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model_name, "object": "model"}]})
            elif self.path.rstrip("/") == "/v1/prompts" and prompts is not None:
                self._send(200, {"model": model_name, "prompts": prompts})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            try:
                n = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(n) or b"{}")
                params = _params(body)
            except (ValueError, TypeError) as exc:
                return self._send(400, {"error": {"message": f"bad request: {exc}"}})
            created = int(time.time())
            try:
                if self.path == "/v1/chat/completions":
                    msgs = body.get("messages")
                    if not isinstance(msgs, list) or not msgs:
                        return self._send(400, {"error": {"message": "'messages' must be a non-empty list"}})
                    out = backend.chat(msgs, params)
                    return self._send(200, {"object": "chat.completion", "created": created, "model": model_name,
                                            "choices": [{"index": 0, "finish_reason": out.finish_reason,
                                                         "message": {"role": "assistant", "content": out.text}}],
                                            "usage": {"prompt_tokens": len(out.prompt_ids),
                                                      "completion_tokens": len(out.token_ids)}})
                if self.path == "/v1/completions":
                    prompt = body.get("prompt")
                    if not (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
                        return self._send(400, {"error": {"message": "'prompt' must be a list of token ids"}})
                    out = backend.complete(prompt, params)
                    return self._send(200, {"object": "text_completion", "created": created, "model": model_name,
                                            "choices": [{"index": 0, "text": out.text, "finish_reason": out.finish_reason,
                                                         "token_ids": out.token_ids,
                                                         "logprobs": {"token_logprobs": out.logprobs}}]})
            except Exception as exc:  # noqa: BLE001 - the client gets the reason, the server lives on
                return self._send(500, {"error": {"message": f"{type(exc).__name__}: {exc}"}})
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    return Handler


def start(backend, host: str = "127.0.0.1", port: int = 0, model_name: str = "mmgrpo", prompts: dict | None = None):
    """Start serving in a daemon thread; returns the server (``server.server_address`` has the port).
    ``prompts``: a result's optimized prompts, answered at GET /v1/prompts."""
    server = ThreadingHTTPServer((host, port), make_handler(backend, model_name, prompts))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="mmgrpo-serve", daemon=True).start()
    return server
