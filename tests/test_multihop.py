"""Many-hop search on the real data: counts, splits, metric, BM25, rollouts, the HoVer path."""
from __future__ import annotations

import json

import pytest

from mmgrpo.lm.base import SamplingParams
from mmgrpo.program import Example, Prediction
from mmgrpo.retrieve import BM25Retriever
from mmgrpo.rollout import sample
from mmgrpo.tasks import get_task
from mmgrpo.tasks.multihop import recall


@pytest.fixture(scope="module")
def task():
    return get_task("multihop")


def test_data_counts_and_stable_disjoint_splits(task):
    assert task.settings["corpus_size"] == 4858
    assert (len(task.train), len(task.dev), len(task.test)) == (300, 100, 100)
    ids = [{e.id for e in s} for s in (task.train, task.dev, task.test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    again = get_task("multihop")
    assert [e.id for e in again.dev] == [e.id for e in task.dev]
    assert all(len(e.gold["titles"]) == 2 for e in task.train)


def test_recall_hand_checked():
    ex = Example("q", {"claim": "c"}, {"titles": ["Shirley Temple", "Tom & Jerry"]})
    assert recall(ex, Prediction(titles=["Shirley Temple", "Other"])) == 0.5
    assert recall(ex, Prediction(titles=["shirley temple", "Tom &amp; Jerry", "Shirley Temple"])) == 1.0
    assert recall(ex, Prediction(titles=[])) == 0.0


def test_bm25_finds_a_page_by_its_own_words(task):
    r = task.make_program().retriever
    hit = r.search("Meet Corliss Archer program from radio's Golden Age", 4)
    assert hit[0].title == "Meet Corliss Archer" and len(hit) == 4


def test_rollout_records_query_and_notes_calls_in_order(task, scripted):
    def reply(messages):
        return "query: Shirley Temple" if "query: <" in messages[0]["content"] else "updated_notes: Shirley Temple acted."
    res = sample(task.make_program(), task.dev[:2], task.metric, scripted(reply), n_samples=2, progress=False)
    assert res.counts["ok"] == 4
    t = res.trajectories[0]
    assert [(c.module, c.index) for c in t.calls] == [("notes", 0), ("query", 0), ("notes", 1), ("query", 1),
                                                      ("notes", 2)]
    assert len(t.prediction["titles"]) == 12  # first retrieval + 2 hops of 4 documents


def test_rollout_on_the_embedded_model_scores_and_keeps_the_calls(task, lm):
    res = sample(task.make_program(), task.dev[:1], task.metric, lm, n_samples=2, progress=False,
                 params=SamplingParams(temperature=1.0, max_tokens=32))
    assert sum(res.counts.values()) == 2
    for t in res.trajectories:
        assert t.calls and t.calls[0].module == "notes" and t.calls[0].completion_ids
        assert t.status != "ok" or 0.0 <= t.reward <= 1.0


def test_hover_needs_a_corpus_and_runs_on_a_local_one(tmp_path, scripted):
    with pytest.raises(ValueError, match="needs corpus="):
        get_task("multihop", dataset="hover")
    claims = [{"uid": f"c{i}", "claim": f"Claim about Alpha{i} and Beta{i}.", "label": "SUPPORTED", "num_hops": 2,
               "supporting_facts": [[f"Alpha{i}", 0], [f"Beta{i}", 1]]} for i in range(6)]
    (tmp_path / "claims.json").write_text(json.dumps(claims))
    docs = [{"title": f"Alpha{i}", "text": f"Alpha{i} is a town."} for i in range(6)]
    docs += [{"title": f"Beta{i}", "text": f"Beta{i} is a river."} for i in range(6)]
    (tmp_path / "wiki.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    t = get_task("multihop", dataset="hover", corpus=str(tmp_path / "wiki.jsonl"),
                 claims=str(tmp_path / "claims.json"), n_train=2, n_dev=2, n_test=2, k=2, hops=1)
    assert t.settings["corpus_size"] == 12 and len(t.dev) == 2
    ex = t.dev[0]
    i = ex.id[1:]
    lm = scripted(lambda m: f"query: Beta{i} river" if "query: <" in m[0]["content"] else "updated_notes: ok")
    res = sample(t.make_program(), [ex], t.metric, lm, progress=False)
    assert res.trajectories[0].reward == 1.0  # Alpha from the claim itself, Beta from the hop


def test_malformed_corpus_line_names_the_line(tmp_path):
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"title": "A", "text": "a"}\n{"title": "B"}\n')
    with pytest.raises(ValueError, match=r"c.jsonl:2: a corpus line must be a JSON object with 'title' and 'text'"):
        BM25Retriever(bad)
