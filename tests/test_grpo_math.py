"""Grouping, advantages and the GRPO loss on hand-made data, with hand-computed numbers."""
from __future__ import annotations

import math

import pytest
import torch

from mmgrpo.grpo.groups import assign_weights, compute_advantages, group_calls
from mmgrpo.grpo.loss import grpo_loss, sequence_coefficients, token_logprobs
from mmgrpo.trace import ModuleCall, Trajectory


def traj(i, reward, modules, status="ok"):
    t = Trajectory("ex", sample_index=i, reward=reward, status=status)
    counts = {}
    for m in modules:
        t.calls.append(ModuleCall(m, counts.get(m, 0), [1], [10 + i], [-1.0], f"{m}{i}"))
        counts[m] = counts.get(m, 0) + 1
    return t


@pytest.fixture
def trajs():
    # query is called 3, 2, 1 times; t3 failed to parse before reaching 'answer'
    return [traj(0, 1.0, ["query", "query", "query", "answer"]),
            traj(1, 0.0, ["query", "query", "answer"]),
            traj(2, 0.5, ["query", "answer"]),
            traj(3, -1.0, ["query"], status="parse_failure")]


def keyed(grouping):
    return {(g.module, g.index): sorted(m.trajectory for m in g.members) for g in grouping.groups}


def test_truncate_keeps_indices_every_trajectory_reached(trajs):
    g = group_calls({"ex": trajs}, "truncate")
    assert keyed(g) == {("answer", 0): [0, 1, 2], ("query", 0): [0, 1, 2, 3]}


def test_ragged_keeps_uneven_groups_and_skips_singletons(trajs):
    g = group_calls({"ex": trajs}, "ragged")
    assert keyed(g) == {("answer", 0): [0, 1, 2], ("query", 0): [0, 1, 2, 3], ("query", 1): [0, 1]}
    assert g.skipped["too_small"] == 1  # query index 2: only trajectory 0 got there


def test_fill_pads_with_the_trajectorys_own_last_call(trajs):
    g = group_calls({"ex": trajs}, "fill")
    q2 = [x for x in g.groups if (x.module, x.index) == ("query", 2)][0]
    assert sorted(m.trajectory for m in q2.members) == [0, 1, 2, 3]
    filler = [m for m in q2.members if m.trajectory == 2][0]
    assert filler.call is trajs[2].calls_of("query")[-1]


def test_trajectory_level_puts_all_calls_in_one_group(trajs):
    g = group_calls({"ex": trajs}, level="trajectory")
    assert len(g.groups) == 1 and len(g.groups[0].members) == 4 + 3 + 2 + 1


def test_equal_rewards_are_skipped_and_counted():
    ts = [traj(i, 1.0, ["a"]) for i in range(4)]
    g = group_calls({"ex": ts})
    assert g.groups == [] and g.skipped["equal_rewards"] == 1
    assert g.counts() == {"groups_used": 0, "samples": 0, "groups_skipped_equal_rewards": 1}


def test_advantages_hand_computed(trajs):
    g = group_calls({"ex": trajs}, "truncate")
    compute_advantages(g, scale_rewards=False)
    q0 = [x for x in g.groups if x.module == "query"][0]
    mean = (1 + 0 + 0.5 - 1) / 4
    assert [m.advantage for m in q0.members] == pytest.approx([1 - mean, 0 - mean, 0.5 - mean, -1 - mean])
    compute_advantages(g, scale_rewards=True, eps=0.0)
    std = math.sqrt(sum((r - mean) ** 2 for r in (1, 0, 0.5, -1)) / 4)
    assert q0.members[0].advantage == pytest.approx((1 - mean) / std)


def test_per_trajectory_weights_sum_to_one(trajs):
    g = group_calls({"ex": trajs}, "ragged")
    assign_weights(g)
    per = {}
    for m in g.members:
        per[m.trajectory] = per.get(m.trajectory, 0) + m.weight
    assert per == pytest.approx({0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0})
    assert [m.weight for m in g.members if m.trajectory == 0] == pytest.approx([1 / 3] * 3)


