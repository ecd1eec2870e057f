"""Which mmGRPO settings make prompts -> weights (or mmGRPO alone) learn, on dev only (test is never scored here).

One prompt search (the task's `compare` preset), then one prompts -> weights run per variant from
that same search result, each variant changing one setting of the preset: the update with or
without the demos in its prompt, loss normalization, learning rate, group level, ... With
`--strategy weights` there is no search and each variant trains the program as it is. Every run
keeps its folder (metrics.jsonl with per-module statistics, dev.jsonl), and the summary is
studies/results/<task>_settings[_<tag>].json. Finished variants are skipped when the study is run again.

Usage: python studies/composition_settings.py --task banking77 [--variants base no_demos dapo]
       [--strategy weights] [--set SECTION.KEY=VALUE ...] [--out runs/study-settings] [--tag NAME]
A setting long enough to show a slope: --set run.steps=30 (the summary has each run's reward slope).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

from long_run import slope

from mmgrpo.compare import PRESETS
from mmgrpo.config import load_config

VARIANTS = {  # name -> overrides of the preset (config attribute names)
    "base": {},
    "no_demos": {"train_with_demos": False},  # the reference implementation trains without the demos
    "dapo": {"loss_type": "dapo"},
    "lr3e-4": {"learning_rate": 3e-4},
    "lr3e-5": {"learning_rate": 3e-5},
    "lr1e-5": {"learning_rate": 1e-5},  # the paper's
    "lr1e-4": {"learning_rate": 1e-4},
    "dr_grpo": {"loss_type": "dr_grpo"},
    "gspo": {"loss_type": "gspo"},
    "cispo": {"loss_type": "cispo"},
    "trajectory_cispo": {"group_level": "trajectory", "loss_type": "cispo"},  # the paper's best HoVer setting
    "g12": {"group_size": 12},  # the paper's group size
    "tokens128": {"max_tokens": 128},  # replies cut less often (PAPILLON's modules ask for up to 128)
    "mask_truncated": {"mask_truncated": True},  # replies cut at the budget left out of the update
    "trajectory": {"group_level": "trajectory"},  # the paper's ablation: one group per example
    "t1.0": {"temperature": 1.0},
    "g16": {"group_size": 16, "batch_examples": 4},  # same trajectories per step, bigger groups
    "b16": {"batch_examples": 16},  # twice the examples per step
    "g8": {"group_size": 8},  # twice the trajectories per step, as bigger groups (presets with G = 4)
    "b8": {"batch_examples": 8},  # twice the trajectories per step, as more examples (presets with 4 a step)
}


def summarize(folder: Path) -> dict:
    """A finished run's dev and training figures, by step, and by module where the run logs them."""
    from mmgrpo.runlog import RunDir

    run = RunDir(folder)
    devs, steps = run.read_log("dev.jsonl"), run.read_log()
    return {"dev_by_step": {d["step"]: d["dev"] for d in devs}, "dev_ci95_last": devs[-1]["dev_ci95"],
            "dev_n": devs[-1]["dev_n"], "best_dev": max(d["dev"] for d in devs), "final_dev": devs[-1]["dev"],
            "reward_by_step": [round(s["reward_mean"], 4) for s in steps],
            "reward_slope": slope([s["reward_mean"] for s in steps]),  # with its 95% CI
            "entropy_by_step": [round(s["entropy"], 3) for s in steps],
            "groups_used_by_step": [s["groups_used"] for s in steps],
            "parse_failures_by_step": [s["n_parse_failure"] for s in steps],
            # per module and step: groups trained, groups skipped (for equal rewards or otherwise), entropy
            "modules_by_step": [{m: {"used": v["groups_used"], "skipped": sum(v["groups_skipped"].values()),
                                     "entropy": None if v.get("entropy") is None else round(v["entropy"], 3)}
                                 for m, v in s.get("modules", {}).items()}
                                for s in steps]}


def known_start(root: Path, name: str) -> dict | None:
    """Another variant's step-0 dev record: every variant starts from the same program (the same search,
    or none) and dev is scored greedily, so the start is measured once, not once per variant."""
    for log in sorted(root.glob("*/dev.jsonl")):
        first = log.read_text().splitlines()[:1]
        rec = json.loads(first[0]) if first and log.parent.name not in (name, "search") else None
        if rec and rec["step"] == 0:
            return {**{k: rec[k] for k in ("dev", "dev_ci95", "dev_n", "dev_counts")}, "reused_from": log.parent.name}
    return None


def run_variant(cfg, root: Path, name: str, search: Path | None) -> dict:
    from mmgrpo.compose import run as run_strategy
    from mmgrpo.grpo.run import build

    folder = root / name
    done = folder / "variant.json"
    if done.exists():  # finished: its figures read again from its folder
        return {**json.loads(done.read_text()), **summarize(folder)}
    strategy = "prompts -> weights" if search else "weights"
    vcfg = dataclasses.replace(cfg, **VARIANTS[name], strategy=strategy, name=name, out=str(root))
    resumed = (folder / "config.json").exists()
    job = build(vcfg, resume=str(folder) if resumed else None, path=folder)
    start = known_start(root, name)
    if start and start["dev_n"] == len(job.dev):
        job.known_dev[0] = start
    if search:
        shutil.copyfile(search, folder / "prompts_step0.json")  # the same search for every variant
    t0 = time.time()
    run_strategy(vcfg, job=job)
    rec = {"variant": name, "strategy": strategy, "overrides": VARIANTS[name], **summarize(folder),
           "seconds": time.time() - t0, "resumed": resumed}
    done.write_text(json.dumps(rec, indent=2) + "\n")
    if hasattr(job.backend, "close"):
        job.backend.close()
    return rec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="banking77", choices=sorted(PRESETS))
    ap.add_argument("--variants", nargs="+", default=["base", "no_demos", "dapo", "lr3e-4"], choices=sorted(VARIANTS))
    ap.add_argument("--strategy", default="prompts -> weights", choices=["prompts -> weights", "weights"])
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--out", default="runs/study-settings")
    ap.add_argument("--tag", default="", help="summary file <task>_settings_<tag>.json: studies of other presets apart")
    args = ap.parse_args()
    cfg = load_config(None, overrides=[f"task.name={args.task}", "run.progress=false", *args.set],
                      defaults=PRESETS[args.task])
    root = Path(args.out) / args.task / ("weights" if args.strategy == "weights" else "")
    root.mkdir(parents=True, exist_ok=True)
    search = root / "search" / "prompts_step0.json" if args.strategy != "weights" else None
    if search and not search.exists():  # the prompt search alone, once
        from mmgrpo.compose import run as run_strategy
        from mmgrpo.grpo.run import build

        pcfg = dataclasses.replace(cfg, strategy="prompts", name="search", out=str(root))
        resumed = (root / "search" / "config.json").exists()
        run_strategy(pcfg, job=build(pcfg, resume=str(root / "search") if resumed else None, path=root / "search"))
    rows = []
    for name in args.variants:
        rec = run_variant(cfg, root, name, search)
        rows.append(rec)
        print(json.dumps({k: rec[k] for k in ("variant", "dev_by_step", "best_dev", "seconds")}), flush=True)
    out = Path(__file__).parent / "results" / f"{args.task}_settings{'_' + args.tag if args.tag else ''}.json"
    old = {r["variant"]: r for r in json.loads(out.read_text())} if out.exists() else {}
    old.update({r["variant"]: r for r in rows})
    out.write_text(json.dumps(list(old.values()), indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
