"""One seed of a multi-seed `mmgrpo compare`, in its seed-S folder, so that seeds run side by side
(one process per core) instead of one after another. Seeds after the first run the prompts arm first
and then take the first seed's baseline (compare.share_baseline); when every seed is done,
`mmgrpo compare --resume ROOT` finds their arms finished and writes the summary over seeds.

    python studies/compare_seed.py --task papillon --root runs/compare-papillon-seeds3 --seeds 3 \\
        --test-limit 60 --seed 1 [--arms weights]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from mmgrpo.compare import ARMS, PRESETS, _open, run_seed
from mmgrpo.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True, choices=sorted(PRESETS))
    ap.add_argument("--root", required=True, help="the comparison folder (created with its settings if new)")
    ap.add_argument("--seeds", type=int, required=True, help="how many seeds the comparison has")
    ap.add_argument("--seed", type=int, required=True, help="the run seed this process runs")
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], help="a config override, as for mmgrpo compare")
    ap.add_argument("--arms", nargs="+", choices=[a for a, _ in ARMS],
                    help="run only these arms now, the others later (prompts_weights reuses the prompts arm's "
                         "search only if that arm has finished)")
    args = ap.parse_args()
    cfg = load_config(None, overrides=[f"task.name={args.task}", *args.set], defaults=PRESETS[args.task])
    root = Path(args.root)
    _open(cfg, root, args.test_limit, ARMS, args.seeds)  # refuses a folder started with other settings
    if not cfg.seed <= args.seed < cfg.seed + args.seeds:
        raise SystemExit(f"--seed {args.seed} is not one of the comparison's seeds {cfg.seed}..{cfg.seed + args.seeds - 1}")
    run_seed(cfg, root, args.seed, args.test_limit, only=tuple(args.arms) if args.arms else None)
    print(f"seed {args.seed}: done; when every seed is, `mmgrpo compare --resume {root}` summarises them")


if __name__ == "__main__":
    main()
