"""Starting or resuming a run, and saving every replica's whole state along the way.

A replica's state is everything that makes its next step identical to an uninterrupted
run: weights and buffers, optimizer state, the step, its data order, the RNG states, and
the recipe's parts (the lr scheduler, the fp16 gradient scaler), and the progress's history
(the losses the loss-jump warning judges from, the training time so far).
The coupling's schedule is a function of the step alone, so the step restores it; diloco's
outer state (the anchor, the outer momentum) is in the coupling's state_dict.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from replica_dist import checkpoint, dist, run_lock
from replica_dist.config import Config, ConfigError
from replica_dist.data import ReplicaBatches
from replica_dist.errors import RunError
from replica_dist.guard import StopRequested

log = logging.getLogger(__name__)

_FRESH, _RESUME, _TAKEN, _MISMATCH, _FINISHED = range(5)


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def run_hash(cfg: Config) -> str:
    return checkpoint.config_hash(dataclasses.asdict(cfg))


@dataclass(frozen=True)
class Start:
    step: int
    """The step of the checkpoint resumed from; 0 for a fresh run."""
    saved_world_size: int
    """How many replicas wrote that checkpoint (this run's own count for a fresh run)."""
    finished: bool = False
    """This job had already finished the run (torchrun restarted it after summary.json was
    written): nothing to train, the results are on disk."""


def decide_start(cfg: Config, run_dir: Path) -> Start:
    """Where to start, the same on every rank: rank 0 looks at the run directory and
    broadcasts its finding, so no rank starts while another refuses."""
    status, step, saved_world_size, message = dist.broadcast_object(
        _inspect(cfg, run_dir) if dist.rank() == 0 else None
    )
    if status in (_TAKEN, _MISMATCH):
        raise ConfigError(message)
    if status == _FINISHED:
        log.info("this job had already finished the run in %s: its results follow", run_dir)
        return Start(step, saved_world_size, finished=True)
    if status == _RESUME and step >= cfg.train.steps:
        raise ConfigError(
            f"train.steps={cfg.train.steps} ends before the checkpoint to resume from (step {step}); "
            f"raise train.steps to continue the run"
        )
    if status == _RESUME:
        log.info("resuming from %s", checkpoint.step_dir(checkpoint_root(run_dir), step))
        if saved_world_size != dist.world_size():
            log.warning(
                "checkpoint.remap: %d saved replicas continue as %d", saved_world_size, dist.world_size()
            )
    return Start(step, saved_world_size)


def _inspect(cfg: Config, run_dir: Path) -> tuple[int, int, int, str]:
    """Rank 0's look at the run directory, under the directory's lock (see run_lock)."""
    finished = (run_dir / "summary.json").exists()
    finished_message = f"hydra.run.dir={run_dir} already holds a finished run; choose a new hydra.run.dir"
    if finished and not (run_dir / run_lock.LOCK_NAME).exists():
        return _TAKEN, 0, 0, finished_message  # a finished run is never written into
    try:  # before anything is written, so that a bad path fails cleanly on every rank
        run_dir.mkdir(parents=True, exist_ok=True)
        last_writer = run_lock.acquire(run_dir)
    except OSError as err:
        return _TAKEN, 0, 0, f"hydra.run.dir={run_dir} cannot be written: {err.strerror or err}"
    except ConfigError as err:
        return _TAKEN, 0, 0, str(err)
    # A worker group that torchrun restarted is the same job as the one that wrote the directory.
    same_job = bool(run_lock.current_job()) and last_writer.get("job") == run_lock.current_job()
    if finished:
        if same_job:
            return _FINISHED, 0, dist.world_size(), ""
        run_lock.release()
        return _TAKEN, 0, 0, finished_message
    root = checkpoint_root(run_dir)
    if cfg.checkpoint.resume and root.is_dir():
        for stray in checkpoint.clean_temporaries(root):
            log.warning("removed a partial checkpoint file left by a killed writer: %s", stray)
        try:
            step = checkpoint.find_resumable(
                root, dist.world_size(), run_hash(cfg), allow_other_world_size=cfg.checkpoint.remap
            )
        except checkpoint.CheckpointMismatch as err:
            run_lock.release()
            hint = " (or set checkpoint.remap=true)" if "replicas, this run has" in str(err) else ""
            return _MISMATCH, 0, 0, f"checkpoint: {err}{hint}"
        if step is not None:
            run_lock.record(run_dir)
            return _RESUME, step, checkpoint.saved_world_size(root, step), ""
    if (run_dir / "tb").exists():
        # A run that left no checkpoint (killed before its first, or a first one that did not
        # fit the disk) has nothing to lose: the same command starts it over. Only checkpoints
        # that checkpoint.resume=false declines are kept from another launch.
        if not same_job and not cfg.checkpoint.resume and checkpoint.newest_complete(root) is not None:
            run_lock.release()
            return (
                _TAKEN,
                0,
                0,
                (
                    f"hydra.run.dir={run_dir} already holds a run with checkpoints and checkpoint.resume=false; "
                    f"choose a new hydra.run.dir, or set checkpoint.resume=true to resume it"
                ),
            )
        if same_job:
            log.warning("this job restarted before its first checkpoint: starting over in %s", run_dir)
        else:
            log.warning("%s holds no checkpoint and no finished run: starting the run over", run_dir)
        shutil.rmtree(run_dir / "tb")
    run_lock.record(run_dir)
    return _FRESH, 0, dist.world_size(), ""


def finished_summary(run_dir: Path) -> dict:
    """The results of a run that had finished (see Start.finished)."""
    return json.loads((run_dir / "summary.json").read_text())


def _rng_states() -> dict:
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy_global": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_states(states: dict) -> None:
    random.setstate(_as_tuples(states["python"]))
    saved = states["numpy_global"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": saved["key"].numpy().astype(np.uint32), "pos": saved["pos"]},
            "has_gauss": saved["has_gauss"],
            "gauss": saved["gauss"],
        }
    )
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _as_tuples(value):
    # random.setstate needs the tuples that a round trip through torch.save keeps as lists.
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def save(
    cfg: Config,
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer,
    batches: ReplicaBatches,
    coupling,
    recipe: dict | None = None,
) -> None:
    """Every rank saves its replica; once all have, rank 0 writes the manifest and prunes.

    A write that fails on any rank (a full or read-only disk) raises RunError on every rank
    together, naming the file and the cause; the step is not counted as complete, its folder
    is removed, and the previous complete checkpoint stays. Two small collectives, the same
    on every rank whether or not a write fails."""
    root = checkpoint_root(run_dir)
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "data": batches.state_dict(),
        "coupling": coupling.state_dict(),
        "rng": _rng_states(),
        "recipe": {name: part.state_dict() for name, part in (recipe or {}).items()},
    }
    folder = checkpoint.step_dir(root, step)
    failure = None
    try:
        checkpoint.save_replica(root, step, dist.rank(), state)
    except OSError as err:
        failure = checkpoint.cannot_write(
            "checkpoint", folder / checkpoint.replica_name(dist.rank()), err, root
        )
    # In place of a barrier: every rank is past its write once this returns.
    failure = dist.first_failure(failure)
    if failure is None:
        if dist.rank() == 0:
            try:
                checkpoint.write_manifest(root, step, dist.world_size(), run_hash(cfg))
            except OSError as err:
                failure = checkpoint.cannot_write("checkpoint", folder / checkpoint.MANIFEST, err, root)
            else:
                try:
                    checkpoint.prune(root, cfg.checkpoint.keep)
                except OSError as err:  # the new checkpoint is complete: the run can go on
                    log.warning("could not remove an old checkpoint under %s: %s", root, err)
        failure = dist.first_failure(failure)
    if failure is not None:
        if dist.rank() == 0:
            checkpoint.discard_incomplete(root, step)
        raise RunError(failure)


