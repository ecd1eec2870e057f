"""DSPy's MIPROv2 (auto="light") through mmgrpo's LM vs mmgrpo's own `mipro`, side by side on
Banking77 (10 intents, zero-shot start, the embedded SmolLM2-135M, the same dev and test).

Budget: MIPROv2 runs first and its program runs are counted (metric calls); `mipro` then gets
as many (its trials are sized to match). Prints, per arm, the dev score the optimizer reports,
the held-out test score (n=200, 95% CI), program runs and wall time; the last line is the table.
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/study-dspy")
    args = ap.parse_args()
    task = get_task("banking77", n_labels=10, n_demos=0, reasoning=False)
    labels = task.settings["labels"]
    train = [dspy.Example(query=e.inputs["query"], label=e.gold["label"]).with_inputs("query") for e in task.train]
    dev = [dspy.Example(query=e.inputs["query"], label=e.gold["label"]).with_inputs("query") for e in task.dev[:60]]
    test = [dspy.Example(query=e.inputs["query"], label=e.gold["label"]).with_inputs("query") for e in task.test]
    base = {"rollout": {"max_tokens": 24}, "prompts": {"max_demos": 2, "train_examples": 20},
            "run": {"out": args.out, "progress": False, "eval_examples": 60}}
    rows = []

    # arm 1: DSPy's MIPROv2 (light), run by mmgrpo on the DSPy program through the policy LM
    m1 = Counted(exact)
    t0 = time.time()
    with dspy.context(adapter=dspy.XMLAdapter()):
        r1 = mmgrpo.optimize(DSPyClassify(labels), train=train, dev=dev, metric=m1, strategy="dspy.MIPROv2",
                             config={**base, "run": {**base["run"], "name": "dspy-miprov2"}})
    s1 = time.time() - t0
    runs1 = m1.n
    ev1 = r1.evaluate(test, exact)
    dev1 = json.loads(open(f"{r1.info['run']}/strategy.json").read())["steps"][0]["best_dev"]
    rows.append(("dspy.MIPROv2 (auto=light)", dev1, ev1, runs1, s1))
    r1.close()

    # arm 2: mmgrpo's mipro on the mmgrpo program, with the same number of program runs
    mb, top_k = 20, 3
    trials = max(2, (runs1 - 20 - top_k * len(dev)) // mb)
    m2 = Counted(task.metric)
    prog = task.make_program()
    t0 = time.time()
    r2 = mmgrpo.optimize(prog, train=task.train, dev=task.dev[:60], metric=m2, strategy="mipro",
                         config={**base, "prompts": {**base["prompts"], "trials": trials, "minibatch": mb,
                                                     "top_k": top_k},
                                 "run": {**base["run"], "name": "mmgrpo-mipro"}})
    s2 = time.time() - t0
    ev2 = r2.evaluate(task.test, task.metric)
    dev2 = json.loads(open(f"{r2.info['run']}/strategy.json").read())["steps"][0]["best_dev"]
    rows.append((f"mmgrpo mipro ({trials} trials x {mb})", dev2, ev2, m2.n, s2))
    r2.close()

    print("\narm | dev (n=60) | test (n=200, 95% CI) | program runs | wall s")
    for name, d, ev, n, s in rows:
        print(f"{name} | {d:.3f} | {ev.mean:.3f} ± {ev.ci95:.3f} | {n} | {s:.0f}")


if __name__ == "__main__":
    main()
