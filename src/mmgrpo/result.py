"""The optimized program as something you keep: prompts + adapter + config + scores, one folder.

Layout of a result folder (``RUN/result/`` after ``mmgrpo train``, or ``OptimizedProgram.save``):
``result.json`` (model, how to rebuild the program, metric, settings, scores), ``prompts.json``
(every module's instruction and demos) and ``adapter/`` (a standard PEFT LoRA adapter; absent
when only prompts were optimized). ``load`` rebuilds it anywhere the program is importable.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Sequence

from .lm.base import SamplingParams, using
from .program import Prediction, Program
from .rollout import EvalResult, evaluate
from .runlog import atomic_write, publish_dir, write_json


class OptimizedProgram:
    """A program with its optimized prompts, run by a model with its trained adapter (greedy)."""

    def __init__(self, program: Program, backend, peft_model=None, info: dict | None = None,
                 metric=None, max_tokens: int = 256):
        self.program, self.backend, self.peft_model = program, backend, peft_model
        self.info = dict(info or {})  # what result.json records
        self.metric = metric  # the default of evaluate (None when it could not be rebuilt)
        self.max_tokens = max_tokens

    def __repr__(self) -> str:
        mods = ", ".join(self.program.named_modules()) if hasattr(self.program, "named_modules") else "?"
        scores = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in (self.info.get("scores") or {}).items())
        return (f"OptimizedProgram({type(self.program).__name__} [{mods}], model {self.info.get('model')!r}, "
                f"strategy {self.info.get('strategy')!r}, adapter {'yes' if self.peft_model is not None else 'no'}"
                f"{', ' + scores if scores else ''})")

    def __call__(self, **inputs: Any) -> Prediction:
        with using(self.backend, SamplingParams(temperature=0.0, max_tokens=self.max_tokens)):
            return Prediction(self.program(**inputs))

    def evaluate(self, examples: Sequence, metric=None, concurrency: int = 8, progress: bool | None = False
                 ) -> EvalResult:
        """Greedy score on ``examples`` (Examples or dicts): mean, 95% CI, counts."""
        from .data import program_inputs, to_examples

        if metric is not None and getattr(self.program, "is_dspy", False):
            from .integrations.dspy import dspy_metric  # a DSPy program's metric has DSPy's signature

            metric = dspy_metric(metric)
        metric = metric or self.metric
        if metric is None:
            raise ValueError("evaluate needs a metric (this result was loaded without one)")
        exs = to_examples(examples, program_inputs(self.program), "examples")
        return evaluate(self.program, exs, metric, self.backend, concurrency=concurrency,
                        max_tokens=self.max_tokens, progress=progress)

    @property
    def prompts(self) -> dict:
        return self.program.prompt_state()

    def save(self, folder: str | Path) -> Path:
        """Write the result folder atomically (a temp folder renamed into place)."""
        folder = Path(folder)
        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_json(tmp / "prompts.json", self.prompts)
        if self.peft_model is not None:
            self.peft_model.save_pretrained(tmp / "adapter", safe_serialization=True)
        write_json(tmp / "result.json", {**self.info, "has_adapter": self.peft_model is not None})
        publish_dir(tmp, folder)
        return folder

    def close(self) -> None:
        if hasattr(self.backend, "close"):
            self.backend.close()


def result_folder(path: str | Path) -> Path:
    """A result folder, or a run folder holding one in result/."""
    p = Path(path)
    if (p / "result.json").exists():
        return p
    if (p / "result" / "result.json").exists():
        return p / "result"
    raise FileNotFoundError(f"{p} is neither a result folder (result.json) nor a run folder with result/; "
                            f"a run writes result/ when its strategy finishes")


def build_program(info: dict, program: Program | None = None) -> Program:
    """The program a result was made from: given, from a built-in task, or from its import path."""
    if program is not None:
        return program
    if info.get("task"):
        from .tasks import get_task

        return get_task(info["task"], **info.get("task_options", {})).make_program()
    if info.get("program"):
        from .data import make_program

        return make_program(info["program"])
    raise ValueError("this result does not say how to rebuild its program (it was defined in __main__ or "
                     "a notebook): pass it, mmgrpo.load(folder, program=MyProgram())")


def load(folder: str | Path, program: Program | None = None, device: str = "auto", dtype: str = "auto",
         metric=None, sampler_dtype: str | None = None) -> OptimizedProgram:
    """Rebuild an OptimizedProgram: base model + adapter + prompts; ``program`` overrides the import path.
    ``sampler_dtype`` (see [model] sampler_dtype; None: as the run was set) decides which weights
    generate, so a loaded result answers as the run that made it scored it: with the run's bfloat16
    sampler copy, if it had one. "model": the loaded weights generate themselves."""
    from .lm.hf import HFBackend
    from .models import load as load_model, pick_sampler_dtype

    folder = result_folder(folder)
    info = json.loads((folder / "result.json").read_text())
    prog = build_program(info, program)
    prog.load_prompt_state(json.loads((folder / "prompts.json").read_text()))
    m = load_model(info["model"], dtype=dtype, device=device)
    if sampler_dtype is None:  # results saved before the sampler copy existed sampled with the model
        sampler_dtype = (info.get("config") or {}).get("sampler_dtype", "model")
    # the backend (and its sampler copy of the base weights) first, then the adapter injected into the
    # model, as in training: the copy then samples the base with the adapter merged in
    backend = HFBackend(m.model, m.tokenizer, sampler_dtype=pick_sampler_dtype(m.model, sampler_dtype))
    peft_model = None
    if (folder / "adapter").exists():
        from peft import PeftModel

        with backend.lock:
            peft_model = PeftModel.from_pretrained(m.model, str(folder / "adapter"))  # injects into m.model
            peft_model.eval()
            backend.peft = peft_model
            backend.weights_changed()
    if metric is None and info.get("metric"):
        from .data import import_object

        metric = import_object(info["metric"], "metric")
        if info.get("metric_style") == "dspy":
            from .integrations.dspy import dspy_metric

            metric = dspy_metric(metric)
    elif metric is None and info.get("task"):
        from .tasks import get_task

        metric = get_task(info["task"], **info.get("task_options", {})).metric
    # scored at the budget it was trained at (a result saved before this was recorded: 256, as then)
    return OptimizedProgram(prog, backend, peft_model, info, metric, max_tokens=info.get("eval_max_tokens", 256))


def export(folder: str | Path, out: str | Path, merged: bool = False) -> Path:
    """A standard PEFT adapter folder (+ prompts.json), or with ``merged`` a Hugging Face model folder
    with the adapter merged into the weights, loadable by ``AutoModelForCausalLM.from_pretrained``."""
    src = result_folder(folder)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if not merged:
        if not (src / "adapter").exists():
            raise ValueError(f"{src} has no adapter (only prompts were optimized); nothing to export "
                             f"as a PEFT adapter: its prompts are in {src / 'prompts.json'}")
        shutil.copytree(src / "adapter", tmp)
    else:
        res = load(src, device="cpu", dtype="float32", sampler_dtype="model")
        model = res.peft_model.merge_and_unload() if res.peft_model is not None else res.backend.model
        model.save_pretrained(tmp, safe_serialization=True)
        res.backend.tokenizer.save_pretrained(tmp)
        res.close()
    shutil.copyfile(src / "prompts.json", tmp / "prompts.json")
    atomic_write(tmp / "mmgrpo_result.json", (src / "result.json").read_text())
    if out.exists():
        out.rmdir()
    tmp.replace(out)
    return out
