"""Records every LM call of a running program into its Trajectory.

A context variable holds the current trajectory, so programs running concurrently in
threads (each inside its own copied context) never mix their records.
"""
from __future__ import annotations

import contextvars
import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

OK, PARSE_FAILURE, ERROR = "ok", "parse_failure", "error"


@dataclass
class ModuleCall:
    """One LM call: the exact tokens sampled and their log-probs under the sampling policy."""
    module: str
    index: int  # invocation index of this module within its trajectory
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    text: str
    prompt_version: str = ""
    messages: list[dict] = field(default_factory=list)
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] | None = None  # None when the reply did not parse
    policy_version: int = 0
    temperature: float = 1.0  # of the sampler; the learner divides its logits by it (0: greedy)
    finish_reason: str = "stop"  # "length": cut at the token budget (counted; [grpo] mask_truncated)


@dataclass
class Trajectory:
    """One run of a program on one example."""
    example_id: str
    sample_index: int = 0
    seed: int = 0
    calls: list[ModuleCall] = field(default_factory=list)
    prediction: dict[str, Any] | None = None
    reward: float = 0.0
    status: str = OK
    error: str = ""
    outage: bool = False  # an error caused by an LM server that stayed unreachable (lm.openai.LMUnavailable)

    def calls_of(self, module: str) -> list[ModuleCall]:
        return [c for c in self.calls if c.module == module]

    def next_seed(self) -> int:
        """A per-call sampling seed derived from the trajectory seed: runs repeat exactly."""
        digest = hashlib.sha256(f"{self.seed}:{len(self.calls)}".encode()).digest()
        return int.from_bytes(digest[:4], "little")


_current: contextvars.ContextVar[Trajectory | None] = contextvars.ContextVar("mmgrpo_trajectory", default=None)


def current() -> Trajectory | None:
    return _current.get()


@contextmanager
def recording(trajectory: Trajectory) -> Iterator[Trajectory]:
    token = _current.set(trajectory)
    try:
        yield trajectory
    finally:
        _current.reset(token)


def record(call: ModuleCall) -> ModuleCall:
    """Append a call to the current trajectory (if any), numbering it per module."""
    traj = _current.get()
    if traj is not None:
        call.index = sum(1 for c in traj.calls if c.module == call.module)
        traj.calls.append(call)
    return call
