"""Run (or resume) a small mmGRPO job on the toy task; used by the resume test as a subprocess."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from toy import toy_task  # noqa: E402

from mmgrpo.grpo.config import TrainConfig  # noqa: E402
from mmgrpo.grpo.run import MMGRPO, fit  # noqa: E402
from mmgrpo.lm.hf import HFBackend  # noqa: E402
from mmgrpo.runlog import RunDir  # noqa: E402


def main(run_dir: str, steps: int) -> None:
    cfg = TrainConfig(task="toy", steps=steps, batch_examples=2, group_size=4, max_tokens=12, learning_rate=1e-3,
                      eval_every=1000, eval_examples=2, checkpoint_every=1, keep_checkpoints=2, progress=False, seed=3)
    task = toy_task()
    job = MMGRPO(cfg, task, task.make_program(), HFBackend.load(), RunDir(run_dir))
    fit(job)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
