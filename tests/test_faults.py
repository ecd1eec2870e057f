"""Faults that must not lose a run: damaged checkpoints, a failing disk, non-finite updates,
outages of the outside LM and the judge."""
from __future__ import annotations

import errno
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))

from toy import lenient_toy_task  # noqa: E402

from mmgrpo.grpo import trainer as trainer_mod  # noqa: E402
from mmgrpo.config import TrainConfig  # noqa: E402
from mmgrpo.grpo.groups import Group, Grouping, Member  # noqa: E402
from mmgrpo.grpo.run import MMGRPO, TrainingStopped, fit  # noqa: E402
from mmgrpo.lm.base import SamplingParams  # noqa: E402
from mmgrpo.lm.hf import HFBackend  # noqa: E402
from mmgrpo.lm.openai import OpenAIClient  # noqa: E402
from mmgrpo.program import Module, Prediction, Program  # noqa: E402
from mmgrpo.runlog import RunDir, verify_manifest  # noqa: E402
from mmgrpo.trace import ModuleCall  # noqa: E402


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    """Checkpoints and updates are mechanics: a tiny random model of the embedded model's architecture."""
    b = HFBackend.load(tiny_model_dir, dtype="float32")
    yield b
    b.close()


def make_job(backend, folder, **kw) -> MMGRPO:
    cfg = TrainConfig(task="toy", steps=4, keep_checkpoints=3, progress=False, learning_rate=1e-3, **kw)
    task = lenient_toy_task()
    if backend.peft is not None:  # a job of an earlier test injected its adapter: start it afresh
        backend.model = backend.peft.unload()
        backend.peft = None
    return MMGRPO(cfg, task, task.make_program(), backend, RunDir(folder))


def grouping(backend) -> Grouping:
    prompt = backend.tokenize_chat([{"role": "user", "content": "Say a word."}])
    members = []
    for k, reply in enumerate(["Yes.", "No, never.", "Maybe so.", "Fine."]):
        ids = backend.tokenizer(reply, add_special_tokens=False)["input_ids"]
        call = ModuleCall("m", 0, prompt, ids, [-1.0] * len(ids), reply)
        members.append(Member(call, reward=float(k % 2), trajectory=k, advantage=(-1.0) ** k))
    return Grouping(groups=[Group("e0", "m", 0, members)])


def adapter_state(job) -> dict:
    return {n: p.detach().clone() for n, p in job.trainer.model.named_parameters() if p.requires_grad}


def test_a_damaged_checkpoint_is_named_and_skipped_never_loaded(backend, tmp_path, capsys):
    job = make_job(backend, tmp_path / "run")
    job.trainer.update(grouping(backend))
    job.trainer.finish_step()
    job.checkpoint(1)
    job.trainer.update(grouping(backend))
    job.trainer.finish_step()
    job.checkpoint(2)
    ck = tmp_path / "run" / "checkpoints"
    assert verify_manifest(ck / "step-000002") is None
    # flip bytes in the newest adapter: same size, other content
    f = ck / "step-000002" / "adapter_model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-8:] = bytes(255 - b for b in raw[-8:])
    f.write_bytes(bytes(raw))
    job2 = make_job(backend, tmp_path / "run")
    assert job2.resume() == 1
    err = capsys.readouterr().err
    assert "checkpoint step-000002 is damaged" in err and "adapter_model.safetensors" in err
    assert (ck / "latest").read_text().strip() == "step-000001"
    # a truncated file in the only other checkpoint: nothing intact is a clear error
    g = ck / "step-000001" / "optimizer.safetensors"
    g.write_bytes(g.read_bytes()[:100])
    with pytest.raises(RuntimeError, match="no intact checkpoint"):
        make_job(backend, tmp_path / "run").resume()


def test_a_step_without_an_update_advances_the_schedule_without_a_pytorch_warning(backend, tmp_path):
    import warnings

    job = make_job(backend, tmp_path / "run", lr_schedule="linear", warmup_steps=0)
    lr0 = job.trainer.sched.get_last_lr()[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        job.trainer.finish_step()  # as after a step whose groups all had equal rewards: no optimizer step
    assert job.trainer.step == 1 and job.trainer.sched.get_last_lr()[0] < lr0
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]


