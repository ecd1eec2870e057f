"""``mmgrpo compare``: the paper's four-way comparison from one starting point and one budget.

Arms: the program as it is (baseline), prompt optimization alone, mmGRPO alone, and prompt
optimization then mmGRPO. Every arm has its own subfolder of one comparison folder, a fresh copy
of the model, the same config apart from the strategy, and is scored on the held-out test split.
prompts -> weights starts from the prompts arm's search result (the same search, not a second
one) and its cost includes that search. A finished arm writes arm.json and is skipped when the
comparison is resumed; an unfinished one continues from its last checkpoint.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import time
from pathlib import Path

from .config import TrainConfig, with_defaults
from .rollout import evaluate, mean_ci
from .runlog import RunDir, diff_ci, format_table, pm, write_json

ARMS = (("baseline", ""), ("prompts", "prompts"), ("weights", "weights"), ("prompts_weights", "prompts -> weights"))
# the arm whose program a training arm starts from: its dev score is the training arm's step 0, and
# its test score the training arm's when dev keeps the start (an untrained adapter adds exactly zero)
STARTS_FROM = {"weights": "baseline", "prompts_weights": "prompts"}

_BANKING77 = {"task_options": {"n_labels": 10, "n_demos": 0, "reasoning": False, "valid_label_credit": 0.1},
              "steps": 12, "batch_examples": 8, "group_size": 8, "temperature": 0.8, "max_tokens": 24,
              "learning_rate": 3e-5, "eval_every": 4, "eval_examples": 60, "checkpoint_every": 4}
# Budgets sized for a 2-core CPU and the embedded model; each task's settings with the one reason behind them.
PRESETS = {
    "banking77": {**_BANKING77, "prompt_trials": 10, "prompt_minibatch": 20, "prompt_train_examples": 50,
                  "prompt_val_examples": 60},
    "multihop": {"task_options": {"first_k": 1}, "steps": 4, "batch_examples": 4, "group_size": 4,
                 "temperature": 0.8, "max_tokens": 48, "eval_every": 4, "eval_examples": 30, "checkpoint_every": 2,
                 "prompt_trials": 6, "prompt_minibatch": 10, "prompt_train_examples": 20, "prompt_candidates": 3,
                 "prompt_val_examples": 30},
    "papillon": {"steps": 4, "batch_examples": 4, "group_size": 4, "temperature": 0.8, "max_tokens": 64,
                 "eval_every": 4, "eval_examples": 30, "checkpoint_every": 2, "prompt_trials": 6,
                 "prompt_minibatch": 10, "prompt_train_examples": 20, "prompt_candidates": 3, "concurrency": 16,
                 "prompt_val_examples": 30},
}
PRESET_REASONS = {
    "banking77": "zero-shot on 10 intents as in the paper; lr 3e-5, since 1e-4 collapsed entropy (studies/demo_seeds.py)",
    "multihop": "first_k=1: the LM-written queries then carry the recall (0.39 from the claim alone, 0.66 in all)",
    "papillon": "PUPA prompts run to thousands of tokens: 16 programs at a time keep the KV cache in memory",
}
# Every preset's prompt search scores on held-out training examples, so dev judges prompts and adapters unbiased.


def paired_diff(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b over the same examples, with a normal-approximation 95% half-width."""
    return mean_ci([x - y for x, y in zip(a, b, strict=True)])


def _cost(backend, t0: float) -> dict:
    s = backend.stats
    return {"seconds": time.time() - t0, "lm_calls": s["requests"], "gen_tokens": s["generated_tokens"],
            "prompt_tokens": s["prompt_tokens"]}


def _finished(root: Path, name: str | None) -> dict | None:
    path = root / name / "arm.json" if name else None
    return json.loads(path.read_text()) if path and path.exists() else None


def start_record(start: dict, name: str) -> dict:
    """A training arm's step-0 dev record: the dev score of the arm it starts from (``start``, its arm.json)."""
    return {**{k: start[k] for k in ("dev", "dev_ci95", "dev_n", "dev_counts")}, "reused_from": name}


