"""Composing the two levers: a strategy is a sequence of steps, run in order on one program.

``prompts`` bootstraps few-shot demos and searches over them (optimize/bootstrap.py);
``weights`` runs mmGRPO on the program with the prompts it has at that point (grpo/run.py).
The paper's recipe is "prompts -> weights". Each step's prompts are written to the run folder,
and a resumed run reloads them instead of searching again.
"""
from __future__ import annotations

import json
from dataclasses import asdict

from .grpo.config import TrainConfig
from .grpo.run import MMGRPO, build, fit, print_summary
from .optimize.bootstrap import random_search

STEPS = ("prompts", "weights")


def parse_strategy(text: str) -> list[str]:
    steps = [s.strip().lower() for s in text.split("->")]
    if not text.strip() or any(not s for s in steps):
        raise ValueError(f"strategy {text!r} is empty or has an empty step; write e.g. 'prompts -> weights'")
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ValueError(f"strategy {text!r} names unknown step(s) {unknown}; known steps: {', '.join(STEPS)}")
    if steps.count("weights") > 1:
        raise ValueError(f"strategy {text!r}: 'weights' may appear once (one adapter, one training run)")
    return steps


def prompts_step(job: MMGRPO, index: int) -> dict:
    cfg, path = job.cfg, job.run.path / f"prompts_step{index}.json"
    if path.exists():  # resumed: keep what was found
        saved = json.loads(path.read_text())
        job.program.load_prompt_state(saved["prompts"])
        return saved["summary"]
    res = random_search(job.program, job.task.train[: cfg.prompt_train_examples], job.dev, job.task.metric,
                        job.backend, n_candidates=cfg.prompt_candidates, max_demos=cfg.prompt_max_demos,
                        concurrency=cfg.concurrency, seed=cfg.seed)
    summary = {"step": "prompts", "best_dev": res.best_score, "pool_sizes": res.pool_sizes,
               "trials": [asdict(t) for t in res.trials]}
    job.run.write_json(path.name, {"prompts": res.best, "summary": summary})
    return summary


def run(cfg: TrainConfig, resume: str | None = None) -> dict:
    steps = parse_strategy(cfg.strategy)
    job = build(cfg, resume)
    out: dict = {"strategy": steps, "steps": []}
    for i, step in enumerate(steps):
        if step == "prompts":
            s = prompts_step(job, i)
            print(f"prompts: best dev {s['best_dev']:.3f} over {len(s['trials'])} demo sets "
                  f"(demo pool per module: {s['pool_sizes']})")
        else:
            s = fit(job)
            print_summary(job, s)
        out["steps"].append(s)
    job.run.write_json("strategy.json", out)
    return out
