"""The HF backend on the real embedded model: exact ids, log-probs, batching, determinism."""
from __future__ import annotations

import pytest
import torch

from mmgrpo import trace
from mmgrpo.lm.base import SamplingParams, using
from mmgrpo.lm.hf import BASE
from mmgrpo.models import ModelNotFound, load, resolve
from mmgrpo.program import Example, Module, ParseError, Program
from mmgrpo.rollout import sample


class Ask(Program):
    def __init__(self):
        self.answer = Module("answer", ["question"], ["answer"], "Answer the question briefly.", max_tokens=24)

    def forward(self, question):
        return self.answer(question=question)


def test_trace_records_the_exact_sampled_ids_and_they_round_trip(lm):
    traj = trace.Trajectory("t", seed=7)
    with using(lm, SamplingParams(temperature=1.0, max_tokens=24)), trace.recording(traj):
        try:
            Ask()(question="What is the capital of France?")
        except ParseError:  # a reply that does not parse is still recorded; any other error fails the test
            pass
    call = traj.calls[0]
    assert call.prompt_ids == lm.tokenize_chat(call.messages)
    assert len(call.completion_ids) == len(call.logprobs) > 0
    body = [t for t in call.completion_ids if t not in lm.stop_ids]
    assert lm.tokenizer.decode(body, skip_special_tokens=True) == call.text
    # stopped on the end-of-turn token, which the text never shows but the ids keep for training
    if call.completion_ids[-1] in lm.stop_ids:
        assert lm.tokenizer.encode(call.text, add_special_tokens=False) != call.completion_ids


def test_logprobs_match_a_forward_pass(lm):
    prompts = [lm.tokenize_chat([{"role": "user", "content": q}]) for q in ("Say hi.", "Count to five, slowly please.")]
    outs = lm.generate_batch(prompts, [SamplingParams(temperature=1.0, max_tokens=12, seed=s) for s in (1, 2)])
    for p, o in zip(prompts, outs):
        ids = torch.tensor([p + o.token_ids])
        with torch.no_grad():
            logits = lm.model(input_ids=ids).logits[0, len(p) - 1:-1].float()
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(o.token_ids)[:, None])[:, 0]
        assert torch.allclose(ref, torch.tensor(o.logprobs), atol=2e-3), (ref, o.logprobs)


def test_greedy_is_deterministic_and_batch_invariant(lm):
    p = lm.tokenize_chat([{"role": "user", "content": "Name a fruit."}])
    other = lm.tokenize_chat([{"role": "user", "content": "Write a long sentence about the sea and the sky."}])
    g = SamplingParams(temperature=0.0, max_tokens=16)
    alone = lm.generate_batch([p], [g])[0]
    batched = lm.generate_batch([other, p, other], [g, g, g])[1]
    assert alone.token_ids == batched.token_ids