def restore(
    run_dir: Path,
    start: Start,
    model: nn.Module,
    optimizer,
    batches: ReplicaBatches,
    coupling,
    recipe: dict | None = None,
) -> None:
    """Load this replica's state at `start`; with checkpoint.remap, see CheckpointConfig.remap.
    `recipe`: more parts with a state_dict (the lr scheduler, the gradient scaler), saved
    under their names; a replica that remap adds takes replica 0's (the lr schedule is the
    same for all)."""
    root = checkpoint_root(run_dir)
    coupling.step_count = start.step  # the schedule's phase; a remapped replica's guard starts anew

    def load_recipe(state: dict) -> None:
        for name, part in (recipe or {}).items():
            if name in state.get("recipe", {}):
                part.load_state_dict(state["recipe"][name])

    if start.saved_world_size == dist.world_size():
        state = checkpoint.load_replica(root, start.step, dist.rank())
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])  # moves the state to the parameters' device
        batches.load_state_dict(state["data"])
        coupling.load_state_dict(state["coupling"])
        load_recipe(state)
        _set_rng_states(state["rng"])
    elif dist.rank() < start.saved_world_size:
        state = checkpoint.load_replica(root, start.step, dist.rank())
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        load_recipe(state)
    else:
        load_recipe(checkpoint.load_replica(root, start.step, 0))
        saved = [checkpoint.load_replica(root, start.step, r)["model"] for r in range(start.saved_world_size)]
        model.load_state_dict(
            {
                name: torch.stack([s[name] for s in saved]).mean(0) if value.is_floating_point() else value
                for name, value in saved[0].items()
            }
        )


class Checkpointer:
    """Owns the run's checkpoints: when to save (every checkpoint.every steps, and at a stop
    every rank agreed on), the rule that a step which saw a non-finite value is never saved,
    and the last step, which ends with the final results instead of a checkpoint."""

    def __init__(
        self, cfg: Config, run_dir: Path, model: nn.Module, optimizer, batches, coupling, recipe=None
    ):
        self.cfg, self.run_dir = cfg, run_dir
        self.model, self.optimizer, self.batches, self.coupling = model, optimizer, batches, coupling
        self.recipe = recipe or {}
        """Name -> a part with state_dict/load_state_dict (lr scheduler, gradient scaler, progress)."""

    def due(self, step: int) -> bool:
        """Whether `step` saves a checkpoint (the coupling then agrees on it before its update)."""
        return bool(self.cfg.checkpoint.every) and step % self.cfg.checkpoint.every == 0

    def restore(self, start: Start) -> None:
        if start.step > 0:
            restore(self.run_dir, start, self.model, self.optimizer, self.batches, self.coupling, self.recipe)

    def after_step(self, step: int) -> None:
        """Save if due (or asked to stop), then raise StopRequested if every rank agreed to stop."""
        stop = self.coupling.stop_agreed
        if step < self.cfg.train.steps and (stop or self.due(step)):
            if self.coupling.clean:  # never a checkpoint of a step that saw a non-finite value
                save(
                    self.cfg,
                    self.run_dir,
                    step,
                    self.model,
                    self.optimizer,
                    self.batches,
                    self.coupling,
                    self.recipe,
                )
            if stop:
                raise StopRequested(step)
