"""The algorithm, stated plainly: every replica of a run in one process, one loop, by hand.

Read this first. Each step t, every replica a at once, from the same mean of the weights
before the step, w̄ = mean_a w_a:
    tanh     w_a <- w_a - lr*g_a + eta_t * tanh((w̄ - w_a) / T)
    linear   w_a <- w_a - lr*g_a + eta_t * (w̄ - w_a)
             (with missing replicas, ft.enabled: w̄ over the replicas that took part, and no
             pull for a replica whose exchange failed; see membership_weights)
    average  w_a <- mean of the post-step weights (every k steps)
    diloco   every H = k steps, after the step: delta = mean_a (anchor - w_a); an outer SGD
             step with (Nesterov) momentum on the anchor along delta (floating buffers: the
             anchor's minus delta, their mean); w_a <- anchor. The first anchor is the mean
             of the starting weights, where every replica begins.
With coupling.fragments = k > 1 the tensors form k contiguous groups (forms.fragment_bounds),
and a step couples only the group forms.fragment_at names: the rules above, for its tensors.
(with momentum, weight decay or Adam, "- lr*g_a" is that optimizer's step; with
via_optimizer the pull enters as the gradient term instead). The distributed trainer
(replica_dist.loop on replica_dist.coupling.ReplicaCoupling) must equal this to 1e-6; the
tests check it in 2- and 4-process worlds. It shares only the data, model and seed helpers
with the package (so that it sees the same shards, batches and initial weights).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from replica_dist.batches import ReplicaBatches, replica_indices
from replica_dist.config import Config
from replica_dist.data import load_dataset
from replica_dist.evaluate import LOSSES
from replica_dist.forms import fragment_at, fragment_bounds
from replica_dist.loop import build_optimizer, replica_seed
from replica_dist.model import build_model


def pull(
    form: str, w: torch.Tensor, mean: torch.Tensor, eta: float, temperature: float = 1.0
) -> torch.Tensor:
    """The coupling's move of weights `w` toward the replicas' `mean` (same shape), in the
    textbook order: the reference for each form's fused one (replica_dist.forms)."""
    gap = mean - w
    if form == "tanh":
        return eta * torch.tanh(gap / temperature)
    if form == "linear":
        return eta * gap
    if form == "average":
        return gap
    raise ValueError(f"no pull for coupling form {form!r}")


def reference_weights(cfg: Config, world_size: int) -> list[dict[str, torch.Tensor]]:
    """Final state_dicts of every replica after cfg.train.steps steps, for a world of
    `world_size` ranks: world_size / parallel.dp replicas, each stepping on the mean gradient
    of its dp ranks' minibatches."""
    dp = cfg.parallel.dp
    world_size //= dp
    models, optimizers, batches, loss_fn = _replicas(cfg, world_size)

    c = cfg.coupling
    sizes = [t.numel() for t in _weights(models[0])]
    group = [
        g for g, (first, end) in enumerate(fragment_bounds(sizes, c.fragments)) for _ in range(first, end)
    ]
    if c.name == "diloco":
        anchor = [torch.stack(ts).mean(0) for ts in zip(*(_weights(m) for m in models))]
        momentum = [torch.zeros_like(a) for a in anchor]
        _load(models, anchor)
    for step in range(1, cfg.train.steps + 1):
        coupled_group = fragment_at(c, step)
        coupled = coupled_group is not None
        # Whether tensor i is coupled at this step.
        takes = [coupled and g == coupled_group for g in group]
        eta = _eta(c, step, cfg.train.steps)
        before = [[t.detach().clone() for t in _weights(m)] for m in models]
        mean_before = [torch.stack(ts).mean(0) for ts in zip(*before)]

        def elastic_pull(w, m, eta=eta):
            return pull(c.name, w, m, eta, c.temperature)

        for model, replica_batches in zip(models, batches):
            grads = []
            for batch in replica_batches:
                x, y = batch.next()
                model.zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()
                grads.append([p.grad for p in model.parameters()])
            for p, g in zip(model.parameters(), zip(*grads)):
                p.grad = torch.stack(g).mean(0)
        if c.name == "ddp":
            for params in zip(*(m.parameters() for m in models)):
                mean_grad = torch.stack([p.grad for p in params]).mean(0)
                for p in params:
                    p.grad = mean_grad.clone()
        if coupled and c.via_optimizer:
            for r, model in enumerate(models):
                for i, (p, w, m) in enumerate(zip(model.parameters(), before[r], mean_before)):
                    if takes[i]:
                        p.grad -= elastic_pull(w, m)
        for optimizer in optimizers:
            optimizer.step()
        with torch.no_grad():
            if coupled and c.name == "average":
                after = [[t.clone() for t in _weights(m)] for m in models]
                mean_after = [torch.stack(ts).mean(0) for ts in zip(*after)]
                for model in models:
                    for i, (t, m) in enumerate(zip(_weights(model), mean_after)):
                        if takes[i]:
                            t.copy_(m)
            elif coupled and c.name == "diloco":
                num_params = len(list(models[0].parameters()))
                for i, ts in enumerate(zip(*(_weights(m) for m in models))):
                    if not takes[i]:
                        continue
                    delta = torch.stack([anchor[i] - t for t in ts]).mean(0)
                    if i >= num_params:  # a floating buffer: the mean
                        anchor[i] = anchor[i] - delta
                        continue
                    momentum[i] = c.outer_momentum * momentum[i] + delta
                    nesterov = c.outer_nesterov and c.outer_momentum > 0
                    move = delta + c.outer_momentum * momentum[i] if nesterov else momentum[i]
                    anchor[i] = anchor[i] - c.outer_lr * move
                for model in models:
                    for i, t in enumerate(_weights(model)):
                        if takes[i]:
                            t.copy_(anchor[i])
            elif coupled and not c.via_optimizer:
                for r, model in enumerate(models):
                    for i, (t, w, m) in enumerate(zip(_weights(model), before[r], mean_before)):
                        if takes[i]:
                            t.add_(elastic_pull(w, m))
    assert all(math.isfinite(t.sum().item()) for m in models for t in _weights(m))
    return [m.state_dict() for m in models]


