"""ReplicaCoupling: the object a user's own loop (and the trainer's) calls, two calls a step.

It keeps a step's order: pack the weights and start their exchange before the forward pass,
then, after the backward pass, agree with every replica on whether any value was not finite,
take the optimizer step, and let the coupling form move the weights (replica_dist.forms: one
module per form, looked up by name in its registry; this module never asks which form it runs).

Why one module above 500 lines: ReplicaCoupling's docstring is the public object's manual (a runnable
example, the guard's and the checkpoint's contract, every argument) and its two calls share
one step's state; the forms, the choice of form and the guard live in modules of their own.
"""

from __future__ import annotations

import dataclasses
import zlib

import torch
import torch.distributed as tdist
from torch.amp.grad_scaler import OptState
from torch.distributed.tensor import DTensor

from replica_dist import dist
from replica_dist.config import CouplingConfig, DistConfig, GuardConfig
from replica_dist.errors import ConfigError, CouplingError
from replica_dist.flat import FlatState
from replica_dist.forms import Form, fragment_bounds
from replica_dist.forms import fragment_at as fragment_at
from replica_dist.forms.base import unsupported_feature
from replica_dist.forms.chosen import FORM_SETTINGS as FORM_SETTINGS
from replica_dist.forms.chosen import as_arguments, form_of_arguments, form_of_config
from replica_dist.forms.chosen import coupling_label as coupling_label
from replica_dist.forms.elastic import eta_at as eta_at
from replica_dist.forms.elastic import schedule_note as schedule_note
from replica_dist.forms.tanh import stability_note as stability_note
from replica_dist.guard import Guard
from replica_dist.timing import NO_TIMER


def is_coupling_step(cfg: CouplingConfig, step: int) -> bool:
    """Whether the replicas (all of them, or one fragment) are coupled at `step` (counted from 1)."""
    return fragment_at(cfg, step) is not None


