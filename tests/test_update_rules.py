"""What the update trains on and how: dropout off, the batch denominator, truncated completions,
importance sampling by default where the sampler differs, the evaluation budget. Tiny random models
where mechanics are tested."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from conftest import tiny_backend  # noqa: E402
from toy import toy_task  # noqa: E402

from mmgrpo.config import TrainConfig, with_defaults  # noqa: E402
from mmgrpo.grpo.groups import Group, Grouping, Member  # noqa: E402
from mmgrpo.grpo.trainer import Trainer  # noqa: E402
from mmgrpo.trace import ModuleCall  # noqa: E402


def calls(backend, replies, finish="stop"):
    prompt = backend.tokenize_chat([{"role": "user", "content": "Say a word."}])
    out = []
    for reply in replies:
        ids = backend.tokenizer(reply, add_special_tokens=False)["input_ids"]
        out.append(ModuleCall("m", 0, prompt, ids, [-1.0] * len(ids), reply, finish_reason=finish))
    return out


def test_the_policy_has_no_dropout_in_training_mode():
    backend = tiny_backend(attention_dropout=0.5)
    ids = torch.tensor([backend.tokenize_chat([{"role": "user", "content": "Hello there, how are you?"}])])
    backend.model.train()
    noisy = [backend.model(input_ids=ids).logits for _ in range(2)]
    assert not torch.equal(noisy[0], noisy[1])  # the model as loaded: dropout in training mode
    trainer = Trainer(backend, TrainConfig(progress=False))
    trainer.model.train()
    a, b = trainer.model(input_ids=ids).logits, trainer.model(input_ids=ids).logits
    assert torch.equal(a, b)
    backend.close()


def _coefficient_total(monkeypatch, denominator):
    """The normalizer the update used, for one informative group of 2 beside a group without signal."""
    from mmgrpo.grpo import trainer as trainer_mod

    backend = tiny_backend()
    trainer = Trainer(backend, TrainConfig(progress=False, loss_denominator=denominator, learning_rate=1e-3))
    seen = {}
    real = trainer_mod.sequence_coefficients

    def spy(lengths, weights, loss_type, max_len=None, total=None):
        seen["total"], seen["n"] = total, len(lengths)
        return real(lengths, weights, loss_type, max_len, total)

    monkeypatch.setattr(trainer_mod, "sequence_coefficients", spy)
    live = [Member(c, float(k), k, advantage=1.0 - 2 * k) for k, c in enumerate(calls(backend, ["Yes.", "No."]))]
    flat = [Member(c, 0.5, k) for k, c in enumerate(calls(backend, ["Fine.", "Maybe so.", "Sure.", "Ok."]))]
    informative = Group("e0", "m", 0, live)
    g = Grouping(groups=[informative], candidates=[informative, Group("e1", "m", 0, flat)])
    upd = trainer.update(g)
    backend.close()
    return seen, upd


def test_the_batch_denominator_counts_every_sampled_completion(monkeypatch):
    seen, upd = _coefficient_total(monkeypatch, "batch")
    assert upd["updated"] and seen == {"total": 6.0, "n": 2}  # 2 trained of 6 sampled, weight 1 each
    seen, _ = _coefficient_total(monkeypatch, "informative")
    assert seen == {"total": 2.0, "n": 2}


def test_mask_truncated_leaves_cut_completions_out_of_the_update():
    backend = tiny_backend()
    trainer = Trainer(backend, TrainConfig(progress=False, mask_truncated=True, learning_rate=1e-3))
    cut = calls(backend, ["Yes yes yes", "No no no"], finish="length")
    g = Grouping(groups=[Group("e0", "m", 0, [Member(c, float(k), k, advantage=1.0 - 2 * k)
                                               for k, c in enumerate(cut)])])
    before = [p.detach().clone() for p in trainer.params]
    upd = trainer.update(g)
    assert upd == {"updated": False, "truncated_masked": 2}
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params))
    mixed = calls(backend, ["Yes."]) + cut[:1]
    g = Grouping(groups=[Group("e0", "m", 0, [Member(c, float(k), k, advantage=1.0 - 2 * k)
                                               for k, c in enumerate(mixed)])])
    upd = trainer.update(g)
    assert upd["updated"] and upd["truncated_masked"] == 1 and upd["train_tokens"] == len(mixed[0].completion_ids)
    backend.close()


def test_importance_sampling_is_on_by_default_exactly_where_the_sampler_differs():
    assert TrainConfig().tis is None  # in-process: the sampler is the learner's own model
    assert TrainConfig(servers=["http://127.0.0.1:8000/v1"]).tis == 2.0
    assert TrainConfig(train_with_demos=False).tis == 2.0  # the update's prompts were never sampled
    assert TrainConfig(servers=["http://127.0.0.1:8000/v1"], tis_cap="off").tis is None
    assert TrainConfig(tis_cap=3).tis == 3.0
    with pytest.raises(ValueError, match="cannot be off with train_with_demos = false"):
        TrainConfig(train_with_demos=False, tis_cap="off")
    with pytest.raises(ValueError, match="tis_cap"):
        TrainConfig(tis_cap=0.5)
    # a run saved before these keys resumes as it ran
    old = with_defaults({"model": "smollm2-135m"})
    assert old["tis_cap"] is None and old["loss_denominator"] == "informative" and old["eval_max_tokens"] == 256
    assert old["sampler_dtype"] == "model" and old["update_dtype"] == "model"


def test_tis_turns_on_where_a_sampler_copy_in_another_dtype_samples_or_the_update_autocasts():
    from mmgrpo.lm.hf import HFBackend

    tiny = tiny_backend()
    tiny.close()
    for sampler, autocast, on in ((None, "model", False), ("bfloat16", "model", True), (None, "bfloat16", True)):
        backend = HFBackend(tiny.model, tiny.tokenizer, sampler_dtype=sampler)
        trainer = Trainer(backend, TrainConfig(progress=False, learning_rate=1e-3, update_dtype=autocast))
        g = Grouping(groups=[Group("e0", "m", 0, [Member(c, float(k), k, advantage=1.0 - 2 * k)
                                                   for k, c in enumerate(calls(backend, ["Yes.", "No."]))])])
        upd = trainer.update(g)
        assert backend.samples_apart == (sampler is not None) and ("tis_weight_mean" in upd) == on
        backend.close()
        tiny.model = trainer.model.unload()  # the plain model again for the next backend


def test_tis_weights_the_tokens_of_a_remote_sampler(monkeypatch):
    backend = tiny_backend()
    trainer = Trainer(backend, TrainConfig(progress=False, servers=["http://127.0.0.1:9/v1"], learning_rate=1e-3))
    g = Grouping(groups=[Group("e0", "m", 0, [Member(c, float(k), k, advantage=1.0 - 2 * k)
                                               for k, c in enumerate(calls(backend, ["Yes.", "No."]))])])
    upd = trainer.update(g)  # the recorded sampler log-probs (-1.0) are far from the tiny model's
    assert upd["updated"] and 0 < upd["tis_weight_mean"] <= 2.0 and 0 <= upd["tis_capped_frac"] <= 1
    backend.close()


class Budgets:
    """An LM that records each call's token budget and answers through a real backend."""

    def __init__(self, backend):
        self.backend, self.seen = backend, []

    def chat(self, messages, params):
        self.seen.append(params.max_tokens)
        return self.backend.chat(messages, params)


