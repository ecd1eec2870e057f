"""Rollouts in Ray actors (a local Ray cluster started and stopped here) against a real
`mmgrpo serve` process: the same trajectories as local rollouts; a killed worker's examples are
run again and counted; a training run with workers equals one without."""
from __future__ import annotations

import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

ray = pytest.importorskip("ray")

from test_remote import adapter, free_port, run_toy, start_server, toy_config  # noqa: E402
from toy import even, lenient_toy_task  # noqa: E402

from mmgrpo.lm.base import SamplingParams  # noqa: E402
from mmgrpo.lm.remote import RemotePolicy  # noqa: E402
from mmgrpo.rollout import sample  # noqa: E402
from mmgrpo.rollout_ray import RaySampler, policy_settings  # noqa: E402
from mmgrpo.runlog import RunDir  # noqa: E402


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    """A local Ray cluster beside `mmgrpo serve` of a tiny random model (these tests check mechanics)."""
    port = free_port()
    proc = start_server(port, tiny_model_dir)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}})
    try:
        yield f"http://127.0.0.1:{port}/v1", tiny_model_dir
    finally:
        ray.shutdown()
        proc.kill()
        proc.wait()


def view(result):
    return [(t.example_id, t.sample_index, t.status, t.reward, [c.completion_ids for c in t.calls])
            for t in result.trajectories]


def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_ray_workers_give_the_local_trajectories_and_redo_a_killed_workers_examples(cluster, tmp_path):
    url, model = cluster
    task = lenient_toy_task()
    policy = RemotePolicy([url], tokenizer(model))
    examples = task.dev[:6]
    armed = tmp_path / "armed"  # while this file exists, a worker scoring example t3 kills itself (once)

    def deadly(ex, pred):
        if ex.id == "t3" and armed.exists():
            armed.unlink()
            os.kill(os.getpid(), signal.SIGKILL)
        return even(ex, pred)

    workers = RaySampler(2, task.make_program, deadly, policy_settings(policy))
    try:
        assert len(set(workers.actor_pids) | {os.getpid()}) == 3  # two actors, neither of them this process
        for temperature, kill in ((0.0, False), (0.8, False), (0.8, True)):  # greedy; seeded sampling; a death
            params = SamplingParams(temperature=temperature, max_tokens=12)
            local = sample(task.make_program(), examples, even, policy, n_samples=3, params=params, seed=11,
                           concurrency=6)
            if kill:
                armed.touch()
            far = workers.sample(task.make_program(), examples, n_samples=3, params=params, seed=11,
                                 model=policy.model, version=0, concurrency=6)
            assert view(far) == view(local)  # the same trajectories, in the same order
            if kill:  # t3 is on worker 1 with t1 and t5 (round-robin); those still running died with it
                assert not armed.exists() and "t3" in workers.last_retried
                assert set(workers.last_retried) <= {"t1", "t3", "t5"}
            assert far.counts["worker_retries"] == len(workers.last_retried) == (len(workers.last_retried) if kill
                                                                                 else 0)
    finally:
        workers.close()


def test_training_with_ray_workers_equals_training_without(cluster, tmp_path):
    url, model = cluster
    run_toy(replace(toy_config(servers=[url]), steps=2), tmp_path / "plain", model=model)
    spread = run_toy(replace(toy_config(servers=[url], workers=2), steps=2), tmp_path / "ray", model=model)
    assert spread.workers is None  # its actors ended with the run
    a, b = adapter(tmp_path / "plain", 2), adapter(tmp_path / "ray", 2)
    # the same training up to float rounding: the server batches requests as they arrive, so a sampled
    # log-prob (and so an importance weight) may differ in its last bits; compared as a whole, as Adam can
    # magnify that in an element whose gradient is near 0
    num = sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5
    assert num / sum(float(a[k].norm() ** 2) for k in a) ** 0.5 < 1e-3, num
    logs = [RunDir(tmp_path / n).read_log() for n in ("plain", "ray")]
    assert [r["reward_mean"] for r in logs[0]] == [r["reward_mean"] for r in logs[1]]
    assert all(r["n_worker_retries"] == 0 for r in logs[1]) and any(r["updated"] for r in logs[1])


def _broken_program():
    raise ImportError("the program's module is missing on the worker")


def test_a_worker_that_raises_or_never_answers_fails_the_call_instead_of_hanging(cluster):
    import time

    from mmgrpo.rollout_ray import RolloutWorkersFailed

    url, model = cluster
    task = lenient_toy_task()
    policy = RemotePolicy([url], tokenizer(model))
    params = SamplingParams(temperature=0.0, max_tokens=4)
    broken = RaySampler(1, _broken_program, even, policy_settings(policy))
    try:
        with pytest.raises(RolloutWorkersFailed, match="raised.*missing on the worker"):
            broken.sample(task.make_program(), task.dev[:2], n_samples=1, params=params, seed=0, model=policy.model,
                          version=0)
    finally:
        broken.close()

    def forever(ex, pred):
        time.sleep(3600)

    stuck = RaySampler(1, task.make_program, forever, policy_settings(policy), timeout_s=5)
    try:
        t0 = time.perf_counter()
        with pytest.raises(RolloutWorkersFailed, match="no answer from their rollout workers in 5 s"):
            stuck.sample(task.make_program(), task.dev[:2], n_samples=1, params=params, seed=0, model=policy.model,
                         version=0)
        assert time.perf_counter() - t0 < 60
    finally:
        stuck.close()


def test_workers_on_another_machine_get_the_programs_source_and_a_local_cluster_the_path():
    from mmgrpo.rollout_ray import runtime_env

    task = lenient_toy_task()
    assert runtime_env(None, task.make_program, task.reward)["env_vars"]["PYTHONPATH"].split(os.pathsep)[0]
    remote = runtime_env("ray://head:10001", task.make_program, task.reward)
    # the toy program lives in tests/toy.py, not an installed package: its source travels
    assert remote == {"py_modules": [str(Path(sys.modules[task.make_program.__module__].__file__))]}
