"""mmGRPO on the real embedded model: it learns, and a killed run resumes to the same adapter."""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


import pytest
import torch
from safetensors.torch import load_file

from mmgrpo.config import TrainConfig
from mmgrpo.grpo.groups import assign_weights, compute_advantages, group_calls
from mmgrpo.grpo.run import MMGRPO, TrainingStopped, fit
from mmgrpo.grpo.trainer import Trainer
from mmgrpo.lm.base import SamplingParams
from mmgrpo.lm.hf import HFBackend
from mmgrpo.rollout import sample
from mmgrpo.runlog import RunDir
from toy import even, lenient_toy_task, short, toy_task

HERE = Path(__file__).parent


def test_mmgrpo_raises_the_reward_of_a_two_module_program(tmp_path):
    task = toy_task()
    program = task.make_program()
    lm = HFBackend.load(dtype="float32")  # its own copy: training injects LoRA into the model
    cfg = TrainConfig(task="toy", steps=4, batch_examples=4, group_size=8, max_tokens=16, learning_rate=1e-3,
                      eval_every=100, checkpoint_every=100, progress=False)
    job = MMGRPO(cfg, task, program, lm, RunDir(tmp_path))

    def probe():
        res = sample(program, task.dev, task.reward, lm, n_samples=4, seed=99, progress=False,
                     params=SamplingParams(temperature=1.0, max_tokens=16))
        return res.rewards

    before = probe()
    records = [job.train_step(s) for s in range(1, cfg.steps + 1)]
    after = probe()
    assert all(r["updated"] for r in records[:2])
    assert records[0]["groups_used"] >= 4  # groups of both modules, for several examples
    # the base model sits near 0 (format failures score -1); training lifts the mean reward of the same
    # probe by more than twice its standard error (a rise the probe's noise does not explain)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    se = sum(sum((x - mean(xs)) ** 2 for x in xs) / (len(xs) - 1) / len(xs) for xs in (before, after)) ** 0.5
    assert mean(after) - mean(before) > 2 * se, (mean(before), mean(after), se, [r["reward_mean"] for r in records])


