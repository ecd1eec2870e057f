"""The process around the work: memory a run has freed goes back to the operating system (glibc keeps
freed heap pages otherwise), and idle OpenMP threads do not spin long when another process needs the CPU."""
from __future__ import annotations

import os

from mmgrpo import models


def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_freed_heap_pages_go_back_to_the_system():
    # many small blocks (below glibc's mmap threshold, so from the heap, as an update's activations), most
    # of them freed with live ones between: glibc keeps the holes resident until told to trim
    blocks = [b"x" * (64 * 1024) + bytes([i % 256]) for i in range(3000)]  # ~200 MB, every page touched
    kept = blocks[::50]
    del blocks
    before = resident()
    assert models.return_freed_memory()
    after = resident()
    assert before - after > 100 * 2 ** 20, (before, after)
    del kept  # held until the pages around them were measured


def test_importing_mmgrpo_bounds_openmp_spinning_unless_told_otherwise():
    import subprocess
    import sys

    code = "import os, mmgrpo; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    for extra, want in (({}, "10000 None"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "None ACTIVE"),
                        ({"GOMP_SPINCOUNT": "300000"}, "300000 None")):
        out = subprocess.run([sys.executable, "-c", code], env={**clean, **extra}, capture_output=True, text=True)
        assert out.stdout.split("\n")[0] == want, (extra, out.stdout, out.stderr[-500:])
