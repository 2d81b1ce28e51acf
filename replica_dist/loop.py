"""The training loop of one replica. With coupling.py, this file is the whole algorithm.

Every rank runs this same loop on its own replica; the branches depend only on the config
and the step, so every rank issues the same collectives in the same order.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel

from replica_dist import dist
from replica_dist.config import Config, ConfigError, OptimConfig
from replica_dist.coupling import ELASTIC_FORMS, eta_at, is_coupling_step, pull
from replica_dist.data import ReplicaBatches, load_dataset, replica_indices
from replica_dist.evaluate import LOSSES, predict, score
from replica_dist.flat import FlatState
from replica_dist.metrics import NullLogger, TensorBoardLogger, center_layer_stats, replica_layer_stats
from replica_dist.model import build_model

log = logging.getLogger(__name__)


def replica_seed(seed: int, replica: int) -> int:
    """Seed of a replica's initial weights."""
    return int(np.random.SeedSequence([seed, 1000, replica]).generate_state(1)[0])


def build_optimizer(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
    )


def train(cfg: Config, run_dir: Path, device: torch.device) -> dict:
    """Train this rank's replica for `cfg.train.steps` steps; return the run's summary."""
    rank, world_size = dist.rank(), dist.world_size()
    form = cfg.coupling.name
    dtype = getattr(torch, cfg.train.dtype)

    # Decided together: one rank refusing while the others start would leave them hanging.
    if dist.any_rank((run_dir / "summary.json").exists() or (run_dir / "tb").exists(), device):
        raise ConfigError(f"hydra.run.dir={run_dir} already holds a run; choose a new hydra.run.dir")

    # ---- data: the shared test set, and this replica's own training data
    data = load_dataset(cfg.data, cfg.seed, dtype)
    mine = replica_indices(cfg.data, len(data.x_train), cfg.seed, rank, world_size)
    batches = ReplicaBatches(
        data.x_train[mine].to(device), data.y_train[mine].to(device), cfg.train.batch_size, cfg.seed, rank
    )
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    loss_fn = LOSSES[data.loss]

    # ---- this replica's network; the center is a scratch copy that holds the mean weights
    init_replica = rank if cfg.init == "independent" else 0
    model = build_model(cfg.model, data.input_shape, data.num_outputs, replica_seed(cfg.seed, init_replica))
    model = model.to(device=device, dtype=dtype)
    state = FlatState(model)
    if cfg.init == "same":
        dist.broadcast_(state.pack())
        state.load(state.buffer)
    # DDP broadcasts rank 0's weights itself, so `ddp` replicas start (and stay) identical.
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if form == "ddp" else model
    optimizer = build_optimizer(cfg.optim, model.parameters())
    center = copy.deepcopy(model)
    center_state = FlatState(center)
    param_names = state.names[: state.num_params]

    replica_log = TensorBoardLogger(run_dir / "tb" / f"replica_{rank}")
    center_log = TensorBoardLogger(run_dir / "tb" / "center") if rank == 0 else NullLogger()
    ensemble_log = TensorBoardLogger(run_dir / "tb" / "ensemble") if rank == 0 else NullLogger()
    if rank == 0:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))

    start = time.perf_counter()
    center_accuracy = math.nan
    try:
        for step in range(1, cfg.train.steps + 1):
            coupled = is_coupling_step(cfg.coupling, step)
            logging_step = step == 1 or step % cfg.log.every == 0 or step == cfg.train.steps
            eval_step = step % cfg.eval.every == 0 or step == cfg.train.steps
            eta = eta_at(cfg.coupling, step)

            # 1. The mean of the weights *before* the step: one all_reduce of one flat buffer.
            if (coupled and form in ELASTIC_FORMS) or logging_step:
                w_before = state.pack().clone()
                mean_before = dist.replica_mean(w_before)

            # 2. The replica's own optimizer step on its own minibatch.
            x, y = batches.next()
            loss = loss_fn(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if coupled and form in ELASTIC_FORMS and cfg.coupling.via_optimizer:
                state.pull_through_optimizer(pull(form, w_before, mean_before, eta, cfg.coupling.temperature))
            optimizer.step()
            if logging_step:
                w_after_optimizer = state.pack().clone()

            # 3. The coupling: every replica moves at once, from the same mean.
            if coupled and form == "average":
                state.load(dist.replica_mean_(state.pack()))
            elif coupled and not cfg.coupling.via_optimizer:
                state.add(pull(form, w_before, mean_before, eta, cfg.coupling.temperature))

            # 4. Diagnostics, on logging and evaluation steps only.
            if not (logging_step or eval_step):
                continue
            w_after = state.pack().clone()
            mean_after = dist.replica_mean(w_after)
            if logging_step:
                losses = dist.gather_rows([loss.item()], device)[:, 0]
                if not torch.isfinite(losses).all():
                    bad = torch.nonzero(~torch.isfinite(losses)).flatten().tolist()
                    raise FloatingPointError(f"non-finite training loss at step {step} on replica(s) {bad}")
                n = state.num_params
                replica_log.log(
                    {"train/loss": loss.item(), "coupling/eta": eta}
                    | replica_layer_stats(
                        param_names,
                        state.views(w_before)[:n],
                        state.views(w_after_optimizer)[:n],
                        state.views(w_after)[:n],
                        state.views(mean_after)[:n],
                    ),
                    step,
                )
                center_log.log(
                    {"train/replica_mean_loss": losses.mean().item()}
                    | center_layer_stats(param_names, state.views(mean_before)[:n], state.views(mean_after)[:n]),
                    step,
                )
            if eval_step:
                center_state.load(mean_after)
                evaluation = _evaluate(model, center, x_test, y_test, data.task, data.loss)
                replica_log.log({f"test/{k}": v for k, v in evaluation["replica"].items()}, step)
                center_log.log({f"test/{k}": v for k, v in evaluation["center"].items()}, step)
                ensemble_log.log({f"test/{k}": v for k, v in evaluation["ensemble"].items()}, step)
                center_accuracy = evaluation["center"].get("accuracy", math.nan)
            if logging_step:
                elapsed = time.perf_counter() - start
                log.info(
                    "step %d/%d | loss %.4f (mean of %d replicas) | center acc %.4f | %.0f s left",
                    step, cfg.train.steps, losses.mean().item(), world_size, center_accuracy,
                    elapsed / step * (cfg.train.steps - step),
                )
        wall_seconds = time.perf_counter() - start

        summary = _summary(cfg, model, batches, evaluation, data.task, data.loss, wall_seconds, device)
        # Plain state_dicts: they load into the model class with no replica_dist code around.
        (run_dir / "weights").mkdir(exist_ok=True)
        torch.save(model.state_dict(), run_dir / "weights" / f"replica_{rank}.pt")
        if rank == 0:
            torch.save(center.state_dict(), run_dir / "weights" / "center.pt")
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary
    finally:
        for logger in (replica_log, center_log, ensemble_log):
            logger.close()


def _evaluate(model, center, x_test, y_test, task: str, loss: str) -> dict[str, dict[str, float]]:
    """Test metrics of this replica, the center (mean weights) and the ensemble (mean of the
    replicas' output probabilities, or outputs for regression): one all_reduce."""
    replica_prediction = predict(model, x_test, task)
    ensemble_prediction = dist.replica_mean(replica_prediction)
    return {
        "replica": score(replica_prediction, y_test, task, loss),
        "center": score(predict(center, x_test, task), y_test, task, loss),
        "ensemble": score(ensemble_prediction, y_test, task, loss),
    }


def _summary(cfg: Config, model, batches: ReplicaBatches, evaluation, task, loss, wall_seconds, device) -> dict:
    """The run's final numbers; every replica's own are gathered with one all_reduce."""
    train_loss = score(predict(model, batches.x, task), batches.y, task, loss)["loss"]
    mine = evaluation["replica"]
    rows = dist.gather_rows([train_loss, mine["loss"], mine.get("accuracy", math.nan)], device).tolist()
    replicas = []
    for replica, (train, test_loss, test_accuracy) in enumerate(rows):
        entry = {"replica": replica, "train_loss": train, "test_loss": test_loss}
        if task == "classification":
            entry["test_accuracy"] = test_accuracy
        replicas.append(entry)
    return {
        "steps": cfg.train.steps,
        "wall_seconds": wall_seconds,
        "world_size": len(rows),
        "coupling": cfg.coupling.name,
        "task": task,
        "replicas": replicas,
        "center": {f"test_{k}": v for k, v in evaluation["center"].items()},
        "ensemble": {f"test_{k}": v for k, v in evaluation["ensemble"].items()},
    }