def test_a_disk_error_while_checkpointing_keeps_the_previous_checkpoint(backend, tmp_path, monkeypatch):
    job = make_job(backend, tmp_path / "run")
    job.checkpoint(1)

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(TrainingStopped, match=r"No space left.*previous checkpoint \(step-000001\) is intact"):
        job.checkpoint(2)
    ck = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step-000001"]  # no temp folder left
    assert (ck / "latest").read_text().strip() == "step-000001" and verify_manifest(ck / "step-000001") is None


def test_non_finite_updates_are_skipped_counted_and_stop_the_run_in_a_row(backend, tmp_path, monkeypatch):
    job = make_job(backend, tmp_path / "run", max_nonfinite_steps=2)
    before = adapter_state(job)
    ok = job.trainer.update(grouping(backend))
    assert ok["updated"] and any(not torch.equal(before[n], p) for n, p in adapter_state(job).items())
    after_good = adapter_state(job)
    real_loss = trainer_mod.grpo_loss

    def nan_loss(*a, **k):
        out = real_loss(*a, **k)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer_mod, "grpo_loss", nan_loss)
    skipped = job.trainer.update(grouping(backend))
    assert skipped["updated"] is False and skipped["nonfinite_skipped"] is True
    assert all(torch.equal(after_good[n], p) for n, p in adapter_state(job).items())  # weights unchanged
    # in the loop: one skipped step is logged and counted, the second in a row stops the run
    from mmgrpo.grpo import job as job_mod

    job.cfg.batch_examples, job.cfg.group_size, job.cfg.max_tokens = 1, 2, 8
    monkeypatch.setattr(job_mod, "group_calls", lambda *a: grouping(backend))  # groups whatever was sampled
    rec = job.train_step(1)
    assert rec["nonfinite_skipped"] and job.nonfinite == 1
    with pytest.raises(TrainingStopped, match="2 updates in a row had a non-finite loss"):
        job.train_step(2)


# ---- outages of the outside LM and the judge: real server processes, killed and restarted ----
class Delegating(Program):
    """The policy picks a word; an outside LM (a server) writes the sentence."""

    def __init__(self, outside_url: str, model: str, on_run=lambda: None):
        self.on_run = on_run
        self.pick = Module("pick", ["topic"], ["word"], "Give one word related to the topic.", max_tokens=8,
                           demos=[{"topic": "the sun", "word": "light"}], lenient=True)  # every run goes on
        self.outside = OpenAIClient(outside_url, model, retries=1, backoff_s=0.05, timeout_s=60)

    def forward(self, topic):
        self.on_run()
        word = self.pick(topic=topic).word
        out = self.outside.chat([{"role": "user", "content": f"A sentence about {topic} with the word {word}."}],
                                SamplingParams(temperature=0.0, max_tokens=8))
        return Prediction(word=word, sentence=out.text)


def judged(judge: OpenAIClient):
    """A reward that asks the judge (a server) first; the score itself: a word of an even length (about half
    of a random model's words, so groups differ)."""
    def reward(ex, pred) -> float:
        judge.chat([{"role": "user", "content": f"Is '{pred['sentence']}' about {ex.inputs['topic']}?"}],
                   SamplingParams(temperature=0.0, max_tokens=2))
        return float(len(pred["word"].strip()) % 2 == 0)
    return reward


