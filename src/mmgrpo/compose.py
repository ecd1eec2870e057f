"""Composing the two levers: a strategy is a sequence of steps, run in order on one program.

Prompt steps: ``bootstrap`` (few-shot demos + random search), ``mipro`` (proposed instructions x
demo sets, Optuna TPE), ``gepa`` (reflective instruction evolution); ``prompts`` means the one
named by ``prompt_optimizer``. ``weights`` runs mmGRPO on the program with the prompts it has at
that point (grpo/run.py). The paper's recipe is "prompts -> weights". Each prompt step's result
is written to the run folder, and a resumed run reloads it instead of searching again.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, is_dataclass

from .config import TrainConfig
from .grpo.run import MMGRPO, build, fit, print_summary
from .tasks import TASKS as TASK_NAMES

PROMPT_STEPS = ("bootstrap", "mipro", "gepa")
STEPS = ("prompts", *PROMPT_STEPS, "weights")


def parse_strategy(text: str) -> list[str]:
    """Step names in order; ``dspy.<Optimizer>`` steps (DSPy programs) keep their case."""
    steps = [s.strip() if s.strip().lower().startswith("dspy.") else s.strip().lower() for s in text.split("->")]
    if not text.strip() or any(not s for s in steps):
        raise ValueError(f"strategy {text!r} is empty or has an empty step; write e.g. 'prompts -> weights'")
    unknown = [s for s in steps if s not in STEPS and not s.startswith("dspy.")]
    if unknown:
        raise ValueError(f"strategy {text!r} names unknown step(s) {unknown}; known steps: {', '.join(STEPS)}, "
                         f"and for DSPy programs dspy.<Optimizer> (e.g. dspy.MIPROv2)")
    if steps.count("weights") > 1:
        raise ValueError(f"strategy {text!r}: 'weights' may appear once (one adapter, one training run)")
    return steps


def proposer_lm(cfg: TrainConfig, policy):
    if not cfg.proposer_url:
        return policy
    from .lm.openai import OpenAIClient

    return OpenAIClient(cfg.proposer_url, cfg.proposer_model)


def optimize_prompts(job: MMGRPO, kind: str):
    """Run one prompt optimizer on the job's program (it is left holding the best prompts)."""
    cfg, task, program, lm = job.cfg, job.task, job.program, job.backend
    if kind.startswith("dspy."):
        from .integrations.dspy import compile_step

        return compile_step(job, kind)
    if not program.named_modules():
        raise ValueError(f"prompt step {kind!r} edits mmgrpo Modules and this program has none (a DSPy program? "
                         f"use DSPy's optimizers as steps: dspy.BootstrapFewShot, dspy.MIPROv2, dspy.GEPA)")
    train = task.train[: cfg.prompt_train_examples]
    if kind == "bootstrap":
        from .optimizers.bootstrap import random_search

        return random_search(program, train, job.prompt_val, task.metric, lm, n_candidates=cfg.prompt_candidates,
                             max_demos=cfg.prompt_max_demos, threshold=cfg.prompt_demo_threshold,
                             concurrency=cfg.concurrency, seed=cfg.seed, progress=cfg.progress)
    if kind == "mipro":
        from .optimizers.mipro import mipro

        return mipro(program, train, job.prompt_val, task.metric, lm, proposer=proposer_lm(cfg, lm),
                     description=task.description, n_instructions=cfg.prompt_instructions,
                     n_demo_sets=cfg.prompt_candidates, max_demos=cfg.prompt_max_demos,
                     threshold=cfg.prompt_demo_threshold, trials=cfg.prompt_trials,
                     minibatch=cfg.prompt_minibatch, top_k=cfg.prompt_top_k, concurrency=cfg.concurrency,
                     seed=cfg.seed, progress=cfg.progress)
    from .optimizers.gepa import gepa_search

    return gepa_search(program, train, job.prompt_val, task.metric, lm, reflection_lm=proposer_lm(cfg, lm),
                       max_metric_calls=cfg.gepa_metric_calls, minibatch=min(4, cfg.prompt_minibatch),
                       concurrency=cfg.concurrency, seed=cfg.seed, progress=cfg.progress)


