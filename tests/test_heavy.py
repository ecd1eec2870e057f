"""The heavy reliability tests (`./run.sh test -m heavy`): a training run killed 20 times anywhere
and resumed after each, on a busy machine; `mmgrpo serve` under 64 concurrent clients."""
from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mmgrpo.runlog import RunDir

HERE = Path(__file__).parent
pytestmark = pytest.mark.heavy


def job(run_dir: Path, steps: int, fault: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONHASHSEED="0")
    args = [sys.executable, str(HERE / "train_toy_job.py"), str(run_dir), str(steps)] + ([fault] if fault else [])
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def final_adapter(run_dir: Path, steps: int) -> dict:
    return load_file(str(run_dir / "checkpoints" / f"step-{steps:06d}" / "adapter_model.safetensors"))


def leftovers(run_dir: Path) -> list[str]:
    """Temp files and folders of atomic writes (.NAME.XXXX, .NAME.tmp, .NAME.old)."""
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob(".*"))


def test_a_run_killed_twenty_times_anywhere_ends_as_the_uninterrupted_one(tmp_path, cpu_hog):
    steps = 10
    straight = job(tmp_path / "straight", steps)
    _, err = straight.communicate(timeout=1200)
    assert straight.returncode == 0, err.decode()[-2000:]
    want_log = RunDir(tmp_path / "straight").read_log()
    want_dev = RunDir(tmp_path / "straight").read_log("dev.jsonl")

    rng = random.Random(20261127)
    plan = [f"{phase}:{rng.randint(1, top)}" for phase, top in
            (("rollout", 6), ("update", 2), ("checkpoint", 2), ("rename", 4), ("dev", 2), ("log", 1)) * 2]
    plan += ["time"] * (20 - len(plan))
    rng.shuffle(plan)
    run, killed = tmp_path / "killed", []
    for fault in plan:
        proc = job(run, steps, None if fault == "time" else fault)
        if fault == "time":
            try:
                proc.wait(timeout=rng.uniform(2.0, 16.0))  # from the start: loading, or the first step
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=1200)
        if proc.returncode == 0:
            break  # the run finished before this fault came due
        assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
        log = RunDir(run).read_log()
        assert all(log[i]["step"] == i + 1 for i in range(len(log))), [r["step"] for r in log]
        killed.append((fault, len(log)))
    print(f"\nkills: {len(killed)} ({', '.join(f'{f} after step {n}' for f, n in killed)})")
    assert len(killed) == 20, f"the run finished after {len(killed)} kills; make it longer"

    last = job(run, steps)
    _, err = last.communicate(timeout=1200)
    assert last.returncode == 0, err.decode()[-2000:]
    a, b = final_adapter(tmp_path / "straight", steps), final_adapter(run, steps)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), "differs from the uninterrupted run"
    for name, want in (("metrics.jsonl", want_log), ("dev.jsonl", want_dev)):
        lines = (run / name).read_text().splitlines()
        rows = [json.loads(line) for line in lines]  # every line well-formed
        assert [r["step"] for r in rows] == [r["step"] for r in want], name  # exactly one per step
    assert [r["reward_mean"] for r in RunDir(run).read_log()] == [r["reward_mean"] for r in want_log]
    assert leftovers(run) == [], leftovers(run)


# ---- mmgrpo serve under load ----
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def test_serve_holds_64_concurrent_clients(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mmgrpo.cli", "serve", "--port", str(port), "--device", "cpu",
                             "--dtype", "float32"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(url + "/models", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "mmgrpo serve did not start"
                time.sleep(0.5)
        topics = ["the sea", "music", "cats", "winter", "bread", "trains", "the moon", "gardens"]
        bodies = [("/completions", {"prompt": f"A short fact about {t}:", "max_tokens": 8, "temperature": 0.8,
                                    "seed": i, "logprobs": 1, "return_token_ids": True})
                  for i, t in enumerate(topics)]
        bodies += [("/chat/completions", {"messages": [{"role": "user", "content": f"One word about {t}."}],
                                          "max_tokens": 8, "temperature": 0})
                   for t in topics]
        bodies += [("/completions", {"prompt": [1, 2, 3], "max_tokens": 10**6}),  # refused: 400
                   ("/completions", {"prompt": "x", "temperature": "hot"})]
        latencies: list[float] = []
        bad: list[str] = []
        codes: dict[int, int] = {}
        lock = threading.Lock()
        stop_at = time.time() + 60
        rss = [rss_mib(proc.pid)]

        def client(c: int):
            r = random.Random(c)
            while time.time() < stop_at:
                path, body = r.choice(bodies)
                req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
                t0 = time.perf_counter()
                try:
                    with urllib.request.urlopen(req, timeout=120) as resp:
                        code, raw = resp.status, resp.read()
                except urllib.error.HTTPError as exc:
                    code, raw = exc.code, exc.read()
                except OSError as exc:  # a reset or refused connection is a failure too
                    code, raw = 0, f"{type(exc).__name__}: {exc}".encode()
                dt = time.perf_counter() - t0
                try:
                    out = json.loads(raw)
                    ok = (code == 200 and out["choices"][0]["finish_reason"] in ("stop", "length")
                          and (path == "/chat/completions" or len(out["choices"][0]["token_ids"]) ==
                               len(out["choices"][0]["logprobs"]["token_logprobs"]) >= 1)) or \
                        (code == 400 and out["error"]["message"] and body.get("max_tokens") != 8)
                except (ValueError, KeyError, IndexError, TypeError):
                    ok = False
                with lock:
                    codes[code] = codes.get(code, 0) + 1
                    if code == 200:
                        latencies.append(dt)
                    if not ok:
                        bad.append(f"{code} {raw[:200]!r}")

        threads = [threading.Thread(target=client, args=(c,)) for c in range(64)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            rss.append(rss_mib(proc.pid))
            time.sleep(1.0)
        for t in threads:
            t.join()
        half = len(rss) // 2
        q = statistics.quantiles(latencies, n=100)
        print(f"\nserve load: 64 clients, 60 s, {sum(codes.values())} requests ({codes}), "
              f"{len(latencies) / 60:.1f} answers/s; latency p50 {q[49]:.2f} s, p95 {q[94]:.2f} s, "
              f"p99 {q[98]:.2f} s, max {max(latencies):.2f} s; server RSS {rss[0]:.0f} MiB idle, max "
              f"{max(rss[:half]):.0f} MiB in the first half, {max(rss[half:]):.0f} MiB in the second")
        assert not bad, bad[:5]
        assert codes.get(200, 0) > 64 and proc.poll() is None
        # bounded: what the batches need, reached early, then no growth (a leak would keep climbing)
        assert max(rss[half:]) < max(rss[:half]) * 1.1 + 64, f"server memory kept growing: {rss}"
        assert max(rss) - rss[0] < 2048, f"server memory grew by {max(rss) - rss[0]:.0f} MiB"
    finally:
        proc.kill()
        proc.wait()
