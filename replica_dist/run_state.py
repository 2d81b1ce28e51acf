"""Starting or resuming a run, and saving every replica's whole state along the way.

A replica's state is everything that makes its next step identical to an uninterrupted
run: weights and buffers, optimizer state, the step, its data order, the RNG states, and
the recipe's parts (the lr scheduler, the fp16 gradient scaler), and the progress's history
(the losses the loss-jump warning judges from, the training time so far).
The coupling's schedule is a function of the step alone, so the step restores it; diloco's
outer state (the anchor, the outer momentum) is in the coupling's state_dict.

Why one module of about 500 lines: deciding how a run starts (fresh, resumed, refused) reads
the same saved state that saving writes and restoring reads back, so the three stay together.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from replica_dist import checkpoint, dist, run_lock
from replica_dist.batches import ReplicaBatches
from replica_dist.config import RESUMABLE_KEYS, Config, ConfigError, may_change_on_resume
from replica_dist.errors import RunError, one_line
from replica_dist.guard import DivergedError, StopRequested

log = logging.getLogger(__name__)

_FRESH, _RESUME, _TAKEN, _MISMATCH, _FINISHED, _DIVERGED = range(6)
SUMMARY = "summary.json"
CONFIG = "config.yaml"


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


ADDED_KEYS = {"parallel.shard": 1}
"""Keys that may not change on resume, added to the schema after runs were saved, with the
value that means what those runs did: at that value a key left out of a saved config.yaml is
no change, and it stays out of the run's hash, so that their checkpoints still match."""


def run_hash(cfg: Config) -> str:
    settings = dataclasses.asdict(cfg)
    # ft.* may change on resume (config.RESUMABLE_KEYS); without its (emptied) group the hash
    # is the one of checkpoints written before the group existed.
    del settings["ft"]
    for key, old_meaning in ADDED_KEYS.items():
        group, name = key.split(".")
        if settings[group][name] == old_meaning:
            del settings[group][name]
    return checkpoint.config_hash(settings)


def _refused(change: tuple[str, object, object]) -> bool:
    """Whether a change of settings (key, saved, now) stops a resume."""
    key, before, now = change
    if before == _ABSENT and key in ADDED_KEYS and now == ADDED_KEYS[key]:
        return False  # saved before the key existed, and meaning what it meant then
    return not may_change_on_resume(key)


@dataclass(frozen=True)
class Start:
    step: int
    """The step of the checkpoint resumed from; 0 for a fresh run."""
    saved_world_size: int
    """How many replicas wrote that checkpoint (this run's own count for a fresh run)."""
    finished: bool = False
    """This job had already finished the run (torchrun restarted it after summary.json was
    written): nothing to train, the results are on disk."""
    changes: tuple[tuple[str, object, object], ...] = ()
    """(key, saved value, this run's value) of every key that changed since the run's
    config.yaml (only keys that may change on resume, see config.RESUMABLE_KEYS)."""


def decide_start(cfg: Config, run_dir: Path) -> Start:
    """Where to start, the same on every rank: rank 0 looks at the run directory and
    broadcasts its finding, so no rank starts while another refuses.

    summary.json says how the run's latest segment ended: "ok" is a finished run (extended
    from the checkpoint of its last step when train.steps is raised, else never written
    into); "stopped" resumes; "diverged" resumes only with a setting changed (the same
    settings would diverge again from the same checkpoint)."""
    status, step, saved_world_size, message, changes = dist.broadcast_object(
        _inspect(cfg, run_dir) if dist.rank() == 0 else None
    )
    if status in (_TAKEN, _MISMATCH):
        raise ConfigError(message)
    if status == _DIVERGED:  # torchrun restarted a job that had diverged: it ends the same way
        raise DivergedError(message)
    if status == _FINISHED:
        log.info("this job had already finished the run in %s: its results follow", run_dir)
        return Start(step, saved_world_size, finished=True)
    if status == _RESUME:
        log.info("resuming from %s", checkpoint.step_dir(checkpoint_root(run_dir), step))
        for key, before, now in changes:
            log.info("resuming with %s changed from %s to %s", key, _shown(before), _shown(now))
        if saved_world_size != dist.world_size():
            log.warning(
                "checkpoint.remap: %d saved replicas continue as %d", saved_world_size, dist.world_size()
            )
    return Start(step, saved_world_size, changes=tuple(changes))


