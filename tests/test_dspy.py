"""DSPy programs under mmGRPO, on the embedded model with dspy 3.4.1 (the mmgrpo[dspy] extra)."""
from __future__ import annotations

import json
import threading
from collections import Counter

import pytest


def test_the_core_never_imports_dspy():
    import subprocess
    import sys

    code = ("import sys, mmgrpo, mmgrpo.api, mmgrpo.cli, mmgrpo.compose, mmgrpo.result, mmgrpo.serve; "
            "assert not {'dspy', 'litellm'} & set(sys.modules), 'imported'")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


dspy = pytest.importorskip("dspy")

import mmgrpo  # noqa: E402
from mmgrpo.data import to_examples  # noqa: E402
from mmgrpo.grpo.groups import group_calls  # noqa: E402
from mmgrpo.integrations.dspy import DSPyProgram, dspy_metric  # noqa: E402
from mmgrpo.lm.base import SamplingParams  # noqa: E402
from mmgrpo.rollout import sample  # noqa: E402
from mmgrpo.trace import OK, PARSE_FAILURE  # noqa: E402

TOPICS = ["the sea", "music", "cats", "winter", "bread", "trains", "the moon", "gardens"]


class Notes(dspy.Module):
    """Two predictors; `query` is called twice (invocation indices 0 and 1)."""

    def __init__(self):
        super().__init__()
        self.query = dspy.Predict("topic, notes -> query")
        self.answer = dspy.Predict("topic, notes -> answer")

    def forward(self, topic):
        notes = ""
        for _ in range(2):
            notes += "\n- " + self.query(topic=topic, notes=notes or "(none)").query
        return self.answer(topic=topic, notes=notes)


def short_answer(example, pred, trace=None):
    return len(pred.answer.split()) <= 4


def examples(n=8):
    return [dspy.Example(topic=t, query=f"{t} facts", answer=f"{t.capitalize()} is nice.").with_inputs("topic")
            for t in TOPICS[:n]]


class Recorder(dspy.utils.callback.BaseCallback):
    """What DSPy itself sent to its LM and got back, seen from DSPy's side."""

    def __init__(self):
        self.calls, self.lock = {}, threading.Lock()

    def on_lm_start(self, call_id, instance, inputs):
        with self.lock:
            self.calls[call_id] = {"messages": inputs.get("messages")}

    def on_lm_end(self, call_id, outputs, exception=None):
        with self.lock:
            self.calls[call_id]["outputs"] = outputs


def with_demos(m: Notes) -> Notes:
    """Two demos each: with them the 135M model writes XMLAdapter's format most of the time."""
    m.query.demos = [dspy.Example(topic="the sun", notes="(none)", query="sun light"),
                     dspy.Example(topic="dogs", notes="\n- dog breeds", query="dog food")]
    m.answer.demos = [dspy.Example(topic="the sun", notes="\n- sun light\n- sun heat", answer="The sun is hot."),
                      dspy.Example(topic="dogs", notes="\n- dog breeds", answer="Dogs are loyal.")]
    return m


def test_calls_are_token_exact_grouped_by_predictor_and_parse_failures_counted(lm, scripted):
    program = DSPyProgram(with_demos(Notes()), adapter=dspy.XMLAdapter())
    assert program.adapter.use_json_adapter_fallback is False  # one predictor call = one LM call
    rec = Recorder()
    exs = to_examples(examples(2), program.input_fields)
    with dspy.context(callbacks=[rec]):
        roll = sample(program, exs, dspy_metric(short_answer), lm, n_samples=4, seed=3, progress=False,
                      params=SamplingParams(temperature=0.7, max_tokens=48))
    calls = [c for t in roll.trajectories for c in t.calls]
    assert calls and {c.module for c in calls} <= {"query", "answer"}
    seen = list(rec.calls.values())
    assert len(seen) == len(calls)  # one LM call of DSPy = one recorded ModuleCall (no JSON fallback)
    text = lambda out: out[0]["text"] if isinstance(out[0], dict) else out[0]  # noqa: E731
    sent = Counter((json.dumps(s["messages"], sort_keys=True), text(s["outputs"])) for s in seen)
    for c in calls:
        # the messages DSPy passed, with the reply DSPy got back and parsed
        key = (json.dumps(c.messages, sort_keys=True), c.text)
        assert sent[key] > 0
        sent[key] -= 1
        want = lm.tokenizer.apply_chat_template(c.messages, add_generation_prompt=True, tokenize=True)
        want = want["input_ids"] if hasattr(want, "keys") else want
        assert c.prompt_ids == list(want)
        reply = lm.tokenizer.decode([t for t in c.completion_ids if t not in lm.stop_ids], skip_special_tokens=True)
        assert reply == c.text
        assert len(c.logprobs) == len(c.completion_ids) and all(lp <= 0 for lp in c.logprobs)
    for t in roll.trajectories:
        if t.status == OK:
            assert [(c.module, c.index) for c in t.calls] == [("query", 0), ("query", 1), ("answer", 0)]
    assert roll.counts[OK] >= 3 and len(set(roll.rewards)) > 1, roll.counts
    assert ("query", 1) in {(c.module, c.index) for c in calls}  # the second call of a predictor is its own
    keys = {(g.module, g.index) for g in group_calls(roll.by_example(), "ragged", "module").groups}
    assert keys and keys <= {("query", 0), ("query", 1), ("answer", 0)}  # groups by (predictor, invocation)
    # a reply DSPy cannot parse: a counted parse failure with the raw reply kept
    bad = sample(program, exs[:1], dspy_metric(short_answer), scripted(lambda m: "no fields here"), n_samples=2,
                 progress=False)
    assert bad.counts[PARSE_FAILURE] == 2
    t = bad.trajectories[0]
    assert t.calls[-1].text == "no fields here" and "query" in t.error and t.reward == -1.0


