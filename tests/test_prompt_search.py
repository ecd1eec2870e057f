"""MIPROv2-style search and GEPA on the embedded model: every trial is recorded, the best by its
recorded score is loaded, proposals come from the proposer LM, GEPA runs through the real package."""
from __future__ import annotations

import pytest

from mmgrpo.optimizers.gepa import ProgramAdapter, default_feedback, gepa_search
from mmgrpo.optimizers.mipro import mipro
from mmgrpo.tasks import get_task


@pytest.fixture(scope="module")
def task():
    return get_task("banking77", n_labels=10, n_demos=5, reasoning=False)


def test_mipro_records_every_trial_and_loads_the_best_by_full_dev_score(lm, task, scripted):
    drafts = iter(["instruction: Read the query and pick the one intent from the list that it asks about.",
                   "instruction: Read the query and pick the one intent from the list that it asks about.",
                   "instruction: ok", "instruction: Choose the intent whose name matches what the customer wants."] * 3)
    proposer = scripted(lambda messages: next(drafts))
    program = task.make_program()
    original = program.classify.instruction
    res = mipro(program, task.train[:8], task.dev[:8], task.metric, lm, proposer=proposer, description=task.description,
                n_instructions=3, n_demo_sets=2, max_demos=2, trials=5, minibatch=4, top_k=2, seed=3)

    instructions = res.extra["instructions"]["classify"]
    assert instructions == [original, "Read the query and pick the one intent from the list that it asks about.",
                            "Choose the intent whose name matches what the customer wants."]
    reasons = sorted(r["reason"] for r in res.extra["rejected_proposals"])
    assert reasons == ["repeat", "too short"]  # dropped drafts are counted, not lost silently

    assert [t.index for t in res.trials] == list(range(5))
    assert res.trials[0].params == {"classify.instruction": 0, "classify.demos": 0}  # the program as it was
    for t in res.trials:
        assert set(t.params) == {"classify.instruction", "classify.demos"} and t.n == 4 and 0 <= t.score <= 1
    full = [t for t in res.trials if t.full_score is not None]
    assert full and res.best_score == max(t.full_score for t in full)
    assert any(t.params == res.trials[0].params for t in full)  # the start is always re-scored on full dev
    winner = next(t for t in full if t.full_score == res.best_score)
    assert program.prompt_state() == res.best
    assert program.classify.instruction == instructions[winner.params["classify.instruction"]]
    # the label list is context, not instruction: every candidate keeps it in the system prompt
    assert "- " + task.settings["labels"][0] in program.classify.system_prompt()


def test_reflective_dataset_names_the_module_and_says_what_was_expected(lm, task):
    program = task.make_program()
    adapter = ProgramAdapter(program, task.metric, lm)
    batch = task.dev[:4]
    ev = adapter.evaluate(batch, {"classify": program.classify.instruction}, capture_traces=True)
    assert len(ev.scores) == len(ev.outputs) == len(ev.trajectories) == 4
    data = adapter.make_reflective_dataset({}, ev, ["classify"])
    assert 1 <= len(data["classify"]) <= 4
    for rec in data["classify"]:
        assert rec["Inputs"]["query"] in {ex.inputs["query"] for ex in batch}
        assert "expected answer" in rec["Feedback"] or "could not be read" in rec["Feedback"]
    ex, traj = ev.trajectories[0]
    assert ex.gold["label"] in default_feedback(ex, traj) or traj.status != "ok"


def test_gepa_runs_through_the_real_package_with_a_reflection_lm(lm, task, scripted):
    program = task.make_program()
    seen = []

    def reflect(messages):
        seen.append(messages[-1]["content"])
        return "```\nClassify the customer's banking query into exactly one of these intents:\n```"

    res = gepa_search(program, task.train[:6], task.dev[:4], task.metric, lm, reflection_lm=scripted(reflect),
                      max_metric_calls=16, minibatch=2, seed=0)
    assert seen and task.make_program().classify.instruction in seen[0]  # asked about the current instruction
    assert res.extra["reflection_calls"] == len(seen) and res.extra["program_lm_calls"] >= 4
    assert res.trials[0]["instructions"]["classify"] == task.make_program().classify.instruction
    assert res.best_score == max(t["score"] for t in res.trials)
    assert program.prompt_state() == res.best
    assert any("Proposed new text for classify" in line for line in res.extra["log"])


def test_gepa_with_the_embedded_model_as_its_own_reflector_keeps_the_best_scored_instructions(lm, task):
    program = task.make_program()
    start = {n: s["instruction"] for n, s in program.prompt_state().items()}
    res = gepa_search(program, task.train[:4], task.dev[:3], task.metric, lm, max_metric_calls=9, minibatch=2, seed=1)
    assert res.extra["reflection_calls"] >= 1 and res.trials[0]["instructions"] == start  # the seed is scored first
    # the loaded program is the best-scoring candidate on dev, never worse than where the search started
    assert res.best_score == max(t["score"] for t in res.trials) >= res.trials[0]["score"]
    loaded = {n: s["instruction"] for n, s in program.prompt_state().items()}
    assert loaded in [t["instructions"] for t in res.trials if t["score"] == res.best_score]
    assert program.prompt_state() == res.best


def test_demo_sets_add_bootstrapped_demos_to_the_labelled_ones(task):
    from mmgrpo.optimizers.mipro import demo_sets

    program = task.make_program()
    labelled = list(program.classify.demos)
    shown = labelled[0]["query"]
    pool = {"classify": [{"query": shown, "label": "x", "_example": "a"}]
            + [{"query": f"q{i}", "label": f"l{i}", "_example": f"e{i}"} for i in range(6)]}
    sets = demo_sets(program, pool, n=3, max_demos=2, seed=0)["classify"]
    assert len(sets) == 3 and sets[0] == labelled
    for s in sets[1:]:
        assert s[: len(labelled)] == labelled and len(s) == len(labelled) + 2
        assert all("_example" not in d and d["query"] != shown for d in s[len(labelled):])
    assert demo_sets(program, {"classify": []}, n=3, max_demos=2, seed=0)["classify"] == [labelled]
    # labelled training examples join the bootstrapped demos, never repeating an input
    lab = {"classify": [{"query": f"q{i}", "label": f"l{i}", "_example": f"e{i}"} for i in range(3)]
           + [{"query": "new", "label": "gold", "_example": "n"}]}
    mixed = demo_sets(program, pool, n=2, max_demos=2, seed=1, labelled=lab)["classify"][1][len(labelled):]
    queries = [d["query"] for d in mixed]
    assert len(mixed) == 4 and len(set(queries)) == 4


def test_labelled_pool_takes_examples_whose_fields_the_module_has(task):
    from mmgrpo.optimizers.mipro import labelled_pool

    program = task.make_program()
    pool = labelled_pool(program, task.train[:5])["classify"]
    assert [d["label"] for d in pool] == [ex.gold["label"] for ex in task.train[:5]]
    assert [d["query"] for d in pool] == [ex.inputs["query"] for ex in task.train[:5]]
