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


def test_prompts_then_weights_from_the_command_line(tmp_path, capsys):
    code = main(["train", "--task", "banking77", "--set", f"run.out={tmp_path}", "--set", "run.strategy=prompts -> weights",
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