def run_arm(cfg: TrainConfig, root: Path, name: str, strategy: str, test_limit: int | None) -> dict:
    """One arm, scored on dev and test. Scores already measured on the same program are reused, not
    measured again: a training arm's step 0 is the arm it starts from (STARTS_FROM), its final dev
    score is its dev log's at the chosen step, and if dev chose the start its test score is that arm's."""
    from .compose import run as run_strategy
    from .grpo.run import build

    folder = root / name
    arm_cfg = dataclasses.replace(cfg, strategy=strategy, name=name, out=str(root))
    resumed = (folder / "config.json").exists()
    t0 = time.time()
    job = build(arm_cfg, resume=str(folder) if resumed else None, path=folder)
    reused_search = None
    if name == "prompts_weights" and (root / "prompts" / "arm.json").exists():
        # the same search as the prompts arm: reuse its result (compose reloads a saved step)
        shutil.copyfile(root / "prompts" / "prompts_step0.json", folder / "prompts_step0.json")
        reused_search = json.loads((root / "prompts" / "arm.json").read_text())["optimize_cost"]
    task, program, lm = job.task, job.program, job.backend
    dev_ids = [ex.id for ex in job.dev]
    test_set = task.test[:test_limit] if test_limit else task.test
    test_ids = [ex.id for ex in test_set]
    start = _finished(root, STARTS_FROM.get(name))
    if start and start.get("dev_ids") == dev_ids:
        job.known_dev[0] = start_record(start, STARTS_FROM[name])
    optimize_cost = None
    if strategy:
        run_strategy(arm_cfg, job=job)
        optimize_cost = _cost(job.backend, t0) if strategy == "prompts" else None
    reused = []
    chosen = job.best["step"] if job.trained else None
    logged = {r["step"]: r for r in job.run.read_log("dev.jsonl")} if job.trained else {}
    if chosen in logged:
        dev = {k: logged[chosen][k] for k in ("dev", "dev_ci95", "dev_n", "dev_counts")}
        reused.append(f"dev: step {chosen} of the dev log")
    else:
        res = evaluate(program, job.dev, task.metric, lm, concurrency=cfg.concurrency, seed=cfg.seed,
                       max_tokens=cfg.eval_tokens, progress=cfg.progress, desc=f"{name}: dev")
        dev = {"dev": res.mean, "dev_ci95": res.ci95, "dev_n": res.n, "dev_counts": res.counts}
    if chosen == 0 and start and start["test_ids"] == test_ids:
        test = {k: start[k] for k in ("test", "test_ci95", "test_n", "test_counts", "test_scores")}
        reused.append(f"test: {STARTS_FROM[name]} (dev kept the start)")
    else:
        res = evaluate(program, test_set, task.metric, lm, concurrency=cfg.concurrency, seed=cfg.seed,
                       max_tokens=cfg.eval_tokens, progress=cfg.progress, desc=f"{name}: test")
        test = {"test": res.mean, "test_ci95": res.ci95, "test_n": res.n, "test_counts": res.counts,
                "test_scores": res.scores}
    cost = _cost(lm, t0)
    if reused_search:
        cost = {k: cost[k] + reused_search[k] for k in cost}
    rec = {"arm": name, "strategy": strategy or "baseline", **test, "test_ids": test_ids,
           "eval_max_tokens": cfg.eval_tokens,
           **dev, "dev_ids": dev_ids,
           **cost, "optimize_cost": optimize_cost, "includes_reused_search": bool(reused_search),
           "reused_scores": reused, "resumed": resumed, "prompts": program.prompt_state()}
    write_json(folder / "arm.json", rec)
    if hasattr(lm, "close"):
        lm.close()
    del job, lm, program
    gc.collect()
    return rec