def prompts_step(job: MMGRPO, index: int, kind: str) -> dict:
    path = job.run.path / f"prompts_step{index}.json"
    if path.exists():  # resumed: keep what was found
        saved = json.loads(path.read_text())
        job.program.load_prompt_state(saved["prompts"])
        return saved["summary"]
    t0 = time.time()
    res = optimize_prompts(job, kind)
    summary = {"step": kind, "best_dev": res.best_score, "scored_on": job.prompt_val_name, "pool_sizes": res.pool_sizes,
               "seconds": time.time() - t0,
               "trials": [asdict(t) if is_dataclass(t) else t for t in res.trials], **res.extra}
    job.run.write_json(path.name, {"prompts": res.best, "summary": summary})
    return summary


def result_of(job: MMGRPO, scores: dict | None = None):
    """The job's program, prompts and adapter as an OptimizedProgram (what result/ holds)."""
    from .data import spec_of
    from .result import OptimizedProgram

    cfg, task = job.cfg, job.task
    custom = bool(cfg.program) or task.name not in TASK_NAMES
    info = {"model": cfg.model, "strategy": cfg.strategy, "config": cfg.to_dict(), "scores": scores or {},
            "task": None if custom else cfg.task, "task_options": {} if custom else cfg.task_options,
            "program": cfg.program or (spec_of(job.program) if custom else None),
            "metric": cfg.metric or (spec_of(task.metric) if custom else None), "task_settings": task.settings,
            "metric_style": "dspy" if getattr(task.metric, "dspy_metric", None) else "mmgrpo",
            "eval_max_tokens": cfg.eval_tokens}
    return OptimizedProgram(job.program, job.backend, job.trainer.model if job.trained else None, info,
                            task.metric, max_tokens=cfg.eval_tokens)


def run(cfg: TrainConfig, resume: str | None = None, job: MMGRPO | None = None) -> dict:
    """Run the strategy's steps on the job's program, then write its result/ folder."""
    steps = [cfg.prompt_optimizer if s == "prompts" else s for s in parse_strategy(cfg.strategy)]
    job = job or build(cfg, resume)
    if not job.main:  # a data-parallel rank other than 0 joins rank 0's weights step, nothing else
        return fit(job) if "weights" in steps else {}
    out: dict = {"strategy": steps, "steps": []}
    for i, step in enumerate(steps):
        if step in PROMPT_STEPS or step.startswith("dspy."):
            s = prompts_step(job, i, step)
            print(f"{step}: best {s.get('scored_on', 'dev')} score {s['best_dev']:.3f} over {len(s['trials'])} "
                  f"candidates (demo pool per module: {s['pool_sizes']})")
            if s["pool_sizes"] and not any(s["pool_sizes"].values()):
                print(f"  no training run scored >= prompt_demo_threshold = {job.cfg.prompt_demo_threshold}, so "
                      "no demos were bootstrapped; for a graded metric set [prompts] demo_threshold lower")
        else:
            s = fit(job)
            print_summary(job, s)
        out["steps"].append(s)
    job.run.write_json("strategy.json", out)
    last = out["steps"][-1] if out["steps"] else {}
    on_dev = last.get("scored_on", "dev") == "dev"
    scores = ({"dev": last.get("best_dev", last.get("final_dev")), "dev_n": len(job.dev)} if on_dev else
              {"search_val": last["best_dev"], "search_val_n": len(job.prompt_val),
               "search_val_set": last["scored_on"]})
    result_of(job, scores).save(job.run.path / "result")
    print(f"result (prompts + adapter): {job.run.path / 'result'}")
    return out
