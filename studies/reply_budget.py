"""How often a task's replies are cut at the step's token budget, and what that does to the reward:
the rollouts of steps 1..N of a long run's configuration (studies/configs/long_<task>.toml) at each
budget, from the untouched program, with the same seeds. Rollouts only: nothing is trained.

Usage: python studies/reply_budget.py papillon [--budgets 64 128] [--steps 1]
Prints, per budget, the share of LM calls cut (by module), the mean reward and the seconds of rollouts;
the summary is studies/results/reply_budget_<task>.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from mmgrpo.config import load_config
from mmgrpo.grpo.groups import Grouping
from mmgrpo.grpo.run import build
from mmgrpo.grpo.stats import module_stats

HERE = Path(__file__).resolve().parent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("task", choices=["multihop", "papillon"])
    ap.add_argument("--budgets", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--steps", type=int, default=1, help="rollouts of steps 1..N at each budget")
    args = ap.parse_args()
    out = {}
    for budget in args.budgets:
        cfg = load_config(HERE / "configs" / f"long_{args.task}.toml", [f"rollout.max_tokens={budget}"])
        trajectories, secs = [], 0.0
        with tempfile.TemporaryDirectory() as tmp:
            job = build(cfg, path=Path(tmp) / "run")
            for step in range(1, args.steps + 1):
                roll = job.rollouts(step, job.sampler)
                secs += roll.seconds
                trajectories += roll.trajectories
            job.backend.close()
        stats = module_stats(trajectories, Grouping())  # per module: calls, and calls cut at the budget
        calls = {m: v["calls"] for m, v in stats.items()}
        cut = {m: v["truncated"] for m, v in stats.items()}
        rewards = [t.reward for t in trajectories]
        out[budget] = {"cut": cut, "calls": calls, "cut_share": sum(cut.values()) / max(sum(calls.values()), 1),
                       "reward_mean": sum(rewards) / len(rewards), "trajectories": len(rewards), "rollout_s": secs}
        r = out[budget]
        print(f"{args.task}, {budget} tokens: {r['cut_share']:.0%} of calls cut ("
              + ", ".join(f"{m} {cut[m]}/{calls[m]}" for m in calls)
              + f"), reward {r['reward_mean']:.3f} over {r['trajectories']} trajectories, rollouts {secs:.0f}s", flush=True)
    (HERE / "results" / f"reply_budget_{args.task}.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
