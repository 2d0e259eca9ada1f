"""LazyAdam: SparseAdam's arithmetic on the rows a batch touched, checked against torch's SparseAdam."""

from __future__ import annotations

import pytest
import torch

from funnel.training.lazy_adam import LazyAdam


def trajectory(opt_cls, batches, steps_ids):
    torch.manual_seed(0)
    table = torch.nn.Embedding(10, 3, sparse=True)
    opt = opt_cls(table.parameters(), lr=0.05)
    for ids, target in zip(steps_ids, batches, strict=True):
        opt.zero_grad()
        loss = ((table(ids) - target) ** 2).sum()
        loss.backward()
        opt.step()
    return table.weight.detach().clone(), opt


def test_lazy_adam_takes_the_same_steps_as_torch_sparse_adam():
    gen = torch.Generator().manual_seed(1)
    ids = [torch.tensor([1, 4, 4, 7]), torch.tensor([4, 2]), torch.tensor([9, 1, 1, 1, 0])]  # repeats summed
    targets = [torch.randn(len(i), 3, generator=gen) for i in ids]
    ours, opt = trajectory(LazyAdam, targets, ids)
    theirs, _ = trajectory(torch.optim.SparseAdam, targets, ids)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    assert opt.state[opt.param_groups[0]["params"][0]]["step"] == 3


def test_rows_no_batch_touched_keep_their_weights_and_moments():
    ids = [torch.tensor([1, 2]), torch.tensor([2])]
    targets = [torch.ones(2, 3), torch.ones(1, 3)]
    torch.manual_seed(0)
    initial = torch.nn.Embedding(10, 3).weight.detach().clone()
    weights, opt = trajectory(LazyAdam, targets, ids)
    untouched = [0, 3, 4, 5, 6, 7, 8, 9]
    torch.testing.assert_close(weights[untouched], initial[untouched], rtol=0, atol=0)
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert state["exp_avg"][untouched].abs().sum() == 0 and state["exp_avg"][[1, 2]].abs().sum() > 0
    assert not torch.equal(weights[[1, 2]], initial[[1, 2]])


def test_first_step_moves_each_touched_weight_by_lr():
    """Adam's first step is lr * g / (|g| + eps') per coordinate: lr in the direction of -g."""
    table = torch.nn.Embedding(4, 2, sparse=True)
    before = table.weight.detach().clone()
    opt = LazyAdam(table.parameters(), lr=0.1)
    (table(torch.tensor([3])) * torch.tensor([[2.0, -5.0]])).sum().backward()
    opt.step()
    torch.testing.assert_close(table.weight.detach()[3] - before[3], torch.tensor([-0.1, 0.1]), rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_continues_identically():
    ids = [torch.tensor([1, 2]), torch.tensor([2, 5]), torch.tensor([5, 5, 1])]
    targets = [torch.full((len(i), 3), 0.5) for i in ids]
    straight, _ = trajectory(LazyAdam, targets, ids)
    torch.manual_seed(0)
    table = torch.nn.Embedding(10, 3, sparse=True)
    opt = LazyAdam(table.parameters(), lr=0.05)
    for k, (i, t) in enumerate(zip(ids, targets, strict=True)):
        if k == 2:  # checkpoint and resume before the last step
            saved = opt.state_dict()
            opt = LazyAdam(table.parameters(), lr=0.05)
            opt.load_state_dict(saved)
        opt.zero_grad()
        ((table(i) - t) ** 2).sum().backward()
        opt.step()
    torch.testing.assert_close(table.weight.detach(), straight, rtol=0, atol=0)


def test_dense_gradients_and_bad_arguments_are_refused():
    w = torch.nn.Parameter(torch.zeros(3))
    w.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="sparse gradients only"):
        LazyAdam([w]).step()
    with pytest.raises(ValueError, match="lr > 0"):
        LazyAdam([w], lr=0)
