"""Module rendering/parsing, traces, invocation indices, failure capture (no model needed)."""
from __future__ import annotations

import pytest

from mmgrpo import trace
from mmgrpo.lm.base import using
from mmgrpo.program import Example, Module, ParseError, Prediction, Program
from mmgrpo.rollout import evaluate, mean_ci, sample


def test_parse_fields_in_order_and_multiline():
    m = Module("m", ["q"], ["reasoning", "answer"], "Do it.")
    out = m.parse("**Reasoning**: because\nit is.\nanswer: 42\n")
    assert out == {"reasoning": "because\nit is.", "answer": "42"}


def test_parse_missing_field_raises_with_raw_text():
    m = Module("m", ["q"], ["reasoning", "answer"], "Do it.")
    with pytest.raises(ParseError) as err:
        m.parse("reasoning: no answer here")
    assert err.value.raw == "reasoning: no answer here"
    assert "answer" in str(err.value)


def test_lenient_takes_a_markerless_reply_whole_only_for_one_output():
    one = Module("m", ["q"], ["answer"], "x", lenient=True)
    assert one.parse("  Paris.\n") == {"answer": "Paris."}
    assert one.parse("answer: Rome") == {"answer": "Rome"}
    with pytest.raises(ParseError):
        one.parse("   ")
    two = Module("m", ["q"], ["reasoning", "answer"], "x", lenient=True)
    with pytest.raises(ParseError):
        two.parse("Paris")


def test_render_has_instruction_demos_and_inputs():
    m = Module("m", ["q"], ["a"], "Answer.", demos=[{"q": "1+1", "a": "2"}])
    msgs = m.render({"q": "2+2"})
    assert [x["role"] for x in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[0]["content"].startswith("Answer.") and "a: <a>" in msgs[0]["content"]
    assert msgs[2]["content"] == "a: 2" and msgs[3]["content"] == "q: 2+2"


def test_missing_input_field_is_a_clear_error():
    m = Module("m", ["question", "context"], ["a"], "x")
    with pytest.raises(KeyError, match=r"missing input field\(s\) \['context'\]"):
        m.render({"question": "hi"})


class Loop(Program):
    def __init__(self, hops=3, fail_at=None):
        self.query = Module("query", ["q"], ["query"], "Write a query.")
        self.note = Module("note", ["q"], ["note"], "Take a note.")
        self.hops, self.fail_at = hops, fail_at

    def forward(self, q):
        for hop in range(self.hops):
            if hop == self.fail_at:
                raise RuntimeError("tool down")
            self.query(q=q)
            self.note(q=q)
        return Prediction(answer="done")


def echo_lm(scripted):
    def reply(messages):
        field = messages[0]["content"].split("format:\n")[1].split(":")[0]
        return f"{field}: ok"
    return scripted(reply)


def test_invocation_indices_in_a_loop(scripted):
    traj = trace.Trajectory("e1")
    with using(echo_lm(scripted)), trace.recording(traj):
        Loop(hops=3)(q="x")
    assert [(c.module, c.index) for c in traj.calls] == [
        ("query", 0), ("note", 0), ("query", 1), ("note", 1), ("query", 2), ("note", 2)]
    assert all(c.outputs for c in traj.calls)


def test_failures_are_scored_counted_and_keep_their_calls(scripted):
    exs = [Example(f"e{i}", {"q": str(i)}) for i in range(3)]

    class Mixed(Program):
        def __init__(self):
            self.query = Module("query", ["q"], ["query"], "Write a query.")

        def forward(self, q):
            self.query(q=q)
            if q == "1":
                raise RuntimeError("retriever down")
            return Prediction(answer=q)

    def reply(messages):
        return "garbage" if "q: 2" in messages[-1]["content"] else "query: fine"

    res = sample(Mixed(), exs, lambda ex, p: 1.0, scripted(reply), n_samples=2, concurrency=4, progress=False)
    assert res.counts == {"ok": 2, "parse_failure": 2, "error": 2}
    by = res.by_example()
    assert [t.reward for t in by["e0"]] == [1.0, 1.0]
    assert [t.status for t in by["e1"]] == ["error", "error"] and by["e1"][0].reward == 0.0
    assert "retriever down" in by["e1"][0].error and len(by["e1"][0].calls) == 1
    assert [t.reward for t in by["e2"]] == [-1.0, -1.0] and by["e2"][0].calls[0].outputs is None
    assert by["e2"][0].calls[0].text == "garbage"


def test_metric_that_crashes_or_returns_nan_is_an_error(scripted):
    exs = [Example("e0", {"q": "0"}), Example("e1", {"q": "1"})]
    metric = lambda ex, p: float("nan") if ex.id == "e0" else 1 / 0  # noqa: E731
    res = sample(Loop(hops=1), exs, metric, echo_lm(scripted), progress=False)
    assert res.counts["error"] == 2 and all("metric failed" in t.error for t in res.trajectories)


def test_empty_dataset_is_a_clear_error(scripted):
    with pytest.raises(ValueError, match="no examples"):
        evaluate(Loop(), [], lambda e, p: 1.0, echo_lm(scripted))


def test_mean_ci():
    m, ci = mean_ci([0, 1, 0, 1])
    assert m == 0.5 and ci == pytest.approx(1.96 * (1 / 3) ** 0.5 / 2)
