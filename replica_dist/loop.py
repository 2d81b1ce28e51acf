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

from replica_dist import checkpoint, dist, flatness, run_lock, run_state
from replica_dist.config import Config, OptimConfig
from replica_dist.coupling import ELASTIC_FORMS, eta_at, is_coupling_step, pull_from_gap_
from replica_dist.data import Dataset, ReplicaBatches, load_dataset, replica_indices
from replica_dist.diagnostics import Diagnostics
from replica_dist.errors import RunError
from replica_dist.evaluate import LOSSES, predict, score
from replica_dist.flat import FlatState
from replica_dist.guard import DivergedError, Guard, StopRequested
from replica_dist.model import build_model
from replica_dist.progress import Progress
from replica_dist.timing import NO_TIMER, StepTimer

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


def rank_batches(cfg: Config, data: Dataset, device: torch.device) -> ReplicaBatches:
    """This rank's minibatches: its replica's shard, split among the replica's dp ranks."""
    mine = replica_indices(cfg.data, len(data.x_train), cfg.seed, dist.replica(), dist.num_replicas())
    mine = mine[dist.dp_rank() :: cfg.parallel.dp]
    x, y = data.x_train[mine].to(device), data.y_train[mine].to(device)
    return ReplicaBatches(x, y, cfg.train.batch_size, cfg.seed, dist.rank())


