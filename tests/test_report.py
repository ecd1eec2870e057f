"""See what training does: `mmgrpo report` on a short run of a tiny random model (every plot, numbers as in
metrics.jsonl) and the trackers (TensorBoard, W&B offline, MLflow file store) read back."""
from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from toy import lenient_toy_task  # noqa: E402

from mmgrpo.config import TrainConfig  # noqa: E402
from mmgrpo.grpo.run import MMGRPO, fit  # noqa: E402
from mmgrpo.lm.hf import HFBackend  # noqa: E402
from mmgrpo.report import write_report  # noqa: E402
from mmgrpo.runlog import RunDir  # noqa: E402
from mmgrpo.trackers import flatten, mlflow_uri  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    trackers = [t for t in ("tensorboard", "wandb", "mlflow") if _has(t)]
    cfg = TrainConfig(task="toy", steps=3, batch_examples=2, group_size=4, max_tokens=12, learning_rate=2e-3,
                      temperature=0.8, eval_every=1, eval_examples=3, progress=False, seed=5, report_to=trackers)
    task = lenient_toy_task()
    folder = tmp_path_factory.mktemp("report") / "run"
    lm = HFBackend.load(tiny_model_dir, dtype="float32")
    fit(MMGRPO(cfg, task, task.make_program(), lm, RunDir(folder)))
    lm.close()
    return folder, trackers


def _has(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec({"mlflow": "mlflow", "wandb": "wandb", "tensorboard": "tensorboard"}[name]) \
        is not None


def wandb_records(path: Path) -> list[bytes]:
    """The records of an offline W&B run file: a 7-byte header (':W&B', magic, version), then
    LevelDB's log format (32 KiB blocks; records of checksum, length, type: full/first/middle/last)."""
    raw = path.read_bytes()
    assert raw[:4] == b":W&B", raw[:7]
    out, pos, part = [], 7, b""
    while pos + 7 <= len(raw):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0 and length == 0:  # block padding
            pos += left
            continue
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            out.append(data)
        elif kind in (2, 3):
            part += data
        elif kind == 4:
            out.append(part + data)
            part = b""
    return out


def test_report_draws_every_plot_from_the_logged_numbers(run_dir):
    folder, _ = run_dir
    steps = RunDir(folder).read_log()
    assert all(set(r["modules"]) == {"pick", "answer"} for r in steps)  # per-module statistics every step
    page = write_report(folder).read_text()
    want = ["reward", "dev", "groups", "failures", "update", "time"] + [
        f"module_{k}" for k in ("reward_mean", "advantage_abs_mean", "groups_used", "completion_tokens",
                                "parse_failures", "kl", "clip_frac")]
    for name in want:
        png = folder / "report" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f'<figure id="{name}"><img' in page and "data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page  # self-contained: opens offline
    # the steps table holds metrics.jsonl's numbers
    table = page.split("<h2>Steps</h2>")[1].split("</table>")[0]
    rows = re.findall(r"<tr>(.*?)</tr>", table)[1:]
    assert len(rows) == len(steps)
    for row, rec in zip(rows, steps):
        cells = re.findall(r"<td>(.*?)</td>", row)
        assert int(cells[0]) == rec["step"] and float(cells[1]) == pytest.approx(rec["reward_mean"], rel=1e-3)
    mods = page.split("<h2>Per module</h2>")[1]
    assert mods.count("<tr>") - 1 == 2 * len(steps)


def test_each_tracker_reads_back_what_metrics_jsonl_holds(run_dir):
    folder, trackers = run_dir
    assert trackers == ["tensorboard", "wandb", "mlflow"], "the tracker packages are test dependencies"
    steps = RunDir(folder).read_log()
    want = {r["step"]: flatten(r) for r in steps}
    keys = ["reward_mean", "groups_used", "modules/pick/calls", "modules/answer/reward_mean", "dev"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(folder / "tensorboard"))
    ea.Reload()
    for k in keys:
        got = {e.step: e.value for e in ea.Scalars(k) if e.step > 0}
        assert got == pytest.approx({s: v[k] for s, v in want.items()}, rel=1e-6), k

    from mlflow.tracking import MlflowClient

    ids = json.loads((folder / "trackers.json").read_text())
    client = MlflowClient(tracking_uri=mlflow_uri(folder))
    for k in keys:
        got = {m.step: m.value for m in client.get_metric_history(ids["mlflow"], k) if m.step > 0}
        assert got == pytest.approx({s: v[k] for s, v in want.items()}), k
    assert client.get_run(ids["mlflow"]).data.params["config/learning_rate"] == "0.002"

    from wandb.proto import wandb_internal_pb2

    [path] = list((folder / "wandb").glob("offline-run-*/run-*.wandb"))
    history = {}
    for data in wandb_records(path):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history[row.get("_step", 0)] = row
    for k in keys:
        assert {s: history[s][k] for s in want} == pytest.approx({s: v[k] for s, v in want.items()}), k
