"""A long mmGRPO run that survives being stopped: its run folder lives under studies/long_runs/ (records
committed as it goes with --commit-every, the latest checkpoint at the end of each call), each call
continues it, and --minutes ends a call cleanly (Ctrl-C: the last checkpoint is kept). The summary,
studies/results/long_<name>.json, holds the training reward by step with its least-squares slope and 95%
CI, and dev by step (plotted in docs/img/long_<name>_reward.png and _dev.png); once the run is finished,
the adapter dev chose and the untouched program are scored once on the full test split
(studies/long_runs/evals/), with their paired difference.

Usage: python studies/long_run.py banking77 [--steps 100] [--minutes 40] [--set SECTION.KEY=VALUE ...]
Runs: banking77 (the README demo's program and settings, 100 dev examples every 10 steps), multihop and
papillon (studies/configs/long_*.toml: the compare preset's step, dev every 10 steps).
"""
from __future__ import annotations

import argparse
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RUNS = {  # name -> (config, overrides, `mmgrpo eval` arguments of the untouched program)
    "banking77": (ROOT / "examples" / "banking77_demo.toml",
                  ["run.eval_every=10", "run.eval_examples=100", "run.checkpoint_every=5", "run.keep_checkpoints=1"],
                  ["--task", "banking77", "--n-labels", "10", "--n-demos", "5", "--no-reasoning", "--max-tokens", "24"]),
    "multihop": (HERE / "configs" / "long_multihop.toml", [],
                 ["--task", "multihop", "--task-option", "first_k=1", "--max-tokens", "48"]),
    "papillon": (HERE / "configs" / "long_papillon.toml", [], ["--task", "papillon", "--max-tokens", "64"]),
}
T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 8: 2.31, 10: 2.23, 15: 2.13, 20: 2.09, 30: 2.04,
        60: 2.00, 120: 1.98}


def t975(df: int) -> float:
    """Student's t quantile for a two-sided 95% CI (the nearest tabled df at or below)."""
    return T975[max(k for k in T975 if k <= max(df, 1))]


def slope(ys: list[float]) -> dict:
    """Least-squares slope of ys over steps 1..n, with its 95% CI."""
    n = len(ys)
    if n < 3:
        return {"n": n}
    xs = range(1, n + 1)
    mx, my = (n + 1) / 2, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    resid = sum((y - my - b * (x - mx)) ** 2 for x, y in zip(xs, ys))
    se = math.sqrt(resid / (n - 2) / sxx)
    return {"n": n, "slope": b, "ci95": t975(n - 2) * se, "per_100_steps": 100 * b}


def test_scores(name: str, what: list[str]) -> dict:
    """`mmgrpo eval ... --split test` once (kept under long_runs/evals/NAME); its results.json."""
    out = HERE / "long_runs" / "evals" / name
    found = sorted(out.glob("eval-*/results.json"))
    if not found:
        subprocess.run([sys.executable, "-m", "mmgrpo.cli", "eval", *what, "--split", "test", "--out", str(out)],
                       check=True)
        found = sorted(out.glob("eval-*/results.json"))
    return json.loads(found[-1].read_text())


def paired(a: dict, b: dict) -> dict:
    """Mean of a - b over the examples both scored, with its 95% CI (normal)."""
    sb = dict(zip(b["ids"], b["scores"]))
    d = [x - sb[i] for i, x in zip(a["ids"], a["scores"]) if i in sb]
    m = sum(d) / len(d)
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1)) if len(d) > 1 else float("nan")
    return {"n": len(d), "diff": m, "ci95": 1.96 * sd / math.sqrt(len(d))}