def _run(run_dir, steps, model, lag=0):
    env = dict(os.environ, PYTHONHASHSEED="0")
    return subprocess.Popen([sys.executable, str(HERE / "train_toy_job.py"), str(run_dir), str(steps),
                             "--model", model, "--lag", str(lag)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


@pytest.mark.parametrize("lag", [0, 1])
def test_resume_after_sigkill_gives_the_same_final_adapter_on_a_busy_machine(tmp_path, cpu_hog, tiny_model_dir, lag):
    """Killed after step 2, resumed: the same adapter as a straight run, while other processes
    keep every core busy (batches must not depend on timing). Step 1 makes no update. Mechanics: a tiny
    random model, whose steps are short: six of them, so that the kill lands mid-run. At lag 1 the
    rollouts of the next step are in flight when the kill comes."""
    steps = 6
    straight = _run(tmp_path / "straight", steps, tiny_model_dir, lag)
    _, err = straight.communicate(timeout=900)
    assert straight.returncode == 0, err.decode()[-2000:]
    log = RunDir(tmp_path / "straight").read_log()
    assert [r["step"] for r in log] == list(range(1, steps + 1))
    assert not log[0]["updated"] and log[0]["groups_skipped_equal_rewards"] >= 1  # the no-update step
    assert any(r["updated"] for r in log[1:])

    killed_dir = tmp_path / "killed"
    proc = _run(killed_dir, steps, tiny_model_dir, lag)
    latest = killed_dir / "checkpoints" / "latest"
    deadline = time.time() + 900
    while time.time() < deadline:
        if latest.exists() and latest.read_text().strip() == "step-000002":
            break
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert latest.read_text().strip() != f"step-{steps:06d}"

    resumed = _run(killed_dir, steps, tiny_model_dir, lag)
    _, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err.decode()[-2000:]
    a = load_file(str(tmp_path / "straight" / "checkpoints" / f"step-{steps:06d}" / "adapter_model.safetensors"))
    b = load_file(str(killed_dir / "checkpoints" / f"step-{steps:06d}" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    assert all((a[k] == b[k]).all() for k in a), "resumed adapter differs from the uninterrupted one"
    resumed_log = RunDir(killed_dir).read_log()
    assert [r["step"] for r in resumed_log] == list(range(1, steps + 1))
    assert [r["reward_mean"] for r in resumed_log] == [r["reward_mean"] for r in log]


def test_config_errors_name_the_key(tmp_path):
    from mmgrpo.config import load_config

    bad = tmp_path / "c.toml"
    bad.write_text('[grpo]\nlearning_rat = 0.1\n')
    with pytest.raises(ValueError, match=r"unknown key 'learning_rat' in \[grpo\]; did you mean 'learning_rate'"):
        load_config(bad)
    bad.write_text('[rollout]\ngroup_size = "eight"\n')
    with pytest.raises(ValueError, match="key 'group_size' must be of type"):
        load_config(bad)
    bad.write_text('[rollout]\nservers = [1]\n')  # a list of URLs, not of numbers
    with pytest.raises(ValueError, match=r"key 'servers' must be of type list\[str\]"):
        load_config(bad)
    bad.write_text('[grpo]\nprefix_attention = "flash"\n')
    with pytest.raises(ValueError, match="'prefix_attention': must be one of auto, packed, cache, got 'flash'"):
        load_config(bad)
    bad.write_text('[rollout]\ngroup_size = 1\n')
    with pytest.raises(ValueError, match="'group_size': must be >= 2"):
        load_config(bad)
    bad.write_text('[rolout]\ngroup_size = 4\n')
    with pytest.raises(ValueError, match=r"unknown section 'rolout'; did you mean \[rollout\]"):
        load_config(bad)
    good = tmp_path / "c.yaml"
    good.write_text("run: {steps: 3}\ntask: {options: {n_labels: 5}}\n")
    cfg = load_config(good, overrides=["grpo.learning_rate=0.01", "task.options.n_demos=2"])
    assert (cfg.steps, cfg.learning_rate, cfg.task_options) == (3, 0.01, {"n_labels": 5, "n_demos": 2})


def _rollouts(lm, temperature=0.7, seed=5, task=None):
    """Toy rollouts grouped for an update; rewards alternate where they tie, so every call trains
    (these tests are about the log-probs and the objective, not about what is learned)."""
    task = task or toy_task()
    roll = sample(task.make_program(), task.train, task.reward, lm, n_samples=4, seed=seed, progress=False,
                  params=SamplingParams(temperature=temperature, max_tokens=12))
    by_example = roll.by_example()
    for trajs in by_example.values():
        for k, t in enumerate(trajs):
            t.reward = float(k % 2) if len({x.reward for x in trajs}) == 1 else t.reward
    grouping = group_calls(by_example)
    compute_advantages(grouping)
    assign_weights(grouping)
    assert grouping.groups
    return grouping


def test_sampler_and_trainer_agree_at_temperature_and_tis_corrects_a_real_gap():
    lm = HFBackend.load(dtype="float32")
    cfg = TrainConfig(task="toy", max_tokens=12, temperature=0.7, learning_rate=1e-3, tis_cap=1.0, progress=False,
                      update_dtype="model")  # float32 on both sides: they agree to rounding
    trainer = Trainer(lm, cfg)
    grouping = _rollouts(lm)
    members = grouping.members
    seqs = [(m.call.prompt_ids, m.call.completion_ids) for m in members]
    assert all(m.call.temperature == 0.7 for m in members)
    for shared in (True, False):  # the trainer's log-probs of logits / T are what the sampler recorded
        trainer.cfg = dataclasses.replace(cfg, shared_prefix=shared)
        with torch.no_grad():
            logp, mask = trainer.logprobs(seqs, [0.7] * len(seqs))
            untempered, _ = trainer.logprobs(seqs)
        gap = []
        for j, m in enumerate(members):
            sampled = torch.tensor(m.call.logprobs)
            assert torch.allclose(logp[j][mask[j]], sampled, atol=2e-3), (shared, j)
            gap.append(float((untempered[j][mask[j]] - sampled).abs().mean()))
        assert sum(gap) / len(gap) > 0.05  # what T = 1 log-probs (the old convention) would have been off by
    trainer.cfg = cfg
    fresh = trainer.update(grouping)
    assert fresh["mismatch_max"] < 2e-3 and fresh["tis_weight_mean"] == pytest.approx(1.0, abs=1e-3)
    stale = trainer.update(grouping)  # the same rollouts one update later: a real sampler/learner gap
    assert stale["mismatch_mean"] > 10 * fresh["mismatch_mean"] and stale["mismatch_mean"] > 1e-3
    assert 0 < stale["tis_weight_mean"] < 0.999  # tokens the policy now likes less are weighed down


def test_a_second_iteration_moves_the_ratio_and_the_kl(tiny_model_dir):
    # the objective's mechanics: a tiny random model
    grouping = _rollouts(HFBackend.load(tiny_model_dir, dtype="float32"), temperature=1.0, seed=11,
                         task=lenient_toy_task())
    recs = {}
    for mu in (1, 2):
        cfg = TrainConfig(task="toy", max_tokens=12, learning_rate=2e-3, beta=0.05, epsilon=0.02, num_iterations=mu,
                          loss_type="dapo", progress=False, seed=1)
        recs[mu] = Trainer(HFBackend.load(tiny_model_dir, dtype="float32"), cfg).update(grouping)
    # a fresh adapter is zero: with one iteration policy = old = reference, exactly
    assert recs[1]["kl"] == 0 and recs[1]["ratio_dev"] == 0 and recs[1]["clip_frac"] == 0
    assert recs[2]["kl"] > 0 and recs[2]["ratio_dev"] > 0 and recs[2]["clip_frac"] > 0, recs[2]
    assert recs[2]["grad_norm"] > 0


def test_error_rollouts_stop_the_run_before_training_and_it_resumes(tmp_path, tiny_model_dir):
    task = lenient_toy_task()  # mechanics: a tiny random model

    def judge_down(ex, pred):
        raise ConnectionError("judge at 127.0.0.1:9 refused the connection")

    cfg = TrainConfig(task="toy", steps=2, batch_examples=2, group_size=2, max_tokens=8, eval_every=100,
                      eval_examples=2, checkpoint_every=100, progress=False)
    task.reward = judge_down
    job = MMGRPO(cfg, task, task.make_program(), HFBackend.load(tiny_model_dir, dtype="float32"), RunDir(tmp_path))
    before = {k: v.clone() for k, v in job.trainer.model.named_parameters() if v.requires_grad}
    with pytest.raises(TrainingStopped, match=r"[34] of 4 rollouts failed.*ConnectionError: judge at 127.0.0.1:9.*--resume"):
        fit(job)
    after = dict(job.trainer.model.named_parameters())
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing trained on an outage
    assert RunDir(tmp_path).read_log() == []

    task.reward = even  # the judge is back: the same folder resumes and finishes
    job = MMGRPO(cfg, task, task.make_program(), HFBackend.load(tiny_model_dir, dtype="float32"), RunDir(tmp_path))
    fit(job)
    assert [r["step"] for r in RunDir(tmp_path).read_log()] == [1, 2]
    assert [r["step"] for r in RunDir(tmp_path).read_log("dev.jsonl")] == [0, 2]


def test_resume_of_a_run_saved_before_a_config_key_existed(tmp_path, tiny_model_dir):
    import json

    from mmgrpo.config import load_config
    from mmgrpo.grpo.run import build

    tiny = f"model.name={tiny_model_dir}"
    cfg = load_config(None, overrides=["task.name=banking77", f"run.out={tmp_path}", "run.progress=false", tiny])
    job = build(cfg, path=tmp_path / "run")
    job.backend.close()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    del saved["config"]["prefix_attention"]  # as written by a version without the key
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    build(cfg, resume=str(tmp_path / "run")).backend.close()  # the missing key reads as its default
    moved = load_config(None, overrides=["task.name=banking77", f"run.out={tmp_path / 'elsewhere'}",
                                         "run.progress=false", tiny])
    build(moved, resume=str(tmp_path / "run")).backend.close()  # where the folder sits is not what is learned
    with pytest.raises(ValueError, match=r"differs from the run's saved config in \['prefix_attention'\]"):
        build(load_config(None, overrides=["task.name=banking77", f"run.out={tmp_path}", "run.progress=false",
                                           "grpo.prefix_attention=cache", tiny]), resume=str(tmp_path / "run"))


def test_continuous_batching_is_a_rollout_setting_that_reaches_the_backend(tmp_path, tiny_model_dir):
    from mmgrpo.config import load_config
    from mmgrpo.grpo.run import build

    for value in (True, False):
        cfg = load_config(None, overrides=["task.name=banking77", f"run.out={tmp_path}", "run.progress=false",
                                           f"model.name={tiny_model_dir}", f"rollout.continuous_batching={str(value).lower()}"])
        job = build(cfg, path=tmp_path / str(value))
        assert job.backend.continuous is value
        job.backend.close()


def test_prefill_tokens_is_a_rollout_setting_that_reaches_the_backend(tmp_path, tiny_model_dir):
    from mmgrpo.config import load_config
    from mmgrpo.grpo.run import build

    for value in (4096, 0):  # 0: chunks bounded by rows only
        cfg = load_config(None, overrides=["task.name=banking77", f"run.out={tmp_path}", "run.progress=false",
                                           f"model.name={tiny_model_dir}", f"rollout.prefill_tokens={value}"])
        job = build(cfg, path=tmp_path / str(value))
        assert job.backend.prefill_tokens == value
        job.backend.close()
    with pytest.raises(ValueError, match="prefill_tokens"):
        load_config(None, overrides=["task.name=banking77", "rollout.prefill_tokens=-1"])
