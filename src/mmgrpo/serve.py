"""A small OpenAI-compatible server over an in-process backend, speaking vLLM's dialect (the routes' work:
endpoints.py).

Endpoints (field names and shapes as vLLM's OpenAI-compatible server): GET /v1/models (adapters
listed with their ``parent``); POST /v1/chat/completions; POST /v1/completions (``prompt`` as token
ids or text, ``logprobs``, ``return_token_ids``, ``return_tokens_as_token_ids``, ``model`` = an
adapter's name); POST /v1/load_lora_adapter and /v1/unload_lora_adapter; GET /v1/prompts (serving
a result). Every request is checked before it reaches the batcher, so a bad one gets a 4xx and
never fails its batch-mates. Bound to 127.0.0.1 unless told otherwise; with an API key every /v1
route asks for it (``Authorization: Bearer KEY``, as vLLM's ``--api-key``); adapters load only from
under the adapter root; connections, queued generations and loaded adapters are bounded.
"""
from __future__ import annotations

import hmac
import json
import sys
import threading
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .endpoints import MAX_BODY_BYTES, BadRequest, Limits, Server  # noqa: F401 - Limits: the server's settings


def make_handler(state: Server):
    posts = {"/v1/completions": state.completion, "/v1/chat/completions": state.chat}
    if state.limits.adapter_api:
        posts.update({"/v1/load_lora_adapter": state.load_adapter, "/v1/unload_lora_adapter": state.unload_adapter})
    key = state.limits.api_key

    class Handler(BaseHTTPRequestHandler):
        timeout = state.limits.read_timeout_s  # the socket's: a silent client is disconnected, never waited on

        def log_message(self, *args):  # quiet: one line per request is noise in tests
            pass

        def _send(self, code: int, obj) -> None:
            text = isinstance(obj, str)
            raw = obj.encode() if text else json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain; charset=utf-8" if text else "application/json")
            self.send_header("Content-Length", str(len(raw)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(raw)

        def _error(self, code: int, message: str, kind: str = "BadRequestError") -> None:
            self._send(code, {"error": {"message": message, "type": kind, "param": None, "code": code}})

        def _authorized(self, path: str) -> bool:
            """vLLM's --api-key: every /v1 route asks for the Bearer key; /health stays open."""
            if key is None or not path.startswith("/v1"):
                return True
            given = self.headers.get("Authorization") or ""
            if hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return True
            self.close_connection = True  # its body (if any) is not read
            self._error(401, "Unauthorized: send the server's API key as 'Authorization: Bearer KEY'",
                        "AuthenticationError")
            return False

        def do_GET(self):
            path = self.path.split("?")[0].rstrip("/")
            if not self._authorized(path):
                return
            if path == "/v1/models":
                self._send(200, state.models())
            elif path == "/v1/prompts" and state.prompts is not None and state.limits.prompts_api:
                self._send(200, {"model": state.model_name, "prompts": state.prompts})
            elif path == "/health":
                self._send(200, {"status": "ok"})
            else:
                self._error(404, f"no route GET {self.path}", "NotFoundError")

        def _body(self) -> bytes:
            """The body, never past MAX_BODY_BYTES: a missing, negative or non-numeric length is refused
            before anything is read (the connection is closed then: its bytes are not consumed)."""
            if self.headers.get("Transfer-Encoding"):
                self.close_connection = True
                raise BadRequest("chunked request bodies are not accepted: send a Content-Length", 411,
                                 "LengthRequiredError")
            text = self.headers.get("Content-Length")
            if text is None:
                self.close_connection = True
                raise BadRequest("a request body needs a Content-Length header", 411, "LengthRequiredError")
            if not text.strip().isdigit():
                self.close_connection = True
                raise BadRequest(f"Content-Length must be a non-negative integer, got {text!r}")
            n = int(text)
            if n > MAX_BODY_BYTES:
                self.close_connection = True
                raise BadRequest(f"request body of {n} bytes; the limit is {MAX_BODY_BYTES}", 413,
                                 "RequestEntityTooLargeError")
            raw = self.rfile.read(n)
            if len(raw) < n:
                self.close_connection = True
                raise BadRequest(f"the body ended after {len(raw)} of its {n} bytes")
            return raw

        def do_POST(self):
            path = self.path.split("?")[0].rstrip("/")
            if not self._authorized(path):
                return
            handler = posts.get(path)
            try:
                raw = self._body()
                if handler is None:
                    return self._error(404, f"no route POST {self.path}", "NotFoundError")
                body = json.loads(raw or b"{}")
                if not isinstance(body, dict):
                    raise BadRequest("the request body must be a JSON object")
                out = handler(body)
            except BadRequest as exc:
                return self._error(exc.code, str(exc), exc.kind)
            except TimeoutError:
                self.close_connection = True
                return self._error(408, f"the request body did not arrive within {self.timeout:.0f} s",
                                   "RequestTimeoutError")
            except (ValueError, UnicodeDecodeError) as exc:  # JSON that does not parse
                return self._error(400, f"bad request: {exc}")
            except Exception:  # noqa: BLE001 - logged here; the client gets an id to quote, not internals
                rid = uuid.uuid4().hex[:12]
                print(f"mmgrpo serve: internal error, request {rid} ({path}):\n{traceback.format_exc()}",
                      file=sys.stderr, flush=True)
                return self._error(500, f"internal server error (request id {rid}); the server's log has the "
                                        f"details", "InternalServerError")
            self._send(200, out)

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the listen backlog: the default 5 resets clients that connect at once

    def __init__(self, address, handler, max_connections: int):
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):  # full: answer 429 at once, never queue a thread
            body = json.dumps({"error": {"message": "too many open connections; retry later", "type":
                                         "TooManyRequestsError", "param": None, "code": 429}}).encode()
            try:
                request.sendall(b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
                                b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
                                + body)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """What to say when the server is reachable beyond this machine with no key (None: nothing)."""
    import ipaddress

    if api_key or host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:  # a host name: it may resolve to anything
        pass
    return (f"mmgrpo serve: listening on {host} without an API key: anyone who reaches this port can load and "
            f"unload adapters and read the prompts; set --api-key (or MMGRPO_API_KEY)")


def start(backend, host: str = "127.0.0.1", port: int = 0, model_name: str = "mmgrpo", prompts: dict | None = None,
          limits: Limits | None = None, base_name: str | None = None):
    """Start serving in a daemon thread; returns the server (``server.server_address`` has the port,
    ``server.state`` the served state). ``prompts``: a result's optimized prompts, at GET /v1/prompts."""
    limits = limits or Limits()
    state = Server(backend, model_name, prompts, limits, base_name)
    server = _Server((host, port), make_handler(state), limits.max_connections)
    server.state = state
    if (warning := exposure_warning(host, limits.api_key)) is not None:
        print(warning, file=sys.stderr)
    threading.Thread(target=server.serve_forever, name="mmgrpo-serve", daemon=True).start()
    return server
