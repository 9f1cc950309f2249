"""Token permutation: grouping by expert, empty experts, capacity dropping, weighted combine."""

import torch

from llamoe.moe.dispatch import expert_capacity, permute, plan_dispatch, unpermute
from llamoe.moe.experts.torch_loop import TorchExperts


def test_plan_groups_slots_by_expert_in_token_order() -> None:
    ids = torch.tensor([[3, 0], [0, 3], [3, 1], [1, 0]])  # 4 tokens, top-2, expert 2 empty
    plan = plan_dispatch(ids, num_experts=5)
    assert plan.tokens_per_expert.tolist() == [3, 2, 0, 3, 0]
    assert plan.token_index.tolist() == [0, 1, 3, 2, 3, 0, 1, 2]
    assert plan.slot_index.tolist() == [1, 2, 7, 5, 6, 0, 3, 4]
    assert plan.dropped.item() == 0
    assert torch.equal(ids.flatten()[plan.slot_index], torch.tensor([0, 0, 0, 1, 1, 3, 3, 3]))


def test_permute_then_unpermute_sums_each_token_k_times() -> None:
    x = torch.randn(7, 4)
    ids = torch.stack([torch.randperm(6)[:3] for _ in range(7)])
    plan = plan_dispatch(ids, num_experts=6)
    slots = permute(x, plan)
    assert slots.shape == (21, 4)
    torch.testing.assert_close(unpermute(slots, plan, 7), 3 * x)


def test_capacity_drops_latest_tokens_and_counts_them() -> None:
    ids = torch.tensor([[0], [0], [1], [0], [0], [2]])
    cap = expert_capacity(num_tokens=6, top_k=1, num_experts=3, capacity_factor=1.0)
    assert cap == 2
    plan = plan_dispatch(ids, num_experts=3, capacity=cap)
    assert plan.tokens_per_expert.tolist() == [2, 1, 1]
    assert plan.token_index.tolist() == [0, 1, 2, 5, 3, 4]  # kept slots by expert, then the dropped ones
    assert plan.kept.tolist() == [True] * 4 + [False] * 2
    assert plan.dropped.item() == 2
    out = unpermute(permute(torch.ones(6, 1), plan), plan, 6)
    assert out.flatten().tolist() == [1, 1, 1, 0, 0, 1]  # dropped tokens get nothing


def test_expert_capacity_rounds_up() -> None:
    assert expert_capacity(10, 2, 8, 1.25) == 4  # ceil(1.25 * 20 / 8) = ceil(3.125)
    assert expert_capacity(16, 1, 4, 1.0) == 4


def test_torch_experts_with_empty_groups_match_per_token_computation() -> None:
    experts = TorchExperts(num_experts=4, dim=6, hidden_dim=5)
    experts.init_weights(0.5, 0.5)
    counts = torch.tensor([3, 0, 4, 0])
    x = torch.randn(7, 6)
    out = experts(x, counts)
    owner = [0, 0, 0, 2, 2, 2, 2]
    for i, e in enumerate(owner):
        h = torch.nn.functional.silu(x[i] @ experts.w1[e]) * (x[i] @ experts.w3[e])
        torch.testing.assert_close(out[i], h @ experts.w2[e], rtol=0, atol=1e-6)
    out.sum().backward()
    assert experts.w1.grad[1].abs().sum() == 0 and experts.w1.grad[0].abs().sum() > 0


def test_torch_experts_with_no_tokens() -> None:
    experts = TorchExperts(num_experts=3, dim=4, hidden_dim=2)
    experts.init_weights(0.1, 0.1)
    out = experts(torch.empty(0, 4), torch.zeros(3, dtype=torch.int64))
    assert out.shape == (0, 4)