def test_prefill_chunks_are_bounded_by_tokens_and_decode_the_same(lm):
    """A long prompt among short ones: with ``prefill_tokens`` each prefill forward pass holds at
    most that many padded tokens (the long row alone), and greedy replies are those of row chunks."""
    short = [lm.tokenize_chat([{"role": "user", "content": f"Name a fruit, number {i}."}]) for i in range(5)]
    long = lm.tokenize_chat([{"role": "user", "content": "Summarise: " + "the sea is calm and blue. " * 60}])
    prompts = short[:3] + [long] + short[3:]
    g = [SamplingParams(temperature=0.0, max_tokens=6)] * len(prompts)
    old = lm.prefill_tokens
    lm.prefill_tokens = 0  # chunks bounded by rows only
    before = lm.generate_batch(prompts, g)
    sizes = []
    hook = lm.model.get_decoder().register_forward_pre_hook(  # prefill runs the decoder alone
        lambda mod, args, kw: sizes.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    bound = lm.prefill_tokens = 2 * len(short[0]) + 4
    try:
        after = lm.generate_batch(prompts, g)
    finally:
        lm.prefill_tokens = old  # the session's backend keeps its default
        hook.remove()
    prefills = [s for s in sizes if s[1] > 1]  # (rows, tokens after the shared prefix); 1 token: decoding
    assert max(prefills, key=lambda s: s[1])[0] == 1  # the long prompt was prefilled alone
    assert all(b * n <= bound for b, n in prefills if b > 1) and any(b > 1 for b, _ in prefills)
    assert [o.token_ids for o in after] == [o.token_ids for o in before]


def test_rows_asking_the_same_prompt_are_prefilled_once_and_sample_as_alone():
    """The G samples of an example ask with one prompt: it is prefilled once (the prefill passes hold
    one row per distinct prompt) and each row draws what it draws without the sharing."""
    from conftest import tiny_backend

    lm = tiny_backend()
    base = [lm.tokenize_chat([{"role": "user", "content": f"Question {i}: " + "why? " * (3 + 4 * i)}])
            for i in range(3)]
    prompts = [p for p in base for _ in range(4)]
    params = [SamplingParams(temperature=1.0, max_tokens=8, seed=k) for k in range(len(prompts))]
    runs, rows = {}, {}
    for share in (False, True):
        lm.share_prompts = share
        lm._prefix_cache.clear()
        sizes = []
        hook = lm.model.get_decoder().register_forward_pre_hook(  # prefill runs the decoder alone
            lambda mod, args, kw: sizes.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
        try:
            runs[share] = lm.generate_batch(prompts, params)
        finally:
            hook.remove()
        rows[share] = sum(b for b, n in sizes if n > 1)
    assert rows[False] - rows[True] == len(prompts) - len(base)  # (the shared chat-template prefix: once, kept)
    for a, b in zip(runs[True], runs[False]):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4
    lm.close()


def test_chunks_split_sorted_rows_by_count_and_padded_tokens():
    from mmgrpo.lm.decode import _chunks

    lens = [10, 20, 30, 400, 5]
    order = sorted(range(5), key=lambda i: lens[i])  # 4, 0, 1, 2, 3
    assert _chunks(order, lens, 8, 0) == [[4, 0, 1, 2, 3]]  # 0: rows only
    assert _chunks(order, lens, 2, 0) == [[4, 0], [1, 2], [3]]
    assert _chunks(order, lens, 8, 90) == [[4, 0, 1], [2], [3]]  # 3 x 20 <= 90 < 4 x 30; 400 alone


def test_seeded_sampling_repeats(lm):
    p = lm.tokenize_chat([{"role": "user", "content": "Tell me a word."}])
    s = SamplingParams(temperature=1.0, max_tokens=10, seed=123)
    a = lm.generate_batch([p], [s])[0]
    b = lm.generate_batch([p, p], [s.with_(seed=5), s])[1]
    assert a.token_ids == b.token_ids


def test_concurrent_programs_keep_separate_traces_and_share_batches(lm):
    qs = [f"What is {i} plus {i}?" for i in range(8)]
    exs = [Example(f"q{i}", {"question": q}) for i, q in enumerate(qs)]
    before = dict(lm.stats)
    res = sample(Ask(), exs, lambda e, p: 1.0, lm, n_samples=2, concurrency=16,
                 params=SamplingParams(temperature=1.0, max_tokens=8), progress=False)
    assert len(res.trajectories) == 16
    for t in res.trajectories:
        assert len(t.calls) == 1
        ex_q = qs[int(t.example_id[1:])]
        assert t.calls[0].inputs["question"] == ex_q
        assert ex_q in lm.tokenizer.decode(t.calls[0].prompt_ids)
    batches = lm.stats["batches"] - before["batches"]
    assert batches < 16, "16 concurrent requests should share generate calls"


def test_bad_model_name_lists_what_was_tried():
    with pytest.raises(ModelNotFound) as err:
        resolve("no-such-model-xyz")
    msg = str(err.value)
    assert "no-such-model-xyz" in msg and "embedded" in msg and "local folder" in msg


def test_local_folder_loads_like_the_embedded_name(lm, tmp_path):
    path = resolve("smollm2-135m")
    m = load(path)
    assert m.model.config.hidden_size == lm.model.config.hidden_size


def test_continuous_batching_refills_freed_slots_and_each_row_decodes_as_alone(lm):
    """Three programs, four calls each (one to the frozen base variant), two batch slots."""
    import threading

    topics = ["the sea", "a red bicycle", "winter", "bread", "a small town", "music", "rain", "the moon", "tea"]
    work = [[(lm.tokenize_chat([{"role": "user", "content": f"Write about {topics[(3 * k + j) % 9]}."}]),
              SamplingParams(temperature=0.0 if j % 2 else 1.0, max_tokens=4 + 7 * ((k + j) % 3), seed=10 * k + j))
             for j in range(4)] for k in range(3)]  # 3 programs, 4 calls each, lengths 4 / 11 / 18
    # the second call of each program goes to the frozen base (another variant, as PAPILLON's outside LM)
    solo = [[lm.generate_batch([p], [sp], adapter=BASE if j == 1 else None)[0] for j, (p, sp) in enumerate(calls)]
            for calls in work]
    got = [[None] * 4 for _ in work]
    before, old = dict(lm.stats), lm.max_batch
    lm.max_batch, lm.continuous = 2, True  # fewer slots than programs: a freed slot must be refilled mid-batch
    try:
        with lm.clients(3) as handle:
            def program(k):
                for j, (p, sp) in enumerate(work[k]):
                    got[k][j] = (lm.frozen() if j == 1 else lm).complete(p, sp)
                handle.leave()
            threads = [threading.Thread(target=program, args=(k,)) for k in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=300)
    finally:
        lm.max_batch, lm.continuous = old, False
    for k in range(3):
        for j in range(4):
            assert got[k][j].token_ids == solo[k][j].token_ids, (k, j)
            assert got[k][j].logprobs == pytest.approx(solo[k][j].logprobs, abs=1e-4)
    assert lm.stats["refills"] - before["refills"] >= 3  # requests joined a running batch
    assert lm.stats["requests"] - before["requests"] == 12


EXIT_SCRIPT = """
import atexit, sys
held = {}
# registered before mmgrpo is imported, so it runs after mmgrpo's own exit hook (LIFO)
atexit.register(lambda: print("batcher alive at exit:", held["lm"]._worker.is_alive(), flush=True))
from mmgrpo.lm.base import SamplingParams
from mmgrpo.lm.hf import HFBackend
held["lm"] = lm = HFBackend.load("smollm2-135m", dtype="float32")
print(lm.chat([{"role": "user", "content": "Say hi."}], SamplingParams(temperature=0.0, max_tokens=4)).text, flush=True)
"""


def test_a_program_that_ends_right_after_its_reply_exits_cleanly():
    """Replies leave before the batch leaves torch; a daemon batcher still in an op at interpreter
    teardown aborts the process (CI saw rc -6), so every batcher is joined at exit."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", EXIT_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "batcher alive at exit: False"


def test_a_sampler_copy_follows_the_trained_weights_and_the_frozen_view_samples_the_base_in_its_dtype():
    """sampler_dtype: the trained variant samples from a bfloat16 copy that holds the live weights with
    the adapter merged, refreshed after each update; the adapter-off view samples the base weights in
    bfloat16."""
    import torch
    from conftest import tiny_backend
    from peft import LoraConfig, get_peft_model

    from mmgrpo.lm.hf import HFBackend

    plain = tiny_backend()
    plain.close()
    lm = HFBackend(plain.model, plain.tokenizer, sampler_dtype="bfloat16")
    lm.peft = get_peft_model(lm.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                  task_type="CAUSAL_LM"))
    prompts = [lm.tokenize_chat([{"role": "user", "content": f"Question {i}: why?"}]) for i in range(3)]
    params = [SamplingParams(temperature=0.0, max_tokens=6)] * len(prompts)
    copies = dict(lm._sampler.named_modules())

    def merged_weights_match() -> bool:
        for name, mod in lm.model.named_modules():
            if hasattr(mod, "lora_A") and "default" in mod.lora_A:
                want = (mod.get_base_layer().weight + mod.get_delta_weight("default")).to(torch.bfloat16)
                if not torch.equal(copies[name].weight, want):
                    return False
        return True

    for scale in (0.5, -0.3):  # two updates: the copy follows each
        with torch.no_grad():
            for n, p in lm.peft.named_parameters():
                if "lora_B" in n:
                    p.copy_(scale * torch.ones_like(p))
        lm.weights_changed()
        out = lm.generate_batch(prompts, params)
        assert merged_weights_match()
        assert all(c.token_ids for c in out)
    with torch.no_grad():  # the base weights in the copy are the live ones, cast
        emb = lm.model.get_input_embeddings().weight
        assert torch.equal(lm._sampler.get_input_embeddings().weight, emb.to(torch.bfloat16))
    frozen = [lm.frozen().complete(p, params[0]) for p in prompts]
    lm.close()
    import copy

    base = copy.deepcopy(lm.peft).unload().to(torch.bfloat16)  # the live base weights, adapter off, cast
    ref = HFBackend(base, lm.tokenizer)
    want = [ref.generate_batch([p], params[:1])[0] for p in prompts]  # one at a time, as frozen asked them
    ref.close()
    for a, b in zip(frozen, want):
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
