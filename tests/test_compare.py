"""`mmgrpo compare` end to end at a tiny budget on a tiny random model (its mechanics): four arms in one folder,
a test table and a PNG plot (and `mmgrpo report` of the folder), the composed arm starts from the
prompt arm's search, and a resumed comparison skips finished arms; plus the update-without-demos prompt."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmgrpo import trace
from mmgrpo.cli import main
from mmgrpo.compare import paired_diff
from mmgrpo.grpo.trainer import update_prompt
from mmgrpo.lm.base import SamplingParams, using
from mmgrpo.tasks import get_task

TINY = ["--set", "run.steps=1", "--set", "run.eval_every=1", "--set", "rollout.batch_examples=2", "--set", "rollout.group_size=4",
        "--set", "run.eval_examples=4", "--set", "prompts.trials=2", "--set", "prompts.minibatch=3",
        "--set", "prompts.train_examples=6", "--set", "prompts.instructions=2", "--set", "prompts.candidates=2",
        "--set", "prompts.top_k=2", "--set", "run.progress=false", "--test-limit", "5"]


def test_compare_four_arms_table_plot_and_resume(tmp_path, capsys, tiny_model_dir):
    tiny = [*TINY, "--set", f"model.name={tiny_model_dir}"]
    assert main(["compare", "--task", "banking77", "--set", f"run.out={tmp_path}", *tiny]) == 0
    (root,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    out = capsys.readouterr().out
    for label in ("baseline", "prompts", "weights", "prompts -> weights"):
        assert f"\n{label} " in out
    results = json.loads((root / "results.json").read_text())
    arms = results["arms"]
    assert sorted(arms) == ["baseline", "prompts", "prompts_weights", "weights"]
    for name, arm in arms.items():
        assert arm["test_n"] == 5 and 0 <= arm["test"] <= 1 and arm["lm_calls"] > 0 and arm["gen_tokens"] > 0
        assert (root / name / "arm.json").exists()
    assert (root / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the composed arm trained from the prompts arm's search result, and its cost includes that search
    search = json.loads((root / "prompts" / "prompts_step0.json").read_text())
    assert json.loads((root / "prompts_weights" / "prompts_step0.json").read_text()) == search
    assert json.loads((root / "prompts_weights" / "config.json").read_text())["config"]["strategy"] == "prompts -> weights"
    assert arms["prompts_weights"]["includes_reused_search"]
    assert arms["prompts_weights"]["lm_calls"] > arms["weights"]["lm_calls"]
    assert [json.loads(x)["step"] for x in (root / "weights" / "dev.jsonl").read_text().splitlines()] == [0, 1]
    # scores already measured on the same program are reused: a training arm's step 0 is the arm it starts
    # from, its dev score is its log's at the chosen step, its test score the start's if dev kept the start
    for name, start in (("weights", "baseline"), ("prompts_weights", "prompts")):
        full = json.loads((root / name / "arm.json").read_text())
        origin = json.loads((root / start / "arm.json").read_text())
        log = {r["step"]: r for r in map(json.loads, (root / name / "dev.jsonl").read_text().splitlines())}
        assert log[0]["reused_from"] == start and log[0]["dev"] == origin["dev"] and log[0]["eval_s"] == 0.0
        assert "reused_from" not in log[1]
        chosen = json.loads((root / name / "summary.json").read_text())["best_step"]
        assert full["dev"] == log[chosen]["dev"] and full["reused_scores"][0] == f"dev: step {chosen} of the dev log"
        kept = chosen == 0
        if kept:  # the start's own test scores
            assert full["test_scores"] == origin["test_scores"]
        else:  # the trained adapter scored afresh, on every test example
            assert len(full["test_scores"]) == full["test_n"] == origin["test_n"]
        assert any(r.startswith("test:") for r in full["reused_scores"]) == kept
        assert arms[name]["test_scores"] == full["test_scores"]  # results.json keeps per-example scores
    # one LM call per Banking77 program: the weights arm spent 2 x 4 rollouts, 4 dev runs at step 1 unless
    # step 1 had no update (its dev record then repeats step 0's), and unless dev kept the start, 5 test runs
    # (no step-0 or final dev evaluation of its own)
    kept = json.loads((root / "weights" / "summary.json").read_text())["best_step"] == 0
    step1 = json.loads((root / "weights" / "dev.jsonl").read_text().splitlines()[1])
    updated = json.loads((root / "weights" / "metrics.jsonl").read_text().splitlines()[0])["updated"]
    assert ("reused_from_step" in step1) == (not updated)
    assert arms["weights"]["lm_calls"] == 8 + (4 if updated else 0) + (0 if kept else 5)
    # the report of a compare folder: the arms side by side, the test table, each training arm's plots
    assert main(["report", str(root)]) == 0
    page = (root / "report.html").read_text()
    for name in ("compare_dev", "compare_test", "weights_reward", "prompts_weights_reward"):
        assert (root / "report" / f"{name}.png").exists() and f'<figure id="{name}">' in page
    assert all(f"<td>{arm}</td>" in page for arm in arms)

    # resume: every arm is finished, nothing runs again, the same table comes back; a comparison
    # saved before a config key existed (here: continuous_batching) resumes with it at its default
    before = (root / "table.txt").read_text()
    saved = json.loads((root / "compare.json").read_text())
    del saved["config"]["continuous_batching"]
    (root / "compare.json").write_text(json.dumps(saved))
    assert main(["compare", "--resume", str(root)]) == 0
    assert (root / "table.txt").read_text() == before
    # resuming with other settings is refused, naming the key
    assert main(["compare", "--task", "banking77", "--resume", str(root), "--set", f"run.out={tmp_path}", *tiny,
                 "--set", "run.steps=2"]) == 2
    assert "config keys ['steps']" in capsys.readouterr().err
    # a one-seed comparison's arms are not in seed folders: more seeds there is refused, not guessed
    assert main(["compare", "--resume", str(root), "--seeds", "2"]) == 2
    assert "seeds 1" in capsys.readouterr().err


def test_paired_difference():
    m, ci = paired_diff([1, 1, 0, 1], [0, 1, 0, 0])
    assert m == pytest.approx(0.5) and ci == pytest.approx(1.96 * (1 / 3) ** 0.5 / 2)


def test_update_prompt_without_demos_is_the_instruction_and_input(lm):
    task = get_task("banking77", n_labels=10, n_demos=3, reasoning=False)
    program = task.make_program()
    traj = trace.Trajectory(example_id="x", sample_index=0, seed=1)
    with trace.recording(traj), using(lm, SamplingParams(temperature=0.0, max_tokens=8)):
        try:
            program(query="I lost my card")
        except Exception:  # noqa: BLE001 - a parse failure still records the call
            pass
    (call,) = traj.calls
    assert update_prompt(call, lm.tokenize_chat, True) == call.prompt_ids
    bare = update_prompt(call, lm.tokenize_chat, False)
    assert bare == lm.tokenize_chat(program.classify.render({"query": "I lost my card"}, with_demos=False))
    assert len(bare) < len(call.prompt_ids)


def test_compare_over_seeds_folders_table_and_resume(tmp_path, capsys, tiny_model_dir):
    from mmgrpo.compare import compare, saved_settings
    from mmgrpo.config import load_config

    cfg = load_config(None, overrides=["task.name=banking77", f"run.out={tmp_path}", "run.seed=3",
                                       f"model.name={tiny_model_dir}",
                                       "run.eval_examples=4", "run.progress=false"],
                      defaults={"task_options": {"n_labels": 10, "n_demos": 2, "reasoning": False}})
    arms = (("baseline", ""),)
    summary = compare(cfg, test_limit=4, arms=arms, seeds=2)
    root = Path(summary["folder"])
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["seed-3", "seed-4"]
    for s in (3, 4):  # each seed a whole comparison of its own, with its run seed
        arm = json.loads((root / f"seed-{s}" / "baseline" / "arm.json").read_text())
        assert arm["test_n"] == 4
        assert json.loads((root / f"seed-{s}" / "compare.json").read_text())["config"]["seed"] == s
    row = summary["arms"]["baseline"]
    assert row["seeds"] == 2 and len(row["test_by_seed"]) == 2 and row["test"] == pytest.approx(
        sum(row["test_by_seed"]) / 2)
    assert "seed sd" in (root / "table.txt").read_text()
    assert saved_settings(root)[1] == {"test_limit": 4, "arms": arms, "seeds": 2}
    # the baseline is greedy decoding of the untouched program: the second seed takes the first's
    first, second = (json.loads((root / f"seed-{s}" / "baseline" / "arm.json").read_text()) for s in (3, 4))
    assert second["shared_from"] == "seed-3" and second["test_scores"] == first["test_scores"]
    assert "shared_from" not in first
    before = (root / "table.txt").read_text()
    assert main(["compare", "--resume", str(root)]) == 0  # nothing left to run: the same table
    assert (root / "table.txt").read_text() == before
    # more seeds for a finished multi-seed comparison: the old seeds are kept, a third is added
    assert main(["compare", "--resume", str(root), "--seeds", "3"]) == 0
    assert saved_settings(root)[1]["seeds"] == 3
    results = json.loads((root / "results.json").read_text())["arms"]["baseline"]
    assert results["seeds"] == 3 and len(results["test_scores_by_seed"]) == 3
    assert results["test_scores_by_seed"][:2] == [first["test_scores"], second["test_scores"]]
    assert json.loads((root / "seed-5" / "baseline" / "arm.json").read_text())["shared_from"] == "seed-3"


def test_across_seeds_averages_examples_then_pairs(tmp_path):
    from mmgrpo.compare import _across_seeds
    from mmgrpo.config import TrainConfig
    from mmgrpo.runlog import RunDir

    def rec(name, scores):
        return {"strategy": name, "test": sum(scores) / len(scores), "test_ids": ["a", "b", "c", "d"],
                "test_scores": scores, "dev": 0.5, "seconds": 10.0, "lm_calls": 4, "gen_tokens": 8,
                "prompt_tokens": 16, "resumed": False}
    per_seed = [{"weights": rec("weights", [1, 0, 0, 0]), "prompts_weights": rec("p", [1, 1, 0, 0])},
                {"weights": rec("weights", [0, 0, 1, 0]), "prompts_weights": rec("p", [1, 1, 1, 1])}]
    out = _across_seeds(RunDir(tmp_path), TrainConfig(), per_seed)["arms"]
    assert out["weights"]["test"] == pytest.approx(0.25) and out["prompts_weights"]["test"] == pytest.approx(0.75)
    assert out["prompts_weights"]["seed_sd"] == pytest.approx(0.125 ** 0.5)  # seeds 0.5 and 1.0
    assert out["weights"]["seed_sd"] == 0.0
    # per example: weights .5 0 .5 0, p->w 1 1 .5 .5; differences .5 1 0 .5
    assert out["weights"]["vs_prompts_weights"] == pytest.approx(paired_diff([1, 1, .5, .5], [.5, 0, .5, 0]))
    assert out["prompts_weights"]["test_ci95"] == pytest.approx(1.96 * (1 / 12) ** 0.5 / 2)


def test_run_seed_runs_only_the_named_arms_and_waits_with_the_table(tmp_path, tiny_model_dir):
    from mmgrpo.compare import run_seed
    from mmgrpo.config import load_config

    cfg = load_config(None, overrides=["task.name=banking77", f"run.out={tmp_path}", "run.eval_examples=4",
                                       f"model.name={tiny_model_dir}",
                                       "run.progress=false"],
                      defaults={"task_options": {"n_labels": 10, "n_demos": 2, "reasoning": False}})
    arms = (("baseline", ""), ("prompts", "prompts"))
    rows = run_seed(cfg, tmp_path, cfg.seed, 4, arms, only=("baseline",))
    sub = tmp_path / f"seed-{cfg.seed}"
    assert list(rows) == ["baseline"] and (sub / "baseline" / "arm.json").exists()
    assert not (sub / "prompts").exists() and not (sub / "results.json").exists()
