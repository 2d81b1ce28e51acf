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
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import TensorDataset

from replica_dist import checkpoint, dist, flatness, recipe, run_lock, run_state, shard
from replica_dist.batches import LoaderBatches, ReplicaBatches, ReplicaSampler, rank_indices, stream
from replica_dist.config import Config, OptimConfig
from replica_dist.coupling import ReplicaCoupling, coupling_label, form_of_config
from replica_dist.data import DataInfo, Dataset, build_datasets
from replica_dist.diagnostics import Diagnostics
from replica_dist.errors import RunError
from replica_dist.evaluate import stream_score
from replica_dist.flat import FlatState
from replica_dist.guard import DivergedError, Guard, NonFiniteError, StopRequested
from replica_dist.model import build_model
from replica_dist.progress import Progress
from replica_dist.timing import NO_TIMER, StepTimer

log = logging.getLogger(__name__)


def replica_seed(seed: int, replica: int) -> int:
    """Seed of a replica's initial weights."""
    return int(np.random.SeedSequence([seed, 1000, replica]).generate_state(1)[0])


def build_optimizer(cfg: OptimConfig, params, fused: bool = True) -> torch.optim.Optimizer:
    """fused=True: one kernel for the whole step, and a step the guard refuses is skipped on
    the device (found_inf), with no read back to the host (see ReplicaCoupling). A sharded
    model's parameters (DTensors) need fused=False: torch has no DTensor rule for fused SGD."""
    if cfg.name == "adam":
        return torch.optim.Adam(
            params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, fused=fused
        )
    return torch.optim.SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
        fused=fused,
    )


def rank_batches(
    cfg: Config, data: Dataset | TorchDataset, device: torch.device, mesh: dist.Mesh
) -> ReplicaBatches | LoaderBatches:
    """This rank's minibatches: its replica's shard, split among the replica's dp ranks. In-memory
    data (a TensorDataset, or load_dataset's arrays) trains from the device; any other Dataset
    through a DataLoader. The ranks of a sharded replica all read the replica's batches, those
    its one rank reads unsharded (in its order: that rank's is the replica's number)."""
    if isinstance(data, Dataset):
        data = TensorDataset(data.x_train, data.y_train)
    dp_rank, order = (0, mesh.replica) if mesh.sharded else (mesh.dp_rank, dist.rank())
    mine = rank_indices(
        cfg.data, len(data), cfg.seed, mesh.replica, mesh.num_replicas, dp_rank, cfg.parallel.dp
    )
    if isinstance(data, TensorDataset):
        x, y = data.tensors
        return ReplicaBatches(x[mine].to(device), y[mine].to(device), cfg.train.batch_size, cfg.seed, order)
    sampler = ReplicaSampler(mine, cfg.train.batch_size, cfg.seed, order)
    return LoaderBatches(data, sampler, cfg.data, device, getattr(torch, cfg.train.dtype))


def build_replica(cfg: Config, data: Dataset | DataInfo, device: torch.device, mesh: dist.Mesh) -> nn.Module:
    """This replica's network, on `device` in the run's dtype: from its own seed (init=independent)
    or, with init=same, rank 0's weights broadcast to all."""
    init_replica = mesh.replica if cfg.init == "independent" else 0
    model = build_model(cfg.model, data.input_shape, data.num_outputs, replica_seed(cfg.seed, init_replica))
    model = model.to(device=device, dtype=getattr(torch, cfg.train.dtype))
    if cfg.init == "same":  # the same seed already agrees; the broadcast makes rank 0's weights the law
        state = FlatState(model)
        initial = state.pack()
        dist.broadcast_(initial)
        state.load(initial)
    return model


