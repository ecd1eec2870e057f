"""Data-parallel training: `torchrun` with 2 CPU processes (gloo) running `mmgrpo train` trains as
one process does, only rank 0 writes the run folder, and resume works the same. Mechanics: a tiny
random model of the embedded model's architecture runs the lenient toy program."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from mmgrpo.runlog import RunDir

HERE = Path(__file__).parent
TOPICS = ["the sea", "music", "cats", "winter", "bread", "trains"]


def files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())


def train(tmp_path: Path, name: str, world: int, steps: int, model: str, resume: Path | None = None,
          failing_rank: int | None = None):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"t{i}", "topic": t}) + "\n" for i, t in enumerate(TOPICS)))
    sets = [f"model.name={model}", "task.program=toy:LenientToy", "task.metric=toy:even", f"task.train={data}", f"task.dev={data}",
            f"run.steps={steps}", "run.eval_every=2", "run.eval_examples=2", f"run.out={tmp_path / name}",
            "run.progress=false", "rollout.batch_examples=2", "rollout.group_size=4", "rollout.max_tokens=12",
            "rollout.temperature=0.8", "grpo.learning_rate=2e-3", "run.seed=5", "run.keep_checkpoints=3", "run.checkpoint_every=1",
            "model.dtype=float32", "model.sampler_dtype=model", "model.update_dtype=model",  # exact: float32
            "grpo.prefix_attention=packed", "grpo.pack_tokens=256"]  # several micro-batches, so that both ranks have a share
    cli = ["-m", "mmgrpo.cli", "train", *[a for s in sets for a in ("--set", s)]]
    if resume:
        cli += ["--resume", str(resume)]
    if failing_rank is not None:  # the launched script: one rank raises in its first update
        cli = [str(HERE / "dist_fault_job.py"), str(failing_rank), *cli[2:]]
    cmd = [sys.executable, *cli] if world == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *cli]
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if failing_rank is not None:
        return out
    assert out.returncode == 0, "\n".join(l for l in (out.stdout + out.stderr).splitlines() if "rank0" in l or "Error" in l)[-3000:]
    runs = [p for p in (tmp_path / name).iterdir() if p.is_dir()]
    assert len(runs) == 1, runs  # rank 1 made no folder of its own
    return runs[0]


def test_torchrun_with_two_gloo_processes_trains_like_one_and_only_rank_0_writes(tmp_path, tiny_model_dir):
    one = train(tmp_path, "one", 1, 3, tiny_model_dir)
    two = train(tmp_path, "two", 2, 3, tiny_model_dir)
    name = "checkpoints/step-000003/adapter_model.safetensors"
    a, b = load_file(str(one / name)), load_file(str(two / name))
    # resume: as if killed after step 2, then the same torchrun command with --resume
    import shutil

    shutil.rmtree(two / "checkpoints" / "step-000003")
    (two / "checkpoints" / "latest").write_text("step-000002\n")
    assert train(tmp_path, "two", 2, 3, tiny_model_dir, resume=two) == two
    c = load_file(str(two / name))
    assert all(torch.equal(b[k], c[k]) for k in b)
    assert a.keys() == b.keys()
    # the same training up to the order of float sums (a gradient all-reduce): Adam's normalisation can
    # magnify that noise in an element whose gradient is near 0, so the adapters are compared as a whole
    num = sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5
    assert num / sum(float(a[k].norm() ** 2) for k in a) ** 0.5 < 1e-4, num
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)  # it did train
    logs = [RunDir(p).read_log() for p in (one, two)]
    assert [r["step"] for r in logs[1]] == [1, 2, 3]  # one line a step: rank 1 wrote none
    assert [r["reward_mean"] for r in logs[0]] == [r["reward_mean"] for r in logs[1]]
    assert any(r["updated"] for r in logs[1])
    for r1, r2 in zip(*logs):
        assert r1["updated"] == r2["updated"]
        if r1["updated"]:  # the statistics are of the whole batch, summed over both ranks
            assert r1["train_tokens"] == r2["train_tokens"] and r1["micro_batches"] == r2["micro_batches"] >= 2
            assert abs(r1["loss"] - r2["loss"]) < 1e-5 and abs(r1["grad_norm"] - r2["grad_norm"]) < 1e-4
    assert files(one) == files(two)


def test_a_rank_that_fails_mid_update_ends_the_job_at_once_instead_of_hanging(tmp_path, tiny_model_dir):
    import time

    for rank in (0, 1):
        t0 = time.perf_counter()
        out = train(tmp_path, f"fail{rank}", 2, 3, tiny_model_dir, failing_rank=rank)
        took = time.perf_counter() - t0
        assert out.returncode != 0 and f"injected failure on rank {rank} mid-update" in out.stdout + out.stderr
        assert took < 300, took  # the loading and first rollouts, not a collective's timeout (3600 s)
