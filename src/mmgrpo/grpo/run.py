"""The mmGRPO loop: rollouts -> groups -> update each step (job.py), dev every eval_every steps,
checkpoints, resume, Ctrl-C; the summary at the end."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from .. import stopping
from ..lm.openai import LMUnavailable
from ..runlog import format_table
from . import distributed
from .build import build  # noqa: F401 - the entry point beside fit
from .job import MMGRPO, TrainingStopped, batch_for_step  # noqa: F401 - the job and what stops it


def fit(job: MMGRPO) -> dict:
    """Run (or continue) the job to cfg.steps; return the summary."""
    if not job.main:
        try:
            return follow(job)
        except BaseException:
            distributed.abort()
            raise
    start = job.resume()
    distributed.broadcast(start)
    try:
        summary = _fit(job, start)
    except BaseException:  # the other ranks may be inside an update's all-reduce: never meet them there
        distributed.abort()
        raise
    distributed.broadcast(None)  # the other ranks of a data-parallel run stop with rank 0
    return summary


def follow(job: MMGRPO) -> dict:
    """A rank other than 0: load the checkpoint rank 0 resumed from, then update on every
    grouping it sends, until it sends None."""
    start = distributed.broadcast()
    if start:
        job.trainer.load(job.run.path / "checkpoints" / f"step-{start:06d}")
    while (grouping := distributed.broadcast()) is not None:
        if grouping.groups:
            job.trainer.update(grouping)
        job.trainer.finish_step()
    job.trained = True
    return {"run": str(job.run.path), "rank": distributed.rank()}


def _fit(job: MMGRPO, start: int) -> dict:
    trackers = None
    if job.cfg.report_to:
        from ..trackers import Trackers

        trackers = Trackers(job.cfg.report_to, job.run.path, job.cfg.to_dict(), job.run.path.name)
    try:
        return _loop(job, start, trackers)
    finally:
        if job.lagged is not None:  # the rollouts in flight end with the run
            job.lagged.close()
        if trackers is not None:
            trackers.close()
        if job.workers is not None:  # the Ray actors end with the run
            job.workers.close()
            job.workers = None


class Interrupted(KeyboardInterrupt):
    """Ctrl-C: the run stops where it is; what its last checkpoint holds is kept."""

    def __init__(self, run_path: Path):
        ck = run_path / "checkpoints" / "latest"
        kept = ck.read_text().strip() if ck.exists() else None
        what = f"checkpoint {kept} is kept" if kept else "no step had been checkpointed"
        super().__init__(f"stopped by Ctrl-C; {what}. Continue with: mmgrpo train --resume {run_path}")


def _loop(job: MMGRPO, start: int, trackers) -> dict:
    try:
        return _steps(job, start, trackers)
    except KeyboardInterrupt as exc:
        if isinstance(exc, Interrupted):
            raise
        raise Interrupted(job.run.path) from None


def _steps(job: MMGRPO, start: int, trackers) -> dict:
    from tqdm.auto import tqdm

    cfg = job.cfg
    if start:
        print(f"mmgrpo: resumed {job.run.path} from step {start}", file=sys.stderr)
    if job.lagged is not None:  # the earlier versions lagged rollouts sample with, then the live one
        job.lagged.start(start, job.kept_policies)
        for v, snapshot in sorted(job.kept_policies.items()):
            job.push_policy(v, snapshot)
    job.push_policy(start)
    if start == 0:
        rec = job.evaluate(0, "baseline")
        if trackers is not None:
            trackers.log(rec, 0)
    bar = tqdm(range(start + 1, cfg.steps + 1), desc="mmGRPO", initial=start, total=cfg.steps,
               disable=not cfg.progress)
    last_dev = (job.run.read_log("dev.jsonl") or [None])[-1]  # shown until the next dev evaluation
    for step in bar:
        stopping.check()
        try:
            rec = job.train_step(step)
        except TrainingStopped as exc:
            if step > 1 and (step - 1) % cfg.checkpoint_every:  # keep every finished step
                job.checkpoint(step - 1)
            bar.close()
            done = f"steps 1-{step - 1} are saved" if step > 2 else "step 1 is saved" if step == 2 else \
                "no step had finished"
            raise TrainingStopped(f"{exc} {done.capitalize()}; continue with "
                                  f"`mmgrpo train ... --resume {job.run.path}`.") from exc
        try:
            if rec["updated"] and job.sampler is not job.backend:
                t0 = time.perf_counter()
                job.push_policy(step)
                rec["push_s"] = time.perf_counter() - t0
            if step % cfg.eval_every == 0 or step == cfg.steps:
                rec.update({k: v for k, v in job.evaluate(step).items() if k != "step"})
        except (TrainingStopped, LMUnavailable) as exc:  # the step is trained: keep it, without its dev score
            job.run.log({**rec, "dev_skipped": "outage"})
            job.checkpoint(step)
            bar.close()
            raise TrainingStopped(f"{exc} Steps 1-{step} are saved; continue with "
                                  f"`mmgrpo train ... --resume {job.run.path}`.") from exc
        job.run.log(rec)
        if trackers is not None:
            trackers.log(rec, step)
        if "dev" in rec:
            last_dev = {"step": step, "dev": rec["dev"]}
        bar.set_postfix(reward=f"{rec['reward_mean']:.2f}", groups=rec["groups_used"],
                        dev="-" if last_dev is None else f"{last_dev['dev']:.2f} (step {last_dev['step']})")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            job.checkpoint(step)
    bar.close()
    job.trainer.load_adapter(job.run.path / "best_adapter")  # what follows (and result/) uses the best
    job.trained = True
    devs = job.run.read_log("dev.jsonl")
    first = devs[0] if devs and devs[0]["step"] == 0 else None
    summary = {"run": str(job.run.path), "baseline_dev": first["dev"] if first else None,
               "baseline_ci95": first["dev_ci95"] if first else None,
               "final_dev": devs[-1]["dev"] if devs else None, "final_ci95": devs[-1]["dev_ci95"] if devs else None,
               "dev_n": devs[-1]["dev_n"] if devs else 0, "best_dev": job.best["dev"], "best_step": job.best["step"],
               "eval_max_tokens": cfg.eval_tokens, "steps": cfg.steps}
    job.run.write_json("summary.json", summary)
    return summary


def print_summary(job: MMGRPO, summary: dict) -> None:
    rows = []
    for r in job.run.read_log():
        skipped = sum(v for k, v in r.items() if k.startswith("groups_skipped"))
        upd = r.get("updated")
        rows.append((r["step"], f"{r['reward_mean']:.3f}", r.get("n_ok", 0), r.get("n_parse_failure", 0),
                     r.get("n_error", 0), r["groups_used"], skipped,
                     f"{r['grad_norm']:.3f}" if upd else "-", f"{r['mismatch_mean']:.1e}" if upd else "-",
                     f"{r['rollout_s']:.1f}", f"{r.get('update_s', 0.0):.1f}",
                     f"{r['dev']:.3f}" if "dev" in r else ""))
    print(f"\nmmGRPO on {job.task.name} ({job.cfg.model}), run folder: {job.run.path}")
    print(format_table(rows, ("step", "reward", "ok", "parse_fail", "error", "groups", "skipped", "grad norm",
                              "mismatch", "rollout s", "update s", "dev")))
    b, f = summary["baseline_dev"], summary["final_dev"]
    if b is not None and f is not None:
        half = lambda ci: "n/a" if ci is None or ci != ci else f"{ci:.3f}"  # noqa: E731 - one example: no CI
        print(f"\ndev score (n={summary['dev_n']}, 95% CI): baseline {b:.3f} ± {half(summary['baseline_ci95'])} "
              f"-> trained {f:.3f} ± {half(summary['final_ci95'])} (best {summary['best_dev']:.3f} "
              f"at step {summary['best_step']})")
    print(f"best adapter: {job.run.path / 'best_adapter'}")
