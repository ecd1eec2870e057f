"""Bad input, fuzzed: every generated case ends in a result or a documented error (ValueError,
with a message that names what was wrong; a data error names its file), and `mmgrpo serve`
answers every request with a well-formed body and stays up. Derandomized, so CI is repeatable."""
from __future__ import annotations

import http.client
import json
import math
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmgrpo import serve
from mmgrpo.compose import STEPS, parse_strategy
from mmgrpo.data import read_jsonl, to_examples
from mmgrpo.config import SECTIONS, TrainConfig, load_config
from mmgrpo.lm.base import Completion, SamplingParams
from mmgrpo.program import Module, ParseError
from mmgrpo.retrieve import read_corpus
from mmgrpo.tasks import banking77, multihop, papillon

CASES: dict[str, int] = {}


def fuzz(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


def counted(target: str) -> None:
    CASES[target] = CASES.get(target, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print("\ncases fuzzed:", json.dumps(CASES), "total", sum(CASES.values()))


def documented(exc: BaseException, must_name: str | None = None) -> None:
    assert isinstance(exc, ValueError), f"undocumented error type {type(exc).__name__}: {exc}"
    assert str(exc).strip(), f"{type(exc).__name__} without a message"
    if must_name is not None:
        assert must_name in str(exc), f"the error does not name {must_name}: {exc}"


# ---- the reply parser ------------------------------------------------------------------------
field = st.from_regex(r"[a-z][a-z_]{0,8}", fullmatch=True)
line_text = st.text(st.characters(blacklist_categories=["Cs", "Zl", "Zp", "Cc"], blacklist_characters=":"),
                    max_size=40)


@fuzz(3000)
@given(fields=st.lists(field, min_size=1, max_size=3, unique_by=str.lower), text=st.text(max_size=300),
       lenient=st.booleans())
def test_reply_parser_returns_every_field_or_a_parse_error(fields, text, lenient):
    counted("reply parser")
    m = Module("m", ["q"], fields, "Answer.", lenient=lenient)
    try:
        out = m.parse(text)
    except ParseError as exc:
        assert exc.module == "m" and exc.raw == text and str(exc)
        return
    assert list(out) == fields and all(isinstance(v, str) for v in out.values())


@fuzz(1000)
@given(data=st.data())
def test_a_reply_in_the_modules_own_format_parses_back(data):
    counted("reply parser")
    fields = data.draw(st.lists(field, min_size=1, max_size=3, unique_by=str.lower))
    values = {f: data.draw(line_text) for f in fields}
    m = Module("m", ["q"], fields, "Answer.")
    assert m.parse(m._assistant(values)) == {f: v.strip() for f, v in values.items()}


# ---- strategy strings ------------------------------------------------------------------------
@fuzz(1500)
@given(text=st.one_of(st.text(max_size=60),
                      st.lists(st.sampled_from([*STEPS, "dspy.MIPROv2", "", " ", "weight", "PROMPTS"]), max_size=5)
                      .map(" -> ".join)))
def test_strategy_strings_parse_or_say_what_is_wrong(text):
    counted("strategy strings")
    try:
        steps = parse_strategy(text)
    except ValueError as exc:
        documented(exc, repr(text))
        return
    assert steps and steps.count("weights") <= 1
    assert all(s in STEPS or s.startswith("dspy.") for s in steps)


# ---- the config loader -----------------------------------------------------------------------
scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
value = st.one_of(scalar, st.lists(scalar, max_size=3), st.dictionaries(st.text(max_size=5), scalar, max_size=2))
section_name = st.one_of(st.sampled_from(list(SECTIONS)), st.text(max_size=8))
sections = st.dictionaries(section_name, st.one_of(
    st.dictionaries(st.one_of(st.sampled_from(sorted({k for keys in SECTIONS.values() for k in keys})),
                              st.text(max_size=8)), value, max_size=4), scalar), max_size=3)


def check_config(make, source_must_appear: str | None = None):
    try:
        cfg = make()
    except (ValueError, FileNotFoundError) as exc:
        documented(exc if isinstance(exc, ValueError) else ValueError(str(exc)), source_must_appear)
        return
    assert isinstance(cfg, TrainConfig)
    for k, v in cfg.to_dict().items():  # whatever was accepted is finite and of its declared kind
        if isinstance(v, float):
            assert math.isfinite(v), f"{k} accepted a non-finite {v}"
    assert all(isinstance(u, str) for u in cfg.servers)


@fuzz(1500)
@given(raw=sections)
def test_config_sections_load_or_name_the_bad_key(raw):
    counted("config loader")
    check_config(lambda: load_config(None, sections=raw))


@fuzz(700)
@given(items=st.lists(st.one_of(
    st.text(max_size=30),
    st.tuples(st.sampled_from([f"{s}.{k}" for s, keys in SECTIONS.items() for k in keys] + ["task.options.n_labels",
                                                                                          "temperature", "x.y.z"]),
              st.one_of(st.text(max_size=10), st.integers(-5, 10**9).map(str),
                        st.sampled_from(["nan", "inf", "-1e400", "1e400", "[]", "{}", "null", "true", "\"\""])))
    .map("=".join)), max_size=4))
def test_set_overrides_load_or_name_the_bad_key(items):
    counted("config loader")
    check_config(lambda: load_config(None, items))


@fuzz(800)
@given(text=st.one_of(st.text(max_size=200), sections.map(lambda d: json.dumps(d, allow_nan=True)),
                      st.binary(max_size=100).map(lambda b: b.decode("latin-1"))),
       suffix=st.sampled_from([".toml", ".yaml"]))
def test_config_files_load_or_name_the_file(text, suffix, tmp_path_factory):
    counted("config loader")
    path = tmp_path_factory.mktemp("cfg") / f"c{suffix}"
    path.write_text(text, encoding="utf-8", errors="surrogatepass") if "\ud800" not in text else \
        path.write_bytes(text.encode("utf-8", "replace"))
    check_config(lambda: load_config(path), str(path))


# ---- data loaders: task data and user data ---------------------------------------------------
json_value = st.recursive(scalar, lambda c: st.one_of(st.lists(c, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), c, max_size=3)),
                          max_leaves=8)
row = st.one_of(json_value, st.fixed_dictionaries(
    {"id": st.one_of(st.text(max_size=4), st.integers(0, 3)), "text": json_value},
    optional={"gold": json_value, "label": json_value}))
garbage_line = st.one_of(row.map(lambda r: json.dumps(r, allow_nan=True)), st.text(max_size=40),
                         st.binary(max_size=40).map(lambda b: b.decode("latin-1")))


def write(tmp_path_factory, name: str, content: str | bytes) -> Path:
    path = tmp_path_factory.mktemp("data") / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    return path


def check_loader(load, path: Path):
    try:
        out = load(path)
    except ValueError as exc:
        documented(exc, str(path))
        return None
    assert isinstance(out, list) and out
    return out


@fuzz(800)
@given(lines=st.lists(garbage_line, max_size=5), raw=st.booleans(), data=st.binary(max_size=60))
def test_user_jsonl_loads_or_names_the_file_and_line(lines, raw, data, tmp_path_factory):
    counted("data: user JSONL")
    path = write(tmp_path_factory, "train.jsonl", data if raw else "\n".join(lines))
    out = check_loader(lambda p: read_jsonl(p, ["text"]), path)
    if out is not None:
        assert len({e.id for e in out}) == len(out) and all("text" in e.inputs for e in out)


@fuzz(500)
@given(rows=st.lists(row, max_size=5))
def test_user_rows_in_code_load_or_say_which(rows):
    counted("data: user rows")
    try:
        out = to_examples(rows, ["text"], "train")
    except ValueError as exc:
        documented(exc, "train")
        return
    assert len(out) == len(rows)


csv_cell = st.one_of(st.text(max_size=20), st.sampled_from(["", "\"", "a,b", "x\ny", "\x00", "||", "a||b"]))


def csv_text(header: list[str], cells) -> st.SearchStrategy:
    return st.lists(st.lists(cells, min_size=0, max_size=len(header) + 1), max_size=4).map(
        lambda rows: "\n".join([",".join(header)] + [",".join(r) for r in rows]))


@fuzz(600)
@given(text=st.one_of(csv_text(["text", "category"], csv_cell), csv_text(["text"], csv_cell), st.text(max_size=80)),
       raw=st.binary(max_size=60), use_raw=st.booleans())
def test_banking77_csv_loads_or_names_the_file(text, raw, use_raw, tmp_path_factory):
    counted("data: task CSV (Banking77)")
    path = write(tmp_path_factory, "train.csv", raw if use_raw else text)
    out = check_loader(lambda p: banking77.load_rows("train", p), path)
    if out is not None:
        assert all(r["text"] and r["label"] for r in out)


@fuzz(600)
@given(text=st.one_of(csv_text(["conversation_hash", "user_query", "target_response", "pii_units"], csv_cell),
                      st.text(max_size=80)), raw=st.binary(max_size=60), use_raw=st.booleans())
def test_pupa_csv_loads_or_names_the_file(text, raw, use_raw, tmp_path_factory):
    counted("data: task CSV (PUPA)")
    path = write(tmp_path_factory, "PUPA_New.csv", raw if use_raw else text)
    out = check_loader(papillon.load_rows, path)
    if out is not None:
        assert all(ex.inputs["user_query"] for ex in out)


@fuzz(500)
@given(lines=st.lists(st.one_of(garbage_line, st.fixed_dictionaries(
    {"question_id": st.text(max_size=4), "question": json_value, "gold_titles": json_value}).map(json.dumps)),
    max_size=4))
def test_hotpotqa_questions_load_or_name_the_file(lines, tmp_path_factory):
    counted("data: task JSONL (HotPotQA)")
    path = write(tmp_path_factory, "questions.jsonl", "\n".join(lines))
    out = check_loader(multihop._hotpot_examples, path)
    if out is not None:  # what loads is what the program and the metric can use
        assert all(isinstance(ex.inputs["claim"], str) and ex.inputs["claim"].strip() and ex.gold["titles"]
                   and all(isinstance(t, str) for t in ex.gold["titles"]) for ex in out)


@fuzz(500)
@given(doc=st.one_of(json_value, st.lists(st.fixed_dictionaries(
    {"uid": st.text(max_size=4), "claim": json_value, "supporting_facts": json_value}), max_size=3)),
    text=st.text(max_size=30), use_text=st.booleans())
def test_hover_claims_load_or_name_the_file(doc, text, use_text, tmp_path_factory):
    counted("data: task JSON (HoVer)")
    path = write(tmp_path_factory, "hover.json", text if use_text else json.dumps(doc, allow_nan=True))
    out = check_loader(multihop._hover_examples, path)
    if out is not None:
        assert all(isinstance(ex.inputs["claim"], str) and ex.inputs["claim"].strip() and ex.gold["titles"]
                   and all(isinstance(t, str) for t in ex.gold["titles"]) for ex in out)


@fuzz(500)
@given(lines=st.lists(st.one_of(garbage_line, st.fixed_dictionaries({"title": json_value, "text": json_value})
                                .map(json.dumps)), max_size=4), raw=st.binary(max_size=40), use_raw=st.booleans())
def test_retrieval_corpus_loads_or_names_the_file(lines, raw, use_raw, tmp_path_factory):
    counted("data: retrieval corpus")
    path = write(tmp_path_factory, "corpus.jsonl", raw if use_raw else "\n".join(lines))
    check_loader(read_corpus, path)


# ---- every endpoint of mmgrpo serve ----------------------------------------------------------
class QuickBackend:
    """The real model's tokenizer and adapter bookkeeping, with an instant completion that checks
    what the server let through (ids in the vocabulary, sane sampling settings)."""

    def __init__(self, lm):
        self.lm, self.tokenizer, self.model = lm, lm.tokenizer, lm.model
        self.loaded: set[str] = set()

    def tokenize_chat(self, messages):
        return self.lm.tokenize_chat(messages)

    def complete(self, ids, params: SamplingParams, adapter=None) -> Completion:
        assert ids and all(0 <= t < len(self.tokenizer) for t in ids)
        assert 0 <= params.temperature <= 100 and 0 < params.top_p <= 1 and 1 <= params.max_tokens <= 4096
        assert adapter is None or adapter in self.loaded
        return Completion(text="ok", token_ids=[9454, 2][:params.max_tokens], logprobs=[-0.1, -0.2][:params.max_tokens],
                          prompt_ids=list(ids), finish_reason="stop")

    def add_adapter(self, name, path):
        self.loaded.add(name)

    def remove_adapter(self, name):
        self.loaded.discard(name)


def post(port: int, path: str, raw: bytes, timeout: float = 60.0, length: int | None = None) -> tuple[int, bytes]:
    if length is not None:  # a Content-Length over the limit; the server answers before reading a body
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.putrequest("POST", path)
        conn.putheader("Content-Length", str(length))
        conn.endheaders()
        resp = conn.getresponse()
        out = resp.status, resp.read()
        conn.close()
        return out
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=raw,
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def well_formed(code: int, raw: bytes, path: str) -> dict | str:
    assert code in (200, 400, 403, 404, 413), (code, raw[:300])
    if code != 200:
        err = json.loads(raw)["error"]
        assert err["message"] and err["code"] == code and err["type"].endswith("Error")
        return err
    if path.endswith("_adapter"):
        return raw.decode()
    body = json.loads(raw)
    choice = body["choices"][0]
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    if path == "/v1/completions" and choice["logprobs"] is not None:
        assert len(choice["logprobs"]["tokens"]) == len(choice["logprobs"]["token_logprobs"])
    return body


junk = st.one_of(scalar, st.lists(st.integers(-5, 10**6), max_size=4), st.text(max_size=10),
                 st.dictionaries(st.text(max_size=4), scalar, max_size=2))


def near_valid(adapter_names: list[str]):
    """Bodies that are mostly right, with any field wrong, missing, huge or of another type."""
    return st.fixed_dictionaries({}, optional={
        "model": st.one_of(st.sampled_from(["mmgrpo", "nope", *adapter_names]), junk),
        "prompt": st.one_of(st.lists(st.integers(-3, 49160), min_size=0, max_size=8), st.text(max_size=20),
                            st.lists(st.lists(st.integers(0, 100), max_size=3), max_size=2), junk),
        "messages": st.one_of(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", 3]),
                                                              "content": st.one_of(st.text(max_size=20), junk)}),
                                       max_size=3), junk),
        "max_tokens": st.one_of(st.integers(-2, 10**7), st.floats(), junk),
        "max_completion_tokens": st.one_of(st.integers(-2, 10**7), junk),
        "temperature": st.one_of(st.floats(), st.integers(-3, 300), junk),
        "top_p": st.one_of(st.floats(), junk), "seed": st.one_of(st.integers(-3, 2**70), junk),
        "n": st.one_of(st.integers(-1, 3), junk), "logprobs": st.one_of(st.integers(-1, 30), junk),
        "stop": st.one_of(st.text(max_size=5), st.lists(st.one_of(st.text(max_size=5), junk), max_size=20), junk),
        "return_token_ids": junk, "return_tokens_as_token_ids": junk,
        "lora_name": st.one_of(st.sampled_from(adapter_names + ["x"]), junk),
        "lora_path": st.one_of(st.sampled_from(["/nonexistent", "."]), junk)})


