"""Many-hop search (the paper's HoVer task): write a query, retrieve with BM25, take notes, repeat.

Metric: recall of the gold supporting titles among all titles retrieved.
Offline default: 500 real HotpotQA questions (2 gold titles each) over their 4,858 real
Wikipedia paragraphs (CC BY-SA 4.0; see data/hotpotqa/SOURCE.md). HoVer claims need the
Wikipedia-abstracts-2017 corpus (~5M abstracts), which cannot be shipped: pass ``corpus`` (a
JSONL file of {title, text}) and ``dataset="hover"``.
"""
from __future__ import annotations

import json
import unicodedata
from pathlib import Path

from ..program import Example, Module, Prediction, Program
from ..retrieve import BM25Retriever
from ..textfiles import lines, read_text
from .base import Task, data_path, seeded_split

def norm_title(t: str) -> str:
    return unicodedata.normalize("NFD", t).strip().lower().replace("&amp;", "&")


class MultiHop(Program):
    def __init__(self, retriever: BM25Retriever, hops: int = 2, k: int = 4, first_k: int | None = None):
        self.retriever, self.hops, self.k, self.first_k = retriever, hops, k, first_k or k
        self.query = Module("query", ["claim", "notes"], ["query"],
                            "Write a search query that finds the missing evidence for the claim.",
                            field_notes={"query": "a short search query"}, max_tokens=32, lenient=True)
        self.notes = Module("notes", ["claim", "notes", "passages"], ["updated_notes"],
                            "Update the notes with the facts from the passages that matter for the claim.",
                            field_notes={"updated_notes": "two short sentences"}, max_tokens=64, lenient=True)

    def forward(self, claim: str) -> Prediction:
        found = self.retriever.search(claim, self.first_k)  # hop 0: the claim itself
        titles = [p.title for p in found]
        notes = self.notes(claim=claim, notes="(none)", passages=[str(p) for p in found]).updated_notes
        for _ in range(self.hops):
            q = self.query(claim=claim, notes=notes).query
            found = self.retriever.search(q, self.k)
            titles += [p.title for p in found]
            notes = self.notes(claim=claim, notes=notes, passages=[str(p) for p in found]).updated_notes
        return Prediction(titles=titles, notes=notes)


def recall(ex: Example, pred: Prediction) -> float:
    gold = {norm_title(t) for t in ex.gold["titles"]}
    got = {norm_title(t) for t in pred.get("titles", [])}
    return len(gold & got) / len(gold)


def _claim(uid, claim, titles) -> Example:
    """One example, checked: what loads is what the program and the recall metric can use."""
    if not isinstance(claim, str) or not claim.strip():
        raise ValueError(f"the claim must be non-empty text, got {claim!r}")
    if not isinstance(titles, list) or not titles or not all(isinstance(t, str) and t.strip() for t in titles):
        raise ValueError(f"gold titles must be a non-empty list of titles, got {titles!r}")
    if isinstance(uid, bool) or not isinstance(uid, (str, int)):
        raise ValueError(f"the id must be a string or an integer, got {uid!r}")
    return Example(str(uid), {"claim": claim}, {"titles": list(titles)})


def _hotpot_examples(path: Path | None = None) -> list[Example]:
    path = path or data_path("hotpotqa", "questions.jsonl")
    out = []
    for n, line in lines(path):
        try:
            r = json.loads(line)
            out.append(_claim(r["question_id"], r["question"], r["gold_titles"]))
        except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
            raise ValueError(f"{path}:{n}: malformed question row ({type(exc).__name__}: {exc})") from exc
    if not out:
        raise ValueError(f"{path}: no questions in the file")
    return out


def _hover_examples(path: Path) -> list[Example]:
    try:
        rows = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: HoVer claims are a non-empty JSON list of objects, got {type(rows).__name__}")
    out = []
    for n, r in enumerate(rows):
        try:
            out.append(_claim(r["uid"], r["claim"], sorted({t for t, _ in r["supporting_facts"]})))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: row {n}: malformed HoVer claim ({exc})") from exc
    return out


def make_task(dataset: str = "hotpotqa", corpus: str | None = None, claims: str | None = None, hops: int = 2,
              k: int = 4, n_train: int = 300, n_dev: int = 100, n_test: int = 100, seed: int = 0,
              first_k: int | None = None) -> Task:
    """``first_k``: passages of hop 0 (the claim itself; default k). Smaller leaves more of the
    recall to the LM-written queries (studies/multihop_room.py measures both)."""
    if dataset == "hotpotqa":
        examples = _hotpot_examples()
        corpus_path = Path(corpus) if corpus else data_path("hotpotqa", "corpus.jsonl")
    elif dataset == "hover":
        if not corpus:
            raise ValueError("dataset 'hover' needs corpus=<path to the Wikipedia-abstracts JSONL "
                             "(one {title, text} object per line)>; it cannot be shipped with the package")
        examples = _hover_examples(Path(claims) if claims else data_path("hover", "hover_dev_release_v1.1.json"))
        corpus_path = Path(corpus)
    else:
        raise ValueError(f"unknown multihop dataset {dataset!r}: use hotpotqa or hover")
    n_train = min(n_train, max(0, len(examples) - n_dev - n_test))
    train, dev, test = seeded_split(examples, [n_train, n_dev, n_test], seed)
    retriever = BM25Retriever(corpus_path)
    return Task(name="multihop", make_program=lambda: MultiHop(retriever, hops, k, first_k), metric=recall,
                reward=recall,
                train=train, dev=dev, test=test,
                description="Find the Wikipedia pages that support a many-hop claim or question.",
                settings={"dataset": dataset, "corpus": str(corpus_path), "hops": hops, "k": k,
                          "first_k": first_k or k, "seed": seed,
                          "corpus_size": len(retriever.passages)})
