"""How much of many-hop recall the LM's queries carry: recall of the gold titles from the claim alone
(BM25, hop 0, no LM) next to the whole program's (hop 0 + the LM-written hops), for several first-hop
sizes, on dev. The default should leave room above the claim-only baseline for training to fill.

Usage: python studies/multihop_room.py [--n 100] [--no-lm] [--first-k 1 2 4] ; writes
studies/results/multihop_room.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mmgrpo.rollout import evaluate, mean_ci
from mmgrpo.tasks import get_task
from mmgrpo.tasks.multihop import MultiHop, norm_title


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--first-k", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--no-lm", action="store_true", help="only the claim-only retrieval (seconds, no model)")
    args = ap.parse_args()
    task = get_task("multihop")
    dev = task.dev[: args.n]
    retriever = task.make_program().retriever
    rows = []
    for fk in args.first_k:
        claim_only = []
        for ex in dev:
            got = {norm_title(p.title) for p in retriever.search(ex.inputs["claim"], fk)}
            gold = {norm_title(t) for t in ex.gold["titles"]}
            claim_only.append(len(gold & got) / len(gold))
        m, ci = mean_ci(claim_only)
        row = {"first_k": fk, "k": task.settings["k"], "hops": task.settings["hops"], "n": len(dev),
               "claim_only_recall": m, "claim_only_ci95": ci}
        if not args.no_lm:
            from mmgrpo.lm.hf import HFBackend

            lm = HFBackend.load()
            t0 = time.time()
            res = evaluate(MultiHop(retriever, task.settings["hops"], task.settings["k"], fk), dev,
                           task.metric, lm, concurrency=16, progress=False)
            row.update(program_recall=res.mean, program_ci95=res.ci95, seconds=time.time() - t0, counts=res.counts)
        rows.append(row)
        print(json.dumps(row))
    out = Path(__file__).parent / "results" / "multihop_room.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
