"""A training job: its parts (task, program, backend, trainer, run folder) and what one step does:
rollouts -> groups -> update, with evaluation, checkpoints and resume. The loop over steps is run.py."""
from __future__ import annotations

import json
import random
import shutil
import sys
import uuid
from collections import Counter
from pathlib import Path

from .. import stopping
from ..lm.base import SamplingParams
from ..program import Example
from ..rollout import evaluate, sample, trajectory_seed
from ..runlog import MANIFEST, RunDir, publish_dir, recover_dir, verify_manifest
from ..config import TrainConfig
from ..trace import ERROR, OK, PARSE_FAILURE
from . import distributed
from .checkpoint import write_latest
from .groups import assign_weights, compute_advantages, group_calls
from .lag import LaggedRollouts, drop_stale
from .stats import module_stats, sampled_entropy
from .trainer import Trainer

FAILURES = "failures.jsonl"  # each failed rollout: its error or the reply that did not parse


class TrainingStopped(RuntimeError):
    """A step that must not be trained on (too many errors): the run stops, resumable."""


def batch_for_step(train: list[Example], step: int, size: int, seed: int) -> list[Example]:
    """Examples of step ``step`` (1-based): a fresh seeded permutation each epoch, so the data
    order is a function of the step alone and a resumed run sees what it would have seen."""
    if not train:
        raise ValueError("the training split is empty")
    size = min(size, len(train))
    per_epoch = len(train) // size
    epoch, k = divmod(step - 1, per_epoch)
    order = list(range(len(train)))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return [train[i] for i in order[k * size:(k + 1) * size]]


