"""GPU check of training through a policy server (prepared for a lent CUDA machine; never CI):
`mmgrpo serve` on CUDA serves a randomly initialised Qwen2-0.5B-shaped model; the learner (the
same GPU) trains 3 mmGRPO steps whose rollouts and dev evaluations go through the server, the
adapter pushed after each update under a new name. Prints per step: policy versions seen, the
mismatch of the server's log-probs against the learner's (bf16), rollout/update/push times; then
rollout throughput through the server vs in-process on the same programs (one run).
Usage: python benchmarks/device/gpu_remote.py [--tiny] [--tokenizer DIR]
Must finish in under 3 minutes on one H100.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))
sys.path.insert(0, str(HERE))

from gpu_loop import TwoStep, make_model, short  # noqa: E402

import mmgrpo  # noqa: E402
from mmgrpo.lm.base import SamplingParams  # noqa: E402
from mmgrpo.lm.remote import RemotePolicy  # noqa: E402
from mmgrpo.program import Example  # noqa: E402
from mmgrpo.rollout import sample  # noqa: E402


def wait_up(url: str, proc: subprocess.Popen, limit_s: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < limit_s:
        try:
            urllib.request.urlopen(url + "/models", timeout=2)
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("mmgrpo serve exited at start")
            time.sleep(0.5)
    raise RuntimeError("mmgrpo serve did not answer")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--tokenizer", default=None)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, cuda: {torch.cuda.get_device_name() if cuda else 'none'}")
    root = Path(tempfile.mkdtemp(prefix="mmgrpo-gpu-remote-"))
    make_model("tiny" if args.tiny else "0.5b", root / "model", args.tokenizer)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[1] / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "mmgrpo.cli", "serve", "--model", str(root / "model"),
                             "--port", str(port), "--adapter-root", str(root)], env=env)
    try:
        t0 = time.perf_counter()
        wait_up(url, proc)
        print(f"server up in {time.perf_counter() - t0:.1f}s at {url}")
        rows = [{"topic": t} for t in ("rain", "bread", "rivers", "night", "snow", "bells", "coffee", "wind")]
        config = {"rollout": {"batch_examples": 4, "group_size": 8, "temperature": 1.0, "max_tokens": 16,
                              "servers": [url]},
                  "run": {"steps": 3, "eval_every": 1, "eval_examples": 4, "checkpoint_every": 1,
                          "out": str(root / "runs"), "progress": False}}
        t0 = time.perf_counter()
        res = mmgrpo.optimize(TwoStep(), rows, rows[:4], short, strategy="weights", model=str(root / "model"),
                              config=config)
        run = Path(res.info["run"])
        print(f"learner on {res.backend.device} ({res.backend.model.dtype}); 3 steps through the server in "
              f"{time.perf_counter() - t0:.1f}s")
        for line in (run / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            print(f"   step {r['step']}: versions {r['policy_versions']}, reward {r['reward_mean']:.3f}, "
                  f"updated {r['updated']}, mismatch {r.get('mismatch_mean', float('nan')):.2e}, "
                  f"rollout {r['rollout_s']:.2f}s, update {r.get('update_s', 0):.2f}s, push {r.get('push_s', 0):.2f}s")
        models = json.loads(urllib.request.urlopen(url + "/models").read())["data"]
        print("   served now:", [m["id"] for m in models])
        # throughput: the same 32 programs (greedy, 4 examples x 8), in-process vs through the server
        exs = [Example(f"e{i}", r) for i, r in enumerate(rows[:4])]
        params = SamplingParams(temperature=1.0, max_tokens=16)
        remote = RemotePolicy(url, res.backend.tokenizer)
        for name, lm in (("in-process", res.backend), ("server", remote), ("in-process", res.backend),
                         ("server", remote)):
            out = sample(TwoStep(), exs, short, lm, n_samples=8, params=params, concurrency=32, seed=1,
                         progress=False)
            print(f"   rollouts {name}: {len(out.trajectories) / out.seconds:.1f} programs/s "
                  f"({out.completion_tokens / out.seconds:.0f} tokens/s)")
        res.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
