"""Keep the finished arms of a `mmgrpo compare` folder in the repository, and put them back, so that a
comparison too long for one sitting (many-hop over 5 seeds: ~1.5 CPU-hours a seed) continues in the
next from a clean checkout instead of starting again.

    python studies/keep_arms.py save runs/compare-multihop-seeds5      # -> studies/arms/compare-multihop-seeds5/
    python studies/keep_arms.py restore studies/arms/compare-multihop-seeds5 runs/

A finished arm is one with arm.json: `mmgrpo compare --resume` and `studies/compare_seed.py` skip it.
Only its records travel (arm.json, the prompt search's prompts_step0.json that prompts -> weights
reuses, dev.jsonl for the plot, metrics.jsonl for the per-module figures), never adapters or
checkpoints; an unfinished arm is left out and runs from its start when the comparison is resumed.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

KEEP = ("arm.json", "prompts_step0.json", "dev.jsonl", "metrics.jsonl")
SUMMARY = ("compare.json", "results.json", "table.txt")


def copy_records(src: Path, dst: Path) -> list[str]:
    """Copy the comparison's settings and every finished arm's records from src to dst; returns
    the arms copied, as seed-S/arm or arm."""
    if not (src / "compare.json").exists():
        raise SystemExit(f"{src} is not a comparison folder (no compare.json)")
    copied = []
    for folder in [src, *sorted(p for p in src.glob("seed-*") if p.is_dir())]:
        rel = folder.relative_to(src)
        for name in SUMMARY:
            if (folder / name).exists():
                (dst / rel).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(folder / name, dst / rel / name)
        for arm in sorted(p for p in folder.iterdir() if (p / "arm.json").exists()):
            (dst / rel / arm.name).mkdir(parents=True, exist_ok=True)
            for name in KEEP:
                if (arm / name).exists():
                    shutil.copyfile(arm / name, dst / rel / arm.name / name)
            copied.append(str(rel / arm.name))
    return copied


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save", help="runs/<comparison> -> studies/arms/<comparison>")
    s.add_argument("folder", type=Path)
    r = sub.add_parser("restore", help="studies/arms/<comparison> -> OUT/<comparison>")
    r.add_argument("kept", type=Path)
    r.add_argument("out", type=Path)
    args = ap.parse_args()
    if args.cmd == "save":
        dst = Path(__file__).parent / "arms" / args.folder.name
        copied = copy_records(args.folder, dst)
    else:
        dst = args.out / args.kept.name
        found = next(dst.glob("**/arm.json"), None)
        if found:
            raise SystemExit(f"{dst} already has finished arms ({found.parent}); restore into an empty folder")
        copied = copy_records(args.kept, dst)
    print(f"{dst}: {len(copied)} finished arm(s): {', '.join(copied) or 'none'}")


if __name__ == "__main__":
    main()
