"""What a coupling form is: the base classes of the built-in forms and of a user's own.

A form says what happens to a replica's weights on a step, around the optimizer step that
ReplicaCoupling takes; ReplicaCoupling keeps the step's order (the exchange, the guard's
agreement, the optimizer step) and never asks which form it runs. A form declares:

- `moment`: "before" (pulled toward the mean of the weights from *before* the step, which
  ReplicaCoupling exchanges while the gradient is computed), "after" (moved from the mean of
  the weights *after* the step), or None (it exchanges no weights);
- `fragment_at(step)`: which fragment (0 for the whole model) couples at a step, or None;
- its hooks: `direction_` (moment "before"), `send_` and `receive_` (moment "after"),
  `wrap` (the module the passes run through), `shard` (how a replica is split over its ranks
  with parallel.shard > 1), `attach` (state built from the first weights);
- its state (`state_dict`, `load_state_dict`), saved in the coupling's checkpoint;
- `settings`: the trainer's coupling keys (CouplingConfig's fields) it reads, `supports`: the
  options of the rest of the run it works with (FEATURES), and `check`: its own limits;
- its words: `words()` for reports and titles, `advice` for a center that failed.

The smallest form of one's own is a PullForm with a rule (see replica_dist.forms, and the
README's "A coupling form of your own").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from replica_dist.errors import CouplingError

if TYPE_CHECKING:  # the registry is read by the config, which loads no torch (see forms/__init__)
    import torch

    from replica_dist.flat import FlatState

FEATURES = ("compression", "remap", "replica_dp", "sharded", "fault_tolerant")
"""The run's options a form may support (`Form.supports`): a compressed exchange of weights
(dist.compress); a resume that maps saved replicas onto new ones (checkpoint.remap); replicas
that are each data parallel over several ranks (parallel.dp > 1); replicas that are each
sharded over several ranks (parallel.shard > 1), the form's rule then applied to each rank's
local shard of the weights and of their mean, which must give what it gives on the whole;
replicas that outlive each other (ft.enabled), the form's step defined when replicas are
missing from an exchange or it fails (docs/fault_tolerance.md)."""


class Form:
    """A coupling form: its rule around the optimizer step, its schedule, state and words.

    Subclass PullForm for a pull toward the mean of the weights before the step; subclass
    Form itself (moment "after", with `send_` and `receive_`) for a rule applied after it."""

    name: ClassVar[str] = ""
    """The form's word: coupling.name of a built-in; a form of one's own shows its class's name."""
    moment: ClassVar[str | None] = None
    """"before", "after" or None: see the module's docstring."""
    settings: ClassVar[tuple[str, ...]] = ()
    """The coupling keys (fields of replica_dist.config.CouplingConfig) this form reads; the
    trainer refuses any other on the command line and ReplicaCoupling as an argument."""
    supports: ClassVar[frozenset[str]] = frozenset()
    """Which of FEATURES this form works with."""
    why_not: ClassVar[dict[str, str]] = {}
    """For a feature it does not support, why (said when one asks for it)."""
    advice: ClassVar[str] = ""
    """Appended to the warning about a center whose loss rose far above the ensemble's (a
    form that couples, moment not None, has a center that is meant to work)."""

    fragments: int = 1
    """How many fragments the model is split into (coupling.fragments); fragment_at names one."""
    via_optimizer: bool = False
    """A "before" form's pull enters the gradient (minus the pull) instead of the weights."""

    @classmethod
    def from_config(cls, cfg, steps: int) -> Form:
        """The form the trainer's coupling settings (CouplingConfig) describe, for a run of
        `steps` steps. A form of one's own is built from its keyword arguments instead."""
        return cls()

    @classmethod
    def check(cls, cfg) -> None:
        """ConfigError naming the key, where `cfg` (a CouplingConfig) asks for what this
        form cannot do. The settings common to all forms are checked by CouplingConfig."""

    @property
    def label(self) -> str:
        """The form's name, or a form of one's own's class name."""
        return self.name or type(self).__name__

    def fragment_at(self, step: int) -> int | None:
        """The fragment coupled at `step` (counted from 1), or None: no coupling this step."""
        return None

    def wrap(self, model: torch.nn.Module, group) -> torch.nn.Module:
        """The module to run the forward and backward passes through."""
        return model

    def shard(self, model: torch.nn.Module, device_mesh) -> torch.nn.Module:
        """With parallel.shard > 1: `model` (this replica's, whole) sharded over the ranks of its
        replica, the "shard" dimension of the (replica, shard) `device_mesh` (replica_dist.shard
        says how)."""
        from replica_dist.shard import shard_replica

        return shard_replica(model, device_mesh["shard"])

    def attach(self, state: FlatState, fragments: list[FlatState], replica_mean) -> None:
        """Once, at construction, on every rank: build the form's own state from the first
        weights (`state`, split into `fragments`). `replica_mean(tensor)`, a collective that
        every rank calls alike, gives the replicas' mean of a tensor."""

    def scale(self, step: int) -> float:
        """The factor of direction_'s result (a pull's strength, eta); 1 by default."""
        return 1.0

    def direction_(
        self, total: torch.Tensor, part: FlatState, n: int, apply: torch.Tensor, step: int
    ) -> torch.Tensor:
        """Moment "before": the move of `part`'s weights divided by scale(step), computed in
        place in `total` (the replicas' sum of `part`'s weights before the step, n replicas),
        zero wherever `apply` (a device bool) is false. `part.subtract_from` gives the gap."""
        raise NotImplementedError(f"{type(self).__name__} has moment 'before' but no direction_")

    def send_(self, part: FlatState, flat: torch.Tensor, fragment: int) -> torch.Tensor:
        """Moment "after": what this replica sends for `fragment` (`part`), written into
        `flat`; its mean over the replicas comes to receive_. By default the weights."""
        return part.pack(out=flat)

    def receive_(
        self, part: FlatState, mean: torch.Tensor, apply: torch.Tensor, fragment: int, spare: torch.Tensor
    ) -> None:
        """Moment "after": move `part` given the replicas' `mean` of what send_ wrote, where
        `apply` (every replica agreed to apply this step; a device bool) holds. `spare` is a
        buffer of mean's size free to overwrite. By default the weights become the mean."""
        part.load(mean)

    def state_dict(self) -> dict:
        """The form's own state, for the coupling's checkpoint."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned (after attach)."""

    def words(self) -> list[str]:
        """The form in a few words for reports and titles (`tanh, eta 0.001 to 0.4`)."""
        return [self.label]

    def notes(self, steps: int) -> list[str]:
        """Lines the trainer prints at the start of a run of `steps` steps (a schedule that
        will barely couple, a strength that will overshoot)."""
        return []


