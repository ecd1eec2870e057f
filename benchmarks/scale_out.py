"""Past one machine, measured on this one: rollout throughput with 0 (the driver), 1 and 2 Ray
rollout workers against one `mmgrpo serve` process, and the data-parallel update (torchrun, 2 gloo
processes) against 1 process on the same batches. One run; ratios printed.

Rollouts: 32 Banking77 programs a round (the driver alone: 32 threads; each worker: its share
with the same concurrency), alternating settings, medians of 2 rounds; the server batches by
arrival time. Update: `mmgrpo train` on the toy program (tests/toy.py), 4 examples x G = 8 a step,
3 steps, 1 process vs `torchrun --nproc_per_node 2` (the same batches: same seeds), median
`update_s` of the updated steps. On 2 cores expect little speedup: the
server, the workers and the driver share the same cores.
Usage: python benchmarks/scale_out.py [--n 32] [--skip-update] [--skip-rollouts]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from remote_rollouts import start_server

from common import machine
from mmgrpo.lm.base import SamplingParams
from mmgrpo.lm.hf import HFBackend
from mmgrpo.lm.remote import RemotePolicy
from mmgrpo.rollout import sample
from mmgrpo.tasks import get_task

HERE = Path(__file__).parent


def rollouts(n: int) -> dict[str, float]:
    import ray

    proc, url = start_server()
    try:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}})
        from mmgrpo.rollout_ray import RaySampler, policy_settings

        policy = RemotePolicy(url, HFBackend.load().tokenizer)
        task = get_task("banking77", n_labels=10, n_demos=5, reasoning=False)
        prog, exs = task.make_program(), task.train[:n]
        params = SamplingParams(temperature=1.0, max_tokens=32)
        pools = {k: RaySampler(k, task.make_program, task.reward, policy_settings(policy), cpus_per_worker=0.5)
                 for k in (1, 2)}
        for pool in pools.values():  # warm-up: the actors import and build the program
            pool.sample(prog, exs[:2], n_samples=1, params=params, seed=0, model=policy.model, version=0)
        sample(prog, exs[:2], task.reward, policy, params=params, concurrency=2, progress=False)
        rates: dict[str, list[float]] = {"driver, no workers": [], "1 Ray worker": [], "2 Ray workers": []}
        for _ in range(2):
            out = sample(prog, exs, task.reward, policy, params=params, concurrency=32, seed=1, progress=False)
            rates["driver, no workers"].append(len(out.trajectories) / out.seconds)
            for k, pool in pools.items():
                out = pool.sample(prog, exs, n_samples=1, params=params, seed=1, model=policy.model, version=0,
                                  concurrency=32)
                rates[f"{k} Ray worker{'s' if k > 1 else ''}"].append(len(out.trajectories) / out.seconds)
        for pool in pools.values():
            pool.close()
        ray.shutdown()
        return {k: statistics.median(v) for k, v in rates.items()} | {"runs": rates}
    finally:
        proc.kill()
        proc.wait()


def update_seconds(world: int, folder: Path) -> list[float]:
    """`mmgrpo train` on the toy program (tests/toy.py), 4 examples x G = 8 a step, 3 steps."""
    folder.mkdir(parents=True)
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"t{i}", "topic": t}) + "\n" for i, t in enumerate(
        ["the sea", "music", "cats", "winter", "bread", "trains", "the moon", "gardens"])))
    sets = ["task.program=toy:Toy", "task.metric=toy:short", f"task.train={data}", f"task.dev={data}",
            "run.steps=3", "run.eval_every=100", "run.eval_examples=1", f"run.out={folder}", "run.progress=false",
            "rollout.batch_examples=4", "rollout.group_size=8", "rollout.max_tokens=16", "grpo.pack_tokens=512",
            "grpo.learning_rate=2e-3"]
    cli = ["-m", "mmgrpo.cli", "train", *[a for s in sets for a in ("--set", s)]]
    cmd = [sys.executable, *cli] if world == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *cli]
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // world)),
               PYTHONPATH=os.pathsep.join([str(HERE.parent / "tests"), os.environ.get("PYTHONPATH", "")]))
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    run = next(p for p in folder.iterdir() if p.is_dir())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["update_s"] for r in rows if r.get("updated")], [r["micro_batches"] for r in rows if r.get("updated")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--skip-update", action="store_true")
    ap.add_argument("--skip-rollouts", action="store_true")
    args = ap.parse_args()
    print(machine())
    if not args.skip_rollouts:
        r = rollouts(args.n)
        for k in ("driver, no workers", "1 Ray worker", "2 Ray workers"):
            print(f"{k:20s} {r[k]:6.2f} trajectories/s  (rounds: {', '.join(f'{x:.2f}' for x in r['runs'][k])})")
        print(f"rollouts: 2 workers / 1 worker = {r['2 Ray workers'] / r['1 Ray worker']:.2f}x; "
              f"1 worker / driver = {r['1 Ray worker'] / r['driver, no workers']:.2f}x")
    if not args.skip_update:
        root = Path(tempfile.mkdtemp(prefix="mmgrpo-dp-"))
        (one, mbs), (two, _) = update_seconds(1, root / "one"), update_seconds(2, root / "two")
        print(f"update, 1 process: {statistics.median(one):.2f} s (steps: {', '.join(f'{x:.2f}' for x in one)}; "
              f"micro-batches {mbs})")
        print(f"update, 2 processes: {statistics.median(two):.2f} s (steps: {', '.join(f'{x:.2f}' for x in two)})")
        print(f"ratio={statistics.median(two) / statistics.median(one):.2f} (2-process update time / 1 process)")


if __name__ == "__main__":
    main()