def unscale_or_drop_gradients(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """After scaler.scale(loss).backward(): the optimizer's true gradients (scaler.unscale_,
    unless called already since the last scaler.update()), or, where the scaled ones
    overflowed, none at all (set to None), so that an optimizer step leaves every parameter
    and its state as scaler.step would by not stepping, while a pull entered as a gradient
    (via_optimizer) still moves them. Whether they overflowed, read on the host (one read,
    as scaler.step makes for most optimizers). GradScaler has no public way to ask what
    unscale_ found without stepping: this reads its per-optimizer state, as scaler.step
    does, and marks the optimizer stepped, so that scaler.update() lowers or grows the
    scale as after scaler.step."""
    if not scaler.is_enabled():
        return False
    state = scaler._per_optimizer_states[id(optimizer)]
    if state["stage"] is OptState.STEPPED:
        raise CouplingError(
            "step(loss, scaler=) again before scaler.update(): call scaler.update() after each step"
        )
    if state["stage"] is OptState.READY:
        scaler.unscale_(optimizer)
    state["stage"] = OptState.STEPPED
    if not sum(found.item() for found in state["found_inf_per_device"].values()):
        return False
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None
    return True


DEFAULT_CHECK_EVERY = 100
"""ReplicaCoupling's check_every: at most this many steps pass between a non-finite value and
the error that ends the loop (one exchange of the guard's words and one host read each)."""


@dataclasses.dataclass
class _StepPlan:
    """What begin_step() set up for step() to finish."""

    step: int
    fragment: int | None
    """The fragment this step couples, or None."""
    observe: bool
    sends: list
    """The exchanges started (or to start) for this step, in this order on every rank."""
    observer: object | None
    """The diagnostics' exchange of the whole model (observe=True), exact and uncounted."""
    coupling: object | None
    """A pull's exchange of its fragment, compressed and counted."""
    checks: bool
    """The periodic read back (check_every): the same steps on every rank, so that its
    exchange of words comes in the same order everywhere."""


def _sharded_mesh(
    sharded: bool, device_mesh, process_group, replica_group_of_rank, compress: str, form: Form
) -> dist.Mesh:
    """The mesh of a fully_shard-ed model's coupling (ReplicaCoupling's device_mesh=), or the
    CouplingError that names what does not fit. `sharded`: the model's parameters are DTensors."""
    if not sharded:
        raise CouplingError(
            "device_mesh= is for a model fully_shard-ed over its 'shard' dimension; this one is not"
        )
    if device_mesh is None:
        raise CouplingError(
            "the model is sharded (its parameters are DTensors): pass device_mesh=, the "
            "('replica', 'shard') DeviceMesh it was sharded over"
        )
    if process_group is not None or replica_group_of_rank is not None:
        raise CouplingError(
            "device_mesh= holds the replicas' groups: drop process_group= and replica_group_of_rank="
        )
    if tuple(device_mesh.mesh_dim_names or ()) != ("replica", "shard"):
        raise CouplingError(
            f"device_mesh= must have the dimensions ('replica', 'shard'); got {device_mesh.mesh_dim_names}"
        )
    unsharded_only = [
        key
        for key, asked in (
            ("compress=", compress != "none"),
            ("fragments=", form.fragments > 1),
            ("via_optimizer=", form.via_optimizer),
        )
        if asked
    ]
    if unsharded_only:
        verb = "is" if len(unsharded_only) == 1 else "are"
        raise CouplingError(f"{', '.join(unsharded_only)} {verb} not available with device_mesh= yet")
    return dist.Mesh(
        device_mesh.get_group("replica"), device_mesh.get_group("shard"), device_mesh=device_mesh
    )


class ReplicaCoupling:
    """Couples this process's replica of a model to the other replicas: two calls a step.

    Every process (under torchrun) trains its own replica on its own data; the coupling pulls
    each one toward the mean of all replicas, built with one all_reduce per coupling step:

    - ``begin_step()``, before the forward pass: packs the weights from before the step into
      one buffer and, with ``overlap=True``, starts its all_reduce, which then runs while the
      replica computes its gradient;
    - ``step(loss)``, in place of ``optimizer.step()``: waits for the mean, agrees with every
      replica on whether any value was NaN or inf, takes the optimizer step and applies the
      pull (or, for ``average``, replaces the weights by the mean after the step).

    Two calls, not one hook on ``optimizer.step``: the mean must be of the weights from
    *before* the step, and to hide its all_reduce behind forward and backward it has to start
    before the forward pass, which no optimizer hook sees.

    Example (a plain loop under ``torchrun --nproc_per_node=2``)::

        >>> # doctest: +SKIP
        >>> import torch, torch.distributed as dist
        >>> from replica_dist import ReplicaCoupling
        >>> dist.init_process_group("gloo")
        >>> torch.manual_seed(dist.get_rank())  # each replica starts from its own weights
        >>> model = torch.nn.Linear(10, 1)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.05, fused=True)
        >>> coupling = ReplicaCoupling(model, optimizer, eta=0.001, eta_final=0.4, steps=100)
        >>> for step in range(100):
        ...     x = torch.randn(32, 10); y = x.sum(1, keepdim=True)
        ...     coupling.begin_step()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     optimizer.zero_grad()
        ...     loss.backward()
        ...     coupling.step(loss)  # every check_every-th step also reads the guard back
        >>> coupling.finish()  # the last read back, on every rank

    Every parameter and floating buffer (BatchNorm's running statistics) is coupled. No
    replica ever applies an update whose loss, gradients or buffers are not finite (its
    weights are checked on the steps that couple, observe or agree, see guard.py);
    what the others do is decided together (``nonfinite="stop"`` raises NonFiniteError on
    every rank, ``"skip"`` skips the step), see replica_dist/guard.py. Those decisions are
    taken on the device: a plain step reads nothing back to the host (the host runs ahead of
    the GPU). Every ``check_every``-th step (default 100, counted from 1) exchanges every
    replica's word and reads the outcome back, raising there: a non-finite value ends the
    loop on every rank at most check_every - 1 steps after the step that saw it. A step begun
    with ``observe=True`` or ended with ``agree=True`` reads back too, and ``finish()``, after
    the last step, reads back what the last check could not see. A guarded skip needs a
    fused optimizer (``fused=True``: SGD, Adam, AdamW) to stay on the device; with any other
    the step reads one flag on the host. ``state_dict()`` holds
    the step (hence the eta schedule's phase and the coupling period's) and the guard's state;
    with the model's and the optimizer's state dicts it resumes a run bit for bit.

    A form with state of its own (diloco's anchor and outer momentum) builds it in the
    constructor, which may communicate (diloco sets every replica's weights to their mean),
    and ``state_dict()`` holds it too: construct the coupling first, then load the saved
    state dicts.

    Mixed precision: bf16 autocast needs nothing; with a torch.amp.GradScaler, call
    ``step(loss, scaler=scaler)`` in place of ``scaler.step(optimizer)``, then
    ``scaler.update()``: an overflow leaves out this replica's optimizer step only.

    Arguments: the model and its optimizer; `form`, a built-in form's name
    (replica_dist.forms.FORMS; default the trainer's, CouplingConfig.name) and its schedule,
    as the fields of replica_dist.config.CouplingConfig that the form reads (FORM_SETTINGS;
    any other is refused), with the trainer's defaults except the eta schedule
    (CONSTANT_ETA): eta is constant unless eta_growth or eta_final asks for a schedule; or a
    form object of one's own (a replica_dist.forms.Form, its settings its own); `steps`, the run's length (needed by eta_final);
    `check_every` (DEFAULT_CHECK_EVERY; 0 or None: only where asked); `overlap`, `bucket_mb`,
    `compress` (none, bf16, int8), `compress_chunk` and `error_feedback` (DistConfig;
    compression applies to the coupling's exchange, see dist.ReplicaExchange, and
    `bytes_sent` counts what it sends); `nonfinite` and
    `max_consecutive_skips` (GuardConfig); `process_group`, one rank per replica (default:
    the world), and `replica_group_of_rank`, the ranks of this rank's own replica when each
    replica is itself data parallel (default: none); or, for a model fully_shard-ed (FSDP2)
    over several ranks per replica, `device_mesh`, the 2-D DeviceMesh with dimensions
    ("replica", "shard") whose "shard" dimension it is sharded over (as
    replica_dist.shard.shard_replica does): the coupling then runs over the "replica"
    dimension on each rank's local shard, and a non-finite value in any shard is the whole
    replica's (see parallel.shard). A bad argument is a CouplingError naming it as written
    here (``eta_max=``), before anything communicates.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        form: str | Form = CouplingConfig.name,
        *,
        steps: int | None = None,
        check_every: int = DEFAULT_CHECK_EVERY,
        overlap: bool = True,
        bucket_mb: float = 25.0,
        compress: str = "none",
        compress_chunk: int = 1024,
        error_feedback: bool = False,
        process_group=None,
        replica_group_of_rank=None,
        device_mesh=None,
        nonfinite: str = "stop",
        max_consecutive_skips: int = 20,
        guard=None,
        timer=None,
        mesh=None,
        **schedule,
    ):
        form = form_of_arguments(form, steps, schedule)
        if not isinstance(max_consecutive_skips, int):
            raise CouplingError(f"max_consecutive_skips= must be an int >= 1; got {max_consecutive_skips!r}")
        if check_every is not None and (not isinstance(check_every, int) or check_every < 0):
            raise CouplingError(
                f"check_every= must be a number of steps >= 1 (0 or None: never read back by itself); "
                f"got {check_every!r}"
            )
        try:  # the trainer's own checks of these settings, in this object's words
            GuardConfig(nonfinite=nonfinite, max_consecutive_skips=max_consecutive_skips)
            DistConfig(
                overlap=overlap,
                bucket_mb=bucket_mb,
                compress=compress,
                compress_chunk=compress_chunk,
                error_feedback=error_feedback,
            )
        except ConfigError as err:
            raise CouplingError(as_arguments(str(err))) from None
        asked = {"compression": "compress="} if compress != "none" else {}
        refusal = unsupported_feature(
            form,
            asked | ({"sharded": "device_mesh="} if device_mesh is not None else {}),
            f"form {form.label!r}",
        )
        if refusal:
            raise CouplingError(refusal)
        kinds = {isinstance(p, DTensor) for p in model.parameters()}
        if kinds == {True, False}:  # the layout of its flat state would mix shards and wholes
            raise CouplingError(
                "device_mesh=: the model is sharded in part (some parameters are DTensors, some not): "
                "fully_shard every module that holds parameters, and the root"
            )
        sharded = kinds == {True}
        if device_mesh is not None or sharded:
            mesh = mesh or _sharded_mesh(
                sharded, device_mesh, process_group, replica_group_of_rank, compress, form
            )
        self._build(
            model,
            optimizer,
            form,
            steps=steps,
            check_every=check_every or 0,
            overlap=overlap,
            bucket_mb=bucket_mb,
            compress=compress,
            compress_chunk=compress_chunk,
            error_feedback=error_feedback,
            mesh=mesh or dist.Mesh(process_group, replica_group_of_rank),
            guard=guard or Guard(nonfinite, max_consecutive_skips),
            timer=timer,
        )

    def _build(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        form: Form,
        *,
        steps: int | None,
        check_every: int,
        overlap: bool,
        bucket_mb: float,
        compress: str,
        compress_chunk: int,
        error_feedback: bool,
        mesh,
        guard: Guard,
        timer,
    ) -> None:
        """Everything but the checks of a user's arguments (the trainer's config has its own)."""
        self.form = form
        self.steps = steps or 1
        self.check_every = check_every
        """Every check_every-th step (counted from 1) agrees on the guard's words and reads
        them back, as step(loss, agree=True) does; 0: only where the caller asks."""
        self.model, self.optimizer = model, optimizer
        self.overlap = overlap
        self.timer = timer or NO_TIMER
        self.mesh = mesh
        self.state = FlatState(model)
        self._device = self.state.device
        self.guard = guard.to(self._device)
        if mesh.sharded:  # every shard of a replica takes the same step (see Guard.across_shards)
            self.guard.across_shards = lambda worst: dist.max_within_replica(worst, self.mesh)
        self._bucket_bytes = bucket_mb * 2**20
        self._compression = {"compress": compress, "chunk": compress_chunk, "error_feedback": error_feedback}
        self.bytes_sent = 0
        """Bytes this rank handed to the coupling's collectives so far (dist.ReplicaExchange
        defines them); the diagnostics' exchanges on logging steps are not counted."""
        self._check_same_model()
        bounds = fragment_bounds([t.numel() for t in self.state.tensors], form.fragments)
        self.fragments = [self.state] if len(bounds) == 1 else [self.state.part(*run) for run in bounds]
        """The parts coupled in turn (coupling.fragments); one, the whole state, by default."""
        form.attach(self.state, self.fragments, lambda tensor: dist.replica_mean(tensor, self.mesh))
        # One per fragment, allocated once: the weights sent, the mean received, then the pull,
        # all in this buffer. A form that exchanges no weights communicates only when asked,
        # into a buffer of the moment.
        self._exchanges = [self._new_exchange(part.numel) for part in self.fragments] if form.moment else []
        self.step_count = 0
        """Steps taken (or skipped) so far; the next one is step_count + 1."""
        self._in_step: _StepPlan | None = None
        self.observed: dict[str, torch.Tensor] = {}
        """On a step begun with observe=True: `before` (the weights before the step),
        `mean_before` (the replicas' mean of them) and `after_optimizer` (after the optimizer
        step, before the pull), flat vectors laid out as `state`; empty otherwise."""

    @classmethod
    def from_config(cls, cfg, mesh, model, optimizer, guard=None, timer=None, form=None) -> ReplicaCoupling:
        """The coupling a trainer config (replica_dist.config.Config) describes, among the
        replicas of `mesh` (replica_dist.dist.init_mesh), with its form (form_of_config's, unless
        `form` is that already built); it names the mesh's step. The
        trainer reads the guard back on its own logging and checkpoint steps (log.every
        bounds the lag), so this coupling reads back only where it is asked (check_every=0)."""
        tensors = len(FlatState(model).tensors)
        if cfg.coupling.fragments > tensors:
            raise ConfigError(
                f"coupling.fragments must be at most the model's number of tensors ({tensors}: parameters "
                f"and floating buffers; a fragment holds whole tensors); got {cfg.coupling.fragments}"
            )
        coupling = cls.__new__(cls)
        coupling._build(
            model,
            optimizer,
            form or form_of_config(cfg.coupling, cfg.train.steps),
            steps=cfg.train.steps,
            check_every=0,
            overlap=cfg.dist.overlap,
            bucket_mb=cfg.dist.bucket_mb,
            compress=cfg.dist.compress,
            compress_chunk=cfg.dist.compress_chunk,
            error_feedback=cfg.dist.error_feedback,
            mesh=mesh,
            guard=guard or Guard(cfg.guard.nonfinite, cfg.guard.max_consecutive_skips),
            timer=timer,
        )
        return coupling

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to run the forward and backward passes through: the model itself, or for
        ddp the model in DistributedDataParallel over the replicas' group."""
        return self.form.wrap(model, self.mesh.replicas)

    # ---- the two calls of a step

    def begin_step(self, observe: bool = False) -> None:
        """Before the forward pass. `observe`: exchange and keep the weights before the step
        and their mean even when this step does not couple (for diagnostics; it also agrees
        on the guard's words)."""

        if self._in_step is not None:
            raise CouplingError("begin_step() called twice: call step() after the backward pass first")
        step = self.step_count + 1
        self.mesh.step = step  # a collective that fails names it
        fragment = self.form.fragment_at(step)
        coupled = fragment is not None
        pulls = coupled and self.form.moment == "before"
        # The coupling's exchange (a pull's: its fragment's, compressed and counted), and the
        # diagnostics' of the whole model, exact and uncounted. With one fragment a step that
        # pulls and observes sends once, and the diagnostics read the coupling's mean.
        coupling = self._exchanges[fragment] if pulls else None
        observer = None
        if observe:
            whole = len(self.fragments) == 1 and bool(self._exchanges)
            observer = self._exchanges[0] if whole else self._new_exchange(self.state.numel, compressed=False)
        sends = [(observer, self.state)] if observer is not None else []
        if coupling is not None and coupling is not observer:
            sends.append((coupling, self.fragments[fragment]))
        self.observed = {}
        with self.timer.section("update"):
            for exchange, part in sends:
                part.pack(out=exchange.flat)
            if observe:
                self.observed["before"] = observer.flat.clone()
            if self.overlap:
                for exchange, _ in sends:
                    self._start(exchange, couples=exchange is coupling)
            self.state.save_buffers()  # the forward pass moves them
        self._in_step = _StepPlan(
            step=step,
            fragment=fragment,
            observe=observe,
            sends=[exchange for exchange, _ in sends],
            observer=observer,
            coupling=coupling,
            checks=bool(self.check_every) and step % self.check_every == 0,
        )

    def step(
        self, loss: torch.Tensor, agree: bool = False, scaler: torch.amp.GradScaler | None = None
    ) -> torch.Tensor:
        """In place of optimizer.step() (or of scaler.step(optimizer)), after the backward
        pass: whether the guard let this replica apply the step, as a 0-dim bool tensor on
        the model's device (reading it waits for the device). `agree`: make sure every
        replica's word on this very step is in, and read the guard's decisions back to the
        host (raising there if the run must end); the trainer asks so before a checkpoint, so
        none holds a non-finite value. A step begun with observe=True, and every
        check_every-th step, reads back too; any other step reads nothing back to the host.

        `scaler`: the torch.amp.GradScaler that scaled the loss. The gradients are unscaled
        (unless scaler.unscale_ was called already); where they overflowed, this replica's
        optimizer step is left out, as scaler.step would, while its pull and every exchange
        go on as on any other step; the guard does not count it. Call scaler.update() after."""
        if self._in_step is None:
            raise CouplingError(
                "step() called without begin_step(): call begin_step() before the forward pass"
            )
        if scaler is not None:  # before anything moves: a misused scaler leaves the step as it was
            with self.timer.section("compute"):
                unscale_or_drop_gradients(scaler, self.optimizer)
        plan, self._in_step = self._in_step, None
        step, fragment, observe = plan.step, plan.fragment, plan.observe
        coupled = fragment is not None
        agree = agree or plan.checks
        self.step_count = step
        # A plain step (it neither couples, shows nor saves, so it sends nothing): this replica
        # alone decides, and the guard's bookkeeping waits (Guard.inspect_and_settle).
        plain = not (coupled or observe or agree)
        with self.timer.section("compute"):  # never a non-finite update: checked here, decided together
            if plain:
                apply = self.guard.inspect_and_settle(
                    step, loss, self.state.inspected, self.state.floating_buffers
                )
            else:  # the weights too, on the steps that send, show or save them (see guard.py)
                own = self.guard.inspect(step, loss, self.state.inspected, self.state.floating_buffers)
        if not plain:
            with self.timer.section("communication"):
                apply = self._agree(step, plan, agree) & own
        with self.timer.section("update"):
            pull = self._update(step, apply, fragment, plan.coupling, settled=plain)
        # Every replica moves at once, from the same mean.
        if coupled and self.form.moment == "after":
            self._after_step(step, fragment)
        elif pull is not None:
            with self.timer.section("update"):
                self.fragments[fragment].add(pull, alpha=self.eta)
        if agree or observe:
            self.guard.read_back(step)
        return apply

    def finish(self) -> None:
        """End a loop: every replica's word on every step so far is exchanged and the
        outcome read back, so that a non-finite value after the last read back raises
        NonFiniteError (or SkipLimitError) here, on every rank, and `clean` tells of the last
        step. A collective: call it on every rank, after the last step()."""
        if self._in_step is not None:
            raise CouplingError("finish() called between begin_step() and step(): call step() first")
        guard, step = self.guard, self.step_count
        self.mesh.step = step
        with self.timer.section("communication"):
            guard.decide(step, dist.share_words(guard.word(), self.mesh))
        guard.read_back(step)

    def _agree(self, step: int, plan: _StepPlan, agree: bool) -> torch.Tensor:
        """The mean of the pre-step weights and every rank's guard word, from one all_reduce of
        one buffer (two when a step observes and pulls one fragment of several), so that all
        ranks skip or stop together: whether every replica may apply (a device bool; the
        decision is taken on the device)."""
        guard, sends, coupling = self.guard, plan.sends, plan.coupling
        apply = guard.may_apply()
        for exchange in sends:
            if not self.overlap:
                self._start(exchange, couples=exchange is coupling)
            # A pull folds the division by n into its own arithmetic (Form.direction_).
            total, words = exchange.wait(divide=exchange is not coupling)
            apply = apply & guard.decide(step, words)
            if exchange is plan.observer:  # the buffer turns into the pull below
                n = self.mesh.num_replicas  # asks the process group: not on a plain step
                self.observed["mean_before"] = total / n if exchange is coupling else total.clone()
        # Words that were sent before this step's own check (overlapped), or not at all.
        if agree and (self.overlap or not sends):
            apply = guard.decide(step, dist.share_words(guard.word(), self.mesh)) & apply
        return apply

    def _update(
        self, step: int, apply: torch.Tensor, fragment: int | None, exchange, settled: bool = False
    ) -> torch.Tensor | None:
        """The optimizer step, masked by `apply` on the device; returns the pull still to add
        to `fragment` (from the sum in `exchange`, the coupling's), divided by eta (zero where
        the step is not applied), if any. `settled`: the guard has already recorded `apply`."""
        state, pull = self.state, None
        if not settled:
            self.guard.settle(step, apply)
        if fragment is not None and self.form.moment == "before":
            part = self.fragments[fragment]
            # Before the optimizer step, while the parameters still hold w_before.
            direction = self.form.direction_(exchange.flat, part, self.mesh.num_replicas, apply, step)
            if self.form.via_optimizer:
                part.pull_through_optimizer(direction.mul_(self.eta))
            else:
                pull = direction
        self._optimizer_step(apply)
        state.restore_buffers_unless(apply)
        if "before" in self.observed:
            self.observed["after_optimizer"] = state.pack()
        return pull

    def _optimizer_step(self, apply: torch.Tensor) -> None:
        """optimizer.step(), or none where `apply` is false. A fused optimizer (SGD, Adam or
        AdamW with fused=True) skips on the device through `found_inf`, the flag with which
        torch.amp.GradScaler skips its steps; any other optimizer needs the flag on the host."""
        optimizer = self.optimizer
        if not self._skips_on_device():
            if bool(apply):
                optimizer.step()
            return
        optimizer.found_inf = (~apply).to(torch.float32)
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf

    def _skips_on_device(self) -> bool:
        optimizer = self.optimizer
        if not getattr(optimizer, "_step_supports_amp_scaling", False) or hasattr(optimizer, "found_inf"):
            return False
        # A fused optimizer's first step creates its state from the gradients whatever
        # found_inf says (SGD's momentum buffers): that one step is decided on the host.
        stateless = isinstance(optimizer, torch.optim.SGD) and all(
            g["momentum"] == 0 for g in optimizer.param_groups
        )
        return stateless or bool(optimizer.state)

    def _start(self, exchange, couples: bool) -> None:
        """Start `exchange` with this replica's guard word. One that `couples` is compressed
        and counted in bytes_sent; any other is there for the diagnostics (observe=True) and
        goes exact and uncounted, so that the logged mean is the true one and the
        error-feedback residual only follows the coupling's sends."""
        exchange.start(self.guard.word(), exact=not couples)
        if couples:
            self.bytes_sent += exchange.last_bytes

    def _after_step(self, step: int, fragment: int) -> None:
        """A form of moment "after": what it sends (of `fragment`, after the optimizer step),
        exchanged with the guard's words, and its move given the replicas' mean of it, where
        every replica agreed to apply this step (a device bool; no read back)."""
        part, exchange = self.fragments[fragment], self._exchanges[fragment]
        with self.timer.section("update"):
            self.form.send_(part, exchange.flat, fragment)
        with self.timer.section("communication"):
            self._start(exchange, couples=True)
            mean, words = exchange.wait()
            apply = self.guard.decide(step, words)
        with self.timer.section("update"):
            self.form.receive_(part, mean, apply, fragment, exchange.flat)

    # ---- what a loop reads

    @property
    def eta(self) -> float:
        """The coupling strength at the current step (the one begun, else the last)."""
        return self.form.scale(self._in_step.step if self._in_step else max(self.step_count, 1))

    @property
    def stop_agreed(self) -> bool:
        """Every replica agreed to stop (a SIGTERM or SIGINT reached one of them)."""
        return self.guard.stop_agreed

    @property
    def clean(self) -> bool:
        """No replica saw a non-finite value in the step of the latest exchange of words."""
        return self.guard.all_clean

    def state_dict(self) -> dict:
        """The step (the schedule's phase), the guard's state, the bytes sent so far, with
        error_feedback the exchange's residual, and for diloco the anchor and the outer
        optimizer's state: with the model's and the optimizer's state dicts, enough to
        continue bit for bit."""
        state = {"step": self.step_count, "guard": self.guard.state_dict(), "bytes_sent": self.bytes_sent}
        if self._exchanges and self._exchanges[0].residual is not None:
            # The fragments tile the model: one vector laid out as `state`, whatever their number.
            state["residual"] = torch.cat([exchange.residual for exchange in self._exchanges])
        form_state = self.form.state_dict()
        if form_state:  # under its name, as checkpoints before forms were plug-ins hold it
            state[self.form.label] = form_state
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step"])
        self.guard.load_state_dict(state["guard"])
        self.bytes_sent = int(state.get("bytes_sent", 0))  # absent from checkpoints before compression
        if self._exchanges and self._exchanges[0].residual is not None:
            if "residual" not in state:
                raise CouplingError(
                    "the state has no error-feedback residual: it was saved without error_feedback"
                )
            saved = state["residual"]
            for part, exchange in zip(self.fragments, self._exchanges):
                exchange.residual.copy_(saved.narrow(0, part.offset, part.numel))
        if self.form.label in state:
            self.form.load_state_dict(state[self.form.label])

    # ---- internals

    def _new_exchange(self, numel: int, compressed: bool = True):
        # The diagnostics' exchanges (all an uncoupled form makes) are always exact: no
        # compression buffers, no residual.
        compression = self._compression if compressed and "compression" in self.form.supports else {}
        return dist.ReplicaExchange(
            numel,
            Guard.WORD_LENGTH,
            self.state.dtype,
            self._device,
            self._bucket_bytes,
            self.mesh,
            **compression,
        )

    def _check_same_model(self) -> None:
        """Every replica must hold the same architecture: checked once, with one small
        all_reduce of (size, number of tensors, a digest of the shapes), max and -min."""

        if not tdist.is_initialized():
            raise CouplingError("ReplicaCoupling needs torch.distributed initialised (init_process_group)")
        if self.mesh.replica < 0:
            raise CouplingError(
                f"rank {tdist.get_rank()} is not in process_group: pass a group that holds one rank "
                f"per replica, this one among them"
            )
        if tdist.get_backend(self.mesh.replicas) == "nccl" and self._device.type != "cuda":
            raise CouplingError(
                f"process_group uses nccl, which reduces CUDA tensors only, but the model is on "
                f"{self._device}: move it to this rank's GPU, or use a gloo group"
            )
        shapes = ";".join(
            f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in zip(self.state.names, self.state.tensors)
        )
        mine = torch.tensor(
            [self.state.numel, len(self.state.tensors), zlib.crc32(shapes.encode()) % (1 << 24)],
            dtype=torch.float64,
            device=self._device,
        )
        both = torch.cat([mine, -mine])
        with dist.collective("all_reduce (model check)", self.mesh.step):
            tdist.all_reduce(both, op=tdist.ReduceOp.MAX, group=self.mesh.replicas)
        highest, lowest = both[:3].tolist(), (-both[3:]).tolist()
        if highest != lowest:
            raise CouplingError(
                f"the replicas' models differ: {int(lowest[0])} to {int(highest[0])} weights in "
                f"{int(lowest[1])} to {int(highest[1])} tensors; every replica must build the same model"
            )
