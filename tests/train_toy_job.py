"""Run (or resume) a small mmGRPO job on the toy task; used by the resume tests as a subprocess.

One example a step; example t2 always scores 0.5, so the step that draws it (step 1 with seed 3)
has equal rewards in every group and makes no update: resume must count it all the same.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from toy import short, toy_task  # noqa: E402

from mmgrpo.grpo.config import TrainConfig  # noqa: E402
from mmgrpo.grpo.run import MMGRPO, fit  # noqa: E402
from mmgrpo.lm.hf import HFBackend  # noqa: E402
from mmgrpo.runlog import RunDir  # noqa: E402


def constant_on_t2(ex, pred) -> float:
    return 0.5 if ex.id == "t2" else short(ex, pred)


def main(run_dir: str, steps: int) -> None:
    cfg = TrainConfig(task="toy", steps=steps, batch_examples=1, group_size=4, max_tokens=12, learning_rate=1e-3,
                      temperature=0.7, eval_every=1000, eval_examples=2, checkpoint_every=1, keep_checkpoints=2,
                      progress=False, seed=3)
    task = toy_task()
    task.reward = constant_on_t2
    job = MMGRPO(cfg, task, task.make_program(), HFBackend.load(), RunDir(run_dir))
    fit(job)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