def plot(root: Path, rows: dict[str, dict], title: str) -> Path | None:
    """Dev score over mmGRPO steps for the training arms, the other arms as flat lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    colors = {"baseline": "tab:gray", "prompts": "tab:blue", "weights": "tab:orange", "prompts_weights": "tab:green"}
    for name in ("weights", "prompts_weights"):
        devs = RunDir(root / name).read_log("dev.jsonl") if (root / name).exists() else []
        if devs:
            xs, ys, cis = [d["step"] for d in devs], [d["dev"] for d in devs], [d["dev_ci95"] for d in devs]
            ax.plot(xs, ys, marker="o", color=colors[name], label=rows.get(name, {}).get("strategy", name))
            ax.fill_between(xs, [y - c for y, c in zip(ys, cis)], [y + c for y, c in zip(ys, cis)],
                            color=colors[name], alpha=0.12)
    for name in ("baseline", "prompts"):
        if name in rows:
            ax.axhline(rows[name]["dev"], ls="--", color=colors[name], label=f"{name} (dev)")
    ax.set_xlabel("mmGRPO step")
    ax.set_ylabel("dev score")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = root / "compare.png"
    tmp = root / ".compare.png.tmp"
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def saved_settings(folder: str | Path) -> tuple[TrainConfig, dict]:
    """The config a comparison folder was started with, and the rest of its settings as keyword
    arguments of `compare` (test_limit, arms, seeds), to finish it as it began."""
    from .config import from_dict

    saved = Path(folder) / "compare.json"
    if not saved.exists():
        raise FileNotFoundError(f"{folder} is not a comparison folder (no compare.json)")
    settings = json.loads(saved.read_text())
    arms = tuple(a for a in ARMS if a[0] in settings["arms"])
    return from_dict(settings["config"], str(saved)), {"test_limit": settings["test_limit"], "arms": arms,
                                                       "seeds": settings.get("seeds", 1)}


def _open(cfg: TrainConfig, root, test_limit, arms, seeds: int) -> RunDir:
    """The comparison folder, new or resumed; a resumed one must have been started with these settings."""
    run = RunDir.new(cfg.out, f"compare-{cfg.task}") if root is None else RunDir(root)
    saved = run.path / "compare.json"
    settings = {"config": cfg.to_json(), "test_limit": test_limit,
                "arms": [a for a, _ in arms], **({"seeds": seeds} if seeds > 1 else {})}
    if saved.exists():
        old = json.loads(saved.read_text())
        old["config"] = with_defaults(old["config"])
        if 1 < old.get("seeds", 1) < seeds and {**old, "seeds": seeds} == settings:
            write_json(saved, settings)  # more seeds for a finished or unfinished multi-seed comparison
            old = settings
        if old != settings:
            diff = sorted(k for k in old["config"] if old["config"].get(k) != settings["config"].get(k))
            raise ValueError(f"{run.path} was started with other settings (config keys {diff}, test_limit "
                             f"{old['test_limit']}, seeds {old.get('seeds', 1)}); resume with the same ones, "
                             "or start a new comparison")
    else:
        write_json(saved, settings)
    return run


def _finish(run: RunDir, cfg: TrainConfig, rows: dict[str, dict], table: str, notes: list[str], png) -> dict:
    notes = [*notes, f"dev and test: greedy, at most {cfg.eval_tokens} tokens an LM call (run.eval_max_tokens)"]
    summary = {"task": cfg.task, "model": cfg.model, "folder": str(run.path), "plot": str(png), "table": table,
               "eval_max_tokens": cfg.eval_tokens,
               "notes": notes, "arms": {k: {x: v for x, v in r.items() if x != "prompts"}
                                        for k, r in rows.items()}}
    write_json(run.path / "results.json", summary)
    (run.path / "table.txt").write_text(table + "\n" + "\n".join(notes) + "\n")
    print(f"\n{cfg.task}: held-out test, {cfg.model}\n{table}\n" + "\n".join(notes))
    print(f"folder: {run.path}" + (f"\nplot: {png}" if png else ""))
    return summary


def share_baseline(root: Path, first: int, seed: int) -> None:
    """The baseline arm is greedy decoding of the untouched program, which no run seed enters: later
    seeds take the first seed's instead of scoring the same program again."""
    src, dst = root / f"seed-{first}" / "baseline" / "arm.json", root / f"seed-{seed}" / "baseline" / "arm.json"
    if seed != first and src.exists() and not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        write_json(dst, {**json.loads(src.read_text()), "shared_from": f"seed-{first}"})


def compare(cfg: TrainConfig, root: str | Path | None = None, test_limit: int | None = None,
            arms=ARMS, seeds: int = 1) -> dict:
    """The four arms in one folder; with ``seeds`` > 1, the whole comparison once per run seed
    (cfg.seed, cfg.seed + 1, ...) in seed-S/ subfolders, summarised across seeds in the top folder."""
    from tqdm.auto import tqdm

    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    run = _open(cfg, root, test_limit, arms, seeds)
    if seeds > 1:
        per_seed = [run_seed(cfg, run.path, s, test_limit, arms) for s in range(cfg.seed, cfg.seed + seeds)]
        return _across_seeds(run, cfg, per_seed)
    rows: dict[str, dict] = {}
    bar = tqdm(arms, desc="compare", disable=not cfg.progress)
    for name, strategy in bar:
        bar.set_postfix(arm=name)
        rows[name] = _finished(run.path, name) or run_arm(cfg, run.path, name, strategy, test_limit)
    bar.close()
    return _summarise(run, cfg, rows)


def run_seed(cfg: TrainConfig, root: Path, seed: int, test_limit: int | None, arms=ARMS,
             only: tuple[str, ...] | None = None) -> dict[str, dict]:
    """Seed ``seed`` of a multi-seed comparison whose first seed is cfg.seed, in root/seed-S with its
    own table. A later seed runs its prompts arm first and then takes the first seed's baseline
    (share_baseline), so that seeds started side by side (studies/compare_seed.py) find it finished.
    ``only``: run just these arms now (the table waits for the rest)."""
    sub = root / f"seed-{seed}"
    scfg = dataclasses.replace(cfg, seed=seed)
    run = _open(scfg, sub, test_limit, arms, 1)
    order = arms if seed == cfg.seed else sorted(arms, key=lambda a: a[0] != "prompts")  # stable: prompts first
    rows: dict[str, dict] = {}
    for name, strategy in order:
        if name == "baseline":
            share_baseline(root, cfg.seed, seed)  # if the first seed has finished it
        done = _finished(sub, name)
        if done or only is None or name in only:
            rows[name] = done or run_arm(scfg, sub, name, strategy, test_limit)
    if len(rows) == len(arms):
        rows = {name: rows[name] for name, _ in arms}
        _summarise(run, scfg, rows)
    return rows


