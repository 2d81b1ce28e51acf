"""Per-layer statistics against values computed by hand."""

import math

import pytest
import torch

from replica_dist.metrics import center_layer_stats, replica_layer_stats


def test_replica_layer_stats_by_hand():
    before = [torch.tensor([1.0, 2.0, 2.0])]  # |w| = 3
    after_optimizer = [torch.tensor([1.0, 2.0, 1.0])]  # grad part (0, 0, -1)
    after = [torch.tensor([1.0, 4.0, 1.0])]  # coupling part (0, 2, 0)
    center = [torch.tensor([1.0, 1.0, 5.0])]
    stats = replica_layer_stats(["fc1.weight"], before, after_optimizer, after, center)
    assert stats == pytest.approx(
        {
            "rate/fc1.weight": 1 / 3,  # |mean(0, 2, -1)|
            "update_ratio/fc1.weight": math.sqrt(5) / 3,
            "grad_step/fc1.weight": 1.0,
            "coupling_step/fc1.weight": 2.0,
            "dist_to_center/fc1.weight": 5.0,  # |(0, 3, -4)|
            "weight_norm/fc1.weight": math.sqrt(18),
        }
    )


def test_rate_is_the_absolute_value_of_a_signed_mean():
    before = [torch.zeros(4)]
    after = [torch.tensor([1.0, -1.0, 1.0, -1.0])]
    stats = replica_layer_stats(["w"], before, after, after, after)
    assert stats["rate/w"] == 0.0  # moves that cancel have rate 0...
    assert stats["grad_step/w"] == pytest.approx(2.0)  # ...but a norm of 2


def test_center_layer_stats_by_hand():
    stats = center_layer_stats(["b"], [torch.tensor([3.0, 4.0])], [torch.tensor([3.0, 6.0])])
    assert stats == pytest.approx({"rate/b": 1.0, "update_ratio/b": 2 / 5, "weight_norm/b": math.sqrt(45)})


def test_pairwise_overlap_from_the_center_equals_brute_force():
    from replica_dist.metrics import pairwise_overlaps, replica_overlaps, squared_norms

    generator = torch.Generator().manual_seed(0)
    replicas = [torch.randn(5, 3, generator=generator, dtype=torch.float64) + 1.0 for _ in range(4)]
    center = torch.stack(replicas).mean(0)
    table = torch.tensor([squared_norms([w]) for w in replicas], dtype=torch.float64)
    dots = [(a * b).sum() for i, a in enumerate(replicas) for j, b in enumerate(replicas) if i != j]
    expected = (sum(dots) / 12) / (table.sum() / 4)
    assert pairwise_overlaps(["w"], [center], table)["pairwise_overlap/w"] == pytest.approx(
        expected.item(), rel=1e-12
    )
    cosine = (replicas[0] * center).sum() / (replicas[0].norm() * center.norm())
    assert replica_overlaps(["w"], [replicas[0]], [center])["overlap/w"] == pytest.approx(
        cosine.item(), rel=1e-12
    )


def test_identical_replicas_overlap_fully_and_a_single_replica_has_no_pairs():
    from replica_dist.metrics import pairwise_overlaps, squared_norms

    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    table = torch.tensor([squared_norms([w])] * 3, dtype=torch.float64)
    assert pairwise_overlaps(["w"], [w], table)["pairwise_overlap/w"] == pytest.approx(1.0, rel=1e-12)
    assert pairwise_overlaps(["w"], [w], table[:1]) == {}
