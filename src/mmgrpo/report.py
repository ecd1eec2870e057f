"""`mmgrpo report RUN`: one self-contained report.html (plots embedded, opens offline) and the plots
as PNG, from a training run's metrics.jsonl / dev.jsonl or a `compare` folder's results.json and arms.

Every plot is drawn from the logs' numbers, and the page lists those numbers in tables too, so the
report can be checked against metrics.jsonl.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Callable

from .runlog import RunDir, atomic_write, diff_ci


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def _figure(draw: Callable, title: str, ylabel: str):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    draw(ax)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def run_plots(steps: list[dict], devs: list[dict]) -> dict[str, tuple[str, bytes]]:
    """name -> (title, PNG bytes) for one training run."""
    plots: dict[str, tuple[str, bytes]] = {}

    def reward(ax):
        xs, ys = _series(steps, "reward_mean")
        _, sd = _series(steps, "reward_std")
        ax.plot(xs, ys, marker="o", label="reward mean")
        if len(sd) == len(ys):
            ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)], alpha=0.2,
                            label="± std")
    plots["reward"] = ("Training reward (mean ± std over the step's rollouts)", _figure(reward, "reward", "reward"))

    if devs:
        def dev(ax):
            xs, ys = _series(devs, "dev")
            _, ci = _series(devs, "dev_ci95")
            ax.plot(xs, ys, marker="o", color="C2", label="dev")
            if len(ci) == len(ys):
                ax.fill_between(xs, [y - c for y, c in zip(ys, ci)], [y + c for y, c in zip(ys, ci)], alpha=0.2,
                                color="C2", label="95% CI")
        plots["dev"] = ("Dev score (greedy) with its 95% CI", _figure(dev, "dev score", "score"))

    modules = sorted({m for r in steps for m in (r.get("modules") or {}) if m != "*"})
    if modules:
        for key, label in (("reward_mean", "reward"), ("advantage_abs_mean", "mean |advantage|"),
                           ("groups_used", "groups used"), ("completion_tokens", "completion tokens"),
                           ("parse_failures", "parse failures"), ("kl", "KL"), ("clip_frac", "clip fraction")):
            def per_module(ax, key=key):
                for mod in modules:
                    xs, ys = _series([{"step": r["step"], **(r.get("modules") or {}).get(mod, {})} for r in steps],
                                     key)
                    if xs:
                        ax.plot(xs, ys, marker=".", label=mod)
            plots[f"module_{key}"] = (f"Per module: {label}", _figure(per_module, f"per module: {label}", label))

    def groups(ax):
        xs, used = _series(steps, "groups_used")
        ax.plot(xs, used, marker="o", label="used")
        reasons = sorted({k for r in steps for k in r if k.startswith("groups_skipped_")})
        for k in reasons:
            x2, y2 = _series(steps, k)
            ax.plot(x2, y2, marker=".", ls="--", label=f"skipped: {k[len('groups_skipped_'):]}")
    plots["groups"] = ("Groups used and skipped (by reason)", _figure(groups, "groups", "groups"))

    def failures(ax):
        for k, label in (("n_ok", "ok"), ("n_parse_failure", "parse failure"), ("n_error", "error"),
                         ("n_worker_retries", "worker retries")):
            xs, ys = _series(steps, k)
            if xs:
                ax.plot(xs, ys, marker=".", label=label)
    plots["failures"] = ("Rollouts by outcome", _figure(failures, "rollouts by outcome", "rollouts"))

    def health(ax):
        for k in ("kl", "clip_frac", "grad_norm", "mismatch_mean", "entropy"):
            xs, ys = _series(steps, k)
            if xs:
                ax.plot(xs, ys, marker=".", label=k)
        ax.set_yscale("symlog", linthresh=1e-6)
    plots["update"] = ("Update: KL, clip fraction, grad norm, sampler/learner mismatch, sampled entropy",
                       _figure(health, "update health", "value (symlog)"))

    if any("policy_lag_mean" in r for r in steps):  # a run with max_policy_lag > 0
        def lag(ax):
            for k in LAG_KEYS:
                xs, ys = _series(steps, k)
                if xs:
                    ax.plot(xs, ys, marker=".", label=k)
        plots["lag"] = ("Policy lag: mean lag of the rollouts, stale ones (not trained on), importance weights' "
                        "mean and share capped", _figure(lag, "policy lag", "value"))

    def times(ax):
        for k in ("rollout_s", "update_s", "eval_s", "push_s"):
            xs, ys = _series(steps, k)
            if xs:
                ax.plot(xs, ys, marker=".", label=k)
    plots["time"] = ("Time per phase (s)", _figure(times, "time per phase", "seconds"))
    return plots


def compare_plots(root: Path, results: dict) -> dict[str, tuple[str, bytes]]:
    arms = results.get("arms", {})

    def dev(ax):
        for i, (name, rec) in enumerate(arms.items()):
            devs = RunDir(root / name).read_log("dev.jsonl") if (root / name / "dev.jsonl").exists() else []
            xs, ys = _series(devs, "dev")
            if len(xs) > 1:
                ax.plot(xs, ys, marker="o", color=f"C{i}", label=f"{rec.get('strategy', name)} (training)")
            ax.axhline(rec["dev"], ls="--", color=f"C{i}", label=f"{rec.get('strategy', name)}: final dev")

    def test(ax):
        names = list(arms)
        ys = [arms[n]["test"] for n in names]
        ci = [arms[n].get("test_ci95") or 0.0 for n in names]
        ax.bar(range(len(names)), ys, yerr=ci, capsize=4, color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), [arms[n].get("strategy", n) for n in names], fontsize=8)
    return {"compare_dev": ("The four arms: dev over training steps, and each arm's final dev",
                            _figure(dev, "arms: dev", "dev score")),
            "compare_test": ("Held-out test score by arm (95% CI)", _figure(test, "arms: held-out test", "test score"))}


def _table(rows: list[dict], keys: list[str]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape(str(v)) if v is not None else ""
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(k))}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STEP_KEYS = ["step", "reward_mean", "reward_std", "n_ok", "n_parse_failure", "n_error", "groups_used", "updated",
             "loss", "pg_loss", "kl", "clip_frac", "grad_norm", "mismatch_mean", "entropy", "lr", "rollout_s",
             "update_s", "dev"]
LAG_KEYS = ["policy_lag_mean", "n_stale", "tis_weight_mean", "tis_capped_frac"]  # shown where a run lagged
MODULE_KEYS = ["step", "module", "calls", "parse_failures", "reward_mean", "groups_used", "advantage_abs_mean",
               "completion_tokens", "entropy", "kl", "clip_frac"]


def write_report(folder: str | Path) -> Path:
    """Write FOLDER/report.html and FOLDER/report/*.png; returns the HTML's path."""
    root = Path(folder)
    sections: list[str] = []
    if (root / "results.json").exists():  # a compare folder
        results = json.loads((root / "results.json").read_text())
        title = f"mmgrpo compare: {results.get('task')} ({results.get('model')})"
        plots = compare_plots(root, results)
        rows = [{"arm": k, **v} for k, v in results.get("arms", {}).items()]
        for r in rows:
            d = r.get("vs_prompts_weights")
            r["p->w minus arm"] = diff_ci(d) if d else ""
        sections.append("<h2>Held-out test</h2>" + _table(rows, ["arm", "strategy", "test", "test_ci95", "test_n",
                                                                   "dev", "p->w minus arm", "seconds", "lm_calls"]))
        for arm in results.get("arms", {}):
            if (root / arm / "metrics.jsonl").exists():
                arm_plots = run_plots(RunDir(root / arm).read_log(), RunDir(root / arm).read_log("dev.jsonl"))
                plots.update({f"{arm}_{k}": (f"{arm}: {t}", png) for k, (t, png) in arm_plots.items()})
    elif (root / "metrics.jsonl").exists():
        run = RunDir(root)
        steps, devs = run.read_log(), run.read_log("dev.jsonl")
        if not steps:
            raise ValueError(f"{root}/metrics.jsonl has no steps yet: nothing to report")
        title = f"mmgrpo run: {root.name}"
        plots = run_plots(steps, devs)
        dev_at = {d["step"]: d["dev"] for d in devs}
        keys = STEP_KEYS + [k for k in LAG_KEYS if any("policy_lag_mean" in r and k in r for r in steps)]
        sections.append("<h2>Steps</h2>" + _table([{**r, "dev": dev_at.get(r["step"])} for r in steps], keys))
        mod_rows = [{"step": r["step"], "module": m, **v} for r in steps for m, v in (r.get("modules") or {}).items()]
        if mod_rows:
            sections.append("<h2>Per module</h2>" + _table(mod_rows, MODULE_KEYS))
    else:
        raise FileNotFoundError(f"{root} is neither a run folder (metrics.jsonl) nor a compare folder (results.json)")
    out_dir = root / "report"
    out_dir.mkdir(exist_ok=True)
    figures = []
    for name, (caption, png) in plots.items():
        atomic_write(out_dir / f"{name}.png", png)
        b64 = base64.b64encode(png).decode()
        figures.append(f'<figure id="{name}"><img alt="{html.escape(caption)}" src="data:image/png;base64,{b64}">'
                       f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;color:#222}} figure{{display:inline-block;margin:0.5em;
vertical-align:top}} figcaption{{font-size:0.85em;max-width:640px}} table{{border-collapse:collapse;
font-size:0.8em;margin:1em 0}} td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}</style></head>
<body><h1>{html.escape(title)}</h1><p>{len(plots)} plots; folder {html.escape(str(root))}</p>
<div class="plots">{''.join(figures)}</div>{''.join(sections)}</body></html>
"""
    atomic_write(root / "report.html", page)
    return root / "report.html"