@pytest.fixture(scope="module")
def quick_server(lm, tmp_path_factory):
    server = serve.start(QuickBackend(lm), limits=serve.Limits(adapter_root=tmp_path_factory.getbasetemp()))
    yield server
    server.shutdown()


@fuzz(3500)
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter",
                             "/v1/unload_lora_adapter", "/v1/nothing"]),
       body=st.one_of(near_valid(["a1"]), junk.map(lambda v: {"prompt": v})),
       shape=st.sampled_from(["json", "json", "json", "not-json", "array", "huge"]))
def test_every_serve_endpoint_answers_every_body_well_formed(quick_server, path, body, shape, tmp_path_factory):
    counted("serve endpoints")
    port = quick_server.server_address[1]
    if path == "/v1/load_lora_adapter" and body.get("lora_path") == ".":  # a real adapter folder now and then
        folder = tmp_path_factory.mktemp("adapter")
        (folder / "adapter_config.json").write_text("{}")
        (folder / "adapter_model.safetensors").write_bytes(b"")
        body = {**body, "lora_path": str(folder)}
    raw = {"json": lambda: json.dumps(body, allow_nan=True).encode(), "not-json": lambda: b"{'prompt': [1,",
           "array": lambda: json.dumps([body]).encode(), "huge": lambda: b""}[shape]()
    code, out = post(port, path, raw, length=serve.MAX_BODY_BYTES + 1 if shape == "huge" else None)
    result = well_formed(code, out, path)
    if shape != "json" or path == "/v1/nothing":
        assert code in (400, 403, 404, 413), result
    assert post(port, "/v1/completions", json.dumps({"prompt": [1, 2], "max_tokens": 1}).encode())[0] == 200


