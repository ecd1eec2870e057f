"""The ``mmgrpo`` command: eval, train."""
from __future__ import annotations

import argparse
import sys
import threading
import time

from .tasks import TASKS


def _task_options(args) -> dict:
    opts = {}
    for key in ("n_labels", "n_demos", "seed"):
        v = getattr(args, key, None)
        if v is not None:
            opts[key] = v
    if getattr(args, "no_reasoning", False):
        opts["reasoning"] = False
    return opts


def cmd_eval(args) -> int:
    from .lm.hf import HFBackend
    from .rollout import evaluate
    from .runlog import RunDir, format_table
    from .tasks import get_task

    task = get_task(args.task, **_task_options(args))
    examples = task.split(args.split)[: args.limit] if args.limit else task.split(args.split)
    lm = HFBackend.load(args.model)
    program = task.make_program()
    t0 = time.time()
    res = evaluate(program, examples, task.metric, lm, concurrency=args.concurrency, desc=f"eval {args.task}")
    run = RunDir.new(args.out, f"eval-{args.task}")
    run.write_json("results.json", {"task": args.task, "split": args.split, "model": args.model,
                                    "mean": res.mean, "ci95": res.ci95, "n": res.n, "counts": res.counts,
                                    "seconds": time.time() - t0, "settings": task.settings, "scores": res.scores})
    print(format_table([(args.task, args.split, f"{res.mean:.3f}", f"±{res.ci95:.3f}", res.n, res.counts["ok"],
                   res.counts["parse_failure"], res.counts["error"], f"{res.seconds:.0f}s")],
                 ("task", "split", "score", "95% CI", "n", "ok", "parse_fail", "error", "time")))
    print(f"results: {run.path / 'results.json'}")
    return 0


def cmd_train(args) -> int:
    from .compose import run
    from .grpo.config import load_config

    overrides = list(args.set or [])
    if args.task:
        overrides.insert(0, f"task={args.task}")
    cfg = load_config(args.config, overrides=overrides)
    t0 = time.time()
    run(cfg, resume=args.resume)
    print(f"total {time.time() - t0:.0f}s")
    return 0


def cmd_compare(args) -> int:
    from .compare import PRESETS, compare, saved_settings
    from .grpo.config import load_config

    if args.resume and not args.config and not args.set and not args.task:
        cfg, limit = saved_settings(args.resume)
    else:
        task = args.task or "banking77"
        cfg = load_config(args.config, overrides=[f"task={task}", *(args.set or [])],
                          defaults=None if args.config else PRESETS.get(task))
        limit = args.test_limit
    t0 = time.time()
    compare(cfg, root=args.resume, test_limit=limit)
    print(f"total {time.time() - t0:.0f}s")
    return 0


def cmd_serve(args) -> int:
    from .lm.hf import HFBackend
    from .serve import start

    backend = HFBackend.load(args.model, deterministic=False)  # a server batches by arrival time
    srv = start(backend, args.host, args.port, model_name=args.model)
    print(f"serving {args.model} at http://{srv.server_address[0]}:{srv.server_address[1]}/v1 (Ctrl-C to stop)")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        srv.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mmgrpo", description="Multi-module GRPO and prompt optimization for LM programs")
    sub = p.add_subparsers(dest="cmd", required=True)

    e = sub.add_parser("eval", help="evaluate a task's program on a split")
    e.add_argument("--task", choices=TASKS, required=True)
    e.add_argument("--split", default="dev", choices=["train", "dev", "test"])
    e.add_argument("--limit", type=int, default=None, help="evaluate on the first N examples only")
    e.add_argument("--model", default="smollm2-135m", help="embedded name, local folder or Hugging Face id")
    e.add_argument("--concurrency", type=int, default=16)
    e.add_argument("--n-labels", dest="n_labels", type=int, default=None, help="banking77: narrow the label set")
    e.add_argument("--n-demos", dest="n_demos", type=int, default=None, help="banking77: labelled demos in the prompt")
    e.add_argument("--no-reasoning", action="store_true", help="banking77: label only, no reasoning field")
    e.add_argument("--seed", type=int, default=None)
    e.add_argument("--out", default="runs", help="folder for the results")
    e.set_defaults(fn=cmd_eval)

    t = sub.add_parser("train", help="run mmGRPO from a TOML/YAML config")
    t.add_argument("config", nargs="?", default=None, help="a .toml/.yaml config (defaults for every key left out)")
    t.add_argument("--task", choices=TASKS, default=None, help="the task (overrides the config's)")
    t.add_argument("--resume", default=None, help="a run folder to continue from its last checkpoint")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    t.set_defaults(fn=cmd_train)

    c = sub.add_parser("compare", help="baseline vs prompts vs weights vs prompts -> weights, on held-out test")
    c.add_argument("config", nargs="?", default=None, help="a .toml/.yaml config (default: the task's preset)")
    c.add_argument("--task", choices=TASKS, default=None, help="the task (default banking77)")
    c.add_argument("--resume", default=None, help="a comparison folder to finish (its saved settings are used)")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    c.add_argument("--test-limit", dest="test_limit", type=int, default=None, help="score the first N test examples")
    c.set_defaults(fn=cmd_compare)

    s = sub.add_parser("serve", help="an OpenAI-compatible server over the in-process backend")
    s.add_argument("--model", default="smollm2-135m")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.set_defaults(fn=cmd_serve)

    args = p.parse_args(argv)
    from .grpo.run import TrainingStopped

    try:
        return args.fn(args)
    except TrainingStopped as exc:
        print(f"mmgrpo: stopped: {exc}", file=sys.stderr)
        return 1
    except (ValueError, KeyError, FileNotFoundError) as exc:
        print(f"mmgrpo: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
