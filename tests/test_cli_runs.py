"""The command line as a new user meets it, on real processes: a failed start leaves no run folder,
Ctrl-C stops a run in seconds with the command that resumes it, `train --resume RUN` alone finishes it
(a one-example dev set included), and an own program imports from the current folder."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmgrpo.cli import main

HERE = Path(__file__).parent
TOPICS = ["the sea", "music", "cats", "winter"]


@pytest.fixture
def data(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text("".join(json.dumps({"id": f"t{i}", "topic": t}) + "\n" for i, t in enumerate(TOPICS)))
    return f


@pytest.mark.parametrize("bad", ["unknown key", "bad toml", "missing config", "empty data", "missing data",
                                 "bad import", "resume nowhere"])
def test_a_failed_start_leaves_no_run_folder(tmp_path, data, bad, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(HERE))
    out = tmp_path / "runs"
    cfg = tmp_path / "c.toml"
    cfg.write_text({"unknown key": "[run]\nstepz = 2\n", "bad toml": "[run\nsteps = 2\n"}.get(bad, "[run]\nsteps = 1\n"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args = ["train", str(cfg if bad != "missing config" else tmp_path / "nope.toml"), "--program",
            "toy:Nope" if bad == "bad import" else "toy:Toy", "--metric", "toy:short",
            "--train", str(empty if bad == "empty data" else tmp_path / "no.jsonl" if bad == "missing data" else data),
            "--dev", str(data), "--set", f"run.out={out}", "--set", "run.progress=false"]
    if bad == "resume nowhere":
        args += ["--resume", str(out / "not-a-run")]
    assert main(args) == 2
    assert "mmgrpo: error:" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def test_train_alone_prints_what_to_give(capsys):
    assert main(["train"]) == 2 and "docs/configuration.md" in capsys.readouterr().err


def _train(args, cwd, **kw):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the program is found in the current folder
    return subprocess.Popen([sys.executable, "-m", "mmgrpo.cli", "train", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.parametrize("lag", [0, 1])
def test_ctrl_c_stops_in_seconds_and_resume_alone_finishes_the_run(tmp_path, data, tiny_model_dir, lag):
    # mechanics: a tiny random model, and enough short steps that Ctrl-C lands in the middle of the run;
    # at lag 1 the next step's rollouts are in flight beside the update
    out = tmp_path / "runs"
    steps = 40
    args = ["--program", "toy:LenientToy", "--metric", "toy:even", "--train", str(data), "--dev", str(data),
            "--set", f"model.name={tiny_model_dir}",
            "--set", f"run.steps={steps}", "--set", "run.eval_examples=1", "--set", "run.eval_every=2",
            "--set", "run.checkpoint_every=1", "--set", "rollout.batch_examples=2", "--set", "rollout.group_size=2",
            "--set", "rollout.max_tokens=8", "--set", f"run.out={out}", "--set", "run.progress=false",
            "--set", f"rollout.max_policy_lag={lag}"]
    proc = _train(args, HERE)
    deadline = time.time() + 600
    metrics = None
    while time.time() < deadline and proc.poll() is None:
        found = list(out.glob("*/metrics.jsonl"))
        if found and len(found[0].read_text().splitlines()) >= 1:
            metrics = found[0]
            break
        time.sleep(0.2)
    assert metrics is not None, proc.communicate()
    time.sleep(1.0)  # into a later step
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    took = time.time() - t0
    run = metrics.parent
    assert proc.returncode == 130 and took < 15, (proc.returncode, took, err[-2000:])
    assert f"Continue with: mmgrpo train --resume {run}" in err and "Traceback" not in err, err[-2000:]
    assert not (run / "result").exists()
    stopped_at = len((run / "metrics.jsonl").read_text().splitlines())
    assert stopped_at < steps, stopped_at
    # the same command's saved config: nothing repeated; a dev set of one example has no CI, and finishes
    done = _train(["--resume", str(run)], HERE)
    stdout, err = done.communicate(timeout=900)
    assert done.returncode == 0, err[-3000:]
    assert "resumed" in err and "± n/a" in stdout and (run / "result" / "result.json").exists()
    assert [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == \
        list(range(1, steps + 1))


def test_eval_takes_any_task_option_as_key_value():
    from argparse import Namespace

    from mmgrpo.cli import _task_options

    opts = _task_options(Namespace(task_option=["first_k=1", "quality=chrf", "hops=[2]"], n_labels=10))
    assert opts == {"n_labels": 10, "first_k": 1, "quality": "chrf", "hops": [2]}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        _task_options(Namespace(task_option=["first_k"]))
