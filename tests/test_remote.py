"""The remote policy: vLLM's API contract, `mmgrpo serve` speaking it, and training through a
real server process (adapter pushes, an outage that stops the step, resume once it is back)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from toy import adapter, even, run_toy  # noqa: E402

from mmgrpo import serve  # noqa: E402
from mmgrpo.config import TrainConfig  # noqa: E402
from mmgrpo.grpo.run import TrainingStopped  # noqa: E402
from mmgrpo.lm.base import SamplingParams  # noqa: E402
from mmgrpo.lm.hf import HFBackend  # noqa: E402
from mmgrpo.lm.openai import LMServerError, LMUnavailable  # noqa: E402
from mmgrpo.lm.remote import RemotePolicy  # noqa: E402
from mmgrpo.runlog import RunDir  # noqa: E402


# ---- the contract: requests and responses as vLLM's OpenAI-compatible server documents them ----
class FakeVLLM(BaseHTTPRequestHandler):
    """Answers with bodies shaped as vLLM's (CompletionResponse, ErrorResponse, plain-text adapter
    replies); records what it was sent."""
    seen: list = []
    ports: list = []
    mode = "ids"

    def log_message(self, *a):
        pass

    def _reply(self, code, body, text=False):
        raw = body.encode() if text else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self):
        self._reply(200, {"object": "list", "data": [
            {"id": "Qwen/Qwen2.5-0.5B", "object": "model", "root": "Qwen/Qwen2.5-0.5B", "parent": None},
            {"id": "old-lora", "object": "model", "root": "/x", "parent": "Qwen/Qwen2.5-0.5B"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeVLLM.seen.append((self.path, body))
        FakeVLLM.ports.append(self.server.server_address[1])
        if self.path.endswith("_adapter"):
            if FakeVLLM.mode == "no-lora":
                return self._reply(404, {"detail": "Not Found"})
            verb = "added" if "load_lora" in self.path and "unload" not in self.path else "removed"
            return self._reply(200, f"Success: LoRA adapter '{body['lora_name']}' {verb} successfully.", text=True)
        if FakeVLLM.mode == "error":
            return self._reply(400, {"error": {"message": "This model's maximum context length is 32 tokens.",
                                               "type": "BadRequestError", "param": None, "code": 400}})
        if FakeVLLM.mode == "busy":
            return self._reply(503, {"error": {"message": "overloaded", "type": "ServiceUnavailable", "code": 503}})
        choice = {"index": 0, "text": " yes", "finish_reason": "stop", "stop_reason": None,
                  "logprobs": {"text_offset": [0, 4], "token_logprobs": [-0.25, -0.5],
                               "tokens": ["token_id:9454", "token_id:2"],
                               "top_logprobs": [{"token_id:9454": -0.25}, {"token_id:2": -0.5}]}}
        if FakeVLLM.mode == "ids":
            choice.update(token_ids=[9454, 2], prompt_token_ids=body["prompt"])
        elif FakeVLLM.mode == "text-only":
            choice["logprobs"] = None
        elif FakeVLLM.mode == "bos-added":
            choice.update(token_ids=[9454, 2], prompt_token_ids=[1] + body["prompt"])
        self._reply(200, {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": body["model"],
                          "choices": [choice], "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                                         "total_tokens": 5}})


def start_fake() -> ThreadingHTTPServer:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeVLLM)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture
def fake_vllm():
    srv = start_fake()
    FakeVLLM.seen, FakeVLLM.ports, FakeVLLM.mode = [], [], "ids"
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def test_prompts_are_spread_over_several_servers_and_pushes_reach_all_or_none(fake_vllm, lm, tmp_path):
    other = start_fake()
    try:
        urls = [fake_vllm, f"http://127.0.0.1:{other.server_address[1]}/v1"]
        pol = RemotePolicy(urls, lm.tokenizer, retries=0)
        FakeVLLM.ports.clear()
        for _ in range(6):
            pol.complete([5, 6], SamplingParams(max_tokens=2))
        assert len(set(FakeVLLM.ports)) == 1  # the samples of one prompt share one server's prefix cache
        FakeVLLM.ports.clear()
        for k in range(40):
            pol.complete([5, k], SamplingParams(max_tokens=2))
        assert sorted(FakeVLLM.ports.count(p) for p in set(FakeVLLM.ports))[0] >= 8  # different prompts spread
        FakeVLLM.ports.clear()
        pol.push(tmp_path / "a", "v1", 1)
        assert len(set(FakeVLLM.ports)) == 2  # loaded on every server
    finally:
        other.shutdown()
        other.server_close()  # gone: connections are refused (an open socket would hold them to the timeout)
    FakeVLLM.seen.clear()
    with pytest.raises(LMServerError):  # the second server is gone: the first unloads what it loaded
        pol.push(tmp_path / "b", "v2", 2)
    adapter_calls = [(p.rsplit("/", 1)[1], b["lora_name"]) for p, b in FakeVLLM.seen if p.endswith("_adapter")]
    assert adapter_calls == [("load_lora_adapter", "v2"), ("unload_lora_adapter", "v2")]
    assert pol.model == "v1" and pol.version == 1  # still sampling the version every server has


def test_client_speaks_vllms_completions_and_adapter_api(fake_vllm, lm, tmp_path):
    pol = RemotePolicy(fake_vllm, lm.tokenizer, retries=1, backoff_s=0.01)
    assert pol.base == "Qwen/Qwen2.5-0.5B"  # the model without a parent, not the adapter listed after it
    params = SamplingParams(temperature=0.7, max_tokens=5, seed=11)
    out = pol.complete([5, 6, 7], params)
    path, body = FakeVLLM.seen[-1]
    assert path == "/v1/completions" and body["prompt"] == [5, 6, 7] and body["model"] == "Qwen/Qwen2.5-0.5B"
    assert body["logprobs"] == 1 and body["return_token_ids"] is True and body["return_tokens_as_token_ids"] is True
    assert (body["temperature"], body["max_tokens"], body["seed"], body["n"]) == (0.7, 5, 11, 1)
    assert (out.token_ids, out.logprobs, out.text, out.prompt_ids) == ([9454, 2], [-0.25, -0.5], " yes", [5, 6, 7])
    FakeVLLM.mode = "tokens-only"  # an older vLLM: ids only as 'token_id:<id>' strings
    assert pol.complete([5, 6, 7], params).token_ids == [9454, 2]
    msgs = [{"role": "user", "content": "hi"}]
    pol.chat(msgs, params)
    assert FakeVLLM.seen[-1][1]["prompt"] == lm.tokenize_chat(msgs)  # the chat template applied here, once
    # policy versions: a new name each time, the old one unloaded after the switch
    pol.push(tmp_path / "a1", "run-v1", 1)
    pol.push(tmp_path / "a2", "run-v2", 2)
    calls = [(p.rsplit("/", 1)[1], b["lora_name"]) for p, b in FakeVLLM.seen if p.endswith("_adapter")]
    assert calls == [("load_lora_adapter", "run-v1"), ("load_lora_adapter", "run-v2"),
                     ("unload_lora_adapter", "run-v1")]
    assert FakeVLLM.seen[-2][1]["lora_path"] == str((tmp_path / "a2").resolve())
    pol.complete([5], params)
    assert FakeVLLM.seen[-1][1]["model"] == "run-v2" and pol.version == 2
    pol.frozen().chat(msgs, params)
    assert FakeVLLM.seen[-1][1]["model"] == "Qwen/Qwen2.5-0.5B"
    # what a server can get wrong is named
    FakeVLLM.mode = "text-only"
    with pytest.raises(LMServerError, match="text only, no token ids"):
        pol.complete([5], params)
    FakeVLLM.mode = "bos-added"
    with pytest.raises(LMServerError, match="changed the prompt"):
        pol.complete([5], params)
    FakeVLLM.mode = "error"
    with pytest.raises(LMServerError, match="HTTP 400: This model's maximum context length"):
        pol.complete([5], params)
    FakeVLLM.mode = "no-lora"
    with pytest.raises(LMServerError, match="--enable-lora"):
        pol.push(tmp_path / "a3", "run-v3", 3)
    FakeVLLM.mode, n = "busy", len(FakeVLLM.seen)
    with pytest.raises(LMUnavailable, match="gave up after 2 tries.*overloaded"):
        pol.complete([5], params)
    assert len(FakeVLLM.seen) == n + 2  # a 503 is retried, then it is an outage


# ---- mmgrpo serve speaks the same API ----
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    backend = HFBackend.load(deterministic=False)  # its own copy: adapters get loaded into it
    srv = serve.start(backend, model_name="smollm2-135m",
                      limits=serve.Limits(adapter_root=tmp_path_factory.getbasetemp()))
    yield backend, f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    backend.close()


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if r.headers.get_content_type() == "application/json" else raw.decode())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_serve_answers_in_vllms_shapes_and_rejects_bad_requests_alone(served, tmp_path):
    backend, url = served
    prompt = backend.tokenize_chat([{"role": "user", "content": "Say yes."}])
    code, body = post(url + "/completions", {"model": "smollm2-135m", "prompt": prompt, "max_tokens": 6,
                                             "temperature": 0, "logprobs": 1, "return_tokens_as_token_ids": True,
                                             "return_token_ids": True})
    choice = body["choices"][0]
    assert code == 200 and body["object"] == "text_completion" and choice["prompt_token_ids"] == prompt
    assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in choice["token_ids"]]
    assert len(choice["logprobs"]["token_logprobs"]) == len(choice["token_ids"]) == body["usage"]["completion_tokens"]
    direct = backend.complete(prompt, SamplingParams(temperature=0, max_tokens=6))
    assert choice["token_ids"] == direct.token_ids and choice["text"] == direct.text
    code, body = post(url + "/completions", {"prompt": prompt, "max_tokens": 3, "temperature": 0})
    assert code == 200 and "token_ids" not in body["choices"][0] and body["choices"][0]["logprobs"] is None
    # bad requests get a 4xx in vLLM's error shape, and never fail the good request batched beside them
    bad = [{"prompt": [len(backend.tokenizer) + 5]}, {"prompt": []}, {"prompt": prompt, "n": 2},
           {"prompt": prompt, "max_tokens": 0}, {"prompt": prompt, "temperature": "hot"},
           {"prompt": prompt, "model": "nope"}, {"prompt": list(range(9000))}, {"prompt": prompt, "logprobs": 99}]
    results: dict = {}

    def go(k, b):
        results[k] = post(url + "/completions", {"max_tokens": 8, "temperature": 0, **b})

    threads = [threading.Thread(target=go, args=(k, b)) for k, b in enumerate([{"prompt": prompt}] + bad)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0][0] == 200 and results[0][1]["choices"][0]["text"]
    for k in range(1, len(bad) + 1):
        code, err = results[k]
        assert code in (400, 404) and err["error"]["message"] and err["error"]["code"] == code, (bad[k - 1], err)
    assert results[6][0] == 404 and "does not exist" in results[6][1]["error"]["message"]
    assert post(url + "/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path)})[0] == 400
    assert post(url + "/unload_lora_adapter", {"lora_name": "never"})[0] == 404


def test_serve_loads_adapters_by_name_and_answers_with_them(served, tmp_path):
    from peft import LoraConfig, get_peft_model

    from mmgrpo.models import load

    backend, url = served
    m = load("smollm2-135m", dtype="float32", device="cpu")
    peft = get_peft_model(m.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "ad")
    local = HFBackend(m.model, m.tokenizer)
    local.peft = peft
    prompt = backend.tokenize_chat([{"role": "user", "content": "Name a color."}])
    params = SamplingParams(temperature=0.9, max_tokens=8, seed=4)
    assert post(url + "/load_lora_adapter", {"lora_name": "a1", "lora_path": str(tmp_path / "ad")}) == (
        200, "Success: LoRA adapter 'a1' added successfully.")
    # a retried load (same name, same folder) succeeds again; the same name for another folder does not
    assert post(url + "/load_lora_adapter", {"lora_name": "a1", "lora_path": str(tmp_path / "ad")})[0] == 200
    assert post(url + "/load_lora_adapter", {"lora_name": "a1", "lora_path": str(tmp_path)})[0] == 400
    models = json.loads(urllib.request.urlopen(url + "/models").read())["data"]
    assert [(d["id"], d["parent"]) for d in models] == [("smollm2-135m", None), ("a1", "smollm2-135m")]
    pol = RemotePolicy(url, backend.tokenizer)
    base_out = pol.complete(prompt, params)
    pol.model = "a1"
    with_adapter = pol.complete(prompt, params)
    want = local.complete(prompt, params)
    assert with_adapter.token_ids == want.token_ids
    assert with_adapter.logprobs == pytest.approx(want.logprobs, abs=1e-4)
    assert base_out.token_ids == backend.complete(prompt, params).token_ids  # the base stays the base
    # a policy push: the next version loaded, the one last sampled from unloaded, without PEFT's warning
    assert post(url + "/load_lora_adapter", {"lora_name": "a2", "lora_path": str(tmp_path / "ad")})[0] == 200
    pol.complete(prompt, params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert post(url + "/unload_lora_adapter", {"lora_name": "a1"})[0] == 200
    assert not [w for w in caught if "was active" in str(w.message)], [str(w.message) for w in caught]
    assert post(url + "/completions", {"model": "a1", "prompt": prompt})[0] == 404
    pol.model = "a2"
    assert pol.complete(prompt, params).token_ids == want.token_ids
    local.close()


# ---- training through a real server process ----
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, model: str = "smollm2-135m") -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mmgrpo.cli", "serve", "--port", str(port), "--model", model,
                             "--device", "cpu", "--dtype", "float32", "--adapter-root", tempfile.gettempdir(),
                             "--no-continuous-batching"],  # rows of a batch start together, as in-process
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            return proc
        except (urllib.error.URLError, ConnectionError, OSError):
            if proc.poll() is not None:
                raise RuntimeError("mmgrpo serve exited at start")
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("mmgrpo serve did not answer in 180 s")


def toy_config(**kw) -> TrainConfig:
    return TrainConfig(task="toy", steps=3, batch_examples=2, group_size=4, max_tokens=12, learning_rate=2e-3,
                       temperature=0.8, eval_every=1, eval_examples=3, checkpoint_every=1, keep_checkpoints=3,
                       progress=False, seed=5, update_dtype="model", **kw)  # a float32 learner, as the server


def test_training_through_mmgrpo_serve_matches_in_process_and_survives_an_outage(tmp_path, tiny_model_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    proc = start_server(port, tiny_model_dir)
    try:
        # importance sampling off, as in-process: the same update on what the server sampled (it is on by
        # default with servers, tested in test_update_rules)
        remote = run_toy(toy_config(servers=[url], tis_cap="off"), tmp_path / "remote", model=tiny_model_dir)
        run_toy(toy_config(), tmp_path / "local", model=tiny_model_dir)
        a, b = adapter(tmp_path / "remote", 3), adapter(tmp_path / "local", 3)
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert diff < 1e-4, diff
        logs = {n: RunDir(tmp_path / n).read_log() for n in ("remote", "local")}
        assert [r["reward_mean"] for r in logs["remote"]] == [r["reward_mean"] for r in logs["local"]]
        devs = {n: [r["dev"] for r in RunDir(tmp_path / n).read_log("dev.jsonl")] for n in ("remote", "local")}
        assert devs["remote"] == devs["local"]  # greedy evaluations through the server
        updated = [r["step"] for r in logs["remote"] if r["updated"]]
        assert updated and all(r["mismatch_mean"] < 1e-4 for r in logs["remote"] if r["updated"])
        # every update became a new version under a new name; the previous one was unloaded
        pushes = remote.sampler.pushes
        loads = [p["load"] for p in pushes if "load" in p]
        assert [p["version"] for p in pushes if "load" in p] == [0] + updated and len(set(loads)) == len(loads)
        assert [p["unload"] for p in pushes if "unload" in p] == loads[:-1]
        served = json.loads(urllib.request.urlopen(url + "/models").read())["data"]
        assert [d["id"] for d in served if d["parent"]] == [loads[-1]]
        assert [p.name for p in (tmp_path / "remote" / "policy").iterdir()] == [loads[-1]]
        # each step's rollouts were sampled by the version pushed before it
        version = 0
        for r in logs["remote"]:
            assert r["policy_versions"] == [version]
            version = r["step"] if r["updated"] else version

        # the server dies in the middle of step 2: retries, then the step stops with nothing trained
        calls = {"n": 0}

        def reward_killing_the_server(ex, pred):
            calls["n"] += 1
            if calls["n"] == 11:  # step 1 scores 8 rollouts; this is the 3rd of step 2
                proc.kill()
            return even(ex, pred)

        # one program at a time, so that the rollouts after the 3rd of step 2 still need the server; importance
        # sampling off, as in the run it is compared with
        cfg = toy_config(servers=[url], tis_cap="off", request_retries=1, request_backoff_s=0.05, concurrency=1)
        with pytest.raises(TrainingStopped, match="could not reach an LM server"):
            run_toy(cfg, tmp_path / "outage", reward_killing_the_server, model=tiny_model_dir)
        assert [r["step"] for r in RunDir(tmp_path / "outage").read_log()] == [1]
        proc.wait()
        proc = start_server(port, tiny_model_dir)  # back on the same address; the run resumes from step 1
        run_toy(cfg, tmp_path / "outage", even, model=tiny_model_dir)
        log = RunDir(tmp_path / "outage").read_log()
        assert [r["step"] for r in log] == [1, 2, 3]
        c = adapter(tmp_path / "outage", 3)
        assert max(float((a[k] - c[k]).abs().max()) for k in a) < 1e-4  # the same run as without the outage
    finally:
        proc.kill()
        proc.wait()


def test_a_load_retried_after_a_lost_answer_counts_as_loaded_and_other_errors_do_not():
    from mmgrpo.lm.remote import _load

    class Server:
        def __init__(self, error):
            self.error, self.calls = error, 0

        def request(self, path, body, want_json=True):
            self.calls += 1
            if self.error:
                raise LMServerError(self.error)

    _load(Server("400: The lora adapter 'v3' has already been loaded."), "v3", "/runs/x/policy/v3")
    with pytest.raises(LMServerError, match="No adapter found"):
        _load(Server("400: No adapter found at /runs/x/policy/v3"), "v3", "/runs/x/policy/v3")


def test_lagged_training_through_mmgrpo_serve_matches_in_process_keeps_its_versions_and_resumes(tmp_path,
                                                                                             tiny_model_dir):
    """max_policy_lag = 1 through a server: each step asks for the adapter of its scheduled version (the
    last two stay loaded), the run equals the in-process lagged run, and a resumed run pushes the version
    its checkpoint kept again."""
    def cfg(steps, **kw):
        return TrainConfig(**{"task": "toy", "steps": steps, "batch_examples": 2, "group_size": 4, "max_tokens": 12,
                              "learning_rate": 2e-3, "temperature": 0.8, "eval_every": 2, "eval_examples": 3,
                              "checkpoint_every": 1, "keep_checkpoints": 2, "progress": False, "seed": 5,
                              "max_policy_lag": 1, "tis_cap": 2.0, "update_dtype": "model", **kw})

    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    proc = start_server(port, tiny_model_dir)
    try:
        remote = run_toy(cfg(4, servers=[url]), tmp_path / "remote", model=tiny_model_dir)
        run_toy(cfg(4), tmp_path / "local", model=tiny_model_dir)
        logs = {n: RunDir(tmp_path / n).read_log() for n in ("remote", "local")}
        assert [r["policy_versions"] for r in logs["remote"]] == [[0], [0], [1], [2]]
        assert [r["reward_mean"] for r in logs["remote"]] == [r["reward_mean"] for r in logs["local"]]
        a, b = adapter(tmp_path / "remote", 4), adapter(tmp_path / "local", 4)
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
        loads = [p["load"] for p in remote.sampler.pushes if "load" in p]
        assert [p["unload"] for p in remote.sampler.pushes if "unload" in p] == loads[:-2]  # two stay loaded
        served = json.loads(urllib.request.urlopen(url + "/models").read())["data"]
        assert sorted(d["id"] for d in served if d["parent"]) == sorted(loads[-2:])
        assert sorted(p.name for p in (tmp_path / "remote" / "policy").iterdir()) == sorted(loads[-2:])

        run_toy(cfg(2, servers=[url]), tmp_path / "resumed", model=tiny_model_dir)
        again = run_toy(cfg(4, servers=[url]), tmp_path / "resumed", model=tiny_model_dir)
        kept = 1 if logs["remote"][0]["updated"] else 0  # what step 3 samples with, then the live version 2
        assert [p["version"] for p in again.sampler.pushes if "load" in p][:2] == [kept, 2]
        c = adapter(tmp_path / "resumed", 4)
        assert max(float((a[k] - c[k]).abs().max()) for k in a) < 1e-4
        assert [r["reward_mean"] for r in RunDir(tmp_path / "resumed").read_log()] == \
            [r["reward_mean"] for r in logs["remote"]]
    finally:
        proc.kill()
        proc.wait()
