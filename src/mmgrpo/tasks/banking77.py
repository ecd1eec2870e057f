"""Banking77 intent classification (Casanueva et al., 2020; CC BY 4.0).

Splits: train and dev are drawn, seeded and disjoint, from the official train file; test
from the official test file. ``n_labels`` narrows the 77 intents (a seeded choice) so that
a small model has a chance; the report says which were used.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from ..program import Example, Module, Prediction, Program
from ..textfiles import csv_rows
from .base import Task, data_path, seeded_split


def load_rows(split: str, path: str | Path | None = None) -> list[dict]:
    path = path or data_path("banking77", f"{split}.csv")
    rows = []
    for i, (line, r) in enumerate(csv_rows(path), start=2):  # ids by row number, as they always were
        if not (r.get("text") or "").strip() or not (r.get("category") or "").strip():
            raise ValueError(f"{path}:{line}: malformed row (needs text and category): {r}")
        rows.append({"id": f"{split}-{i}", "text": r["text"].strip(), "label": r["category"].strip()})
    if not rows:
        raise ValueError(f"{path}: no rows (a CSV with a header 'text,category' and one row per example)")
    return rows


def all_labels() -> list[str]:
    return json.loads(data_path("banking77", "categories.json").read_text())


def normalize(label: str) -> str:
    s = label.strip().splitlines()[0] if label.strip() else ""
    s = s.strip().strip("`'\".*[]()").strip().lower()
    return re.sub(r"[\s\-]+", "_", s)


class Classify(Program):
    def __init__(self, labels: list[str], reasoning: bool = True, demos: list[dict] | None = None):
        self.labels = list(labels)
        options = "\n".join(f"- {lab}" for lab in self.labels)
        self.classify = Module(
            "classify", inputs=["query"], outputs=(["reasoning"] if reasoning else []) + ["label"], demos=demos,
            instruction="Classify the banking customer's query into one of these intents:",
            context=f"{options}\nThe label must be copied exactly from the list.",
            field_notes={"reasoning": "one short sentence", "label": "one intent from the list"},
            max_tokens=64 if reasoning else 24)  # a label is <= ~15 tokens; longer replies are noise

    def forward(self, query: str) -> Prediction:
        return self.classify(query=query)


def labelled_demos(train: list[Example], n: int, reasoning: bool) -> list[dict]:
    """A warm start: the first ``n`` training examples of distinct labels, as demos."""
    demos, seen = [], set()
    for ex in train:
        lab = ex.gold["label"]
        if lab in seen or len(demos) >= n:
            continue
        seen.add(lab)
        d = {"query": ex.inputs["query"], "label": lab}
        if reasoning:
            d["reasoning"] = f"The query is about {lab.replace('_', ' ')}."
        demos.append(d)
    return demos


def make_task(n_labels: int = 77, n_train: int = 1000, n_dev: int = 100, n_test: int = 200, seed: int = 0,
              valid_label_credit: float = 0.1, reasoning: bool = True, n_demos: int = 0) -> Task:
    labels = all_labels()
    if not 2 <= n_labels <= len(labels):
        raise ValueError(f"n_labels must be between 2 and {len(labels)}, got {n_labels}")
    if n_labels < len(labels):
        labels = sorted(random.Random(seed).sample(labels, n_labels))
    keep = set(labels)

    def examples(rows):
        return [Example(id=r["id"], inputs={"query": r["text"]}, gold={"label": r["label"]}) for r in rows
                if r["label"] in keep]

    train_pool = examples(load_rows("train"))
    n_train = min(n_train, len(train_pool) - n_dev)
    train, dev = seeded_split(train_pool, [n_train, n_dev], seed)
    test_pool = examples(load_rows("test"))
    (test,) = seeded_split(test_pool, [min(n_test, len(test_pool))], seed + 1)
    normalized = {normalize(lab): lab for lab in labels}
    demos = labelled_demos(train, n_demos, reasoning)
    demo_ids = {d["query"] for d in demos}
    train = [ex for ex in train if ex.inputs["query"] not in demo_ids]

    def metric(ex: Example, pred: Prediction) -> float:
        return float(normalize(pred.get("label", "")) == normalize(ex.gold["label"]))

    def reward(ex: Example, pred: Prediction) -> float:
        if metric(ex, pred):
            return 1.0
        return valid_label_credit if normalize(pred.get("label", "")) in normalized else 0.0

    return Task(name="banking77", make_program=lambda: Classify(labels, reasoning, demos), metric=metric, reward=reward,
                train=train, dev=dev, test=test,
                description="Classify an online-banking customer query into one of the Banking77 intents.",
                settings={"n_labels": n_labels, "labels": labels, "seed": seed, "valid_label_credit": valid_label_credit,
                          "reasoning": reasoning, "n_demos": len(demos)})
