"""GPU check of the whole loop (prepared for a lent CUDA machine; never CI): a randomly initialised
Qwen2-0.5B-shaped model with the embedded SmolLM2 tokenizer, saved as a local model folder, goes
through ``mmgrpo.optimize`` with model.device/dtype = auto (CUDA + bf16): rollouts, 3 updates,
checkpoints, dev eval, result/; then the run is resumed from its step-2 checkpoint and must end
with the same adapter (max |diff| printed); then the result is loaded and evaluated.
Usage: python benchmarks/device/gpu_loop.py [--tiny]   (--tiny: a tiny shape, to check it on a CPU)
Must finish in under 5 minutes on one H100.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import mmgrpo  # noqa: E402
from mmgrpo.program import Module, Program  # noqa: E402

SHAPES = {"tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2),
          "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2)}


class TwoStep(Program):
    """Two lenient modules, so a random model's replies are scored rather than all failing to parse."""

    def __init__(self):
        self.draft = Module("draft", ["topic"], ["draft"], "Write a draft about the topic.", max_tokens=16,
                            lenient=True)
        self.final = Module("final", ["topic", "draft"], ["answer"], "Shorten the draft.", max_tokens=16,
                            lenient=True)

    def forward(self, topic):
        return self.final(topic=topic, draft=self.draft(topic=topic).draft)


def short(example, pred) -> float:  # no meaning: it varies across samples even for random weights,
    return float(len(pred["answer"]) % 2 == 0)  # so groups have signal and the updates run


def make_model(shape: str, folder: Path, tokenizer: str | None = None) -> None:
    """A random model of ``shape`` with the embedded model's tokenizer (or a folder holding its
    tokenizer files: the lent machine has no copy of the embedded model)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from mmgrpo.models import resolve

    tok = AutoTokenizer.from_pretrained(tokenizer or resolve("smollm2-135m"))
    torch.manual_seed(0)
    cfg = Qwen2Config(**SHAPES[shape], vocab_size=len(tok), max_position_embeddings=4096, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    Qwen2ForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--tokenizer", default=None, help="a folder with the SmolLM2 tokenizer files")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, cuda: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    root = Path(tempfile.mkdtemp(prefix="mmgrpo-gpu-loop-"))
    t0 = time.perf_counter()
    make_model("tiny" if args.tiny else "0.5b", root / "model", args.tokenizer)
    rows = [{"topic": t} for t in ("rain", "bread", "rivers", "night", "snow", "bells", "coffee", "wind")]
    config = {"rollout": {"batch_examples": 4, "group_size": 8, "temperature": 1.0, "max_tokens": 16},
              "run": {"steps": 3, "eval_every": 1, "eval_examples": 4, "checkpoint_every": 1, "keep_checkpoints": 3,
                      "out": str(root / "runs"), "progress": False}}
    res = mmgrpo.optimize(TwoStep(), rows, rows[:4], short, strategy="weights", model=str(root / "model"),
                          config=config)
    run = Path(res.info["run"])
    print(f"device {res.backend.device}, dtype {res.backend.model.dtype}; 3 steps + evals in "
          f"{time.perf_counter() - t0:.1f}s")
    import json

    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        print(f"   step {r['step']}: reward {r['reward_mean']:.3f}, groups {r['groups_used']}, updated {r['updated']}, "
              f"mismatch {r.get('mismatch_mean', float('nan')):.2e}, rollout {r['rollout_s']:.1f}s, "
              f"update {r.get('update_s', 0):.1f}s")
    from safetensors.torch import load_file

    final = load_file(str(run / "checkpoints" / "step-000003" / "adapter_model.safetensors"))
    res.close()
    # resume from step 2 as if killed after it
    shutil.copytree(run / "checkpoints" / "step-000003", root / "straight-step3")
    shutil.rmtree(run / "checkpoints" / "step-000003")
    (run / "checkpoints" / "latest").write_text("step-000002\n")
    t1 = time.perf_counter()
    res2 = mmgrpo.optimize(TwoStep(), rows, rows[:4], short, strategy="weights", model=str(root / "model"),
                           config=config, resume=str(run))
    again = load_file(str(run / "checkpoints" / "step-000003" / "adapter_model.safetensors"))
    diff = max(float((final[k].float() - again[k].float()).abs().max()) for k in final)
    print(f"resumed from step 2 in {time.perf_counter() - t1:.1f}s: max |adapter diff| vs straight run = {diff:.3g}")
    res2.close()
    loaded = mmgrpo.load(run, program=TwoStep())  # TwoStep lives in __main__ here
    score = loaded.evaluate(rows, short)
    print(f"loaded result on {loaded.backend.device}: {score}; total {time.perf_counter() - t0:.1f}s")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
