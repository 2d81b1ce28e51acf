"""The coupling between replicas, as pure tensor functions of a replica's weights and the mean.

Each step every replica first takes its own optimizer step; then, on coupling steps, it is
moved by `pull(...)`:

    tanh     w <- w_opt + eta * tanh((mean - w) / T)    the note's rule (T = 1)
    linear   w <- w_opt + eta * (mean - w)              elastic averaging (eta = lr*gamma)
    average  w <- mean of the post-step weights         local SGD / model averaging
    diloco   anchor <- OuterSGD(anchor, mean(anchor - w)) and w <- anchor, after the step

For tanh and linear, `w` and `mean` are the weights *before* the step, so all replicas move
at once from the same mean (the note's loop let replica 2 see replica 1's new weights; we
do not). `none` never couples and `ddp` averages gradients instead (DistributedDataParallel).
For diloco (DiLoCo, arXiv 2311.08105) `anchor` is the weights at the last sync, the same on
every replica, and OuterSGD one step of SGD with (Nesterov) momentum; see _DiLoCo.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import zlib

import torch
import torch.distributed as tdist
from torch.amp.grad_scaler import OptState

from replica_dist import dist
from replica_dist.config import ConfigError, CouplingConfig
from replica_dist.flat import FlatState
from replica_dist.guard import Guard
from replica_dist.timing import NO_TIMER

ELASTIC_FORMS = ("tanh", "linear")
"""Forms that pull toward the mean of the pre-step weights."""


def pull(
    form: str, w: torch.Tensor, mean: torch.Tensor, eta: float, temperature: float = 1.0
) -> torch.Tensor:
    """The coupling's move of weights `w` toward the replicas' `mean` (same shape): the
    textbook form, the reference for the trainer's fused one (_Elastic.direction_)."""
    gap = mean - w
    if form == "tanh":
        return eta * torch.tanh(gap / temperature)
    if form == "linear":
        return eta * gap
    if form == "average":
        return gap
    raise ValueError(f"no pull for coupling form {form!r}")


def eta_at(cfg: CouplingConfig, step: int, steps: int) -> float:
    """Coupling strength at `step` (counted from 1) of a run of `steps` steps, capped at eta_max.

    eta_growth set: eta_0 * (1 + g)^(step - 1), g = eta_growth. Otherwise the geometric
    schedule from eta_0 at step 1 to cfg.eta_end (eta_final, or its default) at step `steps`,
    whatever the run's length (a one-step run takes that end). With g > 0 or an end above
    eta_0 the replicas are drawn together ever harder ("scoping")."""
    # In log space: (1 + g)^t overflows a float long before long runs end; the cap does not.
    end = cfg.eta_end
    if end is None:
        log_eta = math.log(cfg.eta) + (step - 1) * math.log1p(cfg.eta_growth)
    elif steps == 1:
        log_eta = math.log(end)
    else:
        log_eta = math.log(cfg.eta) + (step - 1) / (steps - 1) * math.log(end / cfg.eta)
    return min(cfg.eta_max, math.exp(min(log_eta, math.log(cfg.eta_max))))


STUDY_ETA_FINAL = 0.4
"""Where the schedule docs/study.md chose (eta 0.001, growth 0.004 over 1500 steps) ends."""


def schedule_note(cfg: CouplingConfig, steps: int) -> str | None:
    """One line when a growing tanh/linear schedule, set by its growth per step, ends far below
    where the study's shape ends (a shortened run that keeps eta_growth barely couples);
    None otherwise. A constant eta and a set eta_final are the user's own choices and get no
    note; neither does a schedule that reaches a tenth of an eta_max below the study's end."""
    if cfg.name not in ELASTIC_FORMS or cfg.eta_end is not None or not cfg.eta_growth:
        return None
    target = min(STUDY_ETA_FINAL, cfg.eta_max)
    last = eta_at(cfg, steps, steps)
    if last >= target / 10:
        return None
    return (
        f"coupling: eta reaches only {last:.2g} at the last step of {steps}; "
        f"coupling.eta_final={target:g} keeps the shape the study chose"
    )


