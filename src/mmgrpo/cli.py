"""The ``mmgrpo`` command: train, eval, compare, serve, export, report."""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

from .tasks import TASKS


def _task_options(args) -> dict:
    opts = {}
    for key in ("n_labels", "n_demos", "seed", "quality"):
        v = getattr(args, key, None)
        if v is not None:
            opts[key] = v
    if getattr(args, "no_reasoning", False):
        opts["reasoning"] = False
    for item in getattr(args, "task_option", None) or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--task-option {item!r}: write KEY=VALUE, e.g. --task-option first_k=1")
        try:
            opts[key] = json.loads(raw)
        except json.JSONDecodeError:
            opts[key] = raw  # a plain string
    return opts


def cmd_eval(args) -> int:
    from .lm.hf import HFBackend
    from .rollout import evaluate
    from .runlog import RunDir, format_table, pm

    t0 = time.time()
    if args.run:  # a result: its program, prompts and adapter
        from .data import program_inputs, read_jsonl
        from .result import load

        res = load(args.run, device=args.device, dtype=args.dtype)
        info = res.info
        if args.data:
            examples, name = read_jsonl(args.data, program_inputs(res.program)), str(args.data)
        elif info.get("task"):
            from .tasks import get_task

            examples, name = get_task(info["task"], **info["task_options"]).split(args.split), info["task"]
        else:
            path = (info.get("task_settings", {}).get("data") or {}).get(args.split)
            if not path:
                raise ValueError(f"this result has no {args.split} file on record; pass --data FILE.jsonl")
            examples, name = read_jsonl(path, program_inputs(res.program)), info.get("program")
        examples = examples[: args.limit] if args.limit else examples
        program, lm, metric, model = res.program, res.backend, res.metric, f"{info['model']} + {args.run}"
        budget = args.max_tokens or res.max_tokens
        if metric is None:
            raise ValueError("this result names no importable metric; evaluate it from Python with a metric")
    else:
        if not args.task:
            raise ValueError("say what to evaluate: --task NAME (a built-in task) or --run RUN (a result)")
        from .tasks import get_task

        task = get_task(args.task, **_task_options(args))
        examples = task.split(args.split)[: args.limit] if args.limit else task.split(args.split)
        lm = HFBackend.load(args.model, device=args.device, dtype=args.dtype)
        program, metric, name, model = task.make_program(), task.metric, args.task, args.model
        budget = args.max_tokens
    res = evaluate(program, examples, metric, lm, concurrency=args.concurrency, max_tokens=budget,
                   desc=f"eval {name}")
    run = RunDir.new(args.out, "eval")
    run.write_json("results.json", {"task": name, "split": args.split, "model": model, "run": args.run,
                                    "mean": res.mean, "ci95": res.ci95, "n": res.n, "counts": res.counts,
                                    "max_tokens": res.max_tokens,
                                    "seconds": time.time() - t0, "scores": res.scores,
                                    "ids": [e.id for e in examples]})
    print(format_table([(name, args.split, f"{res.mean:.3f}", pm(res.ci95), res.n, res.counts["ok"],
                   res.counts["parse_failure"], res.counts["error"], f"{res.seconds:.0f}s")],
                 ("task", "split", "score", "95% CI", "n", "ok", "parse_fail", "error", "time")))
    print(f"results: {run.path / 'results.json'}")
    return 0


def cmd_train(args) -> int:
    from .compose import run
    from .config import load_config

    overrides = []
    if args.task:
        overrides.append(f"task.name={args.task}")
    for flag, key in (("program", "program"), ("metric", "metric"), ("reward", "reward"), ("train", "train"),
                      ("dev", "dev"), ("test", "test")):
        if getattr(args, flag):
            overrides.append(f"task.{key}={getattr(args, flag)}")
    saved = None
    if args.resume:  # the run's own config, with what the command line changes on top (checked in build)
        from pathlib import Path

        from .config import with_defaults

        found = Path(args.resume) / "config.json"
        if not found.exists():
            raise FileNotFoundError(f"{args.resume} is not a run folder (no config.json): give the folder a run "
                                    f"wrote, e.g. runs/NAME-<time>")
        saved = with_defaults(json.loads(found.read_text())["config"])
    elif not args.config and not overrides and not args.set:
        raise ValueError("say what to train: a config file (e.g. mmgrpo train examples/banking77_demo.toml, the "
                         "demo), --task NAME, or your program with --program/--metric/--train/--dev; "
                         "every key is in docs/configuration.md")
    cfg = load_config(args.config, overrides=[*overrides, *(args.set or [])], defaults=saved)
    t0 = time.time()
    out = run(cfg, resume=args.resume)
    if out.get("steps") is not None:  # rank 0 (a data-parallel run's other ranks return {})
        print(f"total {time.time() - t0:.0f}s")
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    out = write_report(args.run)
    print(f"report: {out} (plots also as PNG in {out.parent / 'report'})")
    return 0


def cmd_export(args) -> int:
    from .result import export

    out = export(args.run, args.out, merged=args.merged)
    kind = "merged Hugging Face model" if args.merged else "PEFT adapter"
    print(f"{kind} (+ prompts.json): {out}")
    return 0