def train(
    cfg: Config,
    run_dir: Path,
    device: torch.device,
    guard: Guard | None = None,
    timer: StepTimer = NO_TIMER,
) -> dict:
    """Train this rank's replica for `cfg.train.steps` steps; return the run's summary.
    Raises StopRequested after saving a checkpoint when a rank was asked to stop."""
    mesh = dist.init_mesh(cfg.parallel.dp, device, cfg.parallel.shard)
    precision = recipe.Precision(cfg.train.precision, device)  # refuses fp16 off CUDA, before any write
    # Before anything is written: a dataset that cannot be built is a config error.
    dtype = getattr(torch, cfg.train.dtype)
    train_set, test_set, data = build_datasets(cfg.data, cfg.seed, dtype)
    data.check_model(cfg.model)
    loss_fn = recipe.loss_function(cfg.optim, data.loss, data.task)
    # This rank's part of its replica's training data; evaluation covers the whole training
    # set (all shards) and the shared test set.
    batches = rank_batches(cfg, train_set, device, mesh)
    recipe.resolve_steps(cfg, len(batches.sampler.indices), device, mesh)  # train.epochs -> train.steps, once
    form = form_of_config(cfg.coupling, cfg.train.steps)
    for note in form.notes(cfg.train.steps):
        if dist.rank() == 0:  # over the run's length, train.epochs resolved
            log.warning("%s", note)
    # Fresh, or resumed from the newest complete checkpoint: decided once, for every rank.
    start = run_state.decide_start(cfg, run_dir)
    if start.finished:
        run_lock.release()
        return run_state.finished_summary(run_dir)
    splits = {
        name: stream(dataset, cfg.eval.batch_size, cfg.data, device, dtype, cfg.seed)
        for name, dataset in (("train_set", train_set), ("test", test_set))
    }

    model = build_replica(cfg, data, device, mesh)
    if start.step == 0 and cfg.train.init_from:  # before the coupling takes its first look
        run_state.warm_start(cfg.train.init_from, model, mesh)
    # The center is a scratch copy of the network that holds the mean weights: whole, even
    # where the replicas are sharded (taken before they are).
    center = copy.deepcopy(model) if mesh.sharded else None
    if mesh.sharded:
        model = form.shard(model, mesh.device_mesh)
    optimizer = build_optimizer(cfg.optim, model.parameters(), fused=not mesh.sharded)
    scheduler = recipe.build_scheduler(cfg.optim, optimizer, cfg.train.steps)
    coupling = ReplicaCoupling.from_config(cfg, mesh, model, optimizer, guard, timer, form)
    net = coupling.wrap(model)  # ddp: DistributedDataParallel; it starts the replicas identical
    if cfg.parallel.dp > 1:  # the ranks of one replica average their gradients
        device_ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(net, device_ids=device_ids, process_group=mesh.within)
    forward = recipe.compiled(net, cfg.train.compile)
    # The ranks of a sharded replica read the same batches: a replica's count once.
    samples_per_step = cfg.train.batch_size * cfg.train.grad_accum * dist.world_size() // cfg.parallel.shard
    progress = Progress(cfg.train.steps, form, mesh.num_replicas, data.task, samples_per_step)
    # The progress's history is checkpointed with the recipe: a resumed run warns as an uninterrupted one.
    recipe_state = {"scheduler": scheduler, "precision": precision, "progress": progress}
    # Sharded, the checkpoints hold whole state dicts as unsharded (replica_dist.shard).
    saved_model, saved_optimizer = (
        (shard.WholeModel(model), shard.WholeOptimizer(optimizer)) if mesh.sharded else (model, optimizer)
    )
    checkpointer = run_state.Checkpointer(
        cfg, run_dir, saved_model, saved_optimizer, batches, coupling, recipe_state
    )
    checkpointer.restore(start)
    if start.step > 0:  # the checkpoint holds the lr it was written with: optim.lr may have changed
        run_state.rebase_lr(scheduler, cfg.optim.lr)
    recipe.sync_lr(scheduler)  # a replica that checkpoint.remap adds has a fresh optimizer
    # The center is a scratch copy of the network that holds the mean weights.
    layout = FlatState(center) if mesh.sharded else coupling.state  # of the vectors the diagnostics see
    if center is None:
        center = copy.deepcopy(model)
    diagnostics = Diagnostics(run_dir, mesh, layout, center, device, start.step + 1, coupling.state.gather)
    if start.step == 0 or start.changes:  # the settings the next resume compares with
        _write_config(cfg, run_dir)
    progress.start_clock(time.perf_counter())
    step, evaluation = start.step, None
    try:
        for step in range(start.step + 1, cfg.train.steps + 1):
            logging_step = step == 1 or step % cfg.log.every == 0 or step == cfg.train.steps
            eval_step = step % cfg.eval.every == 0 or step == cfg.train.steps

            timer.start_step()
            coupling.begin_step(observe=logging_step)  # overlapped: the mean is on its way
            with timer.section("compute"):
                optimizer.zero_grad(set_to_none=True)
                loss = recipe.forward_backward(
                    net, forward, batches, loss_fn, cfg.train.grad_accum, precision
                )
                precision.unscale_(optimizer)  # fp16: the true gradients, or none after an overflow
                recipe.clip_(model.parameters(), cfg.optim.clip_norm)
            lr = optimizer.param_groups[0]["lr"]
            coupling.step(loss, agree=checkpointer.due(step))  # in place of optimizer.step()
            scheduler.step()
            timer.end_step()
            diagnostics.replica_log.log({"optim/lr": lr}, step)  # every step; written at the next flush

            # Diagnostics, on logging and evaluation steps only.
            if logging_step or eval_step:
                after = coupling.state.pack()
                mean_after = dist.replica_mean(after, mesh)
                after, mean_after = coupling.state.gather(after), coupling.state.gather(mean_after)
            if logging_step:
                mean_loss = (
                    diagnostics.log_step(step, loss.item(), coupling, after, mean_after).nanmean().item()
                )
            if eval_step:
                evaluation = diagnostics.evaluate(step, model, mean_after, splits, data.task, data.loss)
                progress.observe_evaluation(step, evaluation, final=step == cfg.train.steps)
            if logging_step:
                progress.observe_loss(step, mean_loss)
                log.info("%s", progress.line(step, mean_loss, time.perf_counter()))

            checkpointer.after_step(step)  # saves when due; raises StopRequested on an agreed stop
            progress.step_done(step, time.perf_counter())

        if evaluation is None:  # resumed from the last step's checkpoint: only the results are left
            mean_after = coupling.state.gather(dist.replica_mean(coupling.state.pack(), mesh))
            evaluation = diagnostics.evaluate(step, model, mean_after, splits, data.task, data.loss)
            progress.observe_evaluation(step, evaluation, final=True)
        wall_seconds = progress.wall_seconds(time.perf_counter())  # every segment's
        summary = _summary(
            cfg, mesh, model, batches, evaluation, data, wall_seconds, device, progress.warnings()
        )
        # Every rank sends the same sizes (sharded unevenly, rank 0 the most): rank 0's count.
        summary["comm"] = {"compress": cfg.dist.compress, "bytes_sent_per_rank": coupling.bytes_sent}
        _write_results(cfg, run_dir, mesh, saved_model, diagnostics.center, summary)
        if summary["status"] != "ok":  # after summary.json, which says what diverged
            raise DivergedError(f"{summary['reason']}; training diverged: try a lower optim.lr")
        return summary
    except StopRequested as stop:  # every rank together, after the stop's checkpoint
        newest = checkpoint.newest_complete(run_state.checkpoint_root(run_dir)) if dist.rank() == 0 else None
        ended = {"status": "stopped", "step": stop.step, "checkpoint": newest}
        _write_summary(run_dir, _ended(cfg, ended, progress.wall_seconds(time.perf_counter())))
        raise
    except NonFiniteError as err:  # the guard stopped the run, on every rank at the same step
        ended = {"status": "diverged", "reason": str(err), "step": step}
        _write_summary(run_dir, _ended(cfg, ended, progress.wall_seconds(time.perf_counter())))
        raise
    finally:
        diagnostics.close()
        run_lock.release()


