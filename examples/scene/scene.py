"""An example of your own program for mmgrpo (not a built-in task): pick a word, write a line with it.

    PYTHONPATH=examples/scene mmgrpo train --program scene:Scene --metric scene:short_line \
        --train examples/scene/train.jsonl --dev examples/scene/dev.jsonl --set run.steps=4
"""
from mmgrpo import Module, Program


class Scene(Program):
    def __init__(self):
        self.pick = Module("pick", ["subject"], ["word"], "Give one word related to the subject.", max_tokens=8,
                           demos=[{"subject": "the sun", "word": "light"}])
        self.write = Module("write", ["subject", "word"], ["line"],
                            "Write one short line about the subject using the word.", max_tokens=16,
                            demos=[{"subject": "the sun", "word": "light", "line": "The sun spills light."}])

    def forward(self, subject):
        word = self.pick(subject=subject).word
        return self.write(subject=subject, word=word)


def short_line(example, pred) -> float:
    """1 when the line has at most max_words words and uses the picked subject's first word."""
    words = pred["line"].split()
    return float(len(words) <= example.gold["max_words"]) * (
        0.5 + 0.5 * (example.inputs["subject"].split()[-1].lower() in pred["line"].lower()))
