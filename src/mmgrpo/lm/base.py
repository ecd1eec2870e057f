"""The one seam between programs and LM engines.

A backend takes chat messages (or prompt token ids) and sampling settings and returns
completions with their token ids and per-token log-probs.

The log-prob convention, shared by every sampler and the learner: each sampled token's
log-prob under softmax(logits / T), the distribution it was drawn from (T = 1 for greedy).
Top-p draws from the nucleus but the recorded log-prob is the full tempered one, which is
what the learner recomputes (logits / T); training defaults to top_p = 1, where the two agree
exactly, and with top_p < 1 the gap shows in the step's mismatch metric.
"""
from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Iterator, Protocol, runtime_checkable


BASE = "<base>"  # a request's variant (HFBackend): the base model, every adapter off
PINNED = "<pinned>"  # a request's variant (HFBackend): the trained weights of an earlier version (see `pin`)


def newest_at_most(versions, v: int) -> int:
    """The newest of the kept policy ``versions`` that is <= v (a step without an update makes no new one)."""
    found = [u for u in versions if u <= v]
    if not found:
        raise KeyError(f"policy version {v} is not kept (kept: {sorted(versions)})")
    return max(found)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    max_tokens: int = 128
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def with_(self, **kw) -> "SamplingParams":
        return replace(self, **kw)

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


@dataclass
class Completion:
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)
    finish_reason: str = "stop"  # "stop" | "length"


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt token ids of chat messages: the tokenizer's chat template, generation prompt on.
    Every backend tokenizes this way, so a prompt is the same ids in-process and on a server."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


@runtime_checkable
class LM(Protocol):
    """What a Module needs from an engine."""

    def chat(self, messages: list[dict], params: SamplingParams) -> Completion: ...


_current_lm: contextvars.ContextVar[LM | None] = contextvars.ContextVar("mmgrpo_lm", default=None)
_current_params: contextvars.ContextVar[SamplingParams] = contextvars.ContextVar(
    "mmgrpo_params", default=SamplingParams(temperature=0.0))


def current_lm() -> LM:
    lm = _current_lm.get()
    if lm is None:
        raise RuntimeError("no LM is set: run the program inside `with using(lm):` "
                           "(rollout.sample and rollout.evaluate do this for you)")
    return lm


def current_params() -> SamplingParams:
    return _current_params.get()


@contextmanager
def using(lm: LM, params: SamplingParams | None = None) -> Iterator[LM]:
    t1 = _current_lm.set(lm)
    t2 = _current_params.set(params) if params is not None else None
    try:
        yield lm
    finally:
        _current_lm.reset(t1)
        if t2 is not None:
            _current_params.reset(t2)
