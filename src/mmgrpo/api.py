"""The Python entry point: ``mmgrpo.optimize(program, train, dev, metric, ...)`` -> OptimizedProgram.

The same path as ``mmgrpo train``: a config, a task (here made from your program, data and
metric), ``compose.run`` over the strategy's steps, a run folder with its ``result/``.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from .compose import result_of, run
from .config import TrainConfig, load_config
from .grpo.run import build
from .program import Program
from .result import OptimizedProgram


def optimize(program: Program, train: Sequence[Any], dev: Sequence[Any], metric: Callable, *,
             reward: Callable | None = None, strategy: str | None = None, model: str | None = None,
             config: dict | str | None = None, test: Sequence[Any] | None = None,
             input_fields: Sequence[str] | None = None, resume: str | None = None) -> OptimizedProgram:
    """Optimize ``program`` (prompts, weights, or both in the order of ``strategy``).

    train, dev, test: ``Example``s, or dicts whose keys are the program's inputs (the parameters of
    its ``forward``, or ``input_fields``) plus gold fields. metric(example, prediction) -> float is
    what dev scores report; ``reward`` (default: metric) is what mmGRPO trains on. ``config``: a
    dict or a TOML/YAML file of config sections (see ``mmgrpo.config``); ``strategy`` and
    ``model``, when given, win over ``run.strategy`` and ``model.name`` there; when neither names
    them: "prompts -> weights" and the embedded model. The run folder (under
    run.out, default runs/) keeps logs and checkpoints; ``resume`` continues one.
    """
    from .tasks.custom import program_task

    defaults = {"run": {"name": type(program).__name__.lower(), "strategy": "prompts -> weights"}}
    program, metric, reward, input_fields = _adopt(program, metric, reward, input_fields)
    args: dict = {}  # the arguments given win over config; those left out let config decide
    if strategy is not None:
        args["run"] = {"strategy": strategy}
    if model is not None:
        args["model"] = {"name": model}
    if isinstance(config, (str, bytes)) or hasattr(config, "__fspath__"):
        cfg = load_config(config, defaults_sections=defaults, sections=args)
    else:
        sections = {sec: {**(config or {}).get(sec, {}), **args.get(sec, {})} for sec in {*(config or {}), *args}}
        cfg = load_config(None, defaults_sections=defaults, sections=sections)
    task = program_task(program, train, dev, metric, reward, test, name=cfg.name, input_fields=input_fields)
    job = build(cfg, resume=resume, task=task)
    run(cfg, job=job)
    out = result_of(job)
    out.info["run"] = str(job.run.path)
    return out


def _adopt(program, metric, reward, input_fields):
    """A dspy.Module becomes a DSPyProgram, and its DSPy-style metrics (example, prediction,
    trace=None) mmgrpo metrics; anything else passes through."""
    from .data import as_program, is_dspy_module

    if not is_dspy_module(program):
        return program, metric, reward, input_fields
    from .integrations.dspy import dspy_metric

    wrapped = as_program(program)
    return (wrapped, dspy_metric(metric), dspy_metric(reward) if reward else None,
            input_fields or wrapped.input_fields)


def load(folder: str, program: Program | None = None, device: str = "auto", dtype: str = "auto",
         metric: Callable | None = None, sampler_dtype: str | None = None) -> OptimizedProgram:
    """A saved result (``result.save`` or a run's ``result/``), ready to call and evaluate. It generates
    as the run that made it did (``sampler_dtype`` None: the run's [model] sampler_dtype), so it gives
    the answers that run scored; ``sampler_dtype="model"``: the loaded weights generate."""
    from .data import as_program
    from .result import load as load_result

    program = as_program(program) if program is not None else None
    return load_result(folder, program=program, device=device, dtype=dtype, metric=metric,
                       sampler_dtype=sampler_dtype)


__all__ = ["OptimizedProgram", "TrainConfig", "load", "optimize"]