def _write_config(cfg: Config, run_dir: Path) -> None:
    """config.yaml, written atomically by rank 0; every rank agrees on whether it could."""
    failure = None
    if dist.rank() == 0:
        path = run_dir / "config.yaml"
        try:
            checkpoint.atomic_write_bytes(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)).encode())
        except OSError as err:
            failure = checkpoint.cannot_write("the config", path, err, run_state.checkpoint_root(run_dir))
    failure = dist.first_failure(failure)
    if failure is not None:
        raise RunError(failure)


def _ended(cfg: Config, ended: dict, wall_seconds: float) -> dict:
    """summary.json of a run that ended before its last step (stopped, or diverged)."""
    return ended | {
        "steps": cfg.train.steps,
        "wall_seconds": wall_seconds,
        "world_size": dist.world_size(),
        "dp": cfg.parallel.dp,
        "shard": cfg.parallel.shard,
        "coupling": coupling_label(cfg.coupling),
    }


def _write_summary(run_dir: Path, summary: dict) -> None:
    """summary.json of a run that is ending on every rank at once (StopRequested, NonFiniteError),
    written atomically by rank 0 alone, with no collective: a write that fails is a warning,
    and the exception that ends the run says the rest."""
    if dist.rank() != 0:
        return
    path = run_dir / run_state.SUMMARY
    try:
        checkpoint.atomic_write_bytes(path, (json.dumps(summary, indent=2) + "\n").encode())
    except OSError as err:
        log.warning("could not write %s: %s", path, err)


