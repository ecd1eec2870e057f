"""The run folder: config, metrics.jsonl, checkpoints, report. Every write is atomic."""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Temp file in the same folder, fsync, rename: a crash leaves the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # the user's umask, as open() would give, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def format_table(rows: list[tuple], headers: tuple) -> str:
    """A plain aligned text table for closing summaries."""
    cols = [tuple(str(h) for h in headers)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(headers))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(cols[0]), line(tuple("-" * w for w in widths))] + [line(r) for r in cols[1:]])


def _half(ci: float | None) -> str:
    """A 95% CI half-width; one example has none (stored as null)."""
    return "n/a" if ci is None or math.isnan(ci) else f"{ci:.3f}"


def pm(ci: float | None) -> str:
    return f"±{_half(ci)}"


def signed(x: float) -> str:
    """A difference with its sign; a mean of cancelling differences (-1e-17) is +0.000, not -0.000."""
    return f"{0.0 if abs(x) < 5e-4 else x:+.3f}"


def diff_ci(d: tuple[float, float | None]) -> str:
    """A paired difference and its 95% half-width, as compare tables and reports print it."""
    return f"{signed(d[0])} ± {_half(d[1])}"


def _finite(obj: Any) -> Any:
    """NaN and inf as null: bare NaN is not JSON, and strict readers (JS, Go, serde) reject the file."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kw: Any) -> str:
    return json.dumps(_finite(obj), default=str, allow_nan=False, **kw)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, dumps(obj, indent=2, sort_keys=True) + "\n")


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    @classmethod
    def new(cls, root: str | Path, name: str) -> "RunDir":
        """A fresh folder: two runs started in the same second get -2, -3, ... (mkdir is atomic)."""
        base = Path(root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        base.parent.mkdir(parents=True, exist_ok=True)
        for k in range(1, 10_000):
            path = base if k == 1 else base.with_name(f"{base.name}-{k}")
            try:
                path.mkdir()
                return cls(path)
            except FileExistsError:
                continue
        raise RuntimeError(f"no free run folder name under {base}")

    def write_json(self, name: str, obj: Any) -> Path:
        write_json(self.path / name, obj)
        return self.path / name

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text())

    def log(self, record: dict, name: str = "metrics.jsonl") -> None:
        """Append one JSON line; flushed and fsynced so a kill loses at most the line in flight."""
        with open(self.path / name, "a", encoding="utf-8") as f:
            f.write(dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_log(self, name: str = "metrics.jsonl") -> list[dict]:
        p = self.path / name
        if not p.exists():
            return []
        out = []
        for line in p.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a kill: drop only that
        return out

    def truncate_log(self, keep_steps_upto: int, name: str = "metrics.jsonl") -> None:
        """On resume, forget lines written after the checkpoint we resume from."""
        rows = [r for r in self.read_log(name) if r.get("step", 0) <= keep_steps_upto]
        atomic_write(self.path / name, "".join(dumps(r) + "\n" for r in rows))


MANIFEST = "manifest.json"


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file (data files are recorded with it, so a changed file is named)."""
    return _sha256(Path(path))


def write_manifest(folder: Path) -> None:
    """sha256 and size of every file of a finished folder, so that a torn or altered checkpoint
    is detected on resume instead of loaded."""
    files = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            files[f.relative_to(folder).as_posix()] = {"sha256": _sha256(f), "size": f.stat().st_size}
    write_json(folder / MANIFEST, {"files": files})


def verify_manifest(folder: Path) -> str | None:
    """None if every file of the manifest is there with its size and hash, else what is wrong."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{folder / MANIFEST}: unreadable ({type(exc).__name__}: {exc})"
    for name, want in sorted(files.items()):
        f = folder / name
        if not f.is_file():
            return f"{f}: missing"
        if f.stat().st_size != want["size"]:
            return f"{f}: {f.stat().st_size} bytes, the manifest says {want['size']}"
        if _sha256(f) != want["sha256"]:
            return f"{f}: content differs from the manifest (sha256)"
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def publish_dir(tmp: Path, folder: Path) -> None:
    """fsync every file of a finished temp folder, then rename it into place. The old folder is
    moved aside first and deleted last: a kill in between leaves it at ``.NAME.old``, which
    ``recover_dir`` puts back."""
    for f in sorted(tmp.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    aside = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(aside, ignore_errors=True)
    if folder.exists():
        os.replace(folder, aside)
    os.replace(tmp, folder)
    _fsync_dir(folder.parent)
    shutil.rmtree(aside, ignore_errors=True)


def recover_dir(folder: Path) -> None:
    """Undo a publish cut short between its two renames; drop a half-written temp folder."""
    aside = folder.with_name(f".{folder.name}.old")
    if not folder.exists() and aside.exists():
        os.replace(aside, folder)
    shutil.rmtree(aside, ignore_errors=True)
    shutil.rmtree(folder.with_name(f".{folder.name}.tmp"), ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