@fuzz(300)
@given(length=st.one_of(st.integers(-10**6, 10**12).map(str), st.text(max_size=8), st.none(),
                        st.sampled_from(["-1", " 5", "1e3", "0x10", "", "99999999999999999999"])),
       extra=st.binary(max_size=64), body=st.sampled_from([b'{"prompt": [1, 2], "max_tokens": 1}', b"{", b""]))
def test_any_content_length_is_answered_without_reading_past_it(quick_server, length, extra, body):
    """Missing, negative, non-numeric and huge lengths, with bytes after the body: a clear status,
    never a body read to the end of the stream, never a hung connection."""
    import socket

    counted("serve endpoints")
    port = quick_server.server_address[1]
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
    if length is not None:
        head += b"Content-Length: " + length.encode("utf-8", "replace").replace(b"\r", b"").replace(b"\n", b"") \
            + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(head + b"\r\n" + body + extra)
        sock.shutdown(socket.SHUT_WR)
        status = sock.recv(65536).split(b"\r\n", 1)[0]
    code = int(status.split(b" ")[1])
    assert code in (200, 400, 411, 413), status
    if length is None:
        assert code == 411
    elif not length.strip().isdigit():
        assert code in (400, 411), (length, status)


@fuzz(20)
@given(stall=st.sampled_from([b"", b"POST /v1/completions HTTP/1.1\r\n", b"POST /v1/completions HTTP/1.1\r\n"
                              b"Content-Length: 50\r\n\r\n{"]))
