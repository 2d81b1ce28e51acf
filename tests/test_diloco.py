"""coupling=diloco, the outer optimizer (DiLoCo, arXiv 2311.08105): with outer lr 1 and no
momentum it is `average`; its outer Nesterov steps equal the formula worked by hand; a skipped
sync moves nothing; the public object and the trainer resume it bit for bit; bad settings are
one line naming the key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException
from trainer_runs import replica_weights, train_losses
from worlds import COLLECTIVE_TIMEOUT_S, fail_at_batch, run_world

from replica_dist import ReplicaCoupling, loop
from replica_dist.config import ConfigError, load_config
from replica_dist.data import ReplicaBatches
from replica_dist.report import coupling_text


def _net(rank: int) -> torch.nn.Module:
    """A replica with a floating buffer (BatchNorm), from its own seed."""
    torch.manual_seed(100 + rank)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 5), torch.nn.BatchNorm1d(5), torch.nn.Tanh(), torch.nn.Linear(5, 1)
    )


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Replica `rank`'s minibatch at `step`: a function of both only, so a resumed loop sees
    the batches the uninterrupted one saw."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(8, 3, generator=g)
    return x, x.sum(1, keepdim=True).sin()


def _train(model, optimizer, coupling, rank: int, until: int, nan_at: int = 0) -> None:
    while coupling.step_count < until:
        step = coupling.step_count + 1
        coupling.begin_step()
        x, y = _batch(rank, step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        if step == nan_at:
            loss = loss * float("nan")
        optimizer.zero_grad()
        loss.backward()
        coupling.step(loss)


def _build(rank: int, form: str, **settings):
    model = _net(rank)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, fused=True)
    return model, optimizer, ReplicaCoupling(model, optimizer, form, **settings)


# ---- the public object, in one world of two processes


def _diloco_equals_average(rank: int) -> None:
    """outer_lr=1, outer_momentum=0: the outer step lands on the replicas' mean, as average does."""
    model_d, opt_d, diloco = _build(rank, "diloco", every=4, outer_lr=1.0, outer_momentum=0.0)
    # diloco starts every replica from the mean of their starting weights; so must average.
    model_a = copy.deepcopy(model_d)
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.05, momentum=0.9, fused=True)
    average = ReplicaCoupling(model_a, opt_a, "average", every=4)
    start = {k: v.clone() for k, v in model_d.state_dict().items()}
    _train(model_d, opt_d, diloco, rank, 12)
    _train(model_a, opt_a, average, rank, 12)
    got, expected = model_d.state_dict(), model_a.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    assert not torch.equal(got["0.weight"], start["0.weight"])  # it trained
    assert not torch.equal(got["1.running_var"], start["1.running_var"])  # and the buffers moved


def _hand_computed_nesterov(rank: int) -> None:
    """w_r <- w_r - lr*t*c_r at step t (loss w.c_r*t, plain SGD), a sync every H = 2 steps,
    three outer Nesterov steps, each checked against the formula computed here by hand."""
    lr, H, outer_lr, mu = 0.1, 2, 0.7, 0.9
    start = {0: [1.0, 2.0], 1: [3.0, -2.0]}
    c = {0: [1.0, 0.5], 1: [-0.5, 2.0]}
    model = torch.nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([start[rank]]))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, fused=True)
    coupling = ReplicaCoupling(model, optimizer, "diloco", every=H, outer_lr=outer_lr, outer_momentum=mu)

    anchor = [(start[0][i] + start[1][i]) / 2 for i in range(2)]  # [2, 0]: the first anchor
    assert model.weight.tolist() == [anchor]
    buf = [0.0, 0.0]
    for k in range(1, 4):
        for t in (2 * k - 1, 2 * k):
            coupling.begin_step()
            loss = model(torch.tensor([c[rank]], dtype=torch.float64) * t).sum()
            optimizer.zero_grad()
            loss.backward()
            coupling.step(loss)
        # Each replica moved by lr*(t1 + t2)*c_r since the anchor: delta is their mean.
        steps = (2 * k - 1) + 2 * k
        delta = [lr * steps * (c[0][i] + c[1][i]) / 2 for i in range(2)]
        buf = [mu * buf[i] + delta[i] for i in range(2)]
        anchor = [anchor[i] - outer_lr * (delta[i] + mu * buf[i]) for i in range(2)]
        expected = torch.tensor([anchor], dtype=torch.float64)
        torch.testing.assert_close(model.weight, expected, atol=1e-12, rtol=0)
        if k == 1:  # delta = 0.1*3*[0.25, 1.25]; anchor = [2, 0] - 0.7*(1 + 0.9)*delta
            assert anchor == pytest.approx([1.90025, -0.49875], abs=1e-12)


