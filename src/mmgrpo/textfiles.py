"""Reading data files (users' and the tasks'): a byte that is not UTF-8, a NUL in a CSV or an
oversized CSV field is a ValueError naming the file and line, never a bare codec or csv error."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterator


def read_text(path: str | Path) -> str:
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {raw[exc.start]:#04x}); save the file as UTF-8") from None


def lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, line) for every line that is not blank (JSONL files)."""
    for n, line in enumerate(read_text(path).splitlines(), start=1):
        if line.strip():
            yield n, line


def csv_rows(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line where the row starts, row as a dict) for every row after the header."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise ValueError(f"{path}:{reader.line_num}: not a readable CSV row ({exc})") from None
        yield start, row
