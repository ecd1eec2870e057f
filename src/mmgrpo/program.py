"""LM programs: named modules with their own prompts, called from plain Python.

A Module renders chat messages from its instruction, demos and inputs, asks the current LM,
records the call in the current trajectory (before parsing, so a malformed reply is still
there to learn from), and parses ``field: value`` lines back into fields.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from . import trace
from .lm.base import current_lm, current_params


class ParseError(ValueError):
    """A reply that does not contain the module's output fields; keeps the raw text."""

    def __init__(self, module: str, message: str, raw: str):
        super().__init__(f"module {module!r}: {message}; raw reply: {raw[:200]!r}")
        self.module = module
        self.raw = raw


@dataclass
class Example:
    """One task input (``inputs``) with its gold fields (``gold``)."""
    id: str
    inputs: dict[str, Any]
    gold: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.inputs[key] if key in self.inputs else self.gold[key]


class Prediction(dict):
    """A program's output fields; attribute access for convenience."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc


def _title(name: str) -> str:
    return name.replace("_", " ")


class Module:
    """A named LM call with input fields, output fields, an instruction and demos."""

    def __init__(self, name: str, inputs: list[str], outputs: list[str], instruction: str,
                 demos: list[dict[str, Any]] | None = None, max_tokens: int | None = None,
                 field_notes: Mapping[str, str] | None = None, lenient: bool = False, context: str = ""):
        if not outputs:
            raise ValueError(f"module {name!r} needs at least one output field")
        self.name = name
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.instruction = instruction
        self.demos = list(demos or [])
        self.max_tokens = max_tokens
        self.field_notes = dict(field_notes or {})
        # context: fixed text after the instruction (e.g. a label list) that prompt optimizers keep
        self.context = context
        # lenient: a one-output module takes a reply without its 'field:' marker whole, so a model
        # that ignores the format still gets scored on content (strict is what teaches the format)
        self.lenient = lenient and len(self.outputs) == 1

    # ---- prompt ---------------------------------------------------------------------
    def system_prompt(self) -> str:
        fmt = "\n".join(f"{f}: <{self.field_notes.get(f, _title(f))}>" for f in self.outputs)
        head = f"{self.instruction}\n{self.context}" if self.context else self.instruction
        return f"{head}\n\nAnswer in exactly this format:\n{fmt}"

    def _user(self, values: Mapping[str, Any]) -> str:
        missing = [f for f in self.inputs if f not in values]
        if missing:
            raise KeyError(f"module {self.name!r} is missing input field(s) {missing}; it takes {self.inputs}")
        return "\n".join(f"{f}: {_fmt(values[f])}" for f in self.inputs)

    def _assistant(self, values: Mapping[str, Any]) -> str:
        return "\n".join(f"{f}: {_fmt(values[f])}" for f in self.outputs)

    def render(self, values: Mapping[str, Any], with_demos: bool = True) -> list[dict]:
        msgs = [{"role": "system", "content": self.system_prompt()}]
        for d in (self.demos if with_demos else []):
            msgs.append({"role": "user", "content": self._user(d)})
            msgs.append({"role": "assistant", "content": self._assistant(d)})
        msgs.append({"role": "user", "content": self._user(values)})
        return msgs

    def version(self) -> str:
        blob = json.dumps({"i": self.instruction, "d": self.demos}, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]

    # ---- parse ----------------------------------------------------------------------
    def parse(self, text: str) -> dict[str, str]:
        names = "|".join(re.escape(f) for f in self.outputs)
        pat = re.compile(rf"^[\s*#>-]*\**({names})\**\s*:\**\s*", re.IGNORECASE | re.MULTILINE)
        hits = list(pat.finditer(text))
        found: dict[str, str] = {}
        for k, m in enumerate(hits):
            key = m.group(1).lower()
            end = hits[k + 1].start() if k + 1 < len(hits) else len(text)
            if key not in found:
                found[key] = text[m.end():end].strip()
        if not hits and self.lenient and text.strip():
            return {self.outputs[0]: text.strip()}
        out = {}
        for f in self.outputs:
            if f.lower() not in found:
                raise ParseError(self.name, f"no '{f}:' field in the reply", text)
            out[f] = found[f.lower()]
        return out

    # ---- call -----------------------------------------------------------------------
    def __call__(self, **inputs: Any) -> Prediction:
        lm = current_lm()
        params = current_params()
        traj = trace.current()
        if traj is not None:
            params = params.with_(seed=traj.next_seed())
        if self.max_tokens is not None:  # the module's own cap, within the run's budget
            params = params.with_(max_tokens=min(self.max_tokens, params.max_tokens))
        messages = self.render(inputs)
        out = lm.chat(messages, params)
        call = trace.record(trace.ModuleCall(
            module=self.name, index=0, prompt_ids=out.prompt_ids, completion_ids=out.token_ids,
            logprobs=out.logprobs, text=out.text, prompt_version=self.version(), messages=messages,
            inputs=dict(inputs), policy_version=getattr(lm, "version", 0), temperature=params.temperature,
            finish_reason=out.finish_reason))
        fields = self.parse(out.text)
        call.outputs = fields
        return Prediction(fields)

    def __repr__(self) -> str:
        return f"Module({self.name!r}, {self.inputs} -> {self.outputs}, demos={len(self.demos)})"


def _fmt(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "\n" + "\n".join(f"- {x}" for x in v) if v else "(none)"
    return str(v)


class Program:
    """Plain Python over Modules. Subclasses define ``forward(**inputs) -> Prediction``."""

    def forward(self, **inputs: Any) -> Prediction:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, **inputs: Any) -> Prediction:
        return self.forward(**inputs)

    def named_modules(self) -> dict[str, Module]:
        mods = {}
        for v in vars(self).values():
            if isinstance(v, Module):
                mods[v.name] = v
        return mods

    def prompt_state(self) -> dict[str, dict]:
        """The optimizable part of every module (instruction and demos), JSON-ready."""
        return {n: {"instruction": m.instruction, "demos": m.demos} for n, m in self.named_modules().items()}

    def load_prompt_state(self, state: Mapping[str, Mapping]) -> None:
        mods = self.named_modules()
        unknown = set(state) - set(mods)
        if unknown:
            raise KeyError(f"prompt state names unknown module(s) {sorted(unknown)}; program has {sorted(mods)}")
        for n, s in state.items():
            mods[n].instruction = s["instruction"]
            mods[n].demos = list(s.get("demos", []))


Metric = Callable[[Example, Prediction], float]


def program_inputs(program: Any) -> list[str] | None:
    """The named parameters of the program's forward (None when it takes **kwargs only)."""
    if getattr(program, "input_fields", None):  # a wrapper that knows its program's inputs
        return list(program.input_fields)
    fn = getattr(program, "forward", None) or program
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"]
    return names or None


def spec_of(obj: Any) -> str | None:
    """The import path that rebuilds ``obj``'s class (or function), when it has one."""
    if getattr(obj, "import_spec", None):  # a wrapper that knows what it wraps
        return obj.import_spec
    target = obj if inspect.isfunction(obj) or inspect.isclass(obj) else type(obj)
    mod, name = getattr(target, "__module__", None), getattr(target, "__qualname__", "")
    if not mod or "<" in name or mod == "__main__":
        return None
    return f"{mod}:{name}"
