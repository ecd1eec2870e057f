"""Your own program through mmgrpo.optimize and the CLI; the result kept, loaded, served, exported."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

import mmgrpo
from mmgrpo.cli import main
from mmgrpo.program import Module, Program

HERE = Path(__file__).parent
SUBJECTS = ["rain", "bread", "a river", "the night", "snow", "a bell", "coffee", "wind"]


class Scene(Program):
    """Two modules, defined here and not a built-in task: pick a word, then write a line with it."""

    def __init__(self):
        self.pick = Module("pick", ["subject"], ["word"], "Give one word related to the subject.", max_tokens=8,
                           demos=[{"subject": "the sun", "word": "light"}])
        self.write = Module("write", ["subject", "word"], ["line"], "Write one short line about the subject "
                            "using the word.", max_tokens=16,
                            demos=[{"subject": "the sun", "word": "light", "line": "The sun spills light."}])

    def forward(self, subject):
        word = self.pick(subject=subject).word
        return self.write(subject=subject, word=word)


def short_enough(example, pred) -> float:
    return float(len(pred["line"].split()) <= example.gold["max_words"])


class LenientScene(Scene):
    """Scene whose modules take a reply without its field marker whole: a tiny random model's replies
    then parse (for tests of mechanics)."""

    def __init__(self):
        super().__init__()
        for m in (self.pick, self.write):
            m.lenient = True


def even_line(example, pred) -> float:
    """About half of a random model's lines: groups differ, so updates happen."""
    return float(len(pred["line"]) % 2 == 0)


ROWS = [{"subject": s, "max_words": 4} for s in SUBJECTS]  # plain dicts: inputs by forward's signature
TINY = {"rollout": {"batch_examples": 2, "group_size": 4, "max_tokens": 16},
        "grpo": {"learning_rate": 1e-3}, "prompts": {"candidates": 2, "train_examples": 4},
        "run": {"steps": 2, "eval_every": 1, "eval_examples": 4, "progress": False}}


def test_optimize_save_and_load_in_a_fresh_process(tmp_path, tiny_model_dir):
    cfg = {**TINY, "run": {**TINY["run"], "out": str(tmp_path / "runs")}}
    result = mmgrpo.optimize(LenientScene(), train=ROWS[:4], dev=ROWS[4:], metric=even_line,
                             strategy="bootstrap -> weights", config=cfg, model=tiny_model_dir)
    assert isinstance(result, mmgrpo.OptimizedProgram) and result.peft_model is not None
    before = [result(subject=s)["line"] for s in SUBJECTS[:4]]
    score = result.evaluate(ROWS, even_line)
    assert score.n == 8 and 0 <= score.mean <= 1 and sum(score.counts.values()) == 8
    saved = result.save(tmp_path / "kept")
    assert {p.name for p in saved.iterdir()} == {"adapter", "prompts.json", "result.json"}
    info = json.loads((saved / "result.json").read_text())
    assert info["program"] == "test_api:LenientScene" and info["metric"] == "test_api:even_line"
    assert info["model"] == tiny_model_dir
    # the run folder holds the same result
    run_result = Path(result.info["run"]) / "result"
    assert json.loads((run_result / "prompts.json").read_text()) == result.prompts
    code = ("import json, sys, mmgrpo; p = mmgrpo.load(sys.argv[1]); "
            "print(json.dumps([p(subject=s)['line'] for s in sys.argv[2:]]))")
    # 900 s: on a starved machine the child's start (torch, the model) alone can take minutes
    out = subprocess.run([sys.executable, "-c", code, str(saved), *SUBJECTS[:4]], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(HERE)}, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == before


def test_dicts_need_the_programs_inputs():
    from mmgrpo.data import to_examples

    with pytest.raises(ValueError, match=r"train\[1\]: missing input field\(s\) \['subject'\]"):
        to_examples([{"subject": "x"}, {"topic": "y"}], ["subject"], "train")


SCENE = HERE.parent / "examples" / "scene"  # the README's example program, imported by path as scene:Scene


