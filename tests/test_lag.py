"""Rollouts overlapped with updates at a bounded policy lag ([rollout] max_policy_lag): the version
each step samples with, exact resume, stale trajectories, importance weights on lagged calls only.
Mechanics: a tiny random model and the lenient toy program."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from conftest import tiny_backend  # noqa: E402
from toy import adapter, run_toy  # noqa: E402

from mmgrpo.config import TrainConfig  # noqa: E402
from mmgrpo.grpo.groups import Group, Grouping, Member  # noqa: E402
from mmgrpo.grpo.lag import drop_stale, version_for  # noqa: E402
from mmgrpo.grpo.trainer import Trainer  # noqa: E402
from mmgrpo.runlog import RunDir  # noqa: E402
from mmgrpo.trace import ModuleCall, Trajectory  # noqa: E402


def config(lag: int, steps: int = 5, **kw) -> TrainConfig:
    return TrainConfig(**{"task": "toy", "steps": steps, "batch_examples": 2, "group_size": 4, "max_tokens": 12,
                          "learning_rate": 2e-3, "temperature": 0.8, "eval_every": 2, "eval_examples": 3,
                          "checkpoint_every": 1, "keep_checkpoints": 2, "progress": False, "seed": 5,
                          "max_policy_lag": lag, "update_dtype": "model", **kw})  # float32: only lag differs


def test_the_schedule_is_a_function_of_the_step():
    assert [version_for(t, 0) for t in range(1, 6)] == [0, 1, 2, 3, 4]
    assert [version_for(t, 1) for t in range(1, 6)] == [0, 0, 1, 2, 3]
    assert [version_for(t, 2) for t in range(1, 6)] == [0, 0, 0, 1, 2]


@pytest.mark.parametrize("lag", [1, 2])
def test_lagged_steps_sample_their_scheduled_version_and_a_resumed_run_is_the_same_run(tmp_path, tiny_model_dir, lag):
    steps = 5
    base = RunDir(tmp_path / "lag0")
    run_toy(config(0, steps=2, eval_every=1000), base.path, model=tiny_model_dir)
    run_toy(config(lag, steps=steps), tmp_path / "straight", model=tiny_model_dir)
    log = RunDir(tmp_path / "straight").read_log()
    assert [r["step"] for r in log] == list(range(1, steps + 1))
    assert [r["policy_versions"] for r in log] == [[version_for(t, lag)] for t in range(1, steps + 1)]
    assert [r["policy_lag_max"] for r in log] == [min(lag, t - 1) for t in range(1, steps + 1)]
    assert all(r["n_stale"] == 0 for r in log) and any(r["updated"] for r in log)
    # step 1 samples version 0 at any lag: the same rollouts as without lag (a copy of the same weights)
    first = base.read_log()[0]
    assert (log[0]["reward_mean"], log[0]["completion_tokens"]) == (first["reward_mean"], first["completion_tokens"])
    # lagged calls, and only they, are importance-weighted (float32 copy: nothing else differs)
    for r in log:
        lagged = r["step"] > 1 and r["updated"]
        assert ("tis_weight_mean" in r) == (lagged and r["lagged_calls"] > 0), r
    dev = [d["step"] for d in RunDir(tmp_path / "straight").read_log("dev.jsonl")]
    assert dev == [0, 2, 4, 5]

    # stopped after step 2 (its rollouts of later steps were in flight), resumed in a new job
    run_toy(config(lag, steps=2), tmp_path / "resumed", model=tiny_model_dir)
    run_toy(config(lag, steps=steps), tmp_path / "resumed", model=tiny_model_dir)
    a, b = adapter(tmp_path / "straight", steps), adapter(tmp_path / "resumed", steps)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), "the resumed run differs"
    resumed = RunDir(tmp_path / "resumed").read_log()
    assert [r["reward_mean"] for r in resumed] == [r["reward_mean"] for r in log]


def _traj(example: str, i: int, versions: list[int]) -> Trajectory:
    return Trajectory(example, i, calls=[ModuleCall("m", k, [1], [2], [-1.0], "x", policy_version=v)
                                         for k, v in enumerate(versions)])


def test_a_trajectory_older_than_the_lag_is_not_trained_on_and_is_counted():
    by_example = {"e0": [_traj("e0", 0, [3]), _traj("e0", 1, [1, 3])], "e1": [_traj("e1", 0, [2, 2])]}
    kept, rec = drop_stale(by_example, step=5, max_lag=2)  # step 5 updates version 4: lags 1, 3 (oldest call), 2
    assert [t.sample_index for t in kept["e0"]] == [0] and len(kept["e1"]) == 1
    assert rec == {"policy_lag_mean": 2.0, "policy_lag_max": 3, "n_stale": 1}
    kept, rec = drop_stale(by_example, step=5, max_lag=3)
    assert rec["n_stale"] == 0 and len(kept["e0"]) == 2


def test_importance_weights_reach_the_lagged_calls_only():
    backend = tiny_backend()
    trainer = Trainer(backend, TrainConfig(progress=False, learning_rate=1e-3, update_dtype="model"))  # no TIS
    prompt = backend.tokenize_chat([{"role": "user", "content": "Say a word."}])
    replies = ["Yes.", "No.", "Maybe so.", "Never."]
    made = []
    for k, reply in enumerate(replies):
        ids = backend.tokenizer(reply, add_special_tokens=False)["input_ids"]
        call = ModuleCall("m", 0, prompt, ids, [-1.0] * len(ids), reply, policy_version=3 if k < 2 else 4)
        made.append(Member(call, float(k % 2), k, advantage=1.0 - 2 * (k % 2)))
    grouping = Grouping(groups=[Group("e0", "m", 0, made)])
    state = [p.detach().clone() for p in trainer.params], copy.deepcopy(trainer.opt.state_dict())

    def update(version):
        trainer._restore(state)
        out = trainer.update(grouping, version)
        return out, [p.detach().clone() for p in trainer.params]

    plain, w_plain = update(None)
    assert "tis_weight_mean" not in plain and "lagged_calls" not in plain
    current, w_current = update(5)  # every call lagged: all weighted
    assert current["lagged_calls"] == 4 and current["tis_tokens"] == sum(len(m.call.completion_ids) for m in made)
    lagged, _ = update(4)  # the calls of version 3 are lagged, those of version 4 current
    assert lagged["lagged_calls"] == 2
    assert lagged["tis_tokens"] == sum(len(m.call.completion_ids) for m in made[:2])
    assert 0 < lagged["tis_weight_mean"] <= 2.0
    none_lagged, w_none = update(3)  # no call older than the version: exactly the update without lag
    assert none_lagged["lagged_calls"] == 0 and "tis_weight_mean" not in none_lagged
    assert all(torch.equal(a, b) for a, b in zip(w_plain, w_none))
    assert not all(torch.equal(a, b) for a, b in zip(w_plain, w_current))  # the weights changed the update
    backend.close()


def test_lag_needs_importance_weights():
    with pytest.raises(ValueError, match="tis_cap"):
        TrainConfig(max_policy_lag=1, tis_cap="off")
    with pytest.raises(ValueError, match="max_policy_lag"):
        TrainConfig(max_policy_lag=-1)


def test_the_report_shows_the_lag_of_a_lagged_run(tmp_path, tiny_model_dir):
    from mmgrpo.report import write_report

    run_toy(config(1, steps=3, eval_every=1000), tmp_path / "run", model=tiny_model_dir)
    page = write_report(tmp_path / "run").read_text()
    assert (tmp_path / "run" / "report" / "lag.png").read_bytes()[:4] == b"\x89PNG"
    head = page.split("<h2>Steps</h2>")[1].split("</thead>")[0]
    assert "<th>policy_lag_mean</th>" in head and "<th>n_stale</th>" in head
