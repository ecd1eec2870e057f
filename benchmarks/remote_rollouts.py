"""Rollouts through a policy server vs in-process, and the cost of one adapter push, measured in
one run on this machine: the embedded model, Banking77's program, 32 concurrent programs.

The server is `mmgrpo serve` in its own process (the same model, batching by arrival time); the
in-process backend runs deterministic and timed batching. The settings alternate, twice each, and
the medians are compared. A push = write the adapter (safetensors, atomically) + load it on the
server under a new name + unload the previous one (what the trainer does after each update).
Usage: python benchmarks/remote_rollouts.py [--n 32]
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from mmgrpo.lm.base import SamplingParams
from mmgrpo.lm.hf import HFBackend
from mmgrpo.lm.remote import RemotePolicy
from mmgrpo.rollout import sample
from mmgrpo.tasks import get_task


def start_server(core: int | None = None) -> tuple[subprocess.Popen, str]:
    """`mmgrpo serve` (the embedded model in float32) on a free port, pinned to ``core`` with one thread
    when given; returns it once it answers, and its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mmgrpo.cli", "serve", "--port", str(port), "--device", "cpu", "--dtype", "float32",
           "--adapter-root", tempfile.gettempdir()]
    env = dict(os.environ)
    if core is not None:
        cmd, env["OMP_NUM_THREADS"] = ["taskset", "-c", str(core), *cmd], "1"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/models", timeout=2)
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("mmgrpo serve exited while starting")
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("mmgrpo serve did not start in 300 s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    proc, url = start_server()
    try:
        lm = HFBackend.load()
        remote = RemotePolicy(url, lm.tokenizer)
        task = get_task("banking77", n_labels=10, n_demos=5, reasoning=False)
        prog, exs = task.make_program(), task.train[: args.n]
        params = SamplingParams(temperature=1.0, max_tokens=args.max_tokens)
        for sampler in (lm, remote):  # warm-up
            sample(prog, exs[:2], task.reward, sampler, params=params, concurrency=2, progress=False)
        rates: dict[str, list[float]] = {"in-process deterministic": [], "in-process timed": [], "server": []}
        for _ in range(2):
            for name in rates:
                lm.deterministic = name != "in-process timed"
                sampler = remote if name == "server" else lm
                out = sample(prog, exs, task.reward, sampler, params=params, concurrency=32, seed=1, progress=False)
                rates[name].append(len(out.trajectories) / out.seconds)
        med = {k: statistics.median(v) for k, v in rates.items()}
        for k, v in med.items():
            print(f"{k:26s} {v:6.2f} trajectories/s  (runs: {', '.join(f'{x:.2f}' for x in rates[k])})")
        # adapter pushes
        from peft import LoraConfig, get_peft_model

        peft = get_peft_model(lm.model, LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                         "gate_proj", "up_proj", "down_proj"]))
        root = Path(tempfile.mkdtemp(prefix="mmgrpo-push-"))
        times, save_times = [], []
        for k in range(6):
            t0 = time.perf_counter()
            peft.save_pretrained(root / f"v{k}", safe_serialization=True)
            t1 = time.perf_counter()
            remote.push(root / f"v{k}", f"bench-v{k}", k)
            t2 = time.perf_counter()
            save_times.append(t1 - t0)
            times.append(t2 - t0)
        push, save = statistics.median(times[1:]), statistics.median(save_times[1:])
        print(f"adapter push (r=16, all linear layers, {sum(p.numel() for n, p in peft.named_parameters() if 'lora' in n) / 1e6:.1f}M "
              f"params): {push * 1000:.0f} ms median (write {save * 1000:.0f} ms, load+unload {1000 * (push - save):.0f} ms)")
        print(f"server / in-process deterministic = {med['server'] / med['in-process deterministic']:.2f}x; "
              f"server / in-process timed = {med['server'] / med['in-process timed']:.2f}x")
    finally:
        proc.kill()


if __name__ == "__main__":
    main()