@pytest.fixture
def cli_run(tmp_path, monkeypatch, tiny_model_dir):
    """`mmgrpo train --program ... --train ... --dev ...` on files the test writes; the run folder. The
    commands' mechanics: a tiny random model."""
    monkeypatch.syspath_prepend(str(SCENE))
    for name, rows in (("train", ROWS[:4]), ("dev", ROWS[4:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["train", "--program", "scene:Scene", "--metric", "scene:short_line",
            "--train", str(tmp_path / "train.jsonl"), "--dev", str(tmp_path / "dev.jsonl"),
            "--set", f"run.out={tmp_path / 'runs'}", "--set", "run.name=scene", "--set", f"model.name={tiny_model_dir}"]
    for sec, keys in TINY.items():
        args += [x for k, v in keys.items() if sec != "prompts" for x in ("--set", f"{sec}.{k}={json.dumps(v)}")]
    assert main(args) == 0
    (run,) = (tmp_path / "runs").iterdir()
    return tmp_path, run


def test_cli_trains_your_program_from_jsonl_then_evaluates_and_exports_it(cli_run, capsys):
    tmp_path, run = cli_run
    info = json.loads((run / "result" / "result.json").read_text())
    assert info["program"] == "scene:Scene" and info["has_adapter"]
    assert main(["eval", "--run", str(run), "--split", "dev", "--out", str(tmp_path / "evals")]) == 0
    assert "dev" in capsys.readouterr().out

    # export: a merged model that plain transformers loads, with the adapter's greedy completion
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert main(["export", str(run), str(out), "--merged"]) == 0
    res = mmgrpo.load(run, device="cpu", dtype="float32", sampler_dtype="model")  # as the merged model computes
    prompt = res.backend.tokenize_chat([{"role": "user", "content": "Name a color."}])
    want = res.backend.generate_batch([prompt], [mmgrpo.lm.base.SamplingParams(temperature=0, max_tokens=12)])[0]
    model = AutoModelForCausalLM.from_pretrained(out)
    got = model.generate(torch.tensor([prompt]), max_new_tokens=len(want.token_ids), do_sample=False)
    assert got[0, len(prompt):].tolist() == want.token_ids
    assert json.loads((out / "prompts.json").read_text()) == res.prompts
    assert main(["export", str(run), str(tmp_path / "peft")]) == 0
    assert (tmp_path / "peft" / "adapter_model.safetensors").exists()

    # serve the result: the adapter answers, the prompts are published
    from mmgrpo.serve import start

    srv = start(res.backend, port=0, model_name="scene", prompts=res.prompts)
    url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    try:
        got = json.loads(urllib.request.urlopen(f"{url}/prompts", timeout=30).read())
        assert got["prompts"] == res.prompts
        req = urllib.request.Request(f"{url}/completions", data=json.dumps(
            {"prompt": prompt, "max_tokens": 12, "temperature": 0, "return_token_ids": True}).encode(), headers={"Content-Type": "application/json"})
        body = json.loads(urllib.request.urlopen(req, timeout=60).read())
        assert body["choices"][0]["token_ids"] == want.token_ids
    finally:
        srv.shutdown()


def test_cli_errors_name_the_file_line_and_the_import(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(SCENE))
    good = json.dumps(ROWS[0]) + "\n"
    (tmp_path / "train.jsonl").write_text(good + '{"subject": "x", "max_words": \n')
    (tmp_path / "dev.jsonl").write_text(good)
    base = ["train", "--metric", "scene:short_line", "--train", str(tmp_path / "train.jsonl"),
            "--dev", str(tmp_path / "dev.jsonl"), "--set", f"run.out={tmp_path / 'runs'}"]
    assert main([*base, "--program", "scene:Scene"]) == 2
    assert f"{tmp_path / 'train.jsonl'}:2: not valid JSON" in capsys.readouterr().err
    (tmp_path / "train.jsonl").write_text(good + json.dumps({"topic": "x"}) + "\n")
    assert main([*base, "--program", "scene:Scene"]) == 2
    assert "train.jsonl:2: missing input field(s) ['subject']" in capsys.readouterr().err
    assert main([*base, "--program", "scene:Scen"]) == 2
    assert "module 'scene' has no attribute 'Scen'" in capsys.readouterr().err
    assert main([*base, "--program", "no_such_pkg.mod:make"]) == 2
    assert "cannot import module 'no_such_pkg.mod'" in capsys.readouterr().err


def test_sections_are_checked_and_old_flat_keys_say_where_they_moved(tmp_path):
    from mmgrpo.config import load_config

    f = tmp_path / "c.toml"
    f.write_text("temperature = 0.5\n")
    with pytest.raises(ValueError, match=r"'temperature' belongs in a section now: write it as \[rollout\] temperature"):
        load_config(f)
    f.write_text("[rollout]\nsteps = 3\n")
    with pytest.raises(ValueError, match=r"\[rollout\] has no key 'steps'; it is \[run\] steps"):
        load_config(f)
    with pytest.raises(ValueError, match=r"--set run.steps=3"):
        load_config(None, ["steps=3"])
    with pytest.raises(ValueError, match="'dtype': must be one of auto, float32, bfloat16, float16, got 'float8'"):
        load_config(None, ["model.dtype=float8"])


def test_bfloat16_on_cpu_runs_an_update_end_to_end(tmp_path, tiny_model_dir):
    from mmgrpo.config import TrainConfig
    from mmgrpo.grpo.run import MMGRPO
    from mmgrpo.lm.hf import HFBackend
    from mmgrpo.runlog import RunDir
    from toy import lenient_toy_task

    cfg = TrainConfig(task="toy", device="cpu", dtype="bfloat16", steps=1, batch_examples=4, group_size=4,
                      max_tokens=12, learning_rate=1e-3, progress=False)
    lm = HFBackend.load(tiny_model_dir, device=cfg.device, dtype=cfg.dtype)
    assert lm.model.dtype == torch.bfloat16
    task = lenient_toy_task()
    job = MMGRPO(cfg, task, task.make_program(), lm, RunDir(tmp_path))
    before = {k: v.detach().clone() for k, v in job.trainer.model.named_parameters() if v.requires_grad}
    rec = job.train_step(1)
    assert rec["updated"] and rec["grad_norm"] > 0 and rec["mismatch_mean"] < 0.1, rec
    changed = [k for k, v in job.trainer.model.named_parameters() if v.requires_grad and not torch.equal(before[k], v)]
    assert changed


def test_dtype_auto_is_float32_on_a_cpu_and_an_explicit_dtype_is_kept():
    from mmgrpo import models

    assert models.pick_device("cpu", "auto") == ("cpu", "float32")  # bf16 on a CPU learned less (docs/performance.md)
    assert models.pick_device("cpu", "bfloat16") == ("cpu", "bfloat16")
    with pytest.raises(ValueError, match="float8"):
        models.pick_device("cpu", "float8")


def test_a_config_that_names_the_model_and_strategy_is_obeyed_when_the_arguments_are_left_out(
        tmp_path, tiny_model_dir):
    cfg = {"model": {"name": tiny_model_dir}, "rollout": {"batch_examples": 2, "group_size": 2, "max_tokens": 4},
           "run": {"strategy": "weights", "steps": 1, "eval_every": 100, "eval_examples": 2, "progress": False,
                   "out": str(tmp_path / "runs")}}
    result = mmgrpo.optimize(Scene(), train=ROWS[:2], dev=ROWS[2:4], metric=short_enough, config=cfg)
    info = json.loads((Path(result.info["run"]) / "result" / "result.json").read_text())
    assert (info["model"], info["strategy"]) == (tiny_model_dir, "weights")
    # an argument given wins over the config
    result = mmgrpo.optimize(Scene(), train=ROWS[:2], dev=ROWS[2:4], metric=short_enough, config=cfg,
                             strategy="bootstrap")
    info = json.loads((Path(result.info["run"]) / "result" / "result.json").read_text())
    assert (info["model"], info["strategy"]) == (tiny_model_dir, "bootstrap")
