"""Assembling a job from a config: the task and program, the backend, the run folder (new, or the one
resumed after checking that only what may change did)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..config import TrainConfig, with_defaults
from ..runlog import RunDir
from . import distributed
from .job import MMGRPO

# where rollouts run, what watches the run and where its folder sits (a folder moved, or named by a
# relative path instead of an absolute one), not what is learned: a resume may change these
MAY_CHANGE_ON_RESUME = ("servers", "server_model", "adapter_dir", "request_timeout_s", "request_retries",
                        "request_backoff_s", "workers", "ray_address", "report_to", "progress", "out",
                        "dist_timeout_s")


def _load_program(cfg: TrainConfig, task):
    program = task.make_program()
    if cfg.prompts:
        program.load_prompt_state(json.loads(Path(cfg.prompts).read_text()))
    return program


def make_task(cfg: TrainConfig):
    """The config's task: your program (import paths + JSONL files) or a built-in task by name."""
    if cfg.program:
        from ..tasks.custom import task_from_paths

        return task_from_paths(cfg.program, cfg.metric, cfg.train_data, cfg.dev_data, cfg.test_data, cfg.reward)
    from ..tasks import get_task

    return get_task(cfg.task, **cfg.task_options)


def build(cfg: TrainConfig, resume: str | None = None, path: str | Path | None = None, task=None) -> MMGRPO:
    """Assemble a run in a new folder (under cfg.out, or ``path``), or continue ``resume``.
    ``task``: a Task made by the caller (mmgrpo.optimize) instead of the config's."""
    from ..lm.hf import HFBackend

    device = distributed.setup(cfg.device, cfg.dist_timeout_s)  # under torchrun / accelerate launch: join the group
    if resume:
        if not (Path(resume) / "config.json").exists():
            raise FileNotFoundError(f"{resume} is not a run folder (no config.json): give the folder a run wrote, "
                                    f"e.g. runs/NAME-<time>")
        saved = with_defaults(RunDir(resume).read_json("config.json")["config"])
        want = cfg.to_json()
        diff = sorted(k for k in saved.keys() | want.keys() if saved.get(k) != want.get(k) and k not in MAY_CHANGE_ON_RESUME)
        if diff:
            raise ValueError(f"--resume {resume}: the config differs from the run's saved config in {diff}; "
                             f"`mmgrpo train --resume {resume}` alone continues with the saved one")
    # what can fail on bad input (data, program, model) comes before the run folder: a failed start leaves none
    task = task or make_task(cfg)
    program = _load_program(cfg, task)
    backend = HFBackend.load(cfg.model, device=device, dtype=cfg.dtype, sampler_dtype=cfg.sampler_dtype, max_batch=max(cfg.concurrency, 1),
                             deterministic=cfg.deterministic, continuous=cfg.continuous_batching,
                             prefill_tokens=cfg.prefill_tokens)
    if resume:
        run = RunDir(resume)
    elif distributed.rank() == 0:
        run = RunDir(path) if path else RunDir.new(cfg.out, cfg.name)
    run = RunDir(distributed.broadcast(str(run.path) if distributed.rank() == 0 else None))  # rank 0's folder
    if not resume and distributed.rank() == 0:
        run.write_json("config.json", {"config": cfg.to_dict(), "task_settings": task.settings,
                                       "command": sys.argv, "prompts": program.prompt_state()})
    return MMGRPO(cfg, task, program, backend, run)