def train(
    cfg: Config,
    run_dir: Path,
    device: torch.device,
    guard: Guard | None = None,
    timer: StepTimer = NO_TIMER,
) -> dict:
    """Train this rank's replica for `cfg.train.steps` steps; return the run's summary.
    Raises StopRequested after saving a checkpoint when a rank was asked to stop."""
    guard = guard or Guard(cfg.guard.nonfinite, cfg.guard.max_consecutive_skips)
    dist.init_mesh(cfg.parallel.dp, device)
    replica, num_replicas = dist.replica(), dist.num_replicas()
    form = cfg.coupling.name
    dtype = getattr(torch, cfg.train.dtype)

    # Fresh, or resumed from the newest complete checkpoint: decided once, for every rank.
    start = run_state.decide_start(cfg, run_dir)
    if start.finished:
        run_lock.release()
        return run_state.finished_summary(run_dir)

    # ---- data: the shared test set, and this rank's part of its replica's training data
    data = load_dataset(cfg.data, cfg.seed, dtype)
    data.check_model(cfg.model)
    batches = rank_batches(cfg, data, device)
    # Evaluation covers the whole training set (all shards) and the shared test set.
    splits = {
        "train_set": (data.x_train.to(device), data.y_train.to(device)),
        "test": (data.x_test.to(device), data.y_test.to(device)),
    }
    loss_fn = LOSSES[data.loss]

    # ---- this replica's network
    init_replica = replica if cfg.init == "independent" else 0
    model = build_model(cfg.model, data.input_shape, data.num_outputs, replica_seed(cfg.seed, init_replica))
    model = model.to(device=device, dtype=dtype)
    state = FlatState(model)
    if cfg.init == "same":  # the same seed already agrees; the broadcast makes rank 0's weights the law
        initial = state.pack()
        dist.broadcast_(initial)
        state.load(initial)
    # DDP broadcasts the first rank's weights itself: `ddp` replicas start (and stay) identical,
    # and so do the ranks of one replica with parallel.dp > 1.
    device_ids = [device.index] if device.type == "cuda" else None
    if form == "ddp":
        net = DistributedDataParallel(model, device_ids=device_ids)
    elif cfg.parallel.dp > 1:
        net = DistributedDataParallel(model, device_ids=device_ids, process_group=dist.dp_group())
    else:
        net = model
    optimizer = build_optimizer(cfg.optim, model.parameters())
    if start.step > 0:
        run_state.restore(run_dir, start, model, optimizer, batches, guard)
    # The center is a scratch copy of the network that holds the mean weights.
    diagnostics = Diagnostics(
        run_dir, replica, dist.dp_rank() == 0, state, copy.deepcopy(model), device, first_step=start.step + 1
    )
    if start.step == 0:  # the same on every rank: all agree on whether rank 0 could write it
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

    def new_exchange() -> dist.ReplicaExchange:
        return dist.ReplicaExchange(state.numel, Guard.WORD_LENGTH, dtype, device, cfg.dist.bucket_mb * 2**20)

    # Allocated once: the weights sent, the mean received, then the pull, all in this buffer.
    # Uncoupled runs communicate only to log, into a buffer of the moment.
    exchange = new_exchange() if form in (*ELASTIC_FORMS, "average") else None
    overlap = cfg.dist.overlap

    progress = Progress(cfg.train.steps, form, num_replicas, data.task)
    started = time.perf_counter()
    try:
        for step in range(start.step + 1, cfg.train.steps + 1):
            timer.start_step()
            dist.set_step(step)
            coupled = is_coupling_step(cfg.coupling, step)
            logging_step = step == 1 or step % cfg.log.every == 0 or step == cfg.train.steps
            eval_step = step % cfg.eval.every == 0 or step == cfg.train.steps
            eta = eta_at(cfg.coupling, step, cfg.train.steps)
            checkpoint_step = bool(cfg.checkpoint.every) and step % cfg.checkpoint.every == 0

            # 1. The weights *before* the step: the coupling pulls toward their mean. Overlapped,
            #    their all_reduce runs while this replica computes its gradient (its guard word
            #    then tells of the steps before; this step's goes with the next exchange).
            needs_mean = (coupled and form in ELASTIC_FORMS) or logging_step
            # Full-size copies for this step's diagnostics only: rebound every step, so that none
            # outlives its step (nor does an uncoupled run's exchange buffer).
            snapshot: dict[str, torch.Tensor] = {}
            step_exchange = exchange
            if needs_mean:
                step_exchange = exchange or new_exchange()
                state.pack(out=step_exchange.flat)
                if logging_step:
                    snapshot["before"] = step_exchange.flat.clone()
                if overlap:
                    step_exchange.start(guard.word())
            state.save_buffers()  # the forward pass moves them
            timer.lap("update")

            # 2. The replica's own gradient on its own minibatch.
            x, y = batches.next()
            loss = loss_fn(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # Never a non-finite update: checked here, decided together below.
            apply = guard.inspect(step, loss, model.parameters(), state.floating_buffers)
            timer.lap("compute")

            # 3. The mean of the pre-step weights, and every rank's guard word, from one
            #    all_reduce of one buffer, so that all ranks skip or stop together. Checkpoint
            #    steps make sure of this step's words before anything is saved.
            if needs_mean:
                if not overlap:
                    step_exchange.start(guard.word())
                mean_before, words = step_exchange.wait()
                apply = guard.decide(step, words) and apply
                if logging_step:
                    snapshot["mean_before"] = mean_before.clone()  # the buffer turns into the pull below
            if checkpoint_step and (overlap or not needs_mean):
                apply = guard.decide(step, dist.share_words(guard.word(), device)) and apply
            timer.lap("communication")
            guard.settle(step, apply)
            if apply:
                if coupled and form in ELASTIC_FORMS:
                    # Before the optimizer step, while the parameters still hold w_before.
                    gap = state.subtract_from(step_exchange.flat)  # mean - w_before, in place
                    step_pull = pull_from_gap_(form, gap, eta, cfg.coupling.temperature)
                    if cfg.coupling.via_optimizer:
                        state.pull_through_optimizer(step_pull)
                optimizer.step()
            else:
                state.restore_buffers()
            if logging_step:
                snapshot["after_optimizer"] = state.pack()

            # 4. The coupling: every replica moves at once, from the same mean.
            if coupled and form == "average":
                state.pack(out=exchange.flat)
                timer.lap("update")
                exchange.start(guard.word())
                mean_after_step, words = exchange.wait()
                guard.decide(step, words)
                timer.lap("communication")
                state.load(mean_after_step)
            elif coupled and apply and not cfg.coupling.via_optimizer:
                state.add(step_pull)
            timer.end_step("update")

            # 5. Diagnostics, on logging and evaluation steps only.
            if logging_step or eval_step:
                snapshot["after"] = state.pack()
                snapshot["mean_after"] = dist.replica_mean(snapshot["after"])
            if logging_step:
                losses = diagnostics.log_step(
                    step,
                    loss.item(),
                    eta,
                    snapshot["before"],
                    snapshot["after_optimizer"],
                    snapshot["after"],
                    snapshot["mean_before"],
                    snapshot["mean_after"],
                    guard.skipped_steps,
                )
            if eval_step:
                evaluation = diagnostics.evaluate(
                    step, model, snapshot["mean_after"], splits, data.task, data.loss
                )
                progress.observe_evaluation(step, evaluation, final=step == cfg.train.steps)
            if logging_step:
                mean_loss = losses.nanmean().item()
                progress.observe_loss(step, mean_loss)
                log.info("%s", progress.line(step, mean_loss, time.perf_counter()))

            # 6. A checkpoint of every replica (the last step ends with the final results instead).
            if step < cfg.train.steps and (guard.stop_agreed or checkpoint_step):
                if guard.all_clean:  # never a checkpoint of a step that saw a non-finite value
                    run_state.save(cfg, run_dir, step, model, optimizer, batches, guard)
                if guard.stop_agreed:
                    raise StopRequested(step)
            progress.step_done(step, time.perf_counter())
        wall_seconds = time.perf_counter() - started

        summary = _summary(
            cfg, model, batches, evaluation, data.task, data.loss, wall_seconds, device, progress.warnings()
        )
        _write_results(cfg, run_dir, model, diagnostics.center, summary)
        if summary["status"] != "ok":  # after summary.json, which says what diverged
            raise DivergedError(f"{summary['reason']}; training diverged: try a lower optim.lr")
        return summary
    finally:
        diagnostics.close()
        run_lock.release()


def _write_results(cfg: Config, run_dir: Path, model: nn.Module, center: nn.Module, summary: dict) -> None:
    """weights/replica_<r>.pt from every replica, then from rank 0 weights/center.pt and last
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
    if dist.dp_rank() == 0:
        # Plain state_dicts: they load into the model class with no replica_dist code around.
        path = weights / f"replica_{dist.replica()}.pt"
        try:
            weights.mkdir(exist_ok=True)
            checkpoint.atomic_torch_save(model.state_dict(), path)
        except OSError as err:
            failure = checkpoint.cannot_write("final weights", path, err, root)
    stop_if_any(failure)  # summary.json marks a finished run: every replica's weights come first
    if dist.rank() == 0:
        path = weights / "center.pt"
        try:
            checkpoint.atomic_torch_save(center.state_dict(), path)
            path = run_dir / "summary.json"
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
    cfg: Config, model, batches: ReplicaBatches, evaluation, task, loss, wall_seconds, device, warnings
) -> dict:
    """The run's final numbers; every replica's own are gathered with one all_reduce (with
    parallel.dp > 1, own_data_loss is on the data of each replica's rank in this mesh column).
    `status` is "diverged" (with a `reason`) when any of them is not finite: every rank
    decides so from the gathered table, so that all raise together."""
    own_data_loss = score(predict(model, batches.x, task), batches.y, task, loss)["loss"]
    keys = sorted(evaluation["replica"])
    # The center's and the ensemble's numbers ride along as one flag per rank, so that the
    # status is read from the one table every rank holds.
    shared_finite = all(
        math.isfinite(v) for name in ("center", "ensemble") for v in evaluation[name].values()
    )
    rows = dist.gather_rows(
        [own_data_loss] + [evaluation["replica"][k] for k in keys] + [float(shared_finite)], device
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
        "coupling": cfg.coupling.name,
        "task": task,
        "replicas": replicas,
        "center": center,
        "ensemble": ensemble,
    }
