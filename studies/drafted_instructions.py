"""Do the 135M proposer's drafted instructions cost the many-hop search anything? For each seed of the
kept 5-seed comparison whose search chose a drafted instruction, score its chosen prompts next to the
same demos under the starting instructions, paired, on 60 training examples that neither the search
(demos from train[:20], validation train[20:50]) nor dev or test saw: train[50:110].

Usage: python studies/drafted_instructions.py [--seeds 3 1 0 2] [--n 60] [--out F]; writes
studies/results/drafted_instructions.json after every seed (a killed run keeps the seeds it finished).
Seed 2's search kept no demos, so its starting-instructions variant is the untouched program.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mmgrpo.compare import PRESETS, paired_diff
from mmgrpo.rollout import evaluate
from mmgrpo.tasks import get_task

HERE = Path(__file__).parent
ARMS = HERE / "arms" / "compare-multihop-seeds5"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[3, 1, 0, 2])
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "drafted_instructions.json",
                    help="one file per process when seeds run side by side")
    args = ap.parse_args()
    from mmgrpo.lm.hf import HFBackend

    task = get_task("multihop", **PRESETS["multihop"]["task_options"])
    held_out = task.train[50: 50 + args.n]
    start = task.make_program().prompt_state()
    lm = HFBackend.load()
    out_path = args.out
    rows = json.loads(out_path.read_text()) if out_path.exists() else {}
    for seed in args.seeds:
        if str(seed) in rows:
            continue
        chosen = json.loads((ARMS / f"seed-{seed}" / "prompts" / "prompts_step0.json").read_text())["prompts"]
        drafted = [m for m in chosen if chosen[m]["instruction"] != start[m]["instruction"]]
        if not drafted:
            print(f"seed {seed}: the search kept the starting instructions; nothing to compare")
            continue
        restored = {m: {"instruction": start[m]["instruction"], "demos": chosen[m]["demos"]} for m in chosen}
        scores = {}
        for name, state in (("chosen", chosen), ("start_instructions", restored)):
            program = task.make_program()
            program.load_prompt_state(state)
            t0 = time.time()
            res = evaluate(program, held_out, task.metric, lm, concurrency=32, seed=seed, desc=f"seed {seed} {name}")
            scores[name] = {"mean": res.mean, "ci95": res.ci95, "counts": res.counts, "scores": res.scores,
                            "seconds": time.time() - t0}
        diff = paired_diff(scores["chosen"]["scores"], scores["start_instructions"]["scores"])
        rows[str(seed)] = {"drafted_modules": drafted, "instructions": {m: chosen[m]["instruction"] for m in drafted},
                           "demos": {m: len(chosen[m]["demos"]) for m in chosen}, "n": len(held_out),
                           "examples": "train[50:%d]" % (50 + len(held_out)), **scores,
                           "chosen_minus_start": diff}
        print(f"seed {seed}: drafted {drafted}; chosen {scores['chosen']['mean']:.3f}, start instructions "
              f"{scores['start_instructions']['mean']:.3f}, paired {diff[0]:+.3f} ± {diff[1]:.3f} (n={len(held_out)})")
        out_path.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