def _summarise(run: RunDir, cfg: TrainConfig, rows: dict[str, dict]) -> dict:
    """One seed's table: each arm's test score, and its paired difference to prompts -> weights."""
    ref = rows.get("prompts_weights")
    for r in rows.values():
        if ref and r is not ref and r["test_ids"] == ref["test_ids"]:
            r["vs_prompts_weights"] = paired_diff(ref["test_scores"], r["test_scores"])
    png = plot(run.path, rows, f"{cfg.task} ({cfg.model}), dev n={cfg.eval_examples}")
    table = format_table(
        [(r["strategy"], f"{r['test']:.3f}", pm(r['test_ci95']), r["test_n"], f"{r['dev']:.3f}",
          "" if "vs_prompts_weights" not in r else diff_ci(r["vs_prompts_weights"]),
          f"{r['seconds']:.0f}{'*' if r['resumed'] else ''}", r["lm_calls"], r["gen_tokens"], r["prompt_tokens"])
         for r in rows.values()],
        ("arm", "test", "95% CI", "n", "dev", "p->w minus arm (paired)", "wall s", "LM calls", "gen tokens",
         "prompt tokens"))
    notes = ["prompts -> weights reuses the prompts arm's search; its cost includes that search."]
    if any(r["resumed"] for r in rows.values()):
        notes.append("* resumed arm: wall time and counts cover the part run in the finishing process.")
    return _finish(run, cfg, rows, table, notes, png)


def _across_seeds(run: RunDir, cfg: TrainConfig, per_seed: list[dict[str, dict]]) -> dict:
    """Per arm: the mean test score over seeds, the spread of the seeds' scores (sd), and a 95% CI
    over test examples of each example's seed-averaged score; the paired difference likewise."""
    import statistics

    k = len(per_seed)
    rows: dict[str, dict] = {}
    for name in per_seed[0]:
        recs = [seed[name] for seed in per_seed]
        ids = recs[0]["test_ids"]
        if any(r["test_ids"] != ids for r in recs):
            raise ValueError(f"arm {name}: the seeds were scored on different test examples")
        avg = [sum(r["test_scores"][i] for r in recs) / k for i in range(len(ids))]
        mean, ci = mean_ci(avg)
        tests = [r["test"] for r in recs]
        rows[name] = {"arm": name, "strategy": recs[0]["strategy"], "test": mean, "test_ci95": ci,
                      "test_n": len(ids), "test_ids": ids, "test_scores": avg, "seeds": k,
                      "test_scores_by_seed": [r["test_scores"] for r in recs],
                      "test_by_seed": tests, "seed_sd": statistics.stdev(tests),
                      "dev": sum(r["dev"] for r in recs) / k,
                      **{c: sum(r[c] for r in recs) / k for c in ("seconds", "lm_calls", "gen_tokens", "prompt_tokens")},
                      "resumed": any(r["resumed"] for r in recs)}
    ref = rows.get("prompts_weights")
    for r in rows.values():
        if ref and r is not ref:
            r["vs_prompts_weights"] = paired_diff(ref["test_scores"], r["test_scores"])
    table = format_table(
        [(r["strategy"], f"{r['test']:.3f}", pm(r['test_ci95']), f"{r['seed_sd']:.3f}",
          " / ".join(f"{t:.3f}" for t in r["test_by_seed"]), r["test_n"], f"{r['dev']:.3f}",
          "" if "vs_prompts_weights" not in r else diff_ci(r["vs_prompts_weights"]),
          f"{r['seconds']:.0f}", f"{r['lm_calls']:.0f}") for r in rows.values()],
        ("arm", "test", "95% CI", "seed sd", "by seed", "n", "dev", "p->w minus arm (paired)", "wall s/seed",
         "LM calls/seed"))
    notes = [(f"{k} seeds ({cfg.seed}..{cfg.seed + k - 1}): test = mean over seeds; 95% CI over test examples of "
             "each example's seed-averaged score; seed sd = spread of the seeds' test scores; each seed's own "
             "table is in its seed-S/ folder."),
             "prompts -> weights reuses the prompts arm's search; its cost includes that search."]
    return _finish(run, cfg, rows, table, notes, None)