def _skipped_sync_moves_nothing(rank: int) -> None:
    """A NaN loss on replica 1 at a sync step: no replica applies the outer step; the anchor
    and the momentum stay, each replica keeps its own (finite) weights."""
    model, optimizer, coupling = _build(rank, "diloco", every=3, nonfinite="skip")
    _train(model, optimizer, coupling, rank, 5)
    form = coupling.form
    anchor = form.anchor.clone()
    momentum = form.state_dict()["outer_optimizer"]["state"][0]["momentum_buffer"].clone()
    assert momentum.abs().sum() > 0  # one outer step taken (step 3)
    _train(model, optimizer, coupling, rank, 6, nan_at=6 if rank == 1 else 0)
    assert torch.equal(form.anchor, anchor)
    assert torch.equal(form.state_dict()["outer_optimizer"]["state"][0]["momentum_buffer"], momentum)
    weights = coupling.state.pack()
    assert torch.isfinite(weights).all()
    assert not torch.equal(weights, anchor)  # not reloaded from the old anchor either
    others = [torch.empty_like(weights) for _ in range(2)]
    torch.distributed.all_gather(others, weights)
    assert not torch.equal(others[0], others[1])  # each kept its own
    _train(model, optimizer, coupling, rank, 9)  # the next sync (2H steps' worth) applies
    assert not torch.equal(form.anchor, anchor)
    torch.distributed.all_gather(others, coupling.state.pack())
    assert torch.equal(others[0], others[1])


def _resume_from_state_dicts(rank: int, world_size: int, root: str) -> None:
    settings = {"every": 4}  # DiLoCo's outer lr 0.7, Nesterov momentum 0.9
    straight = _build(rank, "diloco", **settings)
    _train(*straight, rank, 14)
    first = _build(rank, "diloco", **settings)
    _train(*first, rank, 10)  # two outer steps taken (momentum set), mid-period
    path = Path(root) / f"state.{rank}.pt"
    model, optimizer, coupling = first
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "coupling": coupling.state_dict(),
    }
    torch.save(state, path)
    del first
    model, optimizer, coupling = _build(rank, "diloco", **settings)  # as a new process would
    saved = torch.load(path)  # weights_only: the coupling's state is plain tensors and numbers
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    coupling.load_state_dict(saved["coupling"])
    assert coupling.step_count == 10
    _train(model, optimizer, coupling, rank, 14)
    for name, value in straight[0].state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name
    assert torch.equal(straight[2].form.anchor, coupling.form.anchor)


def _public(rank: int, world_size: int, root: str) -> None:
    _diloco_equals_average(rank)
    _hand_computed_nesterov(rank)
    _skipped_sync_moves_nothing(rank)
    _resume_from_state_dicts(rank, world_size, root)
    Path(root, f"done.{rank}").write_text("ok")


def test_the_public_object_in_a_world_of_two(tmp_path):
    """diloco(outer lr 1, momentum 0) = average to 1e-6 over 12 steps (every 4, with BatchNorm);
    three outer Nesterov steps = the hand formula; a skipped sync moves nothing; a loop resumed
    from the state dicts at step 10 ends bit for bit equal at step 14."""
    run_world(_public, 2, str(tmp_path))
    assert (tmp_path / "done.0").exists() and (tmp_path / "done.1").exists()