def test_dspy_program_trains_and_round_trips_with_a_dspy_optimizer_first(tmp_path):
    config = {"model": {"dtype": "float32", "sampler_dtype": "model", "update_dtype": "model"},  # agree to 1e-5
              "rollout": {"batch_examples": 2, "group_size": 4, "max_tokens": 32, "temperature": 1.0},
              "prompts": {"max_demos": 2, "train_examples": 2},
              "run": {"steps": 2, "eval_every": 2, "eval_examples": 2, "out": str(tmp_path), "progress": False}}
    with dspy.context(adapter=dspy.XMLAdapter()):  # the user's configured adapter is the one used
        res = mmgrpo.optimize(with_demos(Notes()), train=examples(6), dev=examples(3), metric=short_answer,
                              strategy="dspy.BootstrapFewShot -> weights", config=config)
    assert isinstance(res.program.adapter, dspy.XMLAdapter)
    run = tmp_path / next(p.name for p in tmp_path.iterdir())
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2] and all(s["lm_calls"] > 0 for s in steps)
    assert any(s["updated"] for s in steps) and all(s.get("mismatch_mean", 0) < 1e-4 for s in steps)
    # the weights step trained the program with the demos DSPy's optimizer chose
    state = json.loads((run / "result" / "prompts.json").read_text())["dspy"]
    assert any(state[name]["demos"] for name in ("query", "answer")), state
    assert res.program.predictors()["answer"].demos
    name = next(n for n in ("query", "answer") if state[n]["demos"])
    roll = sample(res.program, to_examples(examples(2), ["topic"]), dspy_metric(short_answer),
                  res.backend, n_samples=2, progress=False, params=SamplingParams(temperature=0.7, max_tokens=32))
    demo = state[name]["demos"][-1]  # the optimizer's: with_demos' own come first, if it kept them
    calls = [c for t in roll.trajectories for c in t.calls if c.module == name]
    assert calls and all(any(str(demo["topic"]) in m["content"] for m in c.messages[1:-1]) for c in calls), (
        demo, calls[0].messages)  # the demo sits between the system message and the input
    # saved and loaded (the DSPy program given back): the same greedy outputs
    first = res(topic="rivers")
    res.save(tmp_path / "saved")
    again = mmgrpo.load(tmp_path / "saved", program=Notes(), device="cpu", dtype="float32")
    assert dict(again(topic="rivers")) == dict(first)
    score = again.evaluate(examples(2), short_answer)
    assert score.n == 2 and 0 <= score.mean <= 1
    # served: plain DSPy, its own LM client, against `mmgrpo serve` of the result, answers the same
    from mmgrpo.serve import start

    srv = start(again.backend, model_name="notes", prompts=again.prompts)
    try:
        served = dspy.LM("openai/notes", api_base=f"http://127.0.0.1:{srv.server_address[1]}/v1", api_key="none",
                         temperature=0.0, max_tokens=256, cache=False)
        with dspy.context(lm=served, adapter=dspy.XMLAdapter()):
            plain = again.program.module(topic="rivers")
        assert dict(plain.items()) == dict(first)
    finally:
        srv.shutdown()
    res.close()
    again.close()
