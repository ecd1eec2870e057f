"""Does a settings study's dev gain hold on examples no run saw? Dev (n=30 on PAPILLON) both chooses
each run's adapter and reports it, and on PAPILLON every trained arm of the comparisons rose on dev
and not on test. This scores the untouched program and each named run's result (its adapter chosen by
dev) on training examples that none of the runs trained on (greedy, paired by example), so the settings
can be told apart without touching test.

Usage: python studies/heldout_adapters.py --task papillon RUN [RUN ...] [--n 40] [--out F]
Each RUN is a finished run folder (e.g. runs/study-settings/papillon/weights/t1.0); the results file
(default studies/results/<task>_heldout_adapters.json) is written after every program, and a program
already in it is not scored again.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mmgrpo.compare import PRESETS, paired_diff
from mmgrpo.grpo.run import batch_for_step
from mmgrpo.rollout import evaluate
from mmgrpo.runlog import diff_ci, pm
from mmgrpo.tasks import get_task

HERE = Path(__file__).parent


def trained_ids(folder: Path, train: list) -> set[str]:
    """The training examples a run's steps drew (the run's own seed, batch size and steps)."""
    cfg = json.loads((folder / "config.json").read_text())["config"]
    steps = len([line for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()])
    return {ex.id for s in range(1, steps + 1) for ex in batch_for_step(train, s, cfg["batch_examples"], cfg["seed"])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--task", default="papillon", choices=sorted(PRESETS))
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from mmgrpo.result import load

    out = args.out or HERE / "results" / f"{args.task}_heldout_adapters.json"
    task = get_task(args.task, **PRESETS[args.task].get("task_options", {}))
    seen = set().union(*(trained_ids(r, task.train) for r in args.runs))
    held_out = [ex for ex in reversed(task.train) if ex.id not in seen][: args.n]  # the split's end: no search uses it
    ids = [ex.id for ex in held_out]
    rows = json.loads(out.read_text()) if out.exists() else {}
    if rows and rows.get("ids") != ids:
        raise SystemExit(f"{out} holds scores on other examples; pass another --out")
    rows["ids"] = ids
    for folder in [None, *args.runs]:
        name = "untouched" if folder is None else folder.name
        if name in rows.get("programs", {}):
            continue
        t0 = time.time()
        if folder is None:
            from mmgrpo.lm.hf import HFBackend

            program, lm, metric = task.make_program(), HFBackend.load(), task.metric
        else:
            res = load(folder / "result")
            program, lm, metric = res.program, res.backend, res.metric
        r = evaluate(program, held_out, metric, lm, concurrency=16, seed=0, desc=name)
        rows.setdefault("programs", {})[name] = {"run": None if folder is None else str(folder), "mean": r.mean,
                                                 "ci95": r.ci95, "counts": r.counts, "scores": r.scores,
                                                 "seconds": time.time() - t0}
        line = f"{name}: {r.mean:.3f} {pm(r.ci95)}"
        if folder is not None:
            d = paired_diff(r.scores, rows["programs"]["untouched"]["scores"])
            rows["programs"][name]["minus_untouched"] = d
            line += f", minus untouched {diff_ci(d)}"
        print(f"{line} (n={r.n}, {time.time() - t0:.0f} s)", flush=True)
        out.write_text(json.dumps(rows, indent=2) + "\n")
        del program, lm


if __name__ == "__main__":
    main()