def _replicas(cfg: Config, replicas: int) -> tuple[list, list, list, object]:
    """Every replica's model (from its seed), optimizer and minibatches (a list of its
    parallel.dp ranks' streams), and the loss function."""
    dp = cfg.parallel.dp
    dtype = getattr(torch, cfg.train.dtype)
    data = load_dataset(cfg.data, cfg.seed, dtype)
    models, optimizers, batches = [], [], []
    for r in range(replicas):
        init = r if cfg.init == "independent" and cfg.coupling.name != "ddp" else 0
        model = build_model(cfg.model, data.input_shape, data.num_outputs, replica_seed(cfg.seed, init)).to(
            dtype
        )
        models.append(model)
        optimizers.append(build_optimizer(cfg.optim, model.parameters()))
        mine = replica_indices(cfg.data, len(data.x_train), cfg.seed, r, replicas)
        batches.append(
            [
                ReplicaBatches(
                    data.x_train[part], data.y_train[part], cfg.train.batch_size, cfg.seed, r * dp + d
                )
                for d, part in ((d, mine[d::dp]) for d in range(dp))
            ]
        )
    return models, optimizers, batches, LOSSES[data.loss]


def _eta(c, step: int, steps: int) -> float:
    """The coupling strength at `step` of a run of `steps` steps (c: the CouplingConfig)."""
    if c.eta_end is None:  # growth per step
        return min(c.eta_max, c.eta * (1 + c.eta_growth) ** (step - 1))
    if steps == 1:
        return c.eta_end
    # geometric from eta at step 1 to eta_end (eta_final or its default) at the last step
    return min(c.eta_max, c.eta * (c.eta_end / c.eta) ** ((step - 1) / (steps - 1)))


@dataclass
class Membership:
    """Which replicas took part in each step's exchange (ft.enabled), as they recorded it."""

    steps: dict[int, dict[int, tuple[int, ...]]]
    """step -> replica -> the replicas toward whose mean of the weights before the step it was
    pulled; () where its exchange failed and it took its step without the pull. A replica
    absent from a step did not take it (it was down); its data stream moves on all the same
    (replica_dist.ft_loop's rule)."""
    heals: dict[int, dict[int, int]] = field(default_factory=dict)
    """step -> replica -> the replica whose state (weights, optimizer) it took before that step."""


def participants_pulls(
    form: str,
    before: list[list[torch.Tensor]],
    members: dict[int, tuple[int, ...]],
    eta: float,
    temperature: float,
) -> dict[int, list[torch.Tensor]]:
    """The pull of each replica in `members` (replica -> participants) toward the mean, over
    its participants, of the weights `before` the step (before[r]: replica r's tensors); none
    for a replica whose participants are ()."""
    pulls = {}
    for r, took_part in members.items():
        if took_part:
            means = [torch.stack([before[p][i] for p in took_part]).mean(0) for i in range(len(before[r]))]
            pulls[r] = [pull(form, w, m, eta, temperature) for w, m in zip(before[r], means)]
    return pulls


def membership_weights(cfg: Config, replicas: int, membership: Membership) -> list[dict[str, torch.Tensor]]:
    """Final state_dicts of `replicas` replicas (tanh or linear, parallel.dp=1) after
    cfg.train.steps steps, each step taken by the replicas of membership.steps[step] only and
    each pulled toward the mean of its own participants; before a step, a replica in
    membership.heals takes its source's weights and optimizer state."""
    models, optimizers, batches, loss_fn = _replicas(cfg, replicas)
    c = cfg.coupling
    for step in range(1, cfg.train.steps + 1):
        for r, source in membership.heals.get(step, {}).items():
            models[r].load_state_dict(models[source].state_dict())
            optimizers[r].load_state_dict(copy.deepcopy(optimizers[source].state_dict()))
        members = membership.steps.get(step, {})
        before = [[t.detach().clone() for t in _weights(m)] for m in models]
        for r, (model, (replica_batches,)) in enumerate(zip(models, batches)):
            x, y = replica_batches.next()
            if r in members:
                model.zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()
                optimizers[r].step()
        coupled = members if fragment_at(c, step) is not None else {}
        with torch.no_grad():
            for r, moves in participants_pulls(
                c.name, before, coupled, _eta(c, step, cfg.train.steps), c.temperature
            ).items():
                for t, move in zip(_weights(models[r]), moves):
                    t.add_(move)
    return [m.state_dict() for m in models]


@torch.no_grad()
def _load(models, flat: list[torch.Tensor]) -> None:
    for model in models:
        for t, value in zip(_weights(model), flat):
            t.copy_(value)


def _weights(model) -> list[torch.Tensor]:
    return [p for p in model.parameters()] + [b for b in model.buffers() if b.is_floating_point()]
