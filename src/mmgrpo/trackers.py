"""The trackers people already use, beside metrics.jsonl (always written): `run.report_to` =
any of "tensorboard" (event files in RUN/tensorboard), "wandb" (offline, RUN/wandb; `wandb sync`
uploads it later) and "mlflow" (a local SQLite store, RUN/mlflow.db). Each is an optional extra,
imported only when named. A resumed run continues the same W&B / MLflow run (ids in
RUN/trackers.json). Nested records (per-module statistics) are flattened to ``modules/NAME/KEY``.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

KNOWN = ("tensorboard", "wandb", "mlflow")
EXTRA = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}


def flatten(record: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) record, keyed by path; booleans as 0/1."""
    out: dict[str, float] = {}
    for k, v in record.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, bool):
            out[key] = float(v)
        elif isinstance(v, (int, float)) and math.isfinite(v):
            out[key] = float(v)
    return out


def mlflow_uri(run_dir: str | Path) -> str:
    """The run's MLflow store: a SQLite file in the run folder (MLflow 3 keeps its plain-file store
    in maintenance mode). Open it with `mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db`."""
    return f"sqlite:///{(Path(run_dir) / 'mlflow.db').resolve()}"


class Trackers:
    def __init__(self, names: list[str], run_dir: str | Path, config: dict, run_name: str):
        unknown = [n for n in names if n not in KNOWN]
        if unknown:
            raise ValueError(f"run.report_to names unknown tracker(s) {unknown}; known: {', '.join(KNOWN)}")
        self.dir = Path(run_dir)
        ids_path = self.dir / "trackers.json"
        ids = json.loads(ids_path.read_text()) if ids_path.exists() else {}
        self.sinks: dict[str, Any] = {}
        for name in names:
            try:
                self.sinks[name] = getattr(self, f"_open_{name}")(config, run_name, ids.get(name))
            except ImportError as exc:
                raise ImportError(f"run.report_to includes {name!r}: pip install {EXTRA[name]} "
                                  f"(or 'mmgrpo[{name}]')") from exc
        new_ids = {n: s[1] for n, s in self.sinks.items() if s[1] is not None}
        if new_ids and new_ids != ids:
            from .runlog import write_json

            write_json(ids_path, {**ids, **new_ids})

    def _open_tensorboard(self, config, run_name, _id):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.dir / "tensorboard")), None

    def _open_wandb(self, config, run_name, run_id):
        import wandb

        run = wandb.init(mode="offline", dir=str(self.dir), project="mmgrpo", name=run_name, config=config,
                         id=run_id, resume="allow" if run_id else None, settings=wandb.Settings(silent=True))
        return run, run.id

    def _open_mlflow(self, config, run_name, run_id):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=mlflow_uri(self.dir))
        if run_id is None:
            exp = client.get_experiment_by_name("mmgrpo") or client.get_experiment(client.create_experiment("mmgrpo"))
            run_id = client.create_run(exp.experiment_id, run_name=run_name).info.run_id
            for k, v in flatten({"config": {k: v for k, v in config.items()}}).items():
                client.log_param(run_id, k, v)
        return client, run_id

    def log(self, record: dict, step: int, prefix: str = "") -> None:
        flat = flatten({k: v for k, v in record.items() if k != "step"}, prefix)
        if not flat:
            return
        for name, (sink, run_id) in self.sinks.items():
            if name == "tensorboard":
                for k, v in flat.items():
                    sink.add_scalar(k, v, step)
                sink.flush()
            elif name == "wandb":
                sink.log(flat, step=step)
            elif name == "mlflow":
                from mlflow.entities import Metric

                now = int(time.time() * 1000)
                sink.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in flat.items()])

    def close(self) -> None:
        for name, (sink, run_id) in self.sinks.items():
            if name == "tensorboard":
                sink.close()
            elif name == "wandb":
                sink.finish()
            elif name == "mlflow":
                sink.set_terminated(run_id)
        self.sinks = {}