def test_outside_lm_and_judge_outages_stop_the_step_and_the_run_resumes_to_the_same_adapter(tiny_model_dir, tmp_path):
    """Mechanics only: the policy, the outside LM and the judge are a tiny random model."""
    from test_remote import free_port, start_server

    ports = {"outside": free_port(), "judge": free_port()}
    procs = {k: start_server(p, tiny_model_dir) for k, p in ports.items()}
    urls = {k: f"http://127.0.0.1:{p}/v1" for k, p in ports.items()}
    judge = OpenAIClient(urls["judge"], tiny_model_dir, retries=1, backoff_s=0.05)
    backend = HFBackend.load(tiny_model_dir, dtype="float32")

    def run(folder: Path, kill: str | None = None, at: int = 0):
        runs = [0]

        def on_run():  # the at-th program run of this process takes the server down, mid-step
            runs[0] += 1
            if runs[0] == at:
                procs[kill].kill()
                procs[kill].wait()

        cfg = TrainConfig(task="toy", steps=3, batch_examples=2, group_size=4, max_tokens=8, learning_rate=2e-3,
                          temperature=0.8, eval_every=1, eval_examples=3, checkpoint_every=1, concurrency=1,
                          progress=False, seed=5)
        task = lenient_toy_task()
        task.make_program = lambda: Delegating(urls["outside"], tiny_model_dir, on_run)
        task.reward = task.metric = judged(judge)
        if backend.peft is not None:
            backend.model = backend.peft.unload()
            backend.peft = None
        fit(MMGRPO(cfg, task, task.make_program(), backend, RunDir(folder)))

    try:
        run(tmp_path / "straight")
        # the outside LM dies at the 3rd rollout of step 2 (3 dev runs, then 8 rollouts a step, 3 dev
        # runs after each): the step stops untrained
        with pytest.raises(TrainingStopped, match="could not reach an LM server"):
            run(tmp_path / "cut", "outside", 3 + 8 + 3 + 3)
        assert [r["step"] for r in RunDir(tmp_path / "cut").read_log()] == [1]
        procs["outside"] = start_server(ports["outside"], tiny_model_dir)
        # resumed at step 2 (no baseline run again); now the judge dies at the 3rd rollout of step 3
        with pytest.raises(TrainingStopped, match="could not reach an LM server"):
            run(tmp_path / "cut", "judge", 8 + 3 + 3)
        assert [r["step"] for r in RunDir(tmp_path / "cut").read_log()] == [1, 2]
        procs["judge"] = start_server(ports["judge"], tiny_model_dir)
        run(tmp_path / "cut")
        log, want = RunDir(tmp_path / "cut").read_log(), RunDir(tmp_path / "straight").read_log()
        assert [r["step"] for r in log] == [1, 2, 3] and any(r["updated"] for r in log)
        assert [r["reward_mean"] for r in log] == [r["reward_mean"] for r in want]
        assert all(r["n_error"] == 0 for r in log)  # no error reward was ever trained on
        a = load_file(str(tmp_path / "straight" / "checkpoints" / "step-000003" / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "cut" / "checkpoints" / "step-000003" / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    finally:
        backend.close()
        for p in procs.values():
            p.kill()
            p.wait()


def test_a_non_finite_later_iteration_leaves_weights_and_optimizer_as_before_the_update(backend, tmp_path,
                                                                                        monkeypatch):
    job = make_job(backend, tmp_path / "run", num_iterations=3)
    assert job.trainer.update(grouping(backend))["updated"]  # optimizer state exists
    before, opt_before = adapter_state(job), job.trainer.opt.state_dict()
    moments = {k: v["exp_avg"].clone() for k, v in opt_before["state"].items()}
    steps = {k: float(v["step"]) for k, v in opt_before["state"].items()}
    real_loss, calls = trainer_mod.grpo_loss, [0]

    def nan_on_the_last_iteration(*a, **k):
        out = real_loss(*a, **k)
        calls[0] += 1
        if calls[0] > 2:  # one micro-batch an iteration: iterations 1 and 2 step, the third is not finite
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer_mod, "grpo_loss", nan_on_the_last_iteration)
    out = job.trainer.update(grouping(backend))
    assert calls[0] == 3 and out["updated"] is False and out["nonfinite_skipped"] is True
    assert all(torch.equal(before[n], p) for n, p in adapter_state(job).items())
    state = job.trainer.opt.state_dict()["state"]
    assert all(torch.equal(moments[k], state[k]["exp_avg"]) and float(state[k]["step"]) == steps[k] for k in state)


def test_the_best_adapter_and_the_non_finite_count_are_part_of_the_checkpoint(backend, tmp_path):
    job = make_job(backend, tmp_path / "run")
    job.best = {"dev": 0.5, "step": 1}
    job.trainer.save_adapter(tmp_path / "run" / "best_adapter")
    named = load_file(str(tmp_path / "run" / "best_adapter" / "adapter_model.safetensors"))
    job.nonfinite = 1
    job.trainer.finish_step()
    job.checkpoint(1)
    assert verify_manifest(tmp_path / "run" / "checkpoints" / "step-000001") is None
    # then: an update and a better dev score write a newer best adapter, and the run dies before its checkpoint
    job.trainer.update(grouping(backend))
    job.trainer.save_adapter(tmp_path / "run" / "best_adapter")
    newer = load_file(str(tmp_path / "run" / "best_adapter" / "adapter_model.safetensors"))
    assert any(not torch.equal(newer[k], named[k]) for k in named)
    again = make_job(backend, tmp_path / "run")
    assert again.resume() == 1
    assert again.best == {"dev": 0.5, "step": 1} and again.nonfinite == 1
    restored = load_file(str(tmp_path / "run" / "best_adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(restored[k], named[k]) for k in named)  # the adapter the restored state names
