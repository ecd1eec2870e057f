"""Strategies: parsing, and "prompts -> weights" end to end through the command line."""
from __future__ import annotations

import json

import pytest

from mmgrpo.cli import main
from mmgrpo.compose import parse_strategy


def test_parse_strategy():
    assert parse_strategy("prompts -> weights") == ["prompts", "weights"]
    assert parse_strategy("Prompts->weights->prompts") == ["prompts", "weights", "prompts"]
    with pytest.raises(ValueError, match=r"unknown step\(s\) \['distill'\]; known steps: prompts, bootstrap, mipro, gepa, weights"):
        parse_strategy("prompts -> distill")
    with pytest.raises(ValueError, match="empty step"):
        parse_strategy("prompts -> ")
    with pytest.raises(ValueError, match="'weights' may appear once"):
        parse_strategy("weights -> prompts -> weights")


def test_prompts_then_weights_from_the_command_line(tmp_path, capsys, tiny_model_dir):
    code = main(["train", "--task", "banking77", "--set", f"run.out={tmp_path}", "--set", f"model.name={tiny_model_dir}", "--set", "run.strategy=prompts -> weights",
                 "--set", "prompts.optimizer=bootstrap",
                 "--set", "run.steps=1", "--set", "rollout.batch_examples=2", "--set", "rollout.group_size=4", "--set", "rollout.max_tokens=12",
                 "--set", "run.eval_examples=6", "--set", "prompts.candidates=2", "--set", "prompts.train_examples=8",
                 "--set", "task.options.n_labels=10", "--set", "task.options.n_demos=5",
                 "--set", "task.options.reasoning=false", "--set", "run.progress=false"])
    assert code == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    strategy = json.loads((run / "strategy.json").read_text())
    assert strategy["strategy"] == ["bootstrap", "weights"] and len(strategy["steps"]) == 2
    trials = strategy["steps"][0]["trials"]
    assert len(trials) == 2 and strategy["steps"][0]["best_dev"] == max(t["score"] for t in trials)
    saved = json.loads((run / "prompts_step0.json").read_text())["prompts"]
    # the weights step started from the searched prompts: its baseline equals the search's best score
    assert strategy["steps"][1]["baseline_dev"] == pytest.approx(strategy["steps"][0]["best_dev"])
    assert "classify" in saved and [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert "bootstrap: best dev" in capsys.readouterr().out
    # the result: the searched prompts with the adapter that was trained on them
    assert json.loads((run / "result" / "prompts.json").read_text()) == saved
    info = json.loads((run / "result" / "result.json").read_text())
    assert info["has_adapter"] and info["task"] == "banking77" and info["strategy"] == "prompts -> weights"


def test_unknown_step_is_a_clear_cli_error(tmp_path, capsys):
    assert main(["train", "--task", "banking77", "--set", "run.strategy=prompts -> magic", "--set", f"run.out={tmp_path}"]) == 2
    assert "unknown step(s) ['magic']" in capsys.readouterr().err


def _search_scores_ids(tmp_path, monkeypatch, val_examples: int, model: str):
    """The example ids a bootstrap search scored its candidates on, and the job it ran in."""
    from mmgrpo.compose import prompts_step
    from mmgrpo.config import load_config
    from mmgrpo.grpo.run import build
    from mmgrpo.optimizers import bootstrap

    cfg = load_config(None, overrides=[
        "task.name=banking77", f"model.name={model}", f"run.out={tmp_path}", "run.progress=false", "run.eval_examples=5",
        "prompts.candidates=2", "prompts.train_examples=6", f"prompts.val_examples={val_examples}",
        "rollout.max_tokens=8", "task.options.n_labels=10", "task.options.n_demos=0", "task.options.reasoning=false"])
    job = build(cfg, path=tmp_path / f"val{val_examples}")
    seen: list[str] = []
    real = bootstrap.evaluate

    def recording(program, examples, *args, **kwargs):
        seen.extend(e.id for e in examples)
        return real(program, examples, *args, **kwargs)

    monkeypatch.setattr(bootstrap, "evaluate", recording)
    try:
        summary = prompts_step(job, 0, "bootstrap")
    finally:
        job.backend.close()
    return set(seen), job, summary


def test_the_prompt_search_can_score_on_held_out_training_examples_and_leave_dev_alone(tmp_path, monkeypatch,
                                                                                        tiny_model_dir):
    seen, job, summary = _search_scores_ids(tmp_path, monkeypatch, 7, tiny_model_dir)
    train = [e.id for e in job.task.train]
    assert [e.id for e in job.prompt_val] == train[6:13] and seen == set(train[6:13])
    assert not seen & {e.id for e in job.dev} and summary["scored_on"] == "train[6:13]"
    # the default searches on dev, as before
    seen, job, summary = _search_scores_ids(tmp_path, monkeypatch, 0, tiny_model_dir)
    assert seen == {e.id for e in job.dev} and summary["scored_on"] == "dev"


def test_too_few_training_examples_for_the_search_set_is_a_clear_error(tmp_path):
    from mmgrpo.config import load_config
    from mmgrpo.grpo.run import build

    cfg = load_config(None, overrides=["task.name=banking77", f"run.out={tmp_path}", "run.progress=false",
                                       "prompts.val_examples=100000"])
    with pytest.raises(ValueError, match=r"prompt_val_examples = 100000 needs 100050 training examples .* set it to 0"):
        build(cfg, path=tmp_path / "run")


def test_a_result_whose_last_step_searched_off_dev_does_not_call_its_score_a_dev_score(tmp_path, tiny_model_dir):
    code = main(["train", "--task", "banking77", "--set", f"run.out={tmp_path}", "--set", f"model.name={tiny_model_dir}", "--set", "run.strategy=bootstrap",
                 "--set", "prompts.candidates=2", "--set", "prompts.train_examples=6", "--set", "prompts.val_examples=4",
                 "--set", "rollout.max_tokens=8", "--set", "run.eval_examples=4", "--set", "task.options.n_labels=10",
                 "--set", "task.options.reasoning=false", "--set", "run.progress=false"])
    assert code == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    step = json.loads((run / "strategy.json").read_text())["steps"][0]
    scores = json.loads((run / "result" / "result.json").read_text())["scores"]
    assert step["scored_on"] == "train[6:10]" and "dev" not in scores
    assert scores == {"search_val": step["best_dev"], "search_val_n": 4, "search_val_set": "train[6:10]"}
