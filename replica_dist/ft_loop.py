"""The training loop of one replica under ft.enabled: its own torchrun job, coupled through torchft.

Each step: a quorum (replica_dist.ft: who takes part; a replica that is behind heals here, from
a live replica's state), the exchange of the weights from before the step started, forward and
backward, `should_commit` (did the exchange complete?), then ReplicaCoupling's step: the
optimizer step and the pull toward the mean of the replicas that took part, or no pull where
the exchange failed (tanh and linear; replica_dist.reference.membership_weights replays it).

Healing: a restarted replica job builds its replica from its seed, and the first quorum, which
finds it behind the others, hands it a live replica's state (model, optimizer, lr schedule,
coupling: its step and guard), taken at that replica's quorum of the same step. torchft's
quorum chooses the source among the replicas at the highest step, so a fresh replica (step 0)
never becomes the source while a later step exists. The healed replica's data stream is its
own shard's, positioned as if it had drawn its batches on every step so far: batch k of its
stream is the one of step ceil(k / train.grad_accum), whoever took part.

Files, each replica job its own (`r`: ft.replica_id): tb/replica_<r>/ (ft/participants every
step, the loss on logging steps), ft/replica_<r>.jsonl (every step's participants and times,
every start of a worker and every heal, appended as they happen), and at the end
weights/replica_<r>.pt and ft/replica_<r>.json (the replica's results and the faults it saw).
No checkpoints yet under ft.enabled.

FAULT_ENV, a scripted fault for tests and trials, is read in `scripted_fault` only.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from replica_dist import checkpoint, recipe
from replica_dist.batches import ReplicaBatches, rank_indices, stream
from replica_dist.config import Config
from replica_dist.coupling import form_of_config
from replica_dist.data import build_datasets
from replica_dist.errors import ConfigError
from replica_dist.evaluate import stream_score
from replica_dist.ft import FtCoupling, FtMesh, build_manager
from replica_dist.guard import Guard
from replica_dist.loop import build_optimizer, replica_seed
from replica_dist.metrics import TensorBoardLogger
from replica_dist.model import build_model
from replica_dist.timing import NO_TIMER, StepTimer

log = logging.getLogger(__name__)

FAULT_ENV = "REPLICA_DIST_FT_FAULT"
"""A scripted fault: "kill=R@S" makes replica R's worker SIGKILL itself at step S, in its job's
first attempt only (the worker torchrun restarts goes on): at the start of the step, before its
quorum, or with ",moment=exchange" after the quorum, so that the others' exchange of that step
fails; ",step_s=X" makes every replica's steps last at least X seconds (a run slow enough for a
restarted replica to rejoin before the others finish). For tests and trials of a setup."""
KILL_MOMENTS = ("quorum", "exchange")


@dataclass
class ScriptedFault:
    kill_replica: int = -1
    kill_step: int = 0
    moment: str = "quorum"
    step_seconds: float = 0.0

    def strike(self, replica: int, step: int, moment: str) -> None:
        """SIGKILL this worker if the fault is due here (its job's first attempt only)."""
        due = (replica, step, moment) == (self.kill_replica, self.kill_step, self.moment)
        if due and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            os.kill(os.getpid(), signal.SIGKILL)


def scripted_fault() -> ScriptedFault:
    """FAULT_ENV, parsed (no fault when it is unset)."""
    fault = ScriptedFault()
    for part in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        key, _, value = part.partition("=")
        if key == "kill":
            replica, _, step = value.partition("@")
            fault.kill_replica, fault.kill_step = int(replica), int(step)
        elif key == "moment" and value in KILL_MOMENTS:
            fault.moment = value
        elif key == "step_s":
            fault.step_seconds = float(value)
        else:
            raise ConfigError(
                f"{FAULT_ENV}: unknown part {part!r}; expected kill=R@S, moment=quorum|exchange, step_s=X"
            )
    return fault


def position_after(batches: ReplicaBatches, drawn: int) -> dict:
    """The data position (ReplicaBatches.state_dict) after `drawn` batches of its stream."""
    order = batches.sampler.order
    if order.whole:
        return {"epoch": 0, "batch": 0}
    epoch, batch = divmod(drawn, order.per_epoch)
    return {"epoch": epoch, "batch": batch}


class Record:
    """ft/replica_<r>.jsonl: one JSON object per line, written as it happens (a killed worker
    leaves whole lines but perhaps the last), appended to by every attempt of the job."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (open for the run)

    def write(self, **event) -> None:
        self._file.write(json.dumps(event) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_record(path: Path) -> list[dict]:
    """The events of a Record, without a last line that a killed worker left unfinished."""
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def recorded_membership(run_dir: Path, replicas: int):
    """The membership schedule (replica_dist.reference.Membership) that the replicas' records
    in `run_dir` hold: every step each one took, with the replicas whose weights its exchange
    averaged (none where it failed), and every heal with its source."""
    from replica_dist.reference import Membership

    steps: dict[int, dict[int, tuple[int, ...]]] = {}
    heals: dict[int, dict[int, int]] = {}
    for r in range(replicas):
        for event in read_record(run_dir / "ft" / f"replica_{r}.jsonl"):
            if event["event"] == "step":
                took_part = tuple(event["participants"]) if event["committed"] else ()
                steps.setdefault(event["step"], {})[r] = took_part
            elif event["event"] == "heal":
                heals.setdefault(event["step"], {})[r] = event["donor"]
    return Membership(steps, heals)


def faults_seen(steps: list[dict]) -> list[dict]:
    """The faults in one replica's step events (in order): each replica that took part in a
    committed exchange and was missing from a later one, with the step it first missed, the
    seconds from that step's start until the first committed exchange without it ended
    (detect: a failed exchange's timeout and the quorum's wait for its heartbeat to expire),
    and from then until the end of the first exchange that held it again (rejoin; None if it
    did not come back)."""
    faults, last_seen, missing = [], {}, {}
    started = {event["step"]: event["started"] for event in steps}
    for event in steps:
        if not (event["coupled"] and event["committed"]):
            continue
        present = set(event["participants"])
        for r in sorted(present & missing.keys()):
            fault = missing.pop(r)
            fault["seconds_to_rejoin"] = round(event["time"] - fault["_detected"], 3)
        for r in sorted(last_seen.keys() - present - missing.keys()):
            first_missed = last_seen[r] + 1
            missing[r] = {
                "replica": r,
                "step": first_missed,
                "seconds_to_detect": round(event["time"] - started.get(first_missed, event["started"]), 3),
                "seconds_to_rejoin": None,
                "_detected": event["time"],
            }
            faults.append(missing[r])
        last_seen.update({r: event["step"] for r in present})
    return [{k: v for k, v in fault.items() if not k.startswith("_")} for fault in faults]


def train(
    cfg: Config, run_dir: Path, device: torch.device, guard: Guard | None = None, timer: StepTimer = NO_TIMER
) -> dict:
    """Train replica ft.replica_id as one job of a fault-tolerant run; returns its results."""
    ft, fault = cfg.ft, scripted_fault()
    replica = ft.replica_id
    dtype = getattr(torch, cfg.train.dtype)
    precision = recipe.Precision(cfg.train.precision, device)
    train_set, test_set, data = build_datasets(cfg.data, cfg.seed, dtype)
    if not isinstance(train_set, TensorDataset):
        raise ConfigError(
            f"data.name={cfg.data.name} is not available with ft.enabled yet (in-memory data only)"
        )
    data.check_model(cfg.model)
    loss_fn = recipe.loss_function(cfg.optim, data.loss, data.task)
    x, y = train_set.tensors
    mine = rank_indices(cfg.data, len(x), cfg.seed, replica, ft.replicas, 0, 1)
    # The seeds of the non-ft trainer's rank `replica` (dp=1): its replica, shard and batches.
    batches = ReplicaBatches(x[mine].to(device), y[mine].to(device), cfg.train.batch_size, cfg.seed, replica)
    model = build_model(cfg.model, data.input_shape, data.num_outputs, replica_seed(cfg.seed, replica))
    model = model.to(device=device, dtype=dtype)
    optimizer = build_optimizer(cfg.optim, model.parameters())
    scheduler = recipe.build_scheduler(cfg.optim, optimizer, cfg.train.steps)
    mesh = FtMesh(replica_id=replica, replica_count=ft.replicas)
    coupling = FtCoupling.from_config(
        cfg, mesh, model, optimizer, guard, timer, form_of_config(cfg.coupling, cfg.train.steps)
    )
    record = Record(run_dir / "ft" / f"replica_{replica}.jsonl")
    record.write(
        event="start",
        pid=os.getpid(),
        attempt=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
        time=time.time(),
    )

    def state_dict() -> dict:
        # A copy: the source goes on stepping while the healing replica reads it.
        return copy.deepcopy(
            {
                "replica": replica,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "precision": precision.state_dict(),
                "coupling": coupling.state_dict(),
            }
        )

    def load_state_dict(state: dict) -> None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        precision.load_state_dict(state["precision"])
        coupling.load_state_dict(state["coupling"])
        batches.load_state_dict(position_after(batches, coupling.step_count * cfg.train.grad_accum))
        log.warning(
            "replica %d healed from replica %d at step %d", replica, state["replica"], coupling.step_count + 1
        )
        record.write(event="heal", step=coupling.step_count + 1, donor=state["replica"], time=time.time())

    mesh.manager = manager = build_manager(ft, state_dict, load_state_dict)
    tb, step, steps_seen = None, 0, []
    try:
        while coupling.step_count < cfg.train.steps:
            started = time.time()
            fault.strike(replica, coupling.step_count + 1, "quorum")
            manager.start_quorum()  # a replica that is behind heals here (load_state_dict)
            step = coupling.step_count + 1
            fault.strike(replica, step, "exchange")
            if tb is None:  # after the first quorum: a healed replica's first step is a later one
                tb = TensorBoardLogger(
                    run_dir / "tb" / f"replica_{replica}", purge_step=step if step > 1 else None
                )
            logging_step = step == 1 or step % cfg.log.every == 0 or step == cfg.train.steps
            mesh.participants = []
            coupling.begin_step()  # a coupling step starts the exchange of the weights before it
            optimizer.zero_grad(set_to_none=True)
            loss = recipe.forward_backward(model, model, batches, loss_fn, cfg.train.grad_accum, precision)
            precision.unscale_(optimizer)
            recipe.clip_(model.parameters(), cfg.optim.clip_norm)
            committed = mesh.commit()  # waits for the exchange: did it complete?
            coupling.step(loss)  # the pull toward the participants' mean, or none where it failed
            scheduler.step()
            exchanged = time.time()
            event = {
                "event": "step",
                "step": step,
                "coupled": coupling.form.fragment_at(step) is not None,
                "participants": list(mesh.participants),
                "committed": bool(committed),
                "started": started,
                "time": exchanged,
            }
            record.write(**event)
            steps_seen.append(event)
            if event["coupled"]:
                tb.log({"ft/participants": float(len(mesh.participants))}, step)
            if logging_step:
                coupling.guard.read_back(step)  # raises on a non-finite value every replica agreed on
                loss_value = loss.item()
                tb.log({"train/loss": loss_value}, step)
                tb.flush()
                log.info(
                    "step %d/%d | loss %.4f (replica %d) | participants %d of %d",
                    step,
                    cfg.train.steps,
                    loss_value,
                    replica,
                    len(mesh.participants),
                    ft.replicas,
                )
                if coupling.stop_agreed:
                    break
            if fault.step_seconds:
                time.sleep(max(0.0, fault.step_seconds - (time.time() - started)))
        status = "stopped" if coupling.stop_agreed else "ok"
        evaluation = stream_score(
            model,
            stream(test_set, cfg.eval.batch_size, cfg.data, device, dtype, cfg.seed),
            data.task,
            data.loss,
        )
        summary = {
            "status": status,
            "replica": replica,
            "step": coupling.step_count,
            "steps": cfg.train.steps,
            "coupling": cfg.coupling.name,
            "test": evaluation,
            "faults": faults_seen(steps_seen),
        }
        weights = run_dir / "weights"
        weights.mkdir(exist_ok=True)
        checkpoint.atomic_torch_save(model.state_dict(), weights / f"replica_{replica}.pt")
        checkpoint.atomic_write_bytes(
            run_dir / "ft" / f"replica_{replica}.json", (json.dumps(summary, indent=2) + "\n").encode()
        )
        log.info(
            "replica %d: %s at step %d | test %s | run directory %s",
            replica,
            status,
            coupling.step_count,
            evaluation,
            run_dir,
        )
        return summary
    finally:
        if tb is not None:
            tb.close()
        record.close()
        manager.shutdown(wait=False)