def test_a_silent_client_is_let_go_and_the_server_answers_others(slow_client_server, stall):
    import socket
    import time

    counted("serve endpoints")
    port = slow_client_server.server_address[1]
    t0 = time.time()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(stall)
        assert post(port, "/v1/completions", json.dumps({"prompt": [1, 2], "max_tokens": 1}).encode())[0] == 200
        while sock.recv(65536):  # the server closes it after its read timeout (or answers 408 first)
            pass
    assert time.time() - t0 < 25


@pytest.fixture(scope="module")
def slow_client_server(lm):
    server = serve.start(QuickBackend(lm), limits=serve.Limits(read_timeout_s=1.0))
    yield server
    server.shutdown()


def test_bad_requests_never_fail_good_ones_batched_with_them(lm):
    """The real model: greedy good requests, sent while a flood of bad and edge-case ones (long
    prompts near the context limit included) arrives, each get exactly their solo answer."""
    server = serve.start(lm)
    port = server.server_address[1]
    good = {"prompt": lm.tokenize_chat([{"role": "user", "content": "Name a colour."}]), "max_tokens": 6,
            "temperature": 0, "logprobs": 1, "return_token_ids": True}
    solo = json.loads(post(port, "/v1/completions", json.dumps(good).encode())[1])["choices"][0]["token_ids"]
    answers, stop = [], threading.Event()

    def good_client():
        while not stop.is_set():
            code, raw = post(port, "/v1/completions", json.dumps(good).encode())
            answers.append((code, json.loads(raw)["choices"][0]["token_ids"] if code == 200 else raw))

    clients = [threading.Thread(target=good_client) for _ in range(3)]
    for c in clients:
        c.start()
    near_limit = server.state.max_prompt - 2
    edge = [{"prompt": [5] * near_limit, "max_tokens": 8},  # prompt + completion over the context: refused
            {"prompt": [5] * (near_limit + 10), "max_tokens": 1},
            {"prompt": [len(lm.tokenizer)], "max_tokens": 1}, {"prompt": [1], "max_tokens": 10**9},
            {"prompt": [1], "stop": [""]}, {"prompt": [1], "temperature": -1}, {"messages": []}]

    @fuzz(200)
    @given(body=st.one_of(st.sampled_from(edge), near_valid([]).map(
        lambda b: {**b, "max_tokens": 2} if isinstance(b.get("max_tokens"), int) and b["max_tokens"] > 2 else b)))
    def flood(body):
        counted("serve endpoints")
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        code, out = post(port, path, json.dumps(body, allow_nan=True).encode())
        well_formed(code, out, path)

    try:
        flood()
    finally:
        stop.set()
        for c in clients:
            c.join()
        alive = post(port, "/v1/completions", json.dumps(good).encode())[0]
        server.shutdown()
    assert alive == 200 and len(answers) >= 3
    assert all(code == 200 and ids == solo for code, ids in answers), [a for a in answers if a != (200, solo)][:3]