class MMGRPO:
    """A run: the task's program, the backend (the learner's model), the sampler (the backend
    itself, or policy servers: cfg.servers), the trainer and the run folder."""

    def __init__(self, cfg: TrainConfig, task, program, backend, run: RunDir):
        self.cfg, self.task, self.program, self.backend, self.run = cfg, task, program, backend, run
        distributed.setup(cfg.device, cfg.dist_timeout_s)
        if cfg.max_policy_lag and not cfg.servers and not backend.has_sampler_copy:
            backend.add_sampler_copy()  # lagged versions sample from a copy while the live weights update
        self.trainer = Trainer(backend, cfg)
        self.trained = False  # set once fit has run: the adapter then belongs to the result
        self.best = {"dev": float("-inf"), "step": None}
        # dev records measured elsewhere on this program and dev set, by step (compare: the arm this
        # one starts from, so its step 0 is not evaluated twice); used once instead of evaluating
        self.known_dev: dict[int, dict] = {}
        self.dev = task.dev[: cfg.eval_examples]
        self.prompt_val, self.prompt_val_name = self.dev, "dev"  # where a prompt search scores its candidates
        if cfg.prompt_val_examples:
            lo, hi = cfg.prompt_train_examples, cfg.prompt_train_examples + cfg.prompt_val_examples
            if len(task.train) < hi:
                raise ValueError(f"prompt_val_examples = {cfg.prompt_val_examples} needs {hi} training examples "
                                 f"(after the first prompt_train_examples = {lo}); the task has {len(task.train)}: "
                                 f"lower one of them, or set it to 0 to search on dev")
            self.prompt_val, self.prompt_val_name = task.train[lo:hi], f"train[{lo}:{hi}]"
        self.main = distributed.rank() == 0  # the other ranks of a data-parallel run only update
        self.sampler = backend
        if cfg.servers and self.main:
            from ..lm.remote import RemotePolicy

            self.sampler = RemotePolicy(cfg.servers, backend.tokenizer, cfg.server_model, cfg.request_timeout_s,
                                        cfg.request_retries, cfg.request_backoff_s)
        self.workers = None
        if cfg.workers and self.main:
            from ..rollout_ray import RaySampler, policy_settings

            self.workers = RaySampler(cfg.workers, task.make_program, task.reward, policy_settings(self.sampler),
                                      cfg.ray_address,
                                      timeout_s=cfg.request_timeout_s * (cfg.request_retries + 1) * 4 + 60)
        if cfg.max_policy_lag and distributed.active():
            raise ValueError("max_policy_lag > 0 is not supported in a data-parallel run (torchrun); set it to 0")
        self.kept_policies: dict[int, dict] = {}  # lagged versions a resumed checkpoint kept
        self.lagged = LaggedRollouts(self, cfg.max_policy_lag) if cfg.max_policy_lag and self.main else None
        self._nonce = uuid.uuid4().hex[:8]
        self.last_eval: tuple[tuple, dict] | None = None  # ((weights version, prompts), record) of the last dev eval
        self.warned = False  # the warning that every reply failed to parse is given once a run
        self.nonfinite = 0  # skipped non-finite updates in a row  # adapter names stay new across resumes of this run

    def push_policy(self, step: int, snapshot: dict | None = None) -> None:
        """Remote sampling: the current adapter (or a kept ``snapshot`` of an earlier one) becomes policy
        version ``step`` on every server (written atomically, loaded under a new name); adapters older
        than the last max_policy_lag + 1 are unloaded and deleted."""
        if self.sampler is self.backend:
            return
        root = Path(self.cfg.adapter_dir) if self.cfg.adapter_dir else self.run.path / "policy"
        name = f"{self.run.path.name}-v{step}-{self._nonce}"
        self.trainer.save_adapter(root / name, snapshot)
        self.sampler.push(root / name, name, step, keep=self.cfg.max_policy_lag + 1)
        for old in root.glob(f"{self.run.path.name}-v*"):
            if old.name not in self.sampler.loaded.values():
                shutil.rmtree(old, ignore_errors=True)

    def evaluate(self, step: int, desc: str = "dev") -> dict:
        known = self.known_dev.pop(step, None)
        state = (self.backend.version, json.dumps(self.program.prompt_state(), sort_keys=True, default=str))
        unchanged = self.last_eval is not None and self.last_eval[0] == state
        if known is not None:
            rec = {"step": step, **known, "eval_s": 0.0}
        elif unchanged:  # no update and no new prompts since the last evaluation: the same scores (greedy)
            rec = {**self.last_eval[1], "step": step, "eval_s": 0.0, "reused_from_step": self.last_eval[1]["step"]}
        else:
            if self.lagged and self.sampler is self.backend:  # the sampler copy is the lagged rollouts' until they end
                self.lagged.drain()
            res = evaluate(self.program, self.dev, self.task.metric, self.sampler, concurrency=self.cfg.concurrency,
                           max_tokens=self.cfg.eval_tokens, seed=self.cfg.seed, progress=self.cfg.progress,
                           desc=f"{desc} (step {step})")
            if res.outages:
                raise TrainingStopped(f"{desc} evaluation at step {step}: {res.outages} of {res.n} runs could not "
                                      f"reach an LM server; no dev score was recorded.")
            if res.errors:
                print(f"mmgrpo: {desc} evaluation at step {step}: {res.errors} of {res.n} runs failed with an error "
                      f"and were scored {0.0} (dev_errors in dev.jsonl)", file=sys.stderr)
            rec = {"step": step, "dev": res.mean, "dev_ci95": res.ci95, "dev_n": res.n, "dev_counts": res.counts,
                   "dev_errors": res.errors, "eval_max_tokens": res.max_tokens, "eval_s": res.seconds}
        self.run.log(rec, "dev.jsonl")
        if not unchanged:
            # a copy names the step it repeats, not where that step's score came from
            self.last_eval = (state, {k: v for k, v in rec.items() if k not in ("reused_from_step", "reused_from")})
        if rec["dev"] > self.best["dev"]:  # kept in the next checkpoint too, so a resume finds the one it names
            self.best = {"dev": rec["dev"], "step": step}
            self.trainer.save_adapter(self.run.path / "best_adapter")
        return rec

    def rollouts(self, step: int, lm):
        """Step ``step``'s rollouts, sampled by ``lm`` (the sampler, or a lagged policy version)."""
        cfg = self.cfg
        batch = batch_for_step(self.task.train, step, cfg.batch_examples, cfg.seed)
        params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens)
        seed = trajectory_seed(cfg.seed, "step", step)
        if self.workers is not None:
            from ..rollout_ray import RolloutWorkersFailed

            try:
                roll = self.workers.sample(self.program, batch, n_samples=cfg.group_size, params=params, seed=seed,
                                           model=lm.model, version=lm.version,
                                           format_failure_score=cfg.format_failure_score,
                                           failure_score=cfg.failure_score, concurrency=cfg.concurrency)
            except RolloutWorkersFailed as exc:
                raise TrainingStopped(f"step {step}: {exc}; nothing was trained on this step.") from exc
        else:
            roll = sample(self.program, batch, self.task.reward, lm, n_samples=cfg.group_size,
                          params=params, concurrency=cfg.concurrency, seed=seed,
                          format_failure_score=cfg.format_failure_score, failure_score=cfg.failure_score,
                          progress=cfg.progress and self.lagged is None, desc=f"step {step} rollouts")
        return roll

    def train_step(self, step: int) -> dict:
        cfg = self.cfg
        roll = self.lagged.take(step, cfg.steps) if self.lagged else self.rollouts(step, self.sampler)
        if roll.outages:  # an outage is not a bad answer: train on none of this step
            raise TrainingStopped(f"step {step}: {len(roll.outages)} of {len(roll.trajectories)} rollouts could not "
                                  f"reach an LM server; nothing was trained on this step. First: "
                                  f"{roll.outages[0].error.splitlines()[0]}. Bring the server back and resume.")
        self.keep_failures(step, roll.trajectories)
        errors = [t.error for t in roll.trajectories if t.status == ERROR]
        if errors:
            common = Counter(e.splitlines()[0] for e in errors).most_common(1)[0]
            print(f"mmgrpo: step {step}: {len(errors)} of {len(roll.trajectories)} rollouts failed with an error "
                  f"(not trained on); most common ({common[1]}x): {common[0][:300]} (all in failures.jsonl)",
                  file=sys.stderr)
        if len(errors) > cfg.max_error_rate * len(roll.trajectories):
            first = max(sorted({e.splitlines()[0] for e in errors}), key=lambda e: sum(x.startswith(e) for x in errors))
            raise TrainingStopped(
                f"step {step}: {len(errors)} of {len(roll.trajectories)} rollouts failed with an error (more than "
                f"max_error_rate = {cfg.max_error_rate}); nothing was trained on this step. Most common error: "
                f"{first}. Fix the cause (a server down? a crashing metric?) and resume the run.")
        stopping.check()  # a Ctrl-C swallowed during the rollouts: nothing of this step is trained
        by_example, lag = roll.by_example(), {}
        if self.lagged:  # a trajectory sampled more than max_policy_lag versions ago is not trained on
            by_example, lag = drop_stale(by_example, step, cfg.max_policy_lag)
        grouping = group_calls(by_example, cfg.grouping, cfg.group_level)
        if not grouping.groups and roll.counts.get(PARSE_FAILURE) == len(roll.trajectories) and not self.warned:
            self.warned = True
            print(f"mmgrpo: step {step}: every rollout's reply failed to parse, so no group carries signal and "
                  f"nothing is learned; give the modules demos (task options, [prompts], or strategy = \"bootstrap "
                  f"-> weights\"), or a format_failure_score that differs from a wrong answer's "
                  f"(failures.jsonl has the replies)", file=sys.stderr)
        compute_advantages(grouping, cfg.scale_rewards)
        assign_weights(grouping, cfg.per_trajectory_norm, cfg.loss_denominator)
        distributed.broadcast(grouping)  # data-parallel: every rank updates on its share of it
        upd = self.trainer.update(grouping, step - 1 if self.lagged else None) if grouping.groups else {"updated": False}
        self.nonfinite = self.nonfinite + 1 if upd.get("nonfinite_skipped") else 0 if upd["updated"] else self.nonfinite
        if self.nonfinite >= cfg.max_nonfinite_steps:
            raise TrainingStopped(f"step {step}: {self.nonfinite} updates in a row had a non-finite loss or gradient "
                                  f"norm and were skipped (max_nonfinite_steps = {cfg.max_nonfinite_steps}); the "
                                  f"weights are those before them. Lower grpo.learning_rate or check the rewards, "
                                  f"then resume.")
        self.trainer.finish_step()
        if self.lagged:
            self.lagged.finished(step, upd["updated"])
        versions = sorted({c.policy_version for t in roll.trajectories for c in t.calls})
        # rewards of the trajectories trained on: an error's score is not the model's
        rewards = [t.reward for t in roll.trajectories if t.status != ERROR] or [0.0]
        mean = sum(rewards) / len(rewards)
        modules = module_stats(roll.trajectories, grouping, upd.pop("modules_update", None))
        truncated = sum(1 for t in roll.trajectories for c in t.calls if c.finish_reason == "length")
        return {"step": step, "reward_mean": mean,
                "reward_std": (sum((r - mean) ** 2 for r in rewards) / len(rewards)) ** 0.5,
                **{f"n_{k}": v for k, v in roll.counts.items()}, **grouping.counts(),
                "lm_calls": roll.lm_calls, "completion_tokens": roll.completion_tokens, "truncated": truncated,
                "policy_versions": versions, **lag, "rollout_s": roll.seconds, "entropy": sampled_entropy(roll.trajectories),
                **upd, "modules": modules}

    def keep_failures(self, step: int, trajectories) -> None:
        """Every failed rollout of the step in failures.jsonl: its error, or the reply that did not parse."""
        for t in trajectories:
            if t.status != OK:
                self.run.log({"step": step, "example_id": t.example_id, "sample_index": t.sample_index,
                              "status": t.status, "error": t.error[:4000],
                              "module": t.calls[-1].module if t.calls else None,
                              "reply": t.calls[-1].text[:2000] if t.calls else None}, FAILURES)

    def checkpoint(self, step: int) -> None:
        ck = self.run.path / "checkpoints"
        name = f"step-{step:06d}"
        try:
            self.trainer.save(ck / name, {"best": self.best, "nonfinite": self.nonfinite},
                              best_adapter=self.run.path / "best_adapter",
                              policies=self.lagged.kept() if self.lagged else None)
            write_latest(self.run.path, name)
        except OSError as exc:  # a full or failing disk: what was saved before stays intact
            prev = (ck / "latest").read_text().strip() if (ck / "latest").exists() else "none"
            raise TrainingStopped(f"writing checkpoint {name} failed ({type(exc).__name__}: {exc}); the previous "
                                  f"checkpoint ({prev}) is intact. Free space (or fix the disk) and continue with "
                                  f"`mmgrpo train ... --resume {self.run.path}`.") from exc
        steps = sorted(p for p in ck.glob("step-*") if p.is_dir())
        for old in steps[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def resume(self) -> int:
        """Load the newest checkpoint and forget log lines after it; 0 = start (logs cleared)."""
        recover_dir(self.run.path / "best_adapter")
        latest = self.run.path / "checkpoints" / "latest"
        if not latest.exists():
            self.run.truncate_log(-1)
            self.run.truncate_log(-1, "dev.jsonl")
            self.run.truncate_log(-1, FAILURES)
            return 0
        name = self.intact_checkpoint(latest.read_text().strip())
        state = self.trainer.load(self.run.path / "checkpoints" / name)
        self.kept_policies = self.trainer.load_policies(self.run.path / "checkpoints" / name)
        self.best = state["best"]
        self.nonfinite = state.get("nonfinite", 0)
        self._restore_best(self.run.path / "checkpoints" / name / "best_adapter")
        self.run.truncate_log(state["step"])
        self.run.truncate_log(state["step"], "dev.jsonl")
        self.run.truncate_log(state["step"], FAILURES)
        return state["step"]


    def _restore_best(self, saved: Path) -> None:
        """best_adapter/ as the checkpoint knew it: an evaluation after the checkpoint may have
        written a newer one that the restored state does not name."""
        best = self.run.path / "best_adapter"
        if not saved.is_dir():  # a checkpoint written before best adapters were part of it: keep what is there
            return
        tmp = best.with_name(f".{best.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(saved, tmp)
        publish_dir(tmp, best)

    def intact_checkpoint(self, latest: str) -> str:
        """``latest``, or the newest earlier checkpoint whose files match its manifest (a damaged
        one is named on stderr and never loaded); none intact is an error."""
        ck = self.run.path / "checkpoints"
        for p in ck.glob("step-*"):
            recover_dir(p)
        recover_dir(ck / latest)
        names = [latest] + sorted((p.name for p in ck.glob("step-*") if p.is_dir() and p.name < latest), reverse=True)
        problems = []
        for name in names:
            folder = ck / name
            problem = (f"{folder}: missing" if not folder.is_dir() else
                       verify_manifest(folder) if (folder / MANIFEST).exists() else None)  # None: before manifests
            if problem is None:
                if name != latest:
                    write_latest(self.run.path, name)
                return name
            problems.append(problem)
            print(f"mmgrpo: checkpoint {name} is damaged, not loaded: {problem}", file=sys.stderr)
        raise RuntimeError(f"no intact checkpoint in {ck} ({'; '.join(problems)}); restore the files, or start "
                           f"the run again without --resume")
