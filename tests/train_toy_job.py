"""Run (or resume) a small mmGRPO job on the toy task; used by the resume tests as a subprocess.

One example a step; example t2 always scores 0.5, so the step that draws it (step 1 with seed 3)
has equal rewards in every group and makes no update: resume must count it all the same.

``python train_toy_job.py RUN STEPS [PHASE:K] [--model DIR] [--lag K]``: ``--model``, a tiny random model's
folder, runs the lenient toy program scored by reply length parity instead of the embedded model;
``--lag``: [rollout] max_policy_lag. With a fault,
the process SIGKILLs itself at the K-th event of PHASE in this process: ``rollout`` (a training reward),
``update`` (a micro-batch loss, mid-update), ``checkpoint`` (an optimizer-state write: the adapter is
already in the temp folder), ``rename`` (after a rename of the run's atomic writes and publishes),
``dev`` (a dev metric call), ``log`` (after a metrics line is written, before its checkpoint).
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from toy import lenient_toy_task, toy_task  # noqa: E402

from mmgrpo import runlog  # noqa: E402
from mmgrpo.grpo import trainer as trainer_mod  # noqa: E402
from mmgrpo.config import TrainConfig  # noqa: E402
from mmgrpo.grpo.run import MMGRPO, fit  # noqa: E402
from mmgrpo.lm.hf import HFBackend  # noqa: E402
from mmgrpo.runlog import RunDir  # noqa: E402


def constant_on_t2(score):
    return lambda ex, pred: 0.5 if ex.id == "t2" else score(ex, pred)


def dying(fn, k: int):
    """fn that SIGKILLs this process right after its k-th call."""
    seen = [0]

    def wrapped(*a, **kw):
        out = fn(*a, **kw)
        seen[0] += 1
        if seen[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    return wrapped


class _OS:
    """The os module for runlog, with a replace that dies after its k-th call."""

    def __init__(self, k: int):
        self.replace = dying(os.replace, k)

    def __getattr__(self, name):
        return getattr(os, name)


def inject(fault: str, task) -> None:
    phase, k = fault.split(":")
    k = int(k)
    if phase == "rollout":
        task.reward = dying(task.reward, k)
    elif phase == "dev":
        task.metric = dying(task.metric, k)
    elif phase == "update":
        trainer_mod.grpo_loss = dying(trainer_mod.grpo_loss, k)
    elif phase == "checkpoint":
        import safetensors.torch

        real = safetensors.torch.save_file

        def save_then_die(*a, **kw):  # the optimizer file half-written, then the kill
            real(*a, **kw)
            path = Path(a[1])
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        calls = [0]

        def save_file(*a, **kw):
            calls[0] += 1
            return (save_then_die if calls[0] == k else real)(*a, **kw)
        safetensors.torch.save_file = save_file
    elif phase == "rename":
        runlog.os = _OS(k)
    elif phase == "log":
        RunDir.log = dying(RunDir.log, k)
    else:
        raise SystemExit(f"unknown fault phase {phase!r}")


def main(run_dir: str, steps: int, fault: str | None = None, model: str | None = None, lag: int = 0) -> None:
    cfg = TrainConfig(task="toy", steps=steps, batch_examples=1, group_size=4, max_tokens=12, learning_rate=1e-3,
                      temperature=0.7, eval_every=1000 if steps <= 4 else 2, eval_examples=2,
                      checkpoint_every=1, keep_checkpoints=2, progress=False, seed=3, max_policy_lag=lag)
    task = lenient_toy_task() if model else toy_task()
    task.reward = constant_on_t2(task.reward)
    if fault:
        inject(fault, task)
    job = MMGRPO(cfg, task, task.make_program(), HFBackend.load(model or "smollm2-135m"), RunDir(run_dir))
    fit(job)


if __name__ == "__main__":
    args = sys.argv[1:]
    opts = {}
    for flag in ("--model", "--lag"):
        if flag in args:
            i = args.index(flag)
            opts[flag], args = args[i + 1], args[:i] + args[i + 2:]
    main(args[0], int(args[1]), args[2] if len(args) > 2 else None, opts.get("--model"), int(opts.get("--lag", 0)))
