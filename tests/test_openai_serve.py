"""The OpenAI-compatible client against real local servers on 127.0.0.1, and PAPILLON on PUPA."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mmgrpo import serve
from mmgrpo.lm.base import SamplingParams
from mmgrpo.lm.openai import LMServerError, OpenAIClient
from mmgrpo.program import Example, Prediction
from mmgrpo.rollout import sample
from mmgrpo.tasks import get_task
from mmgrpo.tasks.papillon import chrf_quality, leakage, make_metric, parse_verdict


@pytest.fixture(scope="module")
def server(lm):
    srv = serve.start(lm, model_name="smollm2-135m")
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def test_client_chats_with_the_embedded_model_over_http(server, lm):
    client = OpenAIClient(server, "smollm2-135m", timeout_s=120)
    msgs = [{"role": "user", "content": "Name a fruit."}]
    out = client.chat(msgs, SamplingParams(temperature=0.0, max_tokens=12))
    direct = lm.chat(msgs, SamplingParams(temperature=0.0, max_tokens=12))
    assert out.text == direct.text and out.text


def test_completions_endpoint_returns_token_ids_and_logprobs(server, lm):
    prompt = lm.tokenize_chat([{"role": "user", "content": "Say yes."}])
    body = client_post(server + "/completions", {"prompt": prompt, "max_tokens": 5, "temperature": 0,
                                                 "logprobs": 1, "return_token_ids": True})
    choice = body["choices"][0]
    assert len(choice["token_ids"]) == len(choice["logprobs"]["token_logprobs"]) > 0
    bad = client_post(server + "/completions", {"prompt": [1.5, "x"]}, expect_error=True)
    assert bad == 400


def client_post(url, body, expect_error=False):
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        if expect_error:
            return exc.code
        raise


class Flaky(BaseHTTPRequestHandler):
    calls = 0
    mode = "flaky"

    def log_message(self, *a):
        pass

    def do_POST(self):
        Flaky.calls += 1
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if Flaky.mode == "flaky" and Flaky.calls == 1:
            code, body = 503, b'{"error": "busy"}'
        elif Flaky.mode == "malformed":
            code, body = 200, b'{"choices": []}'
        elif Flaky.mode == "denied":
            code, body = 401, b'{"error": "bad key"}'
        else:
            code, body = 200, json.dumps({"choices": [{"message": {"content": "fine"}, "finish_reason": "stop"}]}).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def flaky():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    Flaky.calls = 0
    yield srv
    srv.shutdown()


def test_retries_then_succeeds_and_bad_answers_are_clear_errors(flaky, monkeypatch):
    url = f"http://127.0.0.1:{flaky.server_address[1]}/v1"
    monkeypatch.setenv("TEST_KEY", "k")
    client = OpenAIClient(url, "m", api_key_env="TEST_KEY", retries=2, backoff_s=0.01)
    Flaky.mode = "flaky"
    assert client.chat([{"role": "user", "content": "x"}], SamplingParams()).text == "fine" and Flaky.calls == 2
    Flaky.mode = "malformed"
    with pytest.raises(LMServerError, match="malformed chat completion"):
        client.chat([{"role": "user", "content": "x"}], SamplingParams())
    Flaky.mode, Flaky.calls = "denied", 0
    with pytest.raises(LMServerError, match="HTTP 401"):
        client.chat([{"role": "user", "content": "x"}], SamplingParams())
    assert Flaky.calls == 1  # a 4xx is not retried


def test_pupa_counts_splits_and_metric_hand_checked(scripted):
    task = get_task("papillon")
    assert task.settings["rows"] == 664
    sizes = (len(task.train), len(task.dev), len(task.test))
    assert all(n <= s < n + 6 for n, s in zip((300, 100, 200), sizes)), sizes  # whole conversations
    convs = [{e.gold["conversation"] for e in s} for s in (task.train, task.dev, task.test)]
    assert not (convs[0] & convs[1] or convs[0] & convs[2] or convs[1] & convs[2])
    assert [e.id for e in get_task("papillon").test] == [e.id for e in task.test]
    assert leakage("send to Ana Diaz at ana@x.org", ["ana diaz", "ana@x.org", "Madrid"]) == pytest.approx(2 / 3)
    assert parse_verdict("B.") == "B" and parse_verdict("I think T") == "T" and parse_verdict("dunno") is None
    assert parse_verdict("It is a tie") == "T" and parse_verdict("**A**") == "A"  # 'a' is an article, not A
    ex = Example("e", {"user_query": "q"}, {"target_response": "ref", "pii_units": ["Ana", "Madrid"]})
    pred = Prediction(response="r", request="help Ana")
    assert make_metric(scripted(lambda m: "A"))(ex, pred) == pytest.approx((1 + 0.5) / 2)
    assert make_metric(scripted(lambda m: "B"))(ex, pred) == pytest.approx((0 + 0.5) / 2)
    # without a judge: the offline quality, chrF against the reference (any language), no LM asked
    offline = make_metric(None)
    assert get_task("papillon").settings["quality"] == "chrf"
    ex = Example("e", {"user_query": "q"}, {"target_response": "Book the train to Lyon for Friday morning.",
                                            "pii_units": ["Ana"]})
    same = offline(ex, Prediction(response="Book the train to Lyon for Friday morning.", request="book a train"))
    close = offline(ex, Prediction(response="Book a train to Lyon on Friday.", request="book a train"))
    far = offline(ex, Prediction(response="Bananas are yellow.", request="book a train"))
    assert same == pytest.approx(1.0) and 0.5 < far < close < same  # far: no leak (1/2), tiny overlap
    assert far == pytest.approx(0.5 + chrf_quality("Bananas are yellow.", ex.gold["target_response"]) / 2)
    assert 0.2 < chrf_quality("今天天气很好", "今天天气不错") < 1.0


def test_papillon_rollout_with_an_outside_lm_over_http(server, lm):
    task = get_task("papillon", untrusted_url=server, untrusted_model="smollm2-135m")
    res = sample(task.make_program(), task.dev[:1], task.metric, lm, n_samples=2, progress=False,
                 params=SamplingParams(temperature=1.0, max_tokens=48))
    assert sum(res.counts.values()) == 2
    for t in res.trajectories:
        assert t.calls[0].module == "craft_request"
        if t.status == "ok":
            assert [c.module for c in t.calls] == ["craft_request", "respond"] and 0 <= t.reward <= 1