def cmd_compare(args) -> int:
    from .compare import PRESET_REASONS, PRESETS, compare, saved_settings
    from .config import load_config

    if args.resume and not args.config and not args.set and not args.task:
        cfg, kwargs = saved_settings(args.resume)
        if args.seeds is not None:  # a multi-seed comparison may be given more seeds
            kwargs["seeds"] = args.seeds
    else:
        task = args.task or "banking77"
        cfg = load_config(args.config, overrides=[f"task.name={task}", *(args.set or [])],
                          defaults=None if args.config else PRESETS.get(task))
        if not args.config and task in PRESET_REASONS:
            print(f"preset {task}: {PRESET_REASONS[task]}")
        kwargs = {"test_limit": args.test_limit, "seeds": args.seeds or 1}
    t0 = time.time()
    compare(cfg, root=args.resume, **kwargs)
    print(f"total {time.time() - t0:.0f}s")
    return 0


def cmd_serve(args) -> int:
    from .lm.hf import HFBackend
    from .serve import Limits, start

    prompts, name, base = None, args.model, None
    if args.run:
        from .result import load, result_folder

        res = load(args.run, device=args.device, dtype=args.dtype)
        backend, prompts = res.backend, res.prompts
        backend.deterministic = False  # a server batches by arrival time
        folder = result_folder(args.run)
        base = res.info["model"]  # served beside the result, as vLLM lists a LoRA adapter's base
        name = args.name or (folder.parent.name if folder.name == "result" else folder.name)
        root = args.adapter_root or folder.parent
    else:
        backend = HFBackend.load(args.model, device=args.device, dtype=args.dtype, deterministic=False)
        root = args.adapter_root or "."
    backend.continuous = not args.no_continuous_batching  # a request arriving mid-batch joins at a freed slot
    limits = Limits(api_key=args.api_key or os.environ.get("MMGRPO_API_KEY") or None, adapter_root=root,
                    max_adapters=args.max_adapters, adapter_api=not args.no_adapter_api,
                    prompts_api=not args.no_prompts_api, read_timeout_s=args.read_timeout,
                    max_connections=args.max_connections, max_queued=args.max_queued)
    srv = start(backend, args.host, args.port, model_name=name, prompts=prompts, limits=limits, base_name=base)
    print(f"serving {name}{' + ' + args.run if args.run else ''} at "
          f"http://{srv.server_address[0]}:{srv.server_address[1]}/v1 (Ctrl-C to stop)")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        srv.shutdown()
    return 0


