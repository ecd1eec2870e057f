"""`mmgrpo serve` safe to expose: body limits, timeouts and bounds, an API key, adapters only from under
the adapter root, unloads that wait for their requests, no internals in errors. A real server process
on 127.0.0.1 where the HTTP layer is tested; in-process servers over scripted backends for timing."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from conftest import tiny_backend  # noqa: E402

from mmgrpo import serve  # noqa: E402
from mmgrpo.lm.base import BASE, Completion, SamplingParams  # noqa: E402

KEY = "s3cret-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port, path, body=None, key=KEY, timeout=120):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers,
                                 data=None if body is None else json.dumps(body).encode(),
                                 method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if r.headers.get_content_type() == "application/json" else raw.decode())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def raw_http(port, head: bytes, body: bytes = b"", timeout=10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head + body)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            pass
        return out


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A LoRA adapter of a tiny random model under the adapter root, and the model itself."""
    root = tmp_path_factory.mktemp("served")
    b = tiny_backend()
    b.model.save_pretrained(root / "model")
    b.tokenizer.save_pretrained(root / "model")
    from peft import LoraConfig, get_peft_model

    get_peft_model(b.model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(
        root / "adapters" / "a")
    b.close()
    return root


@pytest.fixture(scope="module")
def server(adapter_dir):
    port = free_port()
    env = {**os.environ, "MMGRPO_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "mmgrpo.cli", "serve", "--model", str(adapter_dir / "model"),
                             "--port", str(port), "--device", "cpu", "--adapter-root", str(adapter_dir / "adapters"),
                             "--max-adapters", "2", "--read-timeout", "2", "--max-connections", "6"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not _up(port):
        assert proc.poll() is None and time.time() < deadline, "mmgrpo serve did not start"
        time.sleep(0.3)
    yield port
    proc.kill()
    proc.wait()


def _up(port) -> bool:
    try:
        return call(port, "/health", key=None, timeout=2)[0] == 200
    except OSError:
        return False


PROMPT = {"prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0}


def test_streaming_is_refused_with_a_reason(server):
    for path, body in (("/v1/completions", PROMPT), ("/v1/chat/completions",
                                                     {"messages": [{"role": "user", "content": "hi"}]})):
        code, out = call(server, path, {**body, "stream": True})
        assert code == 400 and "streaming is not served" in out["error"]["message"]


def test_a_result_is_served_under_its_name_with_its_base_beside_it(tmp_path):
    from transformers import AutoTokenizer

    from mmgrpo.models import resolve

    backend = Slow(AutoTokenizer.from_pretrained(resolve("smollm2-135m")), delay=0)
    srv = serve.start(backend, model_name="banking77-demo-1", base_name="smollm2-135m",
                      limits=serve.Limits(adapter_root=tmp_path))
    try:
        port = srv.server_address[1]
        listed = [(m["id"], m["parent"]) for m in call(port, "/v1/models", key=None)[1]["data"]]
        assert listed == [("smollm2-135m", None), ("banking77-demo-1", "smollm2-135m")]
        for name in ("banking77-demo-1", "smollm2-135m"):
            assert call(port, "/v1/completions", {**PROMPT, "model": name}, key=None)[0] == 200
        assert backend.variants == [None, BASE]  # the result's adapter, then the base without it
    finally:
        srv.shutdown()


def test_body_lengths_that_are_missing_negative_or_not_numbers_are_refused(server):
    for length, code in ((b"-1", b"400"), (b"abc", b"400"), (None, b"411"), (b"99999999999", b"413")):
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n"
        if length is not None:
            head += b"Content-Length: " + length + b"\r\n"
        out = raw_http(server, head + b"\r\n", json.dumps(PROMPT).encode() + b" " * 1000)
        assert out.split(b"\r\n", 1)[0].split(b" ")[1] == code, (length, out[:200])
    chunked = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nAuthorization: Bearer " \
              + KEY.encode() + b"\r\n\r\n"
    assert b" 411 " in raw_http(server, chunked, b"5\r\nhello\r\n0\r\n\r\n").split(b"\r\n", 1)[0]
    assert call(server, "/v1/completions", PROMPT)[0] == 200  # and it still serves


def test_a_slow_client_is_disconnected_and_connections_are_bounded(server):
    t0 = time.time()
    with socket.create_connection(("127.0.0.1", server), timeout=30) as s:  # headers, then silence
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nAuthorization: Bearer "
                  + KEY.encode() + b"\r\n\r\n{")
        got = s.recv(65536)
    assert time.time() - t0 < 20 and (got == b"" or b" 408 " in got.split(b"\r\n", 1)[0])
    idle = [socket.create_connection(("127.0.0.1", server), timeout=10) for _ in range(6)]
    try:
        deadline = time.time() + 20  # until the server has taken the six (slower on a busy machine)
        while not (extra := raw_http(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 429"):
            assert time.time() < deadline, extra[:200]
            time.sleep(0.2)
        assert b"TooManyRequestsError" in extra
    finally:
        for s in idle:
            s.close()
    deadline = time.time() + 10
    while call(server, "/health", key=None)[0] != 200:  # the slots come back
        assert time.time() < deadline
        time.sleep(0.2)


def test_every_v1_route_asks_for_the_key(server):
    for path, body in (("/v1/models", None), ("/v1/completions", PROMPT), ("/v1/prompts", None),
                       ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"}),
                       ("/v1/unload_lora_adapter", {"lora_name": "x"})):
        for key in (None, "wrong"):
            code, out = call(server, path, body, key=key)
            assert code == 401 and out["error"]["type"] == "AuthenticationError", (path, key, out)
    assert call(server, "/v1/models")[0] == 200 and call(server, "/health", key=None)[0] == 200


def test_the_remote_policy_sends_the_key(server, adapter_dir, monkeypatch):
    from transformers import AutoTokenizer

    from mmgrpo.lm.remote import RemotePolicy

    tok = AutoTokenizer.from_pretrained(adapter_dir / "model")
    monkeypatch.setenv("MMGRPO_API_KEY", KEY)
    pol = RemotePolicy(f"http://127.0.0.1:{server}/v1", tok, retries=0)
    assert len(pol.complete([1, 2, 3], SamplingParams(temperature=0, max_tokens=2)).token_ids) >= 1
    monkeypatch.setenv("MMGRPO_API_KEY", "wrong")
    with pytest.raises(Exception, match="401.*MMGRPO_API_KEY"):
        RemotePolicy(f"http://127.0.0.1:{server}/v1", tok, retries=0)


def test_adapters_load_only_from_under_the_root_and_say_nothing_of_other_paths(server, adapter_dir):
    outside = [("/etc", "exists"), ("/no/such/folder", "missing"), (str(adapter_dir / "model"), "beside the root"),
               (str(adapter_dir / "adapters" / ".." / "model"), "climbs out")]
    messages = set()
    for path, _ in outside:
        code, out = call(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": path})
        assert code == 403, (path, out)
        messages.add(out["error"]["message"])
    assert len(messages) == 1  # the same answer whatever is there


def test_loads_unloads_and_reloads_leave_the_base_and_every_loaded_adapter_serving(server, adapter_dir):
    a = str(adapter_dir / "adapters" / "a")
    base = call(server, "/v1/completions", {**PROMPT, "return_token_ids": True})[1]["choices"][0]["token_ids"]
    for round_ in range(2):
        assert call(server, "/v1/load_lora_adapter", {"lora_name": "senti", "lora_path": a})[0] == 200
        assert call(server, "/v1/completions", {**PROMPT, "model": "senti"})[0] == 200
        assert call(server, "/v1/unload_lora_adapter", {"lora_name": "senti"})[0] == 200
        code, out = call(server, "/v1/completions", {**PROMPT, "return_token_ids": True})
        assert code == 200 and out["choices"][0]["token_ids"] == base, (round_, out)
        assert call(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 2})[0] == 200
        assert call(server, "/v1/completions", {**PROMPT, "model": "senti"})[0] == 404
    # --max-adapters 2: a third load unloads the least recently used idle one
    for name in ("a1", "a2"):
        assert call(server, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": a})[0] == 200
    assert call(server, "/v1/completions", {**PROMPT, "model": "a1"})[0] == 200  # a2 is now the older
    assert call(server, "/v1/load_lora_adapter", {"lora_name": "a3", "lora_path": a})[0] == 200
    names = [m["id"] for m in call(server, "/v1/models")[1]["data"]]
    assert names[1:] == ["a1", "a3"]
    for name in ("a1", "a3"):
        assert call(server, "/v1/completions", {**PROMPT, "model": name})[0] == 200
        assert call(server, "/v1/unload_lora_adapter", {"lora_name": name})[0] == 200
    assert call(server, "/v1/completions", PROMPT)[0] == 200


class Slow:
    """A scripted backend: each completion takes ``delay`` seconds; a prompt [666] raises."""

    def __init__(self, lm_tokenizer, delay=0.5):
        self.tokenizer, self.delay, self.loaded, self.removed_while_busy = lm_tokenizer, delay, set(), False
        self.busy, self.variants = 0, []
        self.model = type("M", (), {"config": type("C", (), {"max_position_embeddings": 2048})()})()

    def tokenize_chat(self, messages):
        return [1, 2]

    def complete(self, ids, params, adapter=None):
        if ids == [666]:
            raise RuntimeError("secret internal detail /home/someone/key.txt")
        self.busy += 1
        time.sleep(self.delay)
        self.busy -= 1
        assert adapter in (None, BASE) or adapter in self.loaded
        self.variants.append(adapter)
        return Completion(text="ok", token_ids=[5], logprobs=[-0.1], prompt_ids=list(ids))

    def add_adapter(self, name, path):
        self.loaded.add(name)

    def remove_adapter(self, name):
        self.removed_while_busy |= self.busy > 0
        self.loaded.discard(name)


@pytest.fixture
def slow(tmp_path):
    from transformers import AutoTokenizer

    from mmgrpo.models import resolve

    backend = Slow(AutoTokenizer.from_pretrained(resolve("smollm2-135m")))
    (tmp_path / "ad").mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / "ad" / f).write_text("{}")
    srv = serve.start(backend, limits=serve.Limits(adapter_root=tmp_path, max_queued=3, prompts_api=False),
                      prompts={"m": {"instruction": "private"}})
    yield backend, srv.server_address[1], tmp_path / "ad"
    srv.shutdown()


def test_an_unload_waits_for_the_adapters_requests_in_flight(slow):
    backend, port, ad = slow
    assert call(port, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": str(ad)}, key=None)[0] == 200
    results = []
    t = threading.Thread(target=lambda: results.append(call(port, "/v1/completions", {**PROMPT, "model": "a"},
                                                            key=None)[0]))
    t.start()
    time.sleep(0.2)  # in flight
    assert call(port, "/v1/unload_lora_adapter", {"lora_name": "a"}, key=None)[0] == 200
    t.join()
    assert results == [200] and not backend.removed_while_busy
    assert call(port, "/v1/completions", {**PROMPT, "model": "a"}, key=None)[0] == 404


def test_queued_generations_are_bounded_and_errors_hide_internals(slow, capsys):
    _, port, _ = slow
    codes = []
    threads = [threading.Thread(target=lambda: codes.append(call(port, "/v1/completions", PROMPT, key=None)[0]))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes).count(200) == 3 and codes.count(429) == 3
    code, out = call(port, "/v1/completions", {**PROMPT, "prompt": [666]}, key=None)
    assert code == 500 and "secret" not in json.dumps(out) and "request id" in out["error"]["message"]
    assert "secret internal detail" in capsys.readouterr().err  # in the server's log instead
    assert call(port, "/v1/prompts", key=None)[0] == 404  # prompts_api off


def test_a_server_gathers_requests_that_arrive_together_into_one_batch():
    backend = tiny_backend()
    backend.deterministic, backend.max_wait_s = False, 0.3
    params = SamplingParams(temperature=0, max_tokens=2)
    outs = []
    threads = [threading.Thread(target=lambda: outs.append(backend.complete([1, 2, 3], params))) for _ in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.02)
    for t in threads:
        t.join()
    assert len(outs) == 3 and backend.stats["batches"] == 1
    backend.close()


def test_a_server_reachable_beyond_this_machine_without_a_key_is_warned_about():
    from mmgrpo.serve import exposure_warning

    for host in ("0.0.0.0", "192.168.1.5", "::", "myhost.example"):
        assert "without an API key" in exposure_warning(host, None)
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert exposure_warning(host, None) is None
    assert exposure_warning("0.0.0.0", "secret") is None


def test_the_adapter_and_prompts_routes_can_be_turned_off():
    backend = tiny_backend()
    srv = serve.start(backend, "127.0.0.1", 0, prompts={"m": {"instruction": "private"}},
                      limits=serve.Limits(adapter_api=False, prompts_api=False))
    port = srv.server_address[1]
    try:
        assert call(port, "/v1/prompts", key=None)[0] == 404
        assert call(port, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "a"}, key=None)[0] == 404
        assert call(port, "/v1/unload_lora_adapter", {"lora_name": "a"}, key=None)[0] == 404
        assert call(port, "/v1/completions", {**PROMPT, "model": "mmgrpo"}, key=None)[0] == 200
    finally:
        srv.shutdown()
        backend.close()
