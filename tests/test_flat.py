"""FlatState: layout, pack/load/add round trips, shared storage, pull through the optimizer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from replica_dist.flat import FlatState


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2, bias=False))
    # Non-trivial running statistics, so buffers are distinguishable from their init.
    with torch.no_grad():
        model[1].running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, -0.4]))
        model[1].running_var.copy_(torch.tensor([1.5, 2.5, 0.5, 3.0]))
    return model


EXPECTED_NAMES = [
    "0.weight",
    "0.bias",
    "1.weight",
    "1.bias",
    "3.weight",
    "1.running_mean",
    "1.running_var",
]


def _reference_tensors(model: nn.Module) -> list[torch.Tensor]:
    named = dict(model.named_parameters()) | dict(model.named_buffers())
    return [named[name] for name in EXPECTED_NAMES]


def _reference_flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in _reference_tensors(model)])


def test_names_parameters_then_floating_buffers():
    model = _model()
    state = FlatState(model)
    assert state.names == EXPECTED_NAMES
    assert "1.num_batches_tracked" not in state.names
    assert state.num_params == 5
    assert all(n in dict(model.named_parameters()) for n in state.names[: state.num_params])
    assert all(n in dict(model.named_buffers()) for n in state.names[state.num_params :])
    numel = 3 * 4 + 4 + 4 + 4 + 4 * 2 + 4 + 4
    assert state.numel == numel
    assert state.pack().dtype == torch.float32


def test_pack_concatenates_all_tensors():
    model = _model()
    state = FlatState(model)
    packed = state.pack()
    assert packed.shape == (40,)
    assert torch.equal(packed, _reference_flat(model))
    # The running variance occupies the last four entries.
    assert torch.equal(packed[-4:], torch.tensor([1.5, 2.5, 0.5, 3.0]))


def test_pack_tracks_model_changes():
    model = _model()
    state = FlatState(model)
    state.pack()
    with torch.no_grad():
        model[0].weight.mul_(2.0)
        model[1].running_mean.add_(1.0)
    assert torch.equal(state.pack(), _reference_flat(model))


def test_load_then_pack_round_trips():
    model = _model()
    state = FlatState(model)
    target = torch.randn(40, generator=torch.Generator().manual_seed(1))
    state.load(target)
    assert torch.equal(state.pack(), target)
    # Each tensor got its own slice of the vector.
    assert torch.equal(model[0].weight, target[:12].view(4, 3))
    assert torch.equal(model[3].weight, target[24:32].view(2, 4))
    assert torch.equal(model[1].running_var, target[36:40])
    # load copies: changing the vector afterwards leaves the model alone.
    target.zero_()
    assert not torch.equal(_reference_flat(model), target)


def test_load_keeps_integer_buffers():
    model = _model()
    model[1].num_batches_tracked.fill_(7)
    state = FlatState(model)
    state.load(torch.zeros(40))
    assert model[1].num_batches_tracked.item() == 7
    assert model[1].num_batches_tracked.dtype == torch.long


def test_add_adds():
    model = _model()
    state = FlatState(model)
    before = _reference_flat(model).clone()
    delta = torch.randn(40, generator=torch.Generator().manual_seed(2))
    state.add(delta)
    assert torch.allclose(_reference_flat(model), before + delta)
    state.add(-delta)
    assert torch.allclose(_reference_flat(model), before, atol=1e-6)


def test_views_share_storage_with_flat():
    model = _model()
    state = FlatState(model)
    flat = torch.zeros(40)
    views = state.views(flat)
    assert [v.shape for v in views] == [t.shape for t in _reference_tensors(model)]
    for v in views:
        assert v.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    flat[0] = 5.0
    flat[-1] = 7.0
    assert views[0][0, 0].item() == 5.0
    assert views[-1][-1].item() == 7.0
    views[2].fill_(3.0)  # BatchNorm weight: entries 16..19
    assert torch.equal(flat[16:20], torch.full((4,), 3.0))
    assert flat[15].item() == 0.0 and flat[20].item() == 0.0


def test_pack_into_a_given_buffer_allocates_nothing_new():
    model = _model()
    state = FlatState(model)
    out = torch.full((40,), float("nan"))
    assert state.pack(out=out) is out
    assert torch.equal(out, _reference_flat(model))
    assert state.pack().data_ptr() != state.pack().data_ptr()  # without `out`, a new vector each time


def test_subtract_from_uses_the_buffers_saved_before_the_forward_pass():
    model = _model()
    model.train()
    state = FlatState(model)
    before = _reference_flat(model).clone()
    state.save_buffers()
    model(torch.randn(6, 3, generator=torch.Generator().manual_seed(6)))  # moves the running statistics
    assert not torch.equal(_reference_flat(model)[32:], before[32:])
    mean = torch.randn(40, generator=torch.Generator().manual_seed(7))
    gap = mean.clone()
    assert state.subtract_from(gap) is gap
    assert torch.equal(gap, mean - before)
    moved = _reference_flat(model).clone()
    state.restore_buffers_unless(torch.tensor(True))  # an applied step keeps what the forward pass did
    assert torch.equal(_reference_flat(model), moved)
    state.restore_buffers_unless(torch.tensor(False))
    assert torch.equal(_reference_flat(model), before)


@pytest.mark.parametrize("train_mode", [True, False])
def test_pull_through_plain_sgd(train_mode):
    model = _model()
    model.train(train_mode)
    state = FlatState(model)
    lr = 0.1
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(3))
    model(x).pow(2).sum().backward()

    # Expected values, computed by hand from the state just before the pull.
    params = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.detach().clone() for p in model.parameters()]
    buffers = [model[1].running_mean.clone(), model[1].running_var.clone()]
    pull = torch.randn(40, generator=torch.Generator().manual_seed(4))
    sizes = [12, 4, 4, 4, 8, 4, 4]
    parts = list(torch.split(pull.clone(), sizes))

    state.pull_through_optimizer(pull)
    optimizer.step()

    for p, w, g, part in zip(model.parameters(), params, grads, parts):
        assert torch.allclose(p.detach(), w - lr * (g - part.view_as(w)), atol=1e-6)
    assert torch.allclose(model[1].running_mean, buffers[0] + parts[5], atol=1e-6)
    assert torch.allclose(model[1].running_var, buffers[1] + parts[6], atol=1e-6)
    # The pull vector itself is left as it was.
    assert torch.equal(pull, torch.cat(parts))


def test_pull_through_without_gradients():
    """A parameter without a gradient gets -pull as its gradient: w + lr*pull."""
    model = _model()
    state = FlatState(model)
    lr = 0.5
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    before = _reference_flat(model).clone()
    pull = torch.randn(40, generator=torch.Generator().manual_seed(5))
    state.pull_through_optimizer(pull)
    optimizer.step()
    after = _reference_flat(model)
    assert torch.allclose(after[:32], before[:32] + lr * pull[:32], atol=1e-6)
    assert torch.allclose(after[32:], before[32:] + pull[32:], atol=1e-6)
    # The gradients are the negated pull and do not alias the pull vector.
    assert torch.allclose(model[0].weight.grad, -pull[:12].view(4, 3))
    pull.zero_()
    assert not torch.equal(model[0].weight.grad, torch.zeros(4, 3))
