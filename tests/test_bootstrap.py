"""Few-shot bootstrapping on the embedded model: demos come from passing traces, land in the
right module's prompt, and the search keeps every trial and picks the best by its score."""
from __future__ import annotations

from mmgrpo.optimizers.bootstrap import bootstrap_pool, random_search
from mmgrpo.tasks import get_task


def test_demos_come_from_passing_trajectories_and_reach_the_prompt(lm):
    task = get_task("banking77", n_labels=10, n_demos=5, reasoning=False)
    program = task.make_program()
    train = task.train[:12]
    pool = bootstrap_pool(program, train, task.metric, lm)
    demos = pool["classify"]
    assert demos, "the warm-started program should pass on some of 12 training examples"
    gold = {ex.id: ex.gold["label"] for ex in train}
    for d in demos:  # each demo is a passing run: its label is the gold label of its example
        assert d["label"].strip() == gold[d["_example"]]
        assert d["query"] in {ex.inputs["query"] for ex in train}

    program.classify.demos = []
    result = random_search(program, train, task.dev[:8], task.metric, lm, n_candidates=3, max_demos=2, seed=1)
    assert [t.index for t in result.trials] == [0, 1, 2]
    best = max(result.trials, key=lambda t: t.score)
    assert result.best_score == best.score
    assert program.prompt_state() == result.best
    if best.index > 0:
        rendered = program.classify.render({"query": "hello"})
        picked = set(best.demos["classify"])
        assert len(program.classify.demos) == len(picked) and len(rendered) == 2 + 2 * len(picked)
        assert {d["query"] for d in program.classify.demos} <= {ex.inputs["query"] for ex in train if ex.id in picked}


def test_demo_threshold_decides_which_runs_give_demos_and_reaches_the_search(lm, monkeypatch):
    import types

    from mmgrpo import compose
    from mmgrpo.config import load_config
    from mmgrpo.optimizers import bootstrap, mipro

    task = get_task("banking77", n_labels=10, n_demos=5, reasoning=False)
    program = task.make_program()
    train = task.train[:8]
    # a graded metric that tops out at 0.75 gives no demos at the default threshold; at 0.75 it gives
    # exactly the runs the exact-match metric passes
    graded = lambda ex, pred: 0.5 * task.metric(ex, pred) + 0.25  # noqa: E731
    assert bootstrap_pool(program, train, graded, lm)["classify"] == []
    passing = bootstrap_pool(program, train, task.metric, lm)["classify"]
    assert passing and bootstrap_pool(program, train, graded, lm, threshold=0.75)["classify"] == passing

    seen = {}
    for mod, fn in ((mipro, "mipro"), (bootstrap, "random_search")):
        monkeypatch.setattr(mod, fn, lambda *a, _fn=fn, **kw: seen.setdefault(_fn, kw["threshold"]))
    cfg = load_config(None, overrides=["task.name=banking77", "prompts.demo_threshold=0.4"])
    job = types.SimpleNamespace(cfg=cfg, task=task, program=program, backend=lm, prompt_val=task.dev[:2])
    compose.optimize_prompts(job, "mipro")
    compose.optimize_prompts(job, "bootstrap")
    assert seen == {"mipro": 0.4, "random_search": 0.4}
