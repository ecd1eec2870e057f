"""BM25 retrieval over a JSONL corpus ({title, text} per line), with the index cached on disk.

The index is keyed by the corpus file's size and mtime plus its path, so a changed corpus is
re-indexed; building is atomic (temp folder, then rename).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from .models import cache_dir
from .textfiles import lines


@dataclass(frozen=True)
class Passage:
    title: str
    text: str

    def __str__(self) -> str:
        return f"{self.title} | {self.text}"


def read_corpus(path: str | Path) -> list[Passage]:
    out = []
    for n, line in lines(path):
        try:
            row = json.loads(line)
            out.append(Passage(str(row["title"]), str(row["text"])))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: a corpus line must be a JSON object with 'title' and 'text' "
                             f"({type(exc).__name__}: {exc})") from exc
    if not out:
        raise ValueError(f"{path}: the corpus is empty")
    return out


class BM25Retriever:
    def __init__(self, corpus_path: str | Path, max_chars: int = 400):
        import bm25s

        self.path = Path(corpus_path)
        if not self.path.exists():
            raise FileNotFoundError(f"corpus {self.path} does not exist (one JSON object per line: title, text)")
        self.passages = read_corpus(self.path)
        self.max_chars = max_chars
        st = self.path.stat()
        key = hashlib.sha1(f"{self.path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
        index_dir = cache_dir() / "bm25" / key
        if (index_dir / "params.index.json").exists():
            self.index = bm25s.BM25.load(str(index_dir))
        else:
            self.index = bm25s.BM25()
            tokens = bm25s.tokenize([f"{p.title} {p.text}" for p in self.passages], stopwords="en", show_progress=False)
            self.index.index(tokens, show_progress=False)
            index_dir.parent.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=f".{key}-", dir=index_dir.parent)
            self.index.save(tmp)
            try:
                os.replace(tmp, index_dir)
            except OSError:  # another process won the race
                shutil.rmtree(tmp, ignore_errors=True)
        self._lock = threading.Lock()  # bm25s retrieval is not documented as thread-safe

    def search(self, query: str, k: int) -> list[Passage]:
        import bm25s

        k = min(k, len(self.passages))
        with self._lock:
            tokens = bm25s.tokenize([query or " "], stopwords="en", show_progress=False)
            docs, _ = self.index.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        return [Passage(self.passages[int(i)].title, self.passages[int(i)].text[: self.max_chars]) for i in docs[0]]
