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

from mmgrpo.runlog import diff_ci, signed

ARMS = (("baseline", "baseline"), ("prompts", "prompts"), ("weights", "weights"),
        ("prompts_weights", "prompts → weights"))


def rows(result: dict) -> list[str]:
    out = []
    for key, label in ARMS:
        a = result["arms"][key]
        diff = a.get("vs_prompts_weights")
        paired = diff_ci(diff) if diff and key != "prompts_weights" else ""
        spread = f" (seed sd {a['seed_sd']:.3f})" if "seed_sd" in a else ""  # a --seeds N summary
        out.append(f"| {result['task']} | {label} | {a['test']:.3f} ± {a['test_ci95']:.3f}{spread} | {a['test_n']} | "
                   f"{paired} | {a['seconds']:,.0f} | {a['lm_calls']:,.0f} |")
    return out


T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def by_seed(result: dict, arm: str) -> str:
    """The same difference with the seed as the unit: mean of the seeds' test differences and a
    t interval over them. Stricter than the per-example CI, which counts only test-set noise."""
    a, b = result["arms"]["prompts_weights"].get("test_by_seed"), result["arms"][arm].get("test_by_seed")
    if not a or len(a) < 2 or len(a) - 1 not in T975:
        return ""
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    sd = (sum((x - mean) ** 2 for x in d) / (len(d) - 1)) ** 0.5
    return (f"; over {len(d)} seeds minus {arm}: " + " / ".join(signed(x) for x in d)
            + f", mean {signed(mean)} ± {T975[len(d) - 1] * sd / len(d) ** 0.5:.3f} (t, seeds as the unit)")


def verdict(result: dict) -> str:
    arms = result["arms"]
    wins = [k for k in ("prompts", "weights")
            if arms[k].get("vs_prompts_weights") and arms[k]["vs_prompts_weights"][0] - arms[k]["vs_prompts_weights"][1] > 0]
    return (f"{result['task']}: prompts → weights above both single levers with the paired CI excluding 0: "
            f"{'yes' if len(wins) == 2 else 'no'} (significantly above: {', '.join(wins) or 'neither'})"
            + by_seed(result, "prompts"))


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