def stability_note(cfg: CouplingConfig, steps: int) -> str | None:
    """One line when a tanh pull will overshoot the mean: near the mean eta*tanh(gap/T) is a
    linear pull of slope eta/T, and above 2 each replica lands farther from the mean than it
    started, so the gaps grow until tanh saturates and every weight jumps by +-eta a step
    (a README example collapsed so at step 1340). None when eta/T stays at most 2."""
    if cfg.name != "tanh":
        return None
    first_bad = next((t for t in range(1, steps + 1) if eta_at(cfg, t, steps) / cfg.temperature > 2), None)
    if first_bad is None:
        return None
    return (
        f"coupling: eta/temperature exceeds 2 from step {first_bad} (eta {eta_at(cfg, first_bad, steps):.3g}, "
        f"T {cfg.temperature:g}): the tanh pull then overshoots the mean and can destroy the center; "
        f"keep coupling.eta_max <= 2*coupling.temperature"
    )


def is_coupling_step(cfg: CouplingConfig, step: int) -> bool:
    """Whether the replicas (all of them, or one fragment) are coupled at `step` (counted from 1)."""
    return fragment_at(cfg, step) is not None


def fragment_at(cfg: CouplingConfig, step: int) -> int | None:
    """The fragment coupled at `step` (counted from 1), or None: with k = cfg.fragments, one
    every every/k steps in turn, fragment 0 first, so each is coupled every `every` steps
    (with k = 1 the whole model, fragment 0, every `every` steps)."""
    if cfg.name not in (*ELASTIC_FORMS, "average", "diloco"):
        return None
    period = cfg.every // cfg.fragments
    if step % period:
        return None
    return (step // period - 1) % cfg.fragments


def fragment_bounds(sizes: list[int], k: int) -> list[tuple[int, int]]:
    """k contiguous runs [first, end) of the tensors whose sizes (numbers of elements) are
    `sizes`, in order, each holding whole tensors and about 1/k of the elements: run g ends
    with the first tensor at which the running total reaches (g+1)/k of the whole, leaving
    at least one tensor for every run after it."""
    if not 1 <= k <= len(sizes):
        raise CouplingError(f"fragments={k}: a model of {len(sizes)} tensors splits into 1 to {len(sizes)}")
    total, bounds, first, running = sum(sizes), [], 0, 0
    for g in range(k - 1):
        end = first + 1
        running += sizes[first]
        while end < len(sizes) - (k - 1 - g) and running < total * (g + 1) / k:
            running += sizes[end]
            end += 1
        bounds.append((first, end))
        first = end
    bounds.append((first, len(sizes)))
    return bounds


class CouplingError(ValueError):
    """The coupling was used wrongly: calls out of order, a model that differs across
    replicas, a process group that does not fit."""


class _Form:
    """What one coupling form does at a step; the step's order lives in ReplicaCoupling."""

    pulls_before_step = False
    """Pulled toward the mean of the pre-step weights (tanh, linear)."""
    averages_after_step = False
    """Replaced by the mean of the post-step weights (average)."""

    def __init__(self, cfg: CouplingConfig):
        self.cfg = cfg

    def fragment_at(self, step: int) -> int | None:
        """The fragment coupled at `step`, or None."""
        return fragment_at(self.cfg, step)

    def wrap(self, model: torch.nn.Module, group) -> torch.nn.Module:
        return model


class _Elastic(_Form):
    """tanh and linear: w += eta*tanh((mean - w)/T) or eta*(mean - w), mean of the pre-step weights."""

    pulls_before_step = True

    def direction_(self, total: torch.Tensor, state: FlatState, n: int, apply: torch.Tensor) -> torch.Tensor:
        """`pull` / eta, in place in `total` (the replicas' sum of the pre-step weights) and
        zero where `apply` is false: in four passes over the buffer (the mean's division
        folded into the gap's scale, eta into the caller's add), where the textbook order
        takes seven. Equal to `pull` up to rounding (tests/test_coupling.py)."""
        state.subtract_from(total, alpha=n)  # n * (mean - w_before)
        if self.cfg.name == "tanh":
            total.mul_(1.0 / (n * self.cfg.temperature)).tanh_()
        else:
            total.mul_(1.0 / n)
        # A skipped step moves nothing: a fill, not a product, so that a gap that is not
        # finite (a replica's overflowed weights, agreed on in this very step) leaves no NaN.
        return total.masked_fill_(~apply, 0)


class _Average(_Form):
    """average: every `every` steps, w = the mean of the post-step weights (local SGD)."""

    averages_after_step = True


class _DiLoCo(_Average):
    """diloco: every H = `every` steps, after the optimizer step, one outer step on the anchor
    (the weights at the last sync, the same on every replica) along the replicas' mean
    pseudo-gradient, anchor - w; then every replica loads the new anchor.

    The outer optimizer is torch.optim.SGD (momentum outer_momentum, Nesterov unless
    outer_nesterov=false, lr outer_lr) on the anchor's parameters, so the update is PyTorch's:
    buf <- mu*buf + delta; anchor <- anchor - lr*(delta + mu*buf) (Nesterov), or
    anchor - lr*buf. It holds two more copies of the parameters (the anchor, the momentum).

    Floating buffers (BatchNorm's running statistics) are no parameters: they take the
    replicas' mean at each sync (as with average), not the outer step, whose momentum could
    extrapolate a running variance below zero. With outer_lr=1 and outer_momentum=0 the
    outer step lands on the mean too, and diloco is average up to rounding.

    The first anchor is the replicas' mean of their starting weights (one all_reduce at
    construction), loaded into every replica, so all begin identical as under DDP."""

    def attach(self, state: FlatState, fragments: list[FlatState], mesh: dist.Mesh) -> None:
        """Start from the replicas' mean, and build one outer parameter per fragment: a slice
        of the anchor, so that a fragment's outer step moves only its own part."""
        self.anchor = dist.replica_mean(state.pack(), mesh)
        state.load(self.anchor)
        param_numel = sum(t.numel() for t in state.tensors[: state.num_params])
        self.parts = []  # per fragment: (its parameters' slice of the anchor or None, its buffers' slice)
        for part in fragments:
            end = part.offset + part.numel
            split = min(max(part.offset, param_numel), end)
            params = self.anchor[part.offset : split] if split > part.offset else None
            self.parts.append((params, self.anchor[split:end]))
        cfg = self.cfg
        self.outer = torch.optim.SGD(
            [params for params, _ in self.parts if params is not None],
            lr=cfg.outer_lr,
            momentum=cfg.outer_momentum,
            nesterov=cfg.outer_nesterov and cfg.outer_momentum > 0,
            fused=True,
        )
        if cfg.outer_momentum > 0:
            # A fused SGD's first step would fill the buffer from the gradient whatever its
            # found_inf says; a zero buffer gives the same first step (mu*0 + delta) and lets
            # a skipped first step leave it untouched, on the device.
            for params in self.outer.param_groups[0]["params"]:
                self.outer.state[params]["momentum_buffer"] = torch.zeros_like(params)

    def outer_step_(self, fragment: int, mean_delta: torch.Tensor, apply: torch.Tensor) -> None:
        """The outer step of `fragment` along `mean_delta` (the replicas' mean of anchor - w,
        laid out as that fragment), only where `apply` (a device bool) holds: a skipped sync
        leaves its anchor and momentum as they were, on the device. The optimizer steps only
        the parameter whose gradient is set: this fragment's."""
        params, buffers = self.parts[fragment]
        if params is not None:
            params.grad = mean_delta[: params.numel()]
            self.outer.found_inf = (~apply).to(torch.float32)
            try:
                self.outer.step()
            finally:
                del self.outer.found_inf
                params.grad = None
        if buffers.numel():
            mean_buffers = torch.sub(buffers, mean_delta[mean_delta.numel() - buffers.numel() :])
            buffers.copy_(torch.where(apply, mean_buffers, buffers))

    def anchor_of(self, part: FlatState) -> torch.Tensor:
        return self.anchor[part.offset : part.offset + part.numel]

    def state_dict(self) -> dict:
        return {"anchor": self.anchor.clone(), "outer_optimizer": self.outer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.anchor.copy_(state["anchor"])
        self.outer.load_state_dict(state["outer_optimizer"])


class _Uncoupled(_Form):
    """none: independent replicas; they exchange only the guard's words, on the steps that
    ask for it (observed or agreed steps)."""

    def fragment_at(self, step: int) -> int | None:
        return None


class _DataParallel(_Uncoupled):
    """ddp: no pull; DistributedDataParallel averages the gradients, so the replicas stay one."""

    def wrap(self, model: torch.nn.Module, group) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, process_group=group)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


_FORMS: dict[str, type[_Form]] = {
    "tanh": _Elastic,
    "linear": _Elastic,
    "average": _Average,
    "none": _Uncoupled,
    "ddp": _DataParallel,
    "diloco": _DiLoCo,
}


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

_ETA_SCHEDULE = ("eta", "eta_growth", "eta_final", "eta_max")
FORM_SETTINGS = {
    "tanh": (*_ETA_SCHEDULE, "temperature", "every", "via_optimizer", "fragments"),
    "linear": (*_ETA_SCHEDULE, "every", "via_optimizer", "fragments"),
    "average": ("every", "fragments"),
    "diloco": ("every", "fragments", "outer_lr", "outer_momentum", "outer_nesterov"),
    "none": (),
    "ddp": (),
}
"""The schedule's settings (CouplingConfig's fields) that each form reads; ReplicaCoupling
refuses any other, which would change nothing."""

CONSTANT_ETA = {"eta_growth": 0.0}
"""ReplicaCoupling's schedule when neither eta_growth= nor eta_final= asks for one: a constant
eta (the trainer's default, CouplingConfig's, is relative to the run's length)."""


def _schedule_of_arguments(form: str, steps: int | None, schedule: dict) -> CouplingConfig:
    """The CouplingConfig of ReplicaCoupling's arguments; a CouplingError naming the argument
    as the caller wrote it (`eta=`, not `coupling.eta`) for any that is unknown, means nothing
    for `form`, or holds a bad value."""
    if form not in FORM_SETTINGS:
        raise CouplingError(f"form must be one of {', '.join(FORM_SETTINGS)}; got {form!r}")
    known = [f for f in CouplingConfig.__dataclass_fields__ if f != "name"]
    unknown = sorted(set(schedule) - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean {close[0]}=?)" if close else ""
        raise CouplingError(f"ReplicaCoupling has no argument {unknown[0]}={hint}")
    unused = [key for key in schedule if key not in FORM_SETTINGS[form]]
    if unused:
        used = ", ".join(f"{key}=" for key in FORM_SETTINGS[form]) or "none of the schedule's settings"
        raise CouplingError(
            f"{', '.join(f'{key}=' for key in unused)} {'means' if len(unused) == 1 else 'mean'} "
            f"nothing for form {form!r}, which reads {used}"
        )
    try:
        asked = "eta_growth" in schedule or "eta_final" in schedule
        cfg = CouplingConfig(name=form, **(schedule if asked else CONSTANT_ETA | schedule))
    except ConfigError as err:
        raise CouplingError(_as_arguments(str(err))) from None
    if cfg.eta_end is not None and steps is None:
        raise CouplingError("eta_final needs steps=, the run's length")
    return cfg


def _as_arguments(message: str) -> str:
    """A CouplingConfig message in ReplicaCoupling's words: coupling.name=linear as form
    linear, coupling.eta as eta=."""
    message = re.sub(r"coupling\.name=", "form ", message)
    return re.sub(r"coupling\.(\w+)=?", r"\1=", message)


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
        >>> coupling = ReplicaCoupling(model, optimizer, "tanh", eta=0.001, eta_final=0.4, steps=100)
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

    With ``"diloco"`` the constructor sets every replica's weights to their mean (the first
    anchor; one all_reduce), and ``state_dict()`` holds the anchor and the outer optimizer's
    momentum too: construct the coupling first, then load the saved state dicts.

    Mixed precision: bf16 autocast needs nothing; with a torch.amp.GradScaler, call
    ``step(loss, scaler=scaler)`` in place of ``scaler.step(optimizer)``, then
    ``scaler.update()``: an overflow leaves out this replica's optimizer step only.

    Arguments: the model and its optimizer; `form` (tanh, linear, average, none, ddp, diloco)
    and the schedule, as the fields of replica_dist.config.CouplingConfig that the form reads
    (FORM_SETTINGS: eta, eta_growth, eta_final, eta_max, temperature, every, via_optimizer,
    fragments, outer_lr, outer_momentum, outer_nesterov; any other is refused), with the
    trainer's defaults except the eta schedule (CONSTANT_ETA): eta is constant unless eta_growth or
    eta_final asks for a schedule; `steps`, the run's length (needed by eta_final);
    `check_every` (DEFAULT_CHECK_EVERY; 0 or None: only where asked); `overlap`, `bucket_mb`,
    `compress` (none, bf16, int8), `compress_chunk` and `error_feedback` (DistConfig;
    compression applies to the coupling's exchange, see dist.ReplicaExchange, and
    `bytes_sent` counts what it sends); `nonfinite` and
    `max_consecutive_skips` (GuardConfig); `process_group`, one rank per replica (default:
    the world), and `replica_group_of_rank`, the ranks of this rank's own replica when each
    replica is itself data parallel (default: none). A bad argument is a CouplingError
    naming it as written here (``eta_max=``), before anything communicates.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        form: str = "tanh",
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
        nonfinite: str = "stop",
        max_consecutive_skips: int = 20,
        guard=None,
        timer=None,
        mesh=None,
        **schedule,
    ):
        cfg = _schedule_of_arguments(form, steps, schedule)
        if nonfinite not in ("stop", "skip"):
            raise CouplingError(f"nonfinite must be 'stop' or 'skip'; got {nonfinite!r}")
        if not isinstance(max_consecutive_skips, int) or max_consecutive_skips < 1:
            raise CouplingError(f"max_consecutive_skips= must be an int >= 1; got {max_consecutive_skips!r}")
        if check_every is not None and (not isinstance(check_every, int) or check_every < 0):
            raise CouplingError(
                f"check_every= must be a number of steps >= 1 (0 or None: never read back by itself); "
                f"got {check_every!r}"
            )
        if compress not in dist.COMPRESSIONS:
            raise CouplingError(f"compress= must be one of {', '.join(dist.COMPRESSIONS)}; got {compress!r}")
        if compress != "none" and form in ("none", "ddp"):
            raise CouplingError(
                f"compress= applies to the coupling's exchange of weights; form {form!r} has none: use 'none'"
            )
        if error_feedback and compress == "none":
            raise CouplingError("error_feedback= needs compress='bf16' or 'int8'")
        if compress_chunk < 1:
            raise CouplingError(f"compress_chunk= must be >= 1; got {compress_chunk}")
        self._build(
            model,
            optimizer,
            cfg,
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
        cfg: CouplingConfig,
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
        self.cfg = cfg
        self.steps = steps or 1
        self.check_every = check_every
        """Every check_every-th step (counted from 1) agrees on the guard's words and reads
        them back, as step(loss, agree=True) does; 0: only where the caller asks."""
        self.form = _FORMS[cfg.name](cfg)
        self.model, self.optimizer = model, optimizer
        self.overlap = overlap
        self.timer = timer or NO_TIMER
        self.mesh = mesh
        self.state = FlatState(model)
        self._device = self.state.device
        self.guard = guard.to(self._device)
        self._bucket_bytes = bucket_mb * 2**20
        self._compression = {"compress": compress, "chunk": compress_chunk, "error_feedback": error_feedback}
        self.bytes_sent = 0
        """Bytes this rank handed to the coupling's collectives so far (dist.ReplicaExchange
        defines them); the diagnostics' exchanges on logging steps are not counted."""
        self._check_same_model()
        bounds = fragment_bounds([t.numel() for t in self.state.tensors], self.cfg.fragments)
        self.fragments = [self.state] if len(bounds) == 1 else [self.state.part(*run) for run in bounds]
        """The parts coupled in turn (coupling.fragments); one, the whole state, by default."""
        if isinstance(self.form, _DiLoCo):
            self.form.attach(self.state, self.fragments, self.mesh)
        # One per fragment, allocated once: the weights sent, the mean received, then the pull,
        # all in this buffer. Uncoupled forms communicate only when asked, into a buffer of the
        # moment.
        self._exchanges = (
            []
            if isinstance(self.form, _Uncoupled)
            else [self._new_exchange(part.numel) for part in self.fragments]
        )
        self.step_count = 0
        """Steps taken (or skipped) so far; the next one is step_count + 1."""
        self._in_step: dict | None = None
        self.observed: dict[str, torch.Tensor] = {}
        """On a step begun with observe=True: `before` (the weights before the step),
        `mean_before` (the replicas' mean of them) and `after_optimizer` (after the optimizer
        step, before the pull), flat vectors laid out as `state`; empty otherwise."""

    @classmethod
    def from_config(cls, cfg, mesh, model, optimizer, guard=None, timer=None) -> ReplicaCoupling:
        """The coupling a trainer config (replica_dist.config.Config) describes, among the
        replicas of `mesh` (replica_dist.dist.init_mesh); it names the mesh's step. The
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
            dataclasses.replace(cfg.coupling),
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
        pulls = coupled and self.form.pulls_before_step
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
        self._in_step = {
            "step": step,
            "fragment": fragment,
            "observe": observe,
            "sends": [exchange for exchange, _ in sends],  # in this order on every rank
            "observer": observer,
            "coupling": coupling,
            # The periodic read back (check_every): the same steps on every rank, so that its
            # exchange of words comes in the same order everywhere.
            "checks": bool(self.check_every) and step % self.check_every == 0,
        }

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
        step, fragment, observe, sends, observer, coupling, checks = self._in_step.values()
        coupled = fragment is not None
        agree = agree or checks
        self._in_step = None
        self.step_count = step
        # A plain step (it neither couples, shows nor saves, so it sends nothing): this replica
        # alone decides, and the guard's bookkeeping waits (Guard.inspect_and_settle).
        plain = not (coupled or observe or agree)
        with self.timer.section("compute"):  # never a non-finite update: checked here, decided together
            if plain:
                apply = self.guard.inspect_and_settle(
                    step, loss, self.state.parameters, self.state.floating_buffers
                )
            else:  # the weights too, on the steps that send, show or save them (see guard.py)
                own = self.guard.inspect(step, loss, self.state.parameters, self.state.floating_buffers)
        if not plain:
            with self.timer.section("communication"):
                apply = self._agree(step, sends, observer, coupling, agree) & own
        with self.timer.section("update"):
            pull = self._update(step, apply, fragment, coupling, settled=plain)
        # Every replica moves at once, from the same mean.
        if coupled and isinstance(self.form, _DiLoCo):
            self._outer_step(step, fragment)
        elif coupled and self.form.averages_after_step:
            self._average(step, fragment)
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

    def _agree(self, step: int, sends: list, observer, coupling, agree: bool) -> torch.Tensor:
        """The mean of the pre-step weights and every rank's guard word, from one all_reduce of
        one buffer (two when a step observes and pulls one fragment of several), so that all
        ranks skip or stop together: whether every replica may apply (a device bool; the
        decision is taken on the device)."""
        guard = self.guard
        apply = guard.may_apply()
        for exchange in sends:
            if not self.overlap:
                self._start(exchange, couples=exchange is coupling)
            # A pull folds the division by n into its own arithmetic (_Elastic.direction_).
            total, words = exchange.wait(divide=exchange is not coupling)
            apply = apply & guard.decide(step, words)
            if exchange is observer:  # the buffer turns into the pull below
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
        if fragment is not None and self.form.pulls_before_step:
            part = self.fragments[fragment]
            # Before the optimizer step, while the parameters still hold w_before.
            direction = self.form.direction_(exchange.flat, part, self.mesh.num_replicas, apply)
            if self.cfg.via_optimizer:
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

    def _average(self, step: int, fragment: int) -> None:
        """average: the weights after the step (of `fragment`), replaced by their mean over
        the replicas."""
        part, exchange = self.fragments[fragment], self._exchanges[fragment]
        with self.timer.section("update"):
            part.pack(out=exchange.flat)
        with self.timer.section("communication"):
            self._start(exchange, couples=True)
            mean_after_step, words = exchange.wait()
            self.guard.decide(step, words)
        with self.timer.section("update"):
            part.load(mean_after_step)

    def _outer_step(self, step: int, fragment: int) -> None:
        """diloco: the replicas' mean pseudo-gradient (anchor - w after the step), as one
        exchange that carries the guard's words as _average's does; the outer step on the
        anchor where every replica agrees to apply this step (else the sync is skipped: the
        anchor and momentum stay, each replica keeps its weights and the next sync spans
        2H steps); then every replica loads the anchor."""
        form, part, exchange = self.form, self.fragments[fragment], self._exchanges[fragment]
        anchor = form.anchor_of(part)
        with self.timer.section("update"):
            part.pack(out=exchange.flat)
            torch.sub(anchor, exchange.flat, out=exchange.flat)
        with self.timer.section("communication"):
            self._start(exchange, couples=True)
            mean_delta, words = exchange.wait()
            apply = self.guard.decide(step, words)
        with self.timer.section("update"):
            form.outer_step_(fragment, mean_delta, apply)
            # A skipped sync keeps each replica's own weights: chosen on the device, in the
            # exchange's buffer (free until the next step packs it), with no read back.
            weights = part.pack(out=exchange.flat)
            part.load(torch.where(apply, anchor, weights, out=weights))

    # ---- what a loop reads

    @property
    def eta(self) -> float:
        """The coupling strength at the current step (the one begun, else the last)."""
        cfg = self.cfg
        if cfg.eta_final is None and cfg.eta_growth == 0:  # exactly eta: not exp(log(eta))
            return min(cfg.eta, cfg.eta_max)
        step = self._in_step["step"] if self._in_step else max(self.step_count, 1)
        return eta_at(cfg, step, self.steps)

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
        if isinstance(self.form, _DiLoCo):
            state["diloco"] = self.form.state_dict()
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
        if isinstance(self.form, _DiLoCo):
            self.form.load_state_dict(state["diloco"])

    # ---- internals

    def _new_exchange(self, numel: int, compressed: bool = True):
        # The diagnostics' exchanges (all an uncoupled form makes) are always exact: no
        # compression buffers, no residual.
        compression = self._compression if compressed and not isinstance(self.form, _Uncoupled) else {}
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
