"""Does the main job (`./run.sh demo`) learn whatever the seed, and which setting makes it? Dev only.

Each (variant, seed) is `mmgrpo train examples/banking77_demo.toml` with the variant's overrides and
`run.seed`, in its own folder `OUT/runs/<variant>-s<seed>-<time>`; a finished folder (summary.json) is
read, not rerun. The summary, studies/results/demo_seeds.json, holds each run's dev by step, training
reward and sampled entropy by step, and per variant the mean and sd over seeds of the final and best dev.
With --test, each run's result (its best adapter by dev) is also scored once on the 200 test examples,
paired against the untrained model on the same examples.

Usage: python studies/demo_seeds.py [--variants lr1e-4 lr3e-5 beta0.04] [--seeds 0 1 2] [--test] [--out runs/demostudy]
Side by side, one run per core: OMP_NUM_THREADS=1 taskset -c 0 python studies/demo_seeds.py --variants A ... &
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "examples" / "banking77_demo.toml"
VARIANTS = {  # name -> --set overrides of the demo config (whose learning rate was 1e-4 until this study)
    "lr1e-4": ["grpo.learning_rate=1e-4"],
    "lr3e-5": ["grpo.learning_rate=3e-5"],
    "beta0.04": ["grpo.learning_rate=1e-4", "grpo.beta=0.04"],  # KL to the adapter-off model
    # what the loss is normalized over: every sampled completion, or only those in groups with signal
    "denom-batch": ["grpo.loss_denominator=batch"],
    "denom-informative": ["grpo.loss_denominator=informative"],
    # the registered losses beyond the clipped ratio; with one iteration a batch (the demo's) the ratio is
    # 1 and GSPO's gradient is GRPO's, CISPO's DAPO's: two iterations make them differ
    "gspo": ["grpo.loss_type=gspo"],
    "cispo": ["grpo.loss_type=cispo"],
    "grpo-mu2": ["grpo.num_iterations=2"],
    "gspo-mu2": ["grpo.loss_type=gspo", "grpo.num_iterations=2"],
    "cispo-mu2": ["grpo.loss_type=cispo", "grpo.num_iterations=2"],
    # the model in bfloat16 (faster on a CPU with native bf16), against denom-batch: the same run in
    # float32 (on the demo's short prompts the update kernel is "packed" either way)
    "bf16": ["model.dtype=bfloat16", "grpo.loss_denominator=batch"],
    # rollouts and dev sampled by a bfloat16 copy of the weights, the update in float32
    "bf16-sampler": ["model.sampler_dtype=bfloat16", "grpo.loss_denominator=batch"],
    # the configuration's defaults as they are now, the reference of the two below
    "defaults": [],
    # the update's matrix products in bfloat16 (autocast), its weights, logits and log-probs in float32
    "bf16-update": ["model.update_dtype=bfloat16"],
    # rollouts of step t sampled by the weights after step t - 2, during step t - 1's update
    "lag1": ["rollout.max_policy_lag=1"],
}


def run(out: Path, variant: str, seed: int) -> Path:
    name = f"{variant}-s{seed}"
    found = sorted((out / "runs").glob(f"{name}-2*"))
    if found and (found[-1] / "summary.json").exists():
        return found[-1]
    sets = [f"run.seed={seed}", f"run.name={name}", f"run.out={out / 'runs'}", "run.progress=false", *VARIANTS[variant]]
    cmd = [sys.executable, "-m", "mmgrpo.cli", "train", str(CONFIG), *[a for s in sets for a in ("--set", s)]]
    if found:
        cmd += ["--resume", str(found[-1])]
    subprocess.run(cmd, check=True)
    return sorted((out / "runs").glob(f"{name}-2*"))[-1]


def test_scores(out: Path, name: str, what: list[str]) -> dict:
    """`mmgrpo eval ... --split test` once (kept in OUT/evals/NAME); its results.json."""
    found = sorted((out / "evals" / name).glob("eval-*/results.json"))
    if not found:
        subprocess.run([sys.executable, "-m", "mmgrpo.cli", "eval", *what, "--split", "test",
                        "--out", str(out / "evals" / name)], check=True)
        found = sorted((out / "evals" / name).glob("eval-*/results.json"))
    return json.loads(found[-1].read_text())


def _sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def read(folder: Path) -> dict:
    dev = [json.loads(x) for x in (folder / "dev.jsonl").read_text().splitlines() if x.strip()]
    steps = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {"folder": folder.name, "dev_by_step": {d["step"]: round(d["dev"], 4) for d in dev},
            "final_dev": dev[-1]["dev"], "best_dev": max(d["dev"] for d in dev),
            "eval_max_tokens": dev[-1].get("eval_max_tokens", 256),
            "wall_s": round(sum(d.get("eval_s", 0) for d in dev) + sum(s.get("rollout_s", 0) + s.get("update_s", 0)
                                                                        for s in steps)),
            "reward_by_step": [round(s["reward_mean"], 3) for s in steps],
            "entropy_by_step": [round(s["entropy"], 3) for s in steps],
            "mismatch_by_step": [round(s["mismatch_mean"], 5) for s in steps if "mismatch_mean" in s]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=sorted(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--test", action="store_true", help="score each run's result on test, paired with the start")
    ap.add_argument("--out", default="runs/demostudy")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    if args.test:
        from mmgrpo.compare import paired_diff

        base = test_scores(out, "untrained", ["--task", "banking77", "--n-labels", "10", "--n-demos", "5",
                                              "--no-reasoning"])
    path = HERE / "results" / "demo_seeds.json"
    for v in args.variants:
        runs = {}
        for s in args.seeds:
            folder = run(out, v, s)
            runs[s] = read(folder)
            if args.test:
                res = test_scores(out, folder.name, ["--run", str(folder)])
                assert res["ids"] == base["ids"], "test examples differ from the untrained model's"
                runs[s].update(test=res["mean"], test_n=res["n"], test_untrained=base["mean"],
                               test_gain_paired=paired_diff(res["scores"], base["scores"]))
                print(f"{v} seed {s}: test {base['mean']:.3f} -> {res['mean']:.3f}, paired "
                      "{:+.3f} ± {:.3f}".format(*runs[s]["test_gain_paired"]), flush=True)
            record(path, v, s, runs[s])  # each run as it finishes: a stopped study keeps what it measured
        entry = json.loads(path.read_text())[v]  # with the seeds other processes recorded
        finals = [r["final_dev"] for r in entry["runs"].values()]
        print(f"{v:10s} final dev {statistics.mean(finals):.3f} (sd {_sd(finals):.3f}) "
              f"best {entry['best_dev_mean']:.3f}  by seed {[round(x, 3) for x in finals]}", flush=True)
    print(f"wrote {path}")


def record(path: Path, variant: str, seed: int, result: dict) -> None:
    """Add one finished run to the results file (other variants and seeds kept), atomically."""
    old = json.loads(path.read_text()) if path.exists() else {}
    entry = old.setdefault(variant, {"overrides": VARIANTS[variant], "runs": {}})
    entry["runs"][str(seed)] = result
    finals, bests = [r["final_dev"] for r in entry["runs"].values()], [r["best_dev"] for r in entry["runs"].values()]
    entry.update(seeds=sorted(int(k) for k in entry["runs"]), final_dev_mean=statistics.mean(finals),
                 final_dev_sd=_sd(finals), best_dev_mean=statistics.mean(bests), best_dev_sd=_sd(bests))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(old, indent=2) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    main()
