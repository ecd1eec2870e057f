"""Data-parallel updates under `torchrun` or `accelerate launch` (one process per device).

Rank 0 is the run: it samples, evaluates, logs and writes the run folder. Before each update it
sends the step's grouping to every rank; each rank takes its share of the packed micro-batches,
and gradients and loss statistics are summed across ranks. The loss coefficients are computed
over the whole batch (every rank sees every member), so the sum of the shares is the
single-process loss exactly, up to the order of float additions. Nothing here runs in a single
process: every helper is the identity there.
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Sequence

import torch
import torch.distributed as dist


def launched() -> bool:
    """Started by torchrun / accelerate with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str, timeout_s: float = 3600.0) -> str:
    """Join the process group the launcher describes in the environment (nccl on GPUs, gloo on
    CPUs); returns the device this rank trains on. A no-op in a single process. ``timeout_s``: how
    long any collective may wait ([run] dist_timeout_s), the others waiting for rank 0's prompt
    search included; past it the waiting ranks fail instead of hanging."""
    if not launched():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    if cuda:
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return "cpu"


def abort() -> None:
    """After an error on this rank: end the process group instead of meeting the other ranks in a
    collective they are not in (that would hang); they fail at once on the closed connections,
    and the launcher stops the job."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - the error that got us here is the one to report
            pass


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def share(items: Sequence[Any]) -> list[Any]:
    """This rank's part of a list every rank holds the same (round-robin)."""
    return list(items)[rank()::world()]


def broadcast(obj: Any = None) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sync_params(params: Sequence[torch.Tensor]) -> None:
    """Every rank starts from rank 0's weights."""
    if active():
        for p in params:
            dist.broadcast(p.data, src=0)


def sum_grads(params: Sequence[torch.Tensor]) -> None:
    """Sum every parameter's gradient over ranks (a rank without micro-batches adds zeros), in one
    flat buffer."""
    if not active() or not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    at = 0
    for p in params:
        n = p.numel()
        p.grad = flat[at:at + n].view_as(p).clone()
        at += n


def sum_values(values: Sequence[float], device) -> list[float]:
    if not active():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def max_value(value: float, device) -> float:
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())