def summarize(name: str, run: Path) -> dict:
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] if (run / "metrics.jsonl").exists() else []
    dev = [json.loads(x) for x in (run / "dev.jsonl").read_text().splitlines()] if (run / "dev.jsonl").exists() else []
    rewards = [m["reward_mean"] for m in metrics]
    out = {"run": str(run.relative_to(ROOT)), "steps_done": len(metrics),
           "trajectories": sum(m.get("n_ok", 0) + m.get("n_parse_failure", 0) + m.get("n_error", 0) for m in metrics),
           "reward_by_step": [round(r, 4) for r in rewards], "reward_slope": slope(rewards),
           "dev_by_step": {d["step"]: {"dev": d["dev"], "ci95": d.get("dev_ci95"), "n": d.get("dev_n")} for d in dev},
           "wall_s": round(sum(m.get("rollout_s", 0) + m.get("update_s", 0) for m in metrics) + sum(d.get("eval_s", 0) for d in dev))}
    if (run / "summary.json").exists():  # finished: test once, the chosen adapter against the untouched program
        trained = test_scores(f"{name}-trained", ["--run", str(run)])
        untouched = test_scores(f"{name}-untouched", RUNS[name][2])
        out["test"] = {"trained": {k: trained[k] for k in ("mean", "ci95", "n")},
                       "untouched": {k: untouched[k] for k in ("mean", "ci95", "n")},
                       "trained_minus_untouched": paired(trained, untouched)}
    (HERE / "results" / f"long_{name}.json").write_text(json.dumps(out, indent=1) + "\n")
    if metrics:
        from mmgrpo.report import run_plots

        for key, (_, png) in run_plots(metrics, dev).items():
            if key in ("reward", "dev"):  # the pages' plots: docs/img/long_NAME_reward.png, _dev.png
                (ROOT / "docs" / "img" / f"long_{name}_{key}.png").write_bytes(png)
    return out


def commit(name: str, checkpoint: bool) -> None:
    """Commit the run's records and the summary; with ``checkpoint``, its latest finished checkpoint too
    (never one being written). A checkpoint is ~70 MB (adapter, optimizer state, best adapter) and each
    one committed adds itself and removes the one before from the history's diffs: so only at the end of a
    call, while the records go in as often as asked."""
    run = sorted((HERE / "long_runs").glob(f"{name}-2*"))[-1]
    latest = run / "checkpoints" / "latest"
    paths = [p for p in run.iterdir() if p.name not in ("checkpoints", "best_adapter")]
    if checkpoint and latest.exists():
        paths += [latest, run / "checkpoints" / latest.read_text().strip()]
    extra = [HERE / "results" / f"long_{name}.json",
             *(ROOT / "docs" / "img" / f"long_{name}_{k}.png" for k in ("reward", "dev"))]
    paths += [p for p in extra if p.exists()]
    git = ["git", "-C", str(ROOT)]
    metrics = run / "metrics.jsonl"
    step = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    try:
        if checkpoint:  # the old checkpoint leaves the index, the latest enters it
            subprocess.run([*git, "rm", "-r", "-q", "--cached", "--ignore-unmatch", str(run / "checkpoints")],
                           check=True)
        subprocess.run([*git, "add", "-A", "-f", *map(str, paths)], check=True)
        subprocess.run([*git, "commit", "-q", "-m", f"studies: long run {name}, {step} steps"], check=True)
    except subprocess.CalledProcessError as e:  # e.g. the index busy: the next commit catches up
        print(f"long_run: commit skipped ({e})", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("name", choices=list(RUNS))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--minutes", type=float, default=0, help="stop this call cleanly after this long (0: run to the end)")
    ap.add_argument("--commit-every", type=float, default=0, metavar="MIN",
                    help="commit the run's records to git this often, and at the end with its latest checkpoint")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    config, overrides, _ = RUNS[args.name]
    out = HERE / "long_runs"
    found = sorted(out.glob(f"{args.name}-2*"))
    if found:  # continue it; --steps may lengthen it
        cmd = ["--resume", str(found[-1]), "--set", f"run.steps={args.steps}"]
    else:
        sets = [*overrides, f"run.steps={args.steps}", f"run.name={args.name}", f"run.out={out}", *args.set]
        cmd = [str(config), *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.Popen([sys.executable, "-m", "mmgrpo.cli", "train", *cmd])
    t0 = last = time.time()
    while proc.poll() is None:
        time.sleep(10)
        if args.minutes and time.time() - t0 > args.minutes * 60:
            proc.send_signal(signal.SIGINT)
            proc.wait()
        elif args.commit_every and time.time() - last > args.commit_every * 60:
            last = time.time()
            commit(args.name, checkpoint=False)
    time.sleep(0.5)
    run = sorted(out.glob(f"{args.name}-2*"))[-1]
    s = summarize(args.name, run)
    if args.commit_every:
        commit(args.name, checkpoint=True)
    sl = s["reward_slope"]
    print(f"{args.name}: {s['steps_done']} steps, reward slope "
          + (f"{sl['per_100_steps']:+.3f} ± {100 * sl['ci95']:.3f} per 100 steps" if "slope" in sl else "n/a")
          + f", dev {[(k, round(v['dev'], 3)) for k, v in s['dev_by_step'].items()]}")


if __name__ == "__main__":
    main()