def test_dev_is_scored_at_the_training_budget_unless_told(tmp_path):
    from mmgrpo.compose import result_of
    from mmgrpo.grpo.run import MMGRPO
    from mmgrpo.runlog import RunDir

    backend = tiny_backend()
    task = toy_task()
    for kw, want in (({"max_tokens": 4}, 4), ({"max_tokens": 4, "eval_max_tokens": 6}, 6)):
        if backend.peft is not None:
            backend.model, backend.peft = backend.peft.unload(), None
        job = MMGRPO(TrainConfig(task="toy", progress=False, **kw), task, task.make_program(), backend,
                     RunDir(tmp_path / f"run{want}"))
        job.sampler = Budgets(backend)
        rec = job.evaluate(0)
        assert set(job.sampler.seen) == {want} and rec["eval_max_tokens"] == want  # modules cap at 8 and 16
        assert "dev_errors" in rec
        res = result_of(job)
        assert res.max_tokens == want and res.info["eval_max_tokens"] == want
    backend.close()


def test_an_outage_wrapped_by_user_code_is_still_an_outage(scripted):
    from mmgrpo.lm.openai import LMUnavailable
    from mmgrpo.program import Example, Program
    from mmgrpo.rollout import sample

    class Wrapping(Program):
        def __init__(self, exc):
            self.exc = exc

        def forward(self, q):
            try:
                raise LMUnavailable("gave up after 3 tries: connection refused")
            except LMUnavailable as inner:
                if self.exc == "from":
                    raise RuntimeError("the search tool failed") from inner
                raise ValueError("while handling it")  # implicit context

    exs = [Example("e0", {"q": "x"})]
    for how in ("from", "context"):
        res = sample(Wrapping(how), exs, lambda e, p: 1.0, scripted(lambda m: "a"), n_samples=2, progress=False)
        assert len(res.outages) == 2, how

    class Plain(Program):
        def forward(self, q):
            raise RuntimeError("LMUnavailable: a message that only looks like one")

    res = sample(Plain(), exs, lambda e, p: 1.0, scripted(lambda m: "a"), n_samples=1, progress=False)
    assert res.counts["error"] == 1 and not res.outages