def test_bad_mode_is_an_error(trajs):
    with pytest.raises(ValueError, match="grouping mode"):
        group_calls({"ex": trajs}, "stretch")


def test_normalizations_hand_computed():
    lengths, w = [2, 4], [1.0, 1.0]
    assert sequence_coefficients(lengths, w, "grpo") == pytest.approx([1 / 4, 1 / 8])
    assert sequence_coefficients(lengths, w, "dapo") == pytest.approx([1 / 6, 1 / 6])
    assert sequence_coefficients(lengths, w, "dr_grpo", max_len=8) == pytest.approx([1 / 16, 1 / 16])
    with pytest.raises(ValueError, match="max_len"):
        sequence_coefficients(lengths, w, "dr_grpo")


def test_loss_value_with_clipping_hand_computed():
    logp = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    old = torch.log(torch.tensor([[0.25, 0.5], [0.25, 0.5]]))  # ratios 2 and 1
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 2, dtype=torch.bool)
    coefs = torch.tensor([0.5, 0.5])
    out = grpo_loss(logp, old, adv, mask, coefs, epsilon=0.2)
    # seq0 (A=+1): min(2*1, 1.2*1)=1.2, min(1,1)=1 -> -2.2 ; seq1 (A=-1): min(-2, -1.2)=-2, -1 -> 3
    assert float(out.loss) == pytest.approx(0.5 * -2.2 + 0.5 * 3.0)
    assert out.clipped_tokens == 1.0  # only seq0's first token is clipped
    hi = grpo_loss(logp, old, adv, mask, coefs, epsilon=0.2, epsilon_high=2.0)
    assert float(hi.loss) == pytest.approx(0.5 * -3.0 + 0.5 * 3.0)


def test_mask_excludes_padding():
    logp = torch.tensor([[-1.0, -1.0]])
    out = grpo_loss(logp, logp, torch.tensor([2.0]), torch.tensor([[False, True]]), torch.tensor([1.0]))
    assert float(out.loss) == pytest.approx(-2.0) and out.tokens == 1.0


def test_kl_k3_hand_computed():
    logp = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25)]])
    out = grpo_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 1, dtype=torch.bool), torch.tensor([1.0]),
                    beta=0.1, ref_logp=ref)
    k3 = 0.5 - math.log(0.5) - 1  # exp(d) - d - 1 with d = log(0.25/0.5)
    assert float(out.loss) == pytest.approx(0.1 * k3) and out.kl_sum == pytest.approx(k3)


