"""tanh: w += eta * tanh((mean - w) / T), the note's rule, mean of the weights before the step."""

from __future__ import annotations

from typing import TYPE_CHECKING

from replica_dist.forms.elastic import Elastic, eta_at

if TYPE_CHECKING:
    import torch


class Tanh(Elastic):
    """The note's rule: a pull that is linear near the mean (slope eta/T) and at most eta per
    weight and step far from it."""

    name = "tanh"
    settings = (*Elastic.settings, "temperature")
    advice = ": the coupling may be too strong (a lower coupling.eta or a higher coupling.temperature)"

    def _gap_scale(self, n: int) -> float:
        return 1.0 / (n * self.cfg.temperature)

    def _shape_(self, scaled_gaps: torch.Tensor) -> None:
        scaled_gaps.tanh_()

    def _rule_words(self) -> list[str]:
        return [f"T {self.cfg.temperature:.3g}"] if self.cfg.temperature != 1.0 else []

    def notes(self, steps: int) -> list[str]:
        note = stability_note(self.cfg, steps)
        return super().notes(steps) + ([note] if note else [])


def stability_note(cfg, steps: int) -> str | None:
    """One line when a tanh pull will overshoot the mean: near the mean eta*tanh(gap/T) is a
    linear pull of slope eta/T, and above 2 each replica lands farther from the mean than it
    started, so the gaps grow until tanh saturates and every weight jumps by +-eta a step (a
    README example collapsed so at step 1340). None when eta/T stays at most 2."""
    first_bad = next((t for t in range(1, steps + 1) if eta_at(cfg, t, steps) / cfg.temperature > 2), None)
    if first_bad is None:
        return None
    return (
        f"coupling: eta/temperature exceeds 2 from step {first_bad} (eta {eta_at(cfg, first_bad, steps):.3g}, "
        f"T {cfg.temperature:g}): the tanh pull then overshoots the mean and can destroy the center; "
        f"keep coupling.eta_max <= 2*coupling.temperature"
    )
