"""DSPy's prompt optimizers through mmgrpo's LM vs mmgrpo's own, side by side on Banking77 (10
intents, zero-shot start, the embedded SmolLM2-135M as task LM and proposer, the same dev and test):
MIPROv2 (auto="light") vs `mipro`, and BootstrapFewShotWithRandomSearch vs `bootstrap`.

Budget: DSPy's arm runs first and its program runs are counted (metric calls); ours then gets as
many (trials or candidates sized to match). Prints, per arm, the dev score the optimizer reports,
the held-out test score (n=200, 95% CI), program runs and wall time; an arm that fails says why.
Usage: python studies/dspy_mipro_vs_mipro.py [--out runs/study-dspy]  (about 40 min on 2 cores)
"""
from __future__ import annotations

import argparse
import json
import threading
import time

import dspy

import mmgrpo
from mmgrpo.tasks import get_task
from mmgrpo.tasks.banking77 import normalize


class Counted:
    """A metric that counts its calls (= program runs scored)."""

    def __init__(self, fn):
        self.fn, self.n, self.lock = fn, 0, threading.Lock()

    def __call__(self, *a, **k):
        with self.lock:
            self.n += 1
        return self.fn(*a, **k)


class DSPyClassify(dspy.Module):
    """The Banking77 program written in DSPy: one predictor, the intent list in its instructions."""

    def __init__(self, labels):
        super().__init__()
        options = "\n".join(f"- {lab}" for lab in labels)
        self.classify = dspy.Predict(dspy.Signature(
            "query -> label", f"Classify the banking customer's query into one of these intents:\n{options}\n"
                              "The label must be copied exactly from the list."))

    def forward(self, query):
        return self.classify(query=query)


def exact(example, pred, trace=None):
    return float(normalize(pred.get("label", "") or "") == normalize(example.label))


def run_arm(name, fn):
    t0 = time.time()
    try:
        res, counted = fn()
    except Exception as exc:  # noqa: BLE001 - an arm that fails is a result too
        print(f"{name}: FAILED after {time.time() - t0:.0f}s: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        return None
    return res, counted, time.time() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/study-dspy")
    ap.add_argument("--pairs", default="mipro,bootstrap", help="mipro: MIPROv2 vs mipro; bootstrap: "
                    "BootstrapFewShotWithRandomSearch vs bootstrap")
    args = ap.parse_args()
    task = get_task("banking77", n_labels=10, n_demos=0, reasoning=False)
    labels = task.settings["labels"]

    def as_dspy(exs):
        return [dspy.Example(query=e.inputs["query"], label=e.gold["label"]).with_inputs("query") for e in exs]

    dev = task.dev[:60]
    base = {"rollout": {"max_tokens": 24}, "prompts": {"max_demos": 2, "train_examples": 20, "candidates": 6},
            "run": {"out": args.out, "progress": False, "eval_examples": 60}}
    rows = []

    def dspy_arm(step):
        m = Counted(exact)
        with dspy.context(adapter=dspy.XMLAdapter()):
            r = mmgrpo.optimize(DSPyClassify(labels), train=as_dspy(task.train), dev=as_dspy(dev), metric=m,
                                strategy=step, config={**base, "run": {**base["run"], "name": step.lower()}})
        return r, m

    def ours(step, prompts):
        def go():
            m = Counted(task.metric)
            r = mmgrpo.optimize(task.make_program(), train=task.train, dev=dev, metric=m, strategy=step,
                                config={**base, "prompts": {**base["prompts"], **prompts},
                                        "run": {**base["run"], "name": f"mmgrpo-{step}"}})
            return r, m
        return go

    for pair in args.pairs.split(","):
        theirs = "dspy.MIPROv2" if pair == "mipro" else "dspy.BootstrapFewShotWithRandomSearch"
        out = run_arm(theirs, lambda: dspy_arm(theirs))
        runs = out[1].n if out else 600
        if out:
            rows.append((theirs, *out))
        # ours with the same number of program runs (metric calls), sized from theirs
        if pair == "mipro":
            mb, top_k = 20, 3
            budget = {"trials": max(2, (runs - 20 - top_k * len(dev)) // mb), "minibatch": mb, "top_k": top_k}
        else:
            budget = {"candidates": max(2, round((runs - 20) / len(dev)))}
        out = run_arm(pair, ours(pair, budget))
        if out:
            rows.append((f"mmgrpo {pair} {budget}", *out))

    print("\narm | dev (n=60) | test (n=200, 95% CI) | program runs | wall s")
    for name, res, counted, secs in rows:
        res.max_tokens = 24  # a label fits; a rambling reply would otherwise run to 256 tokens
        ev = res.evaluate(as_dspy(task.test) if name.startswith("dspy.") else task.test,
                          exact if name.startswith("dspy.") else task.metric, concurrency=32)
        dev_score = json.loads(open(f"{res.info['run']}/strategy.json").read())["steps"][0]["best_dev"]
        print(f"{name} | {dev_score:.3f} | {ev.mean:.3f} ± {ev.ci95:.3f} | {counted.n} | {secs:.0f}")
        res.close()


if __name__ == "__main__":
    main()