def test_truncated_calls_are_kept_in_the_trace_and_counted_per_module():
    from mmgrpo.grpo.groups import group_calls
    from mmgrpo.grpo.stats import module_stats
    from mmgrpo.lm.base import SamplingParams
    from mmgrpo.rollout import sample

    backend = tiny_backend()  # random weights: a reply almost never ends before 3 tokens
    task = toy_task()
    res = sample(task.make_program(), task.train[:2], lambda e, p: 1.0, backend, n_samples=2,
                 params=SamplingParams(temperature=1.0, max_tokens=3), progress=False)
    cut = [c for t in res.trajectories for c in t.calls if c.finish_reason == "length"]
    assert cut and all(len(c.completion_ids) == 3 for c in cut)
    stats = module_stats(res.trajectories, group_calls(res.by_example()))
    assert sum(s["truncated"] for s in stats.values()) == len(cut)
    backend.close()


def test_an_evaluation_after_no_update_reuses_the_last_scores(tmp_path):
    from mmgrpo.grpo.run import MMGRPO
    from mmgrpo.runlog import RunDir

    backend = tiny_backend()
    task = toy_task()
    job = MMGRPO(TrainConfig(task="toy", progress=False, max_tokens=4), task, task.make_program(), backend,
                 RunDir(tmp_path / "run"))
    job.sampler = Budgets(backend)
    first = job.evaluate(0)
    calls = len(job.sampler.seen)
    again = job.evaluate(4)  # no update in between
    assert len(job.sampler.seen) == calls and again["dev"] == first["dev"] and again["reused_from_step"] == 0
    backend.weights_changed()  # an update
    job.evaluate(8)
    assert len(job.sampler.seen) > calls
    job.program.pick.instruction = "Answer with one word."  # new prompts, the same weights
    seen = len(job.sampler.seen)
    job.evaluate(12)
    assert len(job.sampler.seen) > seen
    backend.close()


def test_update_dtype_runs_the_matrix_products_in_bf16_and_keeps_logits_and_weights_in_float32():
    """[model] update_dtype = "bfloat16": the decoder's linear layers compute in bf16 (autocast), the output
    head in float32 from hidden states cast back, and the trainable LoRA weights stay float32."""
    seen = {}
    runs = {}
    for upd in ("model", "bfloat16"):
        backend = tiny_backend()
        trainer = Trainer(backend, TrainConfig(progress=False, update_dtype=upd))
        inner = backend.model.get_decoder().layers[0].self_attn.q_proj
        hooks = [inner.register_forward_hook(lambda m, a, out, u=upd: seen.__setitem__((u, "q"), out.dtype)),
                 backend.model.get_output_embeddings().register_forward_hook(
                     lambda m, a, out, u=upd: seen.__setitem__((u, "head"), out.dtype))]
        seqs = [(backend.tokenize_chat([{"role": "user", "content": "Say a word."}]), [42, 43, 44])]
        logp, _ = trainer.logprobs(seqs, [1.0])
        for h in hooks:
            h.remove()
        runs[upd] = logp.detach()
        assert logp.dtype == torch.float32 and all(p.dtype == torch.float32 for p in trainer.params)
        assert not torch.is_autocast_enabled("cpu")  # left as it was
        backend.close()
    assert seen[("model", "q")] == torch.float32 and seen[("bfloat16", "q")] == torch.bfloat16
    assert seen[("bfloat16", "head")] == torch.float32
    diff = float((runs["model"] - runs["bfloat16"]).abs().max())
    assert 0 < diff < 0.1, diff  # bf16 rounding of the products, not of the logits
    with pytest.raises(ValueError, match="update_dtype"):
        TrainConfig(update_dtype="int8")