def test_gradient_matches_finite_differences_on_a_tiny_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(7, 5), torch.nn.Linear(5, 7)).double()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    targets = torch.tensor([[2, 3, 4], [5, 6, 1]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    adv, coefs = torch.tensor([0.7, -1.3], dtype=torch.double), torch.tensor([0.5, 0.25], dtype=torch.double)
    with torch.no_grad():
        old = token_logprobs(model(ids), targets).double() + 0.1

    def f():
        lp = token_logprobs(model(ids), targets).double()
        return grpo_loss(lp, old, adv, mask, coefs, epsilon=0.2, beta=0.05, ref_logp=old - 0.2).loss

    f().backward()
    w = model[1].weight
    analytic = w.grad[2, 3].item()
    h = 1e-6
    with torch.no_grad():
        w[2, 3] += h
        up = f().item()
        w[2, 3] -= 2 * h
        down = f().item()
    assert analytic == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-9)
    assert abs(analytic) > 1e-6


def test_error_trajectories_join_no_group_and_are_counted(trajs):
    trajs[1].status, trajs[1].reward = "error", 0.0  # e.g. the judge timed out: not the model's doing
    g = group_calls({"ex": trajs}, "truncate")
    assert all(m.trajectory != 1 for m in g.members)
    assert keyed(g) == {("answer", 0): [0, 2], ("query", 0): [0, 2, 3]}
    everything_failed = [traj(i, 0.0, ["a"], status="error") for i in range(3)]
    g2 = group_calls({"ex": trajs[:1] + trajs[2:3], "dead": everything_failed})
    assert g2.skipped["errors"] == 1  # the example whose rollouts all failed
    pair = [traj(0, 1.0, ["a"]), traj(1, 0.0, ["a"], status="error")]
    assert group_calls({"ex": pair}).skipped["errors"] == 1  # one left: too small because of the error


def test_parse_failures_stay_in_their_groups(trajs):
    g = group_calls({"ex": trajs}, "truncate")
    assert 3 in keyed(g)[("query", 0)]  # trajectory 3 failed to parse: that teaches the format


def test_truncate_counts_the_invocations_it_drops(trajs):
    g = group_calls({"ex": trajs}, "truncate")
    assert g.skipped["truncated"] == 2  # query indices 1 and 2, which not every rollout reached
    assert g.counts()["groups_skipped_truncated"] == 2


def test_trajectory_level_baseline_is_the_mean_over_trajectories():
    # rewards 1, 0, 0.5, -1 with 4, 3, 2, 1 calls: the baseline is 0.125, not the call-weighted 0.4
    ts = [traj(i, r, ["m"] * n) for i, (r, n) in enumerate([(1.0, 4), (0.0, 3), (0.5, 2), (-1.0, 1)])]
    g = group_calls({"ex": ts}, level="trajectory")
    compute_advantages(g, scale_rewards=False)
    adv = {m.trajectory: m.advantage for m in g.members}
    assert adv == pytest.approx({0: 0.875, 1: -0.125, 2: 0.375, 3: -1.125})
    compute_advantages(g, scale_rewards=True, eps=0.0)
    std = math.sqrt(sum((r - 0.125) ** 2 for r in (1, 0, 0.5, -1)) / 4)
    assert g.members[0].advantage == pytest.approx(0.875 / std)


def test_per_module_statistics_by_hand(trajs):
    from mmgrpo.grpo.stats import module_stats, sampled_entropy

    trajs[1].calls[0].logprobs = [-3.0]  # one sampled token less likely than the others (-1.0)
    err = traj(4, 0.0, ["query", "answer"], status="error")  # an error: its calls count, its reward does not
    g = group_calls({"ex": trajs + [err]}, "truncate")
    compute_advantages(g, scale_rewards=False)
    update = {"query": {"train_tokens": 4, "clip_frac": 0.25, "kl": 0.0}}
    s = module_stats(trajs + [err], g, update)
    assert set(s) == {"answer", "query"}
    q, a = s["query"], s["answer"]
    assert q["calls"] == 3 + 2 + 1 + 1 + 1 and a["calls"] == 3 + 1
    assert q["completion_tokens"] == 8 and a["completion_tokens"] == 4  # one token a call
    assert q["parse_failures"] == 1 and a["parse_failures"] == 0  # t3's last call was a query
    # reward of the trajectories behind each call (error excluded): query 3x1.0, 2x0.0, 0.5, -1.0
    assert q["reward_mean"] == pytest.approx((3 * 1.0 + 2 * 0.0 + 0.5 - 1.0) / 7)
    assert a["reward_mean"] == pytest.approx((1.0 + 0.0 + 0.5) / 3)
    # truncate: query index 0 (t0..t3) and answer index 0 (t0..t2) are used; query 1 and 2 truncated
    assert q["groups_used"] == 1 and a["groups_used"] == 1 and q["groups_skipped"] == {"truncated": 2}
    # advantages = reward - group mean: query group mean 0.125, answer group mean 0.5
    assert q["advantage_mean"] == pytest.approx(0.0) and a["advantage_mean"] == pytest.approx(0.0)
    assert q["advantage_abs_mean"] == pytest.approx((0.875 + 0.125 + 0.375 + 1.125) / 4)
    assert a["advantage_abs_mean"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    assert q["entropy"] == pytest.approx((7 * 1.0 + 3.0) / 8) and a["entropy"] == pytest.approx(1.0)
    assert q["clip_frac"] == 0.25 and "clip_frac" not in a  # the update's figures, where it trained
    assert sampled_entropy(trajs + [err]) == pytest.approx((11 * 1.0 + 3.0) / 12)


def test_a_group_too_small_is_put_down_to_errors_only_when_failed_rollouts_had_reached_it():
    ok = [traj(0, 1.0, ["query", "answer"]), traj(1, 0.0, ["query"], status="parse_failure")]
    reached = traj(2, 0.0, ["query", "answer"], status="error")  # failed after its answer call (e.g. the metric)
    early = traj(3, 0.0, ["query"], status="error")  # failed before reaching answer
    g = group_calls({"ex": ok + [reached]}, "truncate", min_size=2)
    assert g.skipped_by_module[("answer", "errors")] == 1 and not g.skipped_by_module[("answer", "too_small")]
    g = group_calls({"ex": ok + [early]}, "ragged", min_size=2)
    assert g.skipped_by_module[("answer", "too_small")] == 1 and not g.skipped_by_module[("answer", "errors")]


def test_batch_denominator_weights_every_grouped_call_and_informative_only_the_trained():
    # ex: two trajectories whose rewards differ (query and answer groups informative); ex2: equal rewards
    a = traj(0, 1.0, ["query", "answer"])
    b = traj(1, 0.0, ["query", "answer"])
    c = traj(0, 0.5, ["answer"])
    c.example_id, d = "ex2", traj(1, 0.5, ["answer"])
    d.example_id = "ex2"
    g = group_calls({"ex": [a, b], "ex2": [c, d]}, "truncate")
    assert len(g.groups) == 2 and len(g.candidates) == 3 and g.skipped["equal_rewards"] == 1  # ex2: no signal
    assign_weights(g, per_trajectory=True, denominator="informative")
    assert sorted(m.weight for m in g.members) == [0.5] * 4 and len(g.sampled) == 6
    assign_weights(g, per_trajectory=True, denominator="batch")
    assert sum(m.weight for m in g.sampled) == pytest.approx(4.0)  # one unit per sampled trajectory
    assign_weights(g, per_trajectory=False, denominator="batch")
    assert [m.weight for m in g.sampled] == [1.0] * 6
    with pytest.raises(ValueError, match="unknown loss denominator"):
        assign_weights(g, denominator="some")


def test_per_trajectory_off_gives_every_call_weight_one(trajs):
    g = group_calls({"ex": trajs}, "ragged")
    assign_weights(g, per_trajectory=True)
    assert any(m.weight != 1.0 for m in g.members)
    assign_weights(g, per_trajectory=False)
    assert all(m.weight == 1.0 for m in g.members)


def test_learning_rate_schedules_by_value():
    from mmgrpo.config import TrainConfig
    from mmgrpo.grpo.trainer import lr_lambda

    f = lr_lambda(TrainConfig(steps=10, warmup_steps=2, lr_schedule="linear"))
    assert [f(s) for s in (0, 1, 2, 6, 10)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0])
    g = lr_lambda(TrainConfig(steps=10, warmup_steps=2, lr_schedule="cosine"))
    assert [g(s) for s in (0, 2, 6, 10)] == pytest.approx([0.5, 1.0, 0.5, 0.0])
    h = lr_lambda(TrainConfig(steps=10, lr_schedule="constant"))
    assert {h(s) for s in range(12)} == {1.0}


def test_batches_cover_each_epoch_once_in_a_fresh_order():
    from mmgrpo.grpo.run import batch_for_step
    from mmgrpo.program import Example

    train = [Example(f"e{i}", {"x": i}) for i in range(10)]
    ids = lambda step: [e.id for e in batch_for_step(train, step, 3, seed=4)]  # noqa: E731
    epoch1 = [i for s in (1, 2, 3) for i in ids(s)]  # 3 batches of 3 an epoch; one example left out
    epoch2 = [i for s in (4, 5, 6) for i in ids(s)]
    assert len(set(epoch1)) == 9 and len(set(epoch2)) == 9 and epoch1 != epoch2
    assert ids(4) == ids(4) and ids(7) != ids(4)  # a function of the step alone
    assert sorted(e.id for e in batch_for_step(train, 1, 50, seed=4)) == sorted(e.id for e in train)  # all 10
    with pytest.raises(ValueError, match="training split is empty"):
        batch_for_step([], 1, 3, seed=0)
