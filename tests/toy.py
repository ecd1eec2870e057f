"""A two-module toy task for learning tests: the reward is a property the base model rarely has."""
from __future__ import annotations

from mmgrpo.program import Example, Module, Program
from mmgrpo.tasks.base import Task

TOPICS = ["the sea", "music", "cats", "winter", "bread", "trains", "the moon", "gardens"]


class Toy(Program):
    def __init__(self):
        self.pick = Module("pick", ["topic"], ["word"], "Give one word related to the topic.", max_tokens=8,
                           demos=[{"topic": "the sun", "word": "light"}])
        self.answer = Module("answer", ["topic", "word"], ["sentence"],
                             "Write a short sentence about the topic using the word.", max_tokens=16,
                             demos=[{"topic": "the sun", "word": "light", "sentence": "The sun gives us light."}])

    def forward(self, topic):
        word = self.pick(topic=topic).word
        return self.answer(topic=topic, word=word)


def short(ex, pred) -> float:
    """1 when the final sentence has at most 4 words (about 1 in 4 samples of the base model)."""
    return float(len(pred["sentence"].split()) <= 4)


def _examples() -> list[Example]:
    return [Example(f"t{i}", {"topic": t}) for i, t in enumerate(TOPICS)]


def toy_task() -> Task:
    exs = _examples()
    return Task("toy", Toy, short, short, train=exs[:4], dev=exs, test=exs)


class LenientToy(Program):
    """The toy program with lenient modules, for tiny random models (tests of mechanics): every reply is
    taken whole, so trajectories finish and are scored rather than all failing to parse."""

    def __init__(self):
        self.pick = Module("pick", ["topic"], ["word"], "Give one word related to the topic.", max_tokens=8,
                           lenient=True)
        self.answer = Module("answer", ["topic", "word"], ["sentence"],
                             "Write a short sentence about the topic using the word.", max_tokens=8, lenient=True)

    def forward(self, topic):
        return self.answer(topic=topic, word=self.pick(topic=topic).word)


def even(ex, pred) -> float:
    """1 when the final reply's length is even: about half of a random model's samples, so groups differ
    and updates happen. No meaning beyond that."""
    return float(len(pred["sentence"]) % 2 == 0)


def lenient_toy_task() -> Task:
    exs = _examples()
    return Task("toy", LenientToy, even, even, train=exs[:4], dev=exs, test=exs)


def run_toy(cfg, folder, reward=None, model: str = "smollm2-135m"):
    """A toy run (to cfg.steps, resuming what ``folder`` holds) on ``model``: the embedded model runs the
    toy program; another (a tiny random model) the lenient toy, whose replies all parse."""
    from mmgrpo.grpo.run import MMGRPO, fit
    from mmgrpo.lm.hf import HFBackend
    from mmgrpo.runlog import RunDir

    task = toy_task() if model == "smollm2-135m" else lenient_toy_task()
    if reward:
        task.reward = reward
    job = MMGRPO(cfg, task, task.make_program(), HFBackend.load(model), RunDir(folder))
    try:
        fit(job)
    finally:
        job.backend.close()
    return job


def adapter(folder, step: int) -> dict:
    """The adapter tensors of a run's checkpoint at ``step``."""
    from pathlib import Path

    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "checkpoints" / f"step-{step:06d}" / "adapter_model.safetensors"))