class PullForm(Form):
    """A pull toward the replicas' mean of the weights before the step, w += pull(w, mean, step),
    on the steps where coupled_at(step) holds. Subclass it and write `pull`; the exchange is
    overlapped with the gradient, guarded, compressed (dist.compress) and fragment-free.

    Example (every k steps, move a share `rate` of the way to the mean)::

        class Halfway(PullForm):
            def __init__(self, k: int = 4, rate: float = 0.5):
                self.k, self.rate = k, rate

            def coupled_at(self, step):
                return step % self.k == 0

            def pull(self, w, mean, step):
                return self.rate * (mean - w)
    """

    moment = "before"
    supports = frozenset(FEATURES) - {"sharded", "fault_tolerant"}
    why_not = {
        "sharded": "its pull(w, mean, step) would see one shard of the weights, and may not be elementwise",
        "fault_tolerant": "its step with missing replicas is not defined",
    }

    def coupled_at(self, step: int) -> bool:
        """Whether the replicas couple at `step` (counted from 1); every step by default."""
        return True

    def pull(self, w: torch.Tensor, mean: torch.Tensor, step: int) -> torch.Tensor:
        """The move of weights `w` (flat, from before the step) given the replicas' `mean`."""
        raise NotImplementedError(f"{type(self).__name__} must define pull(w, mean, step)")

    def fragment_at(self, step: int) -> int | None:
        return 0 if self.coupled_at(step) else None

    def direction_(
        self, total: torch.Tensor, part: FlatState, n: int, apply: torch.Tensor, step: int
    ) -> torch.Tensor:
        mean = total.div_(n)
        move = self.pull(part.pack_before(), mean, step)
        # A fill, not a product: a skipped step moves nothing even where the gap is not finite.
        return total.copy_(move).masked_fill_(~apply, 0)


def unsupported_feature(form: type[Form] | Form, asked: dict[str, str], form_words: str) -> str | None:
    """The message for the first feature in `asked` (feature -> the setting that asks for it,
    as the user wrote it) that `form` does not support, or None. `form_words` names the form
    as the user chose it (`coupling.name=ddp`, `form 'ddp'`)."""
    for feature, setting in asked.items():
        if feature not in form.supports:
            why = form.why_not.get(feature)
            return f"{setting} is not available for {form_words}" + (f" ({why})" if why else "")
    return None


def periodic_fragment(step: int, every: int, fragments: int) -> int | None:
    """The fragment coupled at `step` (counted from 1) of forms coupled every `every` steps,
    or None: with k = fragments, one every every/k steps in turn, fragment 0 first, so each is
    coupled every `every` steps (with k = 1 the whole model, fragment 0, every `every` steps)."""
    period = every // fragments
    if step % period:
        return None
    return (step // period - 1) % fragments


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