def _write_results(
    cfg: Config, run_dir: Path, mesh: dist.Mesh, model: nn.Module, center: nn.Module, summary: dict
) -> None:
    """weights/replica_<r>.pt from every replica (`model`'s state dict: whole tensors, of a
    sharded one too, whose WholeModel gathers them on every rank of the replica), then from rank 0 weights/center.pt and last
    summary.json, which marks a finished run. Each file appears whole or not at all; a write
    that fails on any rank raises RunError on every rank, and the same command then resumes
    from the newest checkpoint and writes them again."""
    root = run_state.checkpoint_root(run_dir)
    weights = run_dir / "weights"

    def stop_if_any(failure: str | None) -> None:
        failure = dist.first_failure(failure)
        if failure is not None:
            raise RunError(failure)

    failure = None
    state = model.state_dict()  # a collective among the ranks of a sharded replica
    if mesh.dp_rank == 0:
        # Plain state_dicts: they load into the model class with no replica_dist code around.
        path = weights / f"replica_{mesh.replica}.pt"
        try:
            weights.mkdir(exist_ok=True)
            checkpoint.atomic_torch_save(state, path)
        except OSError as err:
            failure = checkpoint.cannot_write("final weights", path, err, root)
    stop_if_any(failure)  # summary.json marks a finished run: every replica's weights come first
    if dist.rank() == 0:
        path = weights / "center.pt"
        try:
            checkpoint.atomic_torch_save(center.state_dict(), path)
            path = run_dir / run_state.SUMMARY
            checkpoint.atomic_write_bytes(path, (json.dumps(summary, indent=2) + "\n").encode())
        except OSError as err:
            failure = checkpoint.cannot_write("final results", path, err, root)
    stop_if_any(failure)
    if dist.rank() == 0 and cfg.flatness.sigmas:
        # After the run is finished and the other ranks are gone: rank 0 alone stops here.
        try:
            log.info(
                "%s", flatness.run(run_dir, cfg.flatness.sigmas, cfg.flatness.samples, cfg.seed, force=False)
            )
        except OSError as err:
            cause = f"{err.strerror} (errno {err.errno})" if err.strerror else str(err)
            raise RunError(
                f"cannot write the flatness analysis {err.filename or run_dir / 'flatness.json'}: {cause}; "
                f"the training run finished; fix that and run python -m replica_dist.flatness {run_dir}"
            ) from None


def _summary(
    cfg: Config,
    mesh: dist.Mesh,
    model,
    batches: ReplicaBatches | LoaderBatches,
    evaluation,
    data,
    wall_seconds,
    device,
    warnings,
) -> dict:
    """The run's final numbers; every replica's own are gathered with one all_reduce (with
    parallel.dp > 1, own_data_loss is on the data of each replica's rank in this mesh column).
    `status` is "diverged" (with a `reason`) when any of them is not finite: every rank
    decides so from the gathered table, so that all raise together."""
    own_data_loss = stream_score(model, batches.own_data(cfg.eval.batch_size), data.task, data.loss)["loss"]
    keys = sorted(evaluation["replica"])
    # The center's and the ensemble's numbers ride along as one flag per rank, so that the
    # status is read from the one table every rank holds.
    shared_finite = all(
        math.isfinite(v) for name in ("center", "ensemble") for v in evaluation[name].values()
    )
    rows = dist.gather_rows(
        [own_data_loss] + [evaluation["replica"][k] for k in keys] + [float(shared_finite)], device, mesh
    ).tolist()

    def flat(metrics: dict[str, float]) -> dict[str, float]:  # "train_set/loss" -> "train_loss"
        return {k.replace("train_set/", "train_").replace("test/", "test_"): v for k, v in metrics.items()}

    replicas = [
        {"replica": r, "own_data_loss": row[0]} | flat(dict(zip(keys, row[1:-1])))
        for r, row in enumerate(rows)
    ]
    center, ensemble = flat(evaluation["center"]), flat(evaluation["ensemble"])
    non_finite = [
        f"{k} of the {name}"
        for name, d in (("center", center), ("ensemble", ensemble))
        for k, v in d.items()
        if not math.isfinite(v)
    ]
    non_finite += [
        f"{k} of replica {r['replica']}" for r in replicas for k, v in r.items() if not math.isfinite(v)
    ]
    if not non_finite and not all(row[-1] for row in rows):
        non_finite = ["the center's or ensemble's numbers on another rank"]
    status = {"status": "ok"}
    if non_finite:
        shown = ", ".join(non_finite[:4]) + (
            f" and {len(non_finite) - 4} more" if len(non_finite) > 4 else ""
        )
        status = {"status": "diverged", "reason": f"the final evaluation is not finite: {shown}"}
    return status | {
        "warnings": warnings,
        "steps": cfg.train.steps,
        "wall_seconds": wall_seconds,
        "world_size": len(rows),
        "dp": cfg.parallel.dp,
        "shard": cfg.parallel.shard,
        "coupling": coupling_label(cfg.coupling),
        "task": data.task,
        "replicas": replicas,
        "center": center,
        "ensemble": ensemble,
    }
