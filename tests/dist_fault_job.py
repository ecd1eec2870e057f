"""`mmgrpo train ...` under torchrun with one rank failing in the middle of an update (its first
micro-batch loss raises); used by test_distributed as the launched script.

``python -m torch.distributed.run ... dist_fault_job.py RANK train [args]``
"""
from __future__ import annotations

import os
import sys

from mmgrpo.cli import main
from mmgrpo.grpo import trainer as trainer_mod

real_loss = trainer_mod.grpo_loss


def failing_loss(*a, **k):
    if int(os.environ.get("RANK", "0")) == int(sys.argv[1]):
        raise RuntimeError(f"injected failure on rank {sys.argv[1]} mid-update")
    return real_loss(*a, **k)


trainer_mod.grpo_loss = failing_loss
sys.exit(main(sys.argv[2:]))
