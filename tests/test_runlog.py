"""The run folder: atomic writes, torn log lines, resume truncation, summary output."""
from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

from mmgrpo.grpo.run import print_summary
from mmgrpo.rollout import mean_ci
from mmgrpo.runlog import RunDir, atomic_write, diff_ci, format_table, pm, publish_dir, recover_dir, signed


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a" / "f.json"
    atomic_write(p, "one")
    atomic_write(p, "two")
    assert p.read_text() == "two" and sorted(x.name for x in p.parent.iterdir()) == ["f.json"]


def test_torn_last_line_is_dropped_and_resume_truncates(tmp_path):
    run = RunDir(tmp_path)
    for s in (1, 2, 3):
        run.log({"step": s})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "rew')  # killed mid-write
    assert [r["step"] for r in run.read_log()] == [1, 2, 3]
    run.truncate_log(2)
    assert [r["step"] for r in run.read_log()] == [1, 2]


def _strict(text: str):
    def refuse(const):
        raise ValueError(f"non-standard JSON constant {const}")
    return json.loads(text, parse_constant=refuse)


def test_an_undefined_interval_is_written_as_null_and_shown_as_na(tmp_path):
    mean, ci = mean_ci([1.0])  # one example: no interval
    assert math.isnan(ci)
    run = RunDir(tmp_path)
    run.write_json("results.json", {"mean": mean, "ci95": ci, "by_step": [{"loss": float("inf")}]})
    run.log({"step": 1, "kl": float("nan")})
    run.log({"step": 2, "kl": 0.5})
    run.truncate_log(1)
    assert _strict((tmp_path / "results.json").read_text()) == {"mean": 1.0, "ci95": None, "by_step": [{"loss": None}]}
    assert [_strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [{"step": 1, "kl": None}]
    assert pm(None) == pm(ci) == "±n/a" and pm(0.0123) == "±0.012"


def test_a_cancelling_difference_prints_as_plus_zero():
    assert signed(-1e-17) == "+0.000" and signed(-0.0126) == "-0.013" and signed(0.03) == "+0.030"
    assert diff_ci((-1e-17, 0.057)) == "+0.000 ± 0.057" and diff_ci((0.1, float("nan"))) == "+0.100 ± n/a"


def test_format_table_aligns_columns():
    out = format_table([("a", 1), ("bbb", 22)], ("name", "n")).splitlines()
    assert out == ["name  n", "----  --", "a     1", "bbb   22"]


def test_print_summary_shows_every_step_and_the_dev_change(tmp_path, capsys):
    run = RunDir(tmp_path)
    run.log({"step": 1, "reward_mean": 0.25, "n_ok": 7, "n_parse_failure": 1, "n_error": 0, "groups_used": 3,
             "groups_skipped_equal_rewards": 2, "updated": True, "grad_norm": 0.75, "mismatch_mean": 0.0012,
             "rollout_s": 1.0, "update_s": 2.0, "dev": 0.5})
    job = SimpleNamespace(run=run, cfg=SimpleNamespace(model="m"), task=SimpleNamespace(name="toy"))
    print_summary(job, {"baseline_dev": 0.4, "baseline_ci95": 0.1, "final_dev": 0.5, "final_ci95": 0.1,
                        "dev_n": 10, "best_dev": 0.5, "best_step": 1})
    out = capsys.readouterr().out
    assert "1     0.250   7   1           0      3       2        0.750      1.2e-03" in out
    assert "baseline 0.400 ± 0.100 -> trained 0.500 ± 0.100" in out
    print_summary(job, {"baseline_dev": 0.4, "baseline_ci95": None, "final_dev": 0.5, "final_ci95": None,
                        "dev_n": 1, "best_dev": 0.5, "best_step": 1})  # one dev example: no CI
    assert "baseline 0.400 ± n/a -> trained 0.500 ± n/a" in capsys.readouterr().out


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    folders = {RunDir.new(tmp_path, "demo").path for _ in range(3)}
    assert len(folders) == 3 and all(p.is_dir() for p in folders)


def test_a_publish_cut_between_its_renames_is_recovered(tmp_path):
    best = tmp_path / "best_adapter"
    for content in ("old", "new"):
        tmp = tmp_path / ".best_adapter.tmp"
        tmp.mkdir()
        (tmp / "w").write_text(content)
        publish_dir(tmp, best)
    assert (best / "w").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["best_adapter"]
    os.replace(best, tmp_path / ".best_adapter.old")  # as if killed after moving the old one aside
    recover_dir(best)
    assert (best / "w").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["best_adapter"]