def _device_args(p) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    fmt = argparse.ArgumentDefaultsHelpFormatter  # every option's help shows its default
    p = argparse.ArgumentParser(prog="mmgrpo", description="Multi-module GRPO and prompt optimization for LM programs",
                                formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"mmgrpo {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    e = sub.add_parser("eval", formatter_class=fmt, help="evaluate a task's program, or a result (--run), on a split")
    e.add_argument("--task", choices=TASKS, default=None, help="a built-in task's program, untouched")
    e.add_argument("--run", default=None, help="a result folder, or a run folder with result/")
    e.add_argument("--data", default=None, help="with --run: a JSONL file of examples to evaluate on")
    e.add_argument("--split", default="dev", choices=["train", "dev", "test"], help="which examples")
    e.add_argument("--limit", type=int, default=None, help="evaluate on the first N examples only")
    e.add_argument("--model", default="smollm2-135m", help="embedded name, local folder or Hugging Face id")
    e.add_argument("--concurrency", type=int, default=16, help="programs run at once (their LM calls batched)")
    e.add_argument("--max-tokens", dest="max_tokens", type=int, default=None,
                   help="completion budget of each LM call (default: a result's training budget, else 256)")
    e.add_argument("--n-labels", dest="n_labels", type=int, default=None, help="banking77: narrow the label set")
    e.add_argument("--n-demos", dest="n_demos", type=int, default=None, help="banking77: labelled demos in the prompt")
    e.add_argument("--no-reasoning", action="store_true", help="banking77: label only, no reasoning field")
    e.add_argument("--quality", choices=["chrf", "judge"], default=None,
                   help="papillon: the quality half of the metric (default chrf without a judge endpoint)")
    e.add_argument("--seed", type=int, default=None, help="the task's split seed (built-in tasks)")
    e.add_argument("--task-option", dest="task_option", action="append", default=None, metavar="KEY=VALUE",
                   help="any other option of the built-in task (as [task] options in a config), e.g. first_k=1")
    e.add_argument("--out", default="runs", help="folder for the results")
    _device_args(e)
    e.set_defaults(fn=cmd_eval)

    t = sub.add_parser("train", formatter_class=fmt, help="optimize a task or your own program (strategy: prompts, weights, both)",
                       epilog="Every config key, its section, type and default: docs/configuration.md "
                              "(python scripts/config_doc.py writes it from the code).")
    t.add_argument("config", nargs="?", default=None, help="a .toml/.yaml config (defaults for every key left out)")
    t.add_argument("--task", choices=TASKS, default=None, help="a built-in task (overrides the config's)")
    t.add_argument("--program", default=None, help="your program: import path 'pkg.mod:make_program'")
    t.add_argument("--metric", default=None, help="its metric: import path 'pkg.mod:metric'")
    t.add_argument("--reward", default=None, help="its training reward (default: the metric)")
    t.add_argument("--train", default=None, help="training examples, JSONL")
    t.add_argument("--dev", default=None, help="dev examples, JSONL")
    t.add_argument("--test", default=None, help="held-out examples, JSONL (optional)")
    t.add_argument("--resume", default=None, help="a run folder to continue from its last checkpoint, with its saved "
                   "config (keys given here may change only where, how and how loudly it runs)")
    t.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a config key, e.g. rollout.temperature=0.8 (repeatable)")
    t.set_defaults(fn=cmd_train)

    c = sub.add_parser("compare", formatter_class=fmt, help="baseline vs prompts vs weights vs prompts -> weights, on held-out test")
    c.add_argument("config", nargs="?", default=None, help="a .toml/.yaml config (default: the task's preset)")
    c.add_argument("--task", choices=TASKS, default=None, help="the task (default banking77)")
    c.add_argument("--resume", default=None, help="a comparison folder to finish (its saved settings are used)")
    c.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config key (repeatable)")
    c.add_argument("--test-limit", dest="test_limit", type=int, default=None, help="score the first N test examples")
    c.add_argument("--seeds", type=int, default=None,
                   help="run the comparison once per run seed (seed, seed+1, ...) and report the spread; with "
                        "--resume, a larger N adds seeds to a multi-seed comparison")
    c.set_defaults(fn=cmd_compare)

    s = sub.add_parser("serve", formatter_class=fmt, help="an OpenAI-compatible server over a model or a result (--run)")
    s.add_argument("--model", default="smollm2-135m", help="embedded name, local folder or Hugging Face id")
    s.add_argument("--run", default=None, help="serve a result: its adapter applied, its prompts at /v1/prompts. "
                   "This imports and runs the program and metric code its result.json names: serve only results "
                   "you trust")
    s.add_argument("--name", default=None, help="with --run: the model name to answer to (default: the run "
                   "folder's name; the base model answers under its own name beside it)")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--api-key", dest="api_key", default=None,
                   help="ask every /v1 request for 'Authorization: Bearer KEY' (default: $MMGRPO_API_KEY; unset: open)")
    s.add_argument("--adapter-root", dest="adapter_root", default=None,
                   help="adapters load only from folders under this one (default: the working folder; with --run, "
                        "the run folder)")
    s.add_argument("--max-adapters", dest="max_adapters", type=int, default=8,
                   help="adapters loaded at once; past it the least recently used idle one is unloaded")
    s.add_argument("--no-adapter-api", dest="no_adapter_api", action="store_true",
                   help="turn off /v1/load_lora_adapter and /v1/unload_lora_adapter")
    s.add_argument("--no-prompts-api", dest="no_prompts_api", action="store_true", help="turn off GET /v1/prompts")
    s.add_argument("--read-timeout", dest="read_timeout", type=float, default=30.0,
                   help="seconds a client may stay silent while sending (or idle) before it is disconnected")
    s.add_argument("--max-connections", dest="max_connections", type=int, default=128,
                   help="connections open at once; more are answered 429")
    s.add_argument("--max-queued", dest="max_queued", type=int, default=512,
                   help="generations waiting or running; more are answered 429")
    s.add_argument("--no-continuous-batching", dest="no_continuous_batching", action="store_true",
                   help="a batch waits for its longest row before new requests start")
    _device_args(s)
    s.set_defaults(fn=cmd_serve)

    x = sub.add_parser("export", formatter_class=fmt, help="a result as a PEFT adapter folder, or --merged as a Hugging Face model")
    x.add_argument("run", help="a result folder, or a run folder with result/")
    x.add_argument("out", help="a new folder")
    x.add_argument("--merged", action="store_true", help="merge the adapter into the weights")
    x.set_defaults(fn=cmd_export)

    r = sub.add_parser("report", formatter_class=fmt, help="report.html (plots embedded) + PNGs for a training run or a compare folder")
    r.add_argument("run", help="a run folder (metrics.jsonl) or a compare folder (results.json)")
    r.set_defaults(fn=cmd_report)

    args = p.parse_args(argv)
    from . import stopping
    from .grpo.run import TrainingStopped

    as_process = argv is None  # the `mmgrpo` command, not a call from Python
    if as_process:
        stopping.install()
    try:
        return args.fn(args)
    except KeyboardInterrupt as exc:
        print(f"\nmmgrpo: {exc}" if str(exc) else "\nmmgrpo: stopped by Ctrl-C", file=sys.stderr)
        if as_process:  # what the run keeps is on disk; leave now rather than tear down threads still in torch
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        return 130
    except TrainingStopped as exc:
        print(f"mmgrpo: stopped: {exc}", file=sys.stderr)
        return 1
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as exc:
        print(f"mmgrpo: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
