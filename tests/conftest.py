"""Shared fixtures: the real embedded model, loaded once per test session."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

# the tests run servers and jobs beside the process that started them: idle OpenMP threads sleep at once
# (set before mmgrpo and torch start; the processes the tests start inherit it)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# DSPy's LM fetches a model price list from the internet on first use (5 s timeout, then its bundled copy):
# tests reach no address beyond this machine
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "true")

from mmgrpo.lm.base import Completion, SamplingParams  # noqa: E402


@pytest.fixture(scope="session")
def lm():
    from mmgrpo.lm.hf import HFBackend

    # float32: these tests compare two computations of one thing (a row alone and in a batch, the sampler
    # and the learner) to 1e-5; bfloat16 rounds each to ~3 digits
    return HFBackend.load("smollm2-135m", max_wait_s=0.05, dtype="float32")


class ScriptedLM:
    """A deterministic test engine: replies are given in advance (for the failure paths)."""

    def __init__(self, replies):
        self.replies = replies  # callable(messages) -> str

    def chat(self, messages, params: SamplingParams) -> Completion:
        text = self.replies(messages)
        ids = [ord(c) % 1000 for c in text] or [0]
        return Completion(text=text, token_ids=ids, logprobs=[-0.5] * len(ids), prompt_ids=[1, 2, 3])


@pytest.fixture
def scripted():
    return ScriptedLM


@pytest.fixture
def cpu_hog():
    """Processes that keep every core busy for the length of a test (determinism under load)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()


def tiny_backend(**config):
    """An HFBackend over a tiny random-initialized model of the embedded model's architecture and
    tokenizer: for tests of mechanics, not of the real model's behaviour. Its output head is its own (not
    the embeddings): with tied random weights greedy decoding repeats the input's last token (blank
    replies), with its own head replies differ by input and parse. ``config``: LlamaConfig overrides
    (e.g. attention_dropout)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mmgrpo.lm.hf import HFBackend
    from mmgrpo.models import resolve

    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m"))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      **{"tie_word_embeddings": False, **config}, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    return HFBackend(model, tok)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """`tiny_backend`'s model and tokenizer saved as a model folder, for processes that load a model by
    name (`mmgrpo serve --model DIR`, `HFBackend.load(DIR)`): servers in tests of mechanics start in seconds."""
    folder = tmp_path_factory.mktemp("tiny-model")
    b = tiny_backend()
    b.model.save_pretrained(folder, safe_serialization=True)
    b.tokenizer.save_pretrained(folder)
    b.close()
    return str(folder)


# the files whose tests take longest go first: `./run.sh test` runs files on 2 workers
# (pytest-xdist, --dist loadfile), and a long file started last would run alone at the end
SLOW_FILES = ("test_grpo_train.py", "test_dspy.py", "test_faults.py", "test_prompt_search.py")


def pytest_collection_modifyitems(items):
    order = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: order.get(item.path.name, len(SLOW_FILES)))  # stable: files keep their order