def read_summary(run_dir: Path) -> dict | None:
    """The run's summary.json (None if there is none, or it cannot be read); a summary without
    a status, from before statuses, is a finished run's."""
    try:
        summary = json.loads((run_dir / SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    return {"status": "ok"} | summary if isinstance(summary, dict) else None


def resolved_config(cfg: Config) -> dict:
    """The config as config.yaml holds it (plain values), to compare key by key."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


_ABSENT = "(absent)"


def _shown(value: object) -> str:
    return "null" if value is None else str(value)


def config_changes(saved: dict, cfg: Config) -> list[tuple[str, object, object]]:
    """(key, saved value, this run's value) of every dotted key whose value differs."""
    before, now = _flat(saved), _flat(resolved_config(cfg))
    return [
        (key, before.get(key, _ABSENT), now.get(key, _ABSENT))
        for key in sorted(before.keys() | now.keys())
        if before.get(key, _ABSENT) != now.get(key, _ABSENT)
    ]


def _saved_config(run_dir: Path) -> dict | None:
    try:
        saved = OmegaConf.to_container(OmegaConf.load(run_dir / CONFIG))
    except (OSError, ValueError, OmegaConfBaseException):
        return None
    return saved if isinstance(saved, dict) else None


def _refused_changes(run_dir: Path, refused: list[tuple[str, object, object]]) -> str:
    changed = ", ".join(f"{key} ({_shown(before)} -> {_shown(now)})" for key, before, now in refused)
    return (
        f"hydra.run.dir={run_dir} holds a run with other settings: {changed} may not change on resume "
        f"(keys that may: {', '.join(RESUMABLE_KEYS)}); resume with the saved values "
        f"({run_dir / CONFIG}), or choose a new hydra.run.dir"
    )


def _inspect(cfg: Config, run_dir: Path) -> tuple[int, int, int, str, list]:
    """Rank 0's look at the run directory, under the directory's lock (see run_lock)."""
    summary = read_summary(run_dir)
    ended = summary["status"] if summary else None
    extend = ended == "ok" and cfg.train.steps > summary.get("steps", cfg.train.steps)
    finished = ended == "ok" and not extend
    finished_message = f"hydra.run.dir={run_dir} already holds a finished run; choose a new hydra.run.dir"
    if finished and not (run_dir / run_lock.LOCK_NAME).exists():
        return _TAKEN, 0, 0, finished_message, []  # a finished run is never written into
    try:  # before anything is written, so that a bad path fails cleanly on every rank
        run_dir.mkdir(parents=True, exist_ok=True)
        last_writer = run_lock.acquire(run_dir)
    except OSError as err:
        return _TAKEN, 0, 0, f"hydra.run.dir={run_dir} cannot be written: {err.strerror or err}", []
    except ConfigError as err:
        return _TAKEN, 0, 0, str(err), []
    # A worker group that torchrun restarted is the same job as the one that wrote the directory.
    same_job = bool(run_lock.current_job()) and last_writer.get("job") == run_lock.current_job()
    if finished:
        if same_job:
            return _FINISHED, 0, dist.world_size(), "", []
        run_lock.release()
        return _TAKEN, 0, 0, finished_message, []
    if ended == "diverged" and same_job:
        run_lock.release()
        return _DIVERGED, 0, 0, summary.get("reason", "the run diverged"), []
    root = checkpoint_root(run_dir)
    if cfg.checkpoint.resume and root.is_dir():
        for stray in checkpoint.clean_temporaries(root):
            log.warning("removed a partial checkpoint file left by a killed writer: %s", stray)
        # Only a checkpoint to go on from makes the saved settings binding: a directory with none
        # is started over below, whatever it held.
        saved = _saved_config(run_dir) if checkpoint.newest_complete(root) is not None else None
        changes = config_changes(saved, cfg) if saved is not None else []
        refused = [change for change in changes if _refused(change)]
        if refused:
            run_lock.release()
            return _MISMATCH, 0, 0, _refused_changes(run_dir, refused), []
        try:
            step = checkpoint.find_resumable(
                root, dist.world_size(), run_hash(cfg), allow_other_world_size=cfg.checkpoint.remap
            )
        except checkpoint.CheckpointMismatch as err:
            run_lock.release()
            hint = " (or set checkpoint.remap=true)" if "replicas, this run has" in str(err) else ""
            return _MISMATCH, 0, 0, f"checkpoint: {err}{hint}", []
        refusal = None
        shortened = any(key == "train.steps" for key, _, _ in changes)
        # A checkpoint of the run's own last step (a run whose results could not be written):
        # the resume only writes them.
        if step is not None and (step > cfg.train.steps or (step == cfg.train.steps and shortened)):
            refusal = (
                f"train.steps={cfg.train.steps} ends before the checkpoint to resume from (step {step}); "
                f"raise train.steps to continue the run"
            )
        elif ended == "diverged" and not changes:
            refusal = (
                f"hydra.run.dir={run_dir} holds a run that diverged (stopped at step {summary.get('step')}: "
                f"{summary.get('reason', 'no reason recorded')}); the same settings would diverge again "
                f"from its checkpoint: resume with a changed setting (a lower optim.lr, or another of "
                f"{', '.join(RESUMABLE_KEYS)}), or choose a new hydra.run.dir"
            )
        elif extend and step != summary.get("steps"):
            refusal = (
                f"hydra.run.dir={run_dir} holds a finished run with no checkpoint of its last step "
                f"({summary.get('steps')}) to extend it from; choose a new hydra.run.dir "
                f"(train.init_from={run_dir} starts a new run from its weights)"
            )
        if refusal:
            run_lock.release()
            return _TAKEN, 0, 0, refusal, []
        if step is not None:
            # From here on the run is unfinished again until it ends and writes its own.
            (run_dir / SUMMARY).unlink(missing_ok=True)
            run_lock.record(run_dir)
            return _RESUME, step, checkpoint.saved_world_size(root, step), "", changes
    if summary is not None:  # ended, with nothing to resume from
        run_lock.release()
        return (
            _TAKEN,
            0,
            0,
            (
                f"hydra.run.dir={run_dir} holds a run that ended ({ended}) with no checkpoint to go on from "
                f"(checkpoint.resume={cfg.checkpoint.resume}); choose a new hydra.run.dir"
            ),
            [],
        )
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
                [],
            )
        if same_job:
            log.warning("this job restarted before its first checkpoint: starting over in %s", run_dir)
        else:
            log.warning("%s holds no checkpoint and no finished run: starting the run over", run_dir)
        shutil.rmtree(run_dir / "tb")
    run_lock.record(run_dir)
    return _FRESH, 0, dist.world_size(), "", []


def finished_summary(run_dir: Path) -> dict:
    """The results of a run that had finished (see Start.finished)."""
    return json.loads((run_dir / SUMMARY).read_text())


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


def rebase_lr(scheduler, lr: float) -> None:
    """After a restore, the lr schedule of this run's `lr` at the step restored: the optimizer's
    and the scheduler's state dicts hold the lr they were saved with. The same product as the
    scheduler's own, so an unchanged lr continues bit for bit."""
    for group in scheduler.optimizer.param_groups:
        group["initial_lr"] = lr
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    scheduler._last_lr = [lr * factor(scheduler.last_epoch) for factor in scheduler.lr_lambdas]


def warm_start(source: str, model: nn.Module, mesh) -> None:
    """train.init_from: this replica's initial weights from `source` (see TrainConfig.init_from).
    A source that cannot be read or does not fit the model is a ConfigError on every rank."""
    failure = None
    try:
        model.load_state_dict(_init_weights(Path(source), mesh))
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, pickle.UnpicklingError) as err:
        failure = f"train.init_from={source}: {one_line(err)}"
    failure = dist.first_failure(failure)
    if failure is not None:
        raise ConfigError(failure)
    log.info("initial weights from %s", source)


def _init_weights(source: Path, mesh) -> dict:
    """The state_dict that replica `mesh.replica` (on rank dist.rank()) starts from."""
    if source.is_file():
        state = torch.load(source, map_location="cpu", weights_only=True)
        state = state.get("model", state) if isinstance(state, dict) else state  # a checkpoint's file
        if not isinstance(state, dict):
            raise ValueError("not a weights file (a state_dict saved with torch.save)")
        return state
    if not source.is_dir():
        raise ValueError("no such file or directory")
    if (source / checkpoint.MANIFEST).is_file():  # checkpoints/step-N
        return _replica_of_checkpoint(source.parent, int(source.name.rsplit("-", 1)[-1]))
    summary = read_summary(source)
    weights = source / "weights"
    if summary is not None and summary["status"] == "ok" and weights.is_dir():
        count = len(list(weights.glob("replica_*.pt")))
        if count != mesh.num_replicas:
            raise ValueError(
                f"holds {count} replicas' final weights, this run has {mesh.num_replicas}; {_ONE}"
            )
        return _init_weights(weights / f"replica_{mesh.replica}.pt", mesh)
    newest = checkpoint.newest_complete(checkpoint_root(source))
    if newest is None:
        raise ValueError(
            "not a checkpoint folder, a run directory with weights or checkpoints, or a weights file"
        )
    return _replica_of_checkpoint(checkpoint_root(source), newest)


_ONE = "name one weights file (weights/center.pt) to start every replica from it"


def _replica_of_checkpoint(root: Path, step: int) -> dict:
    saved = checkpoint.saved_world_size(root, step)
    if saved != dist.world_size():
        raise ValueError(
            f"checkpoint of step {step} holds {saved} replicas, this run has {dist.world_size()}; {_ONE}"
        )
    return checkpoint.load_replica(root, step, dist.rank())["model"]


class Checkpointer:
    """Owns the run's checkpoints: when to save (every checkpoint.every steps, the last step,
    so that a finished run can be extended by raising train.steps, and at a stop every rank
    agreed on), and the rule that a step which saw a non-finite value is never saved."""

    def __init__(
        self, cfg: Config, run_dir: Path, model: nn.Module, optimizer, batches, coupling, recipe=None
    ):
        self.cfg, self.run_dir = cfg, run_dir
        self.model, self.optimizer, self.batches, self.coupling = model, optimizer, batches, coupling
        self.recipe = recipe or {}
        """Name -> a part with state_dict/load_state_dict (lr scheduler, gradient scaler, progress)."""

    def due(self, step: int) -> bool:
        """Whether `step` saves a checkpoint (the coupling then agrees on it before its update)."""
        every = self.cfg.checkpoint.every
        return bool(every) and (step % every == 0 or step == self.cfg.train.steps)

    def restore(self, start: Start) -> None:
        if start.step > 0:
            restore(self.run_dir, start, self.model, self.optimizer, self.batches, self.coupling, self.recipe)

    def after_step(self, step: int) -> None:
        """Save if due (or asked to stop), then raise StopRequested if every rank agreed to stop."""
        stop = self.coupling.stop_agreed and step < self.cfg.train.steps  # the last step just ends
        if stop or self.due(step):
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