# ---- the trainer: crashed at step 10, resumed from step 8's checkpoint

OVERRIDES = [
    "coupling=diloco",
    "coupling.every=3",
    "train.steps=12",
    "train.batch_size=16",
    "model.hidden=[16]",
    "log.every=1",
    "eval.every=6",
    "checkpoint.every=4",
    f"dist.timeout_s={COLLECTIVE_TIMEOUT_S}",
]


def _trainer(rank: int, world_size: int, run_dir: str, fail_at_step: int = 0) -> None:
    if fail_at_step:
        fail_at_batch(ReplicaBatches, fail_at_step)
    cfg, _ = load_config(OVERRIDES + [f"hydra.run.dir={run_dir}"])
    loop.train(cfg, Path(run_dir), torch.device("cpu"))


@pytest.mark.slow
def test_the_trainer_resumes_bit_for_bit(tmp_path):
    reference, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_world(_trainer, 2, str(reference))
    with pytest.raises((ProcessRaisedException, ProcessExitedException)):
        run_world(_trainer, 2, str(resumed), 10)
    assert (resumed / "checkpoints" / "step-00000008" / "manifest.json").exists()
    assert not (resumed / "summary.json").exists()
    run_world(_trainer, 2, str(resumed))
    for got, expected in zip(replica_weights(resumed, 2), replica_weights(reference, 2)):
        for name in expected:
            assert torch.equal(got[name], expected[name]), name
    # The last step syncs: both replicas end on the anchor.
    for name, value in replica_weights(reference, 2)[0].items():
        assert torch.equal(value, replica_weights(reference, 2)[1][name]), name
    for replica in range(2):
        assert train_losses(resumed, replica) == train_losses(reference, replica)
    # The checkpoint resumed from holds the outer state: two outer steps' momentum (steps 3, 6).
    saved = torch.load(reference / "checkpoints" / "step-00000008" / "replica-0.pt")
    assert saved["coupling"]["diloco"]["outer_optimizer"]["state"][0]["momentum_buffer"].abs().sum() > 0


# ---- configs


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["coupling=diloco", "coupling.every=0"],
            "coupling.every (the outer period H of coupling.name=diloco) must be >= 1; got 0",
        ),
        (["coupling=diloco", "coupling.outer_lr=0"], "coupling.outer_lr must be > 0; got 0.0"),
        (["coupling=diloco", "coupling.outer_lr=-1"], "coupling.outer_lr must be > 0; got -1.0"),
        (
            ["coupling=diloco", "coupling.outer_momentum=1"],
            "coupling.outer_momentum must be in [0, 1); got 1.0",
        ),
        (
            ["coupling=tanh", "coupling.outer_lr=0.5"],
            "coupling.outer_lr is only used with coupling=diloco; got coupling=tanh "
            "(choose coupling=diloco or drop coupling.outer_lr)",
        ),
        (
            ["coupling=diloco", "checkpoint.remap=true"],
            "checkpoint.remap is not available for coupling.name=diloco (its outer state, the weights at "
            "the last sync and their momentum, belongs to the replicas that saved it)",
        ),
    ],
)
def test_a_bad_diloco_setting_is_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as caught:
        load_config(overrides)
    assert str(caught.value) == message


def test_the_preset_holds_diloco_s_defaults():
    cfg, _ = load_config(["coupling=diloco"])
    c = cfg.coupling
    assert (c.name, c.every, c.outer_lr, c.outer_momentum, c.outer_nesterov) == ("diloco", 50, 0.7, 0.9, True)
    assert coupling_text({"name": "diloco", "every": 50, "outer_lr": 0.7, "outer_momentum": 0.9}, 100) == (
        "diloco, H 50, outer lr 0.7, Nesterov momentum 0.9"
    )
