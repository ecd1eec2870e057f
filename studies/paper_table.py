"""The paper's table from `mmgrpo compare` folders: tasks x four arms, held-out test score with its
95% CI, the paired difference of prompts -> weights against each other arm, wall time, LM calls.

    python studies/paper_table.py runs/compare-banking77-* runs/compare-multihop-* runs/compare-papillon-*

Reads each folder's results.json (a `--seeds N` folder's summary too: means per seed, the seed sd) and prints a Markdown table, then
for each task whether prompts -> weights beat both single levers with a paired CI excluding 0.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ARMS = (("baseline", "baseline"), ("prompts", "prompts"), ("weights", "weights"),
        ("prompts_weights", "prompts → weights"))


def rows(result: dict) -> list[str]:
    out = []
    for key, label in ARMS:
        a = result["arms"][key]
        diff = a.get("vs_prompts_weights")
        paired = f"{diff[0]:+.3f} ± {diff[1]:.3f}" if diff and key != "prompts_weights" else ""
        spread = f" (seed sd {a['seed_sd']:.3f})" if "seed_sd" in a else ""  # a --seeds N summary
        out.append(f"| {result['task']} | {label} | {a['test']:.3f} ± {a['test_ci95']:.3f}{spread} | {a['test_n']} | "
                   f"{paired} | {a['seconds']:,.0f} | {a['lm_calls']:,.0f} |")
    return out


def verdict(result: dict) -> str:
    arms = result["arms"]
    wins = [k for k in ("prompts", "weights")
            if arms[k].get("vs_prompts_weights") and arms[k]["vs_prompts_weights"][0] - arms[k]["vs_prompts_weights"][1] > 0]
    return (f"{result['task']}: prompts → weights above both single levers with the paired CI excluding 0: "
            f"{'yes' if len(wins) == 2 else 'no'} (significantly above: {', '.join(wins) or 'neither'})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path, help="compare folders (or their results.json)")
    args = ap.parse_args()
    results = []
    for f in args.folders:
        path = f / "results.json" if f.is_dir() else f
        if not path.exists():
            raise SystemExit(f"{path}: no results.json (is the comparison finished? `mmgrpo compare --resume {f}`)")
        results.append(json.loads(path.read_text()))
    print("| task | arm | test ± 95% CI | n | prompts → weights minus arm (paired 95% CI) | wall s | LM calls |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print("\n".join(rows(r)))
    print()
    for r in results:
        print(verdict(r))


if __name__ == "__main__":
    main()
