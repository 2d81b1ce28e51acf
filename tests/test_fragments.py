"""coupling.fragments=k: the model split into k contiguous groups of whole tensors, coupled in
turn, each every H = coupling.every steps and one every H/k steps (Streaming DiLoCo's
schedule). The weights each form reaches with fragments are checked against the plain
single-process reference in tests/test_public_api.py; here: the split, the schedule, the
collectives and bytes each step really sends, a resumed trainer, and the bad settings."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException
from trainer_runs import replica_weights, train_losses
from worlds import fail_at_batch, run_world

from replica_dist import ReplicaCoupling, loop
from replica_dist.config import ConfigError, CouplingConfig, load_config
from replica_dist.coupling import CouplingError, fragment_at, fragment_bounds
from replica_dist.data import ReplicaBatches
from replica_dist.guard import Guard

# ---- the split and the schedule


def test_the_split_is_contiguous_whole_tensors_covering_all_and_about_equal():
    rng = random.Random(3)
    for _ in range(300):
        sizes = [rng.choice([1, 10, 100, 1000, 5000]) for _ in range(rng.randint(1, 12))]
        k = rng.randint(1, len(sizes))
        bounds = fragment_bounds(sizes, k)
        assert len(bounds) == k
        assert bounds[0][0] == 0 and bounds[-1][1] == len(sizes)
        assert all(first < end for first, end in bounds)  # none empty
        assert all(bounds[g][1] == bounds[g + 1][0] for g in range(k - 1))  # contiguous
        # Each group ends at the first tensor that reaches its share, so it overshoots the
        # share by less than one tensor.
        total = sum(sizes)
        for g, (first, end) in enumerate(bounds[:-1]):
            assert sum(sizes[:end]) < total * (g + 1) / k + max(sizes) or end == first + 1


def test_the_split_of_known_models():
    assert fragment_bounds([2048, 32, 320, 10], 1) == [(0, 4)]
    assert fragment_bounds([2048, 32, 320, 10], 2) == [(0, 1), (1, 4)]
    assert fragment_bounds([10, 10, 10, 10], 2) == [(0, 2), (2, 4)]
    assert fragment_bounds([1, 1, 1, 100], 2) == [(0, 3), (3, 4)]
    assert fragment_bounds([1, 1, 1, 100], 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(CouplingError, match="a model of 4 tensors splits into 1 to 4"):
        fragment_bounds([1, 1, 1, 100], 5)


@pytest.mark.parametrize(("every", "k"), [(1, 1), (4, 1), (4, 2), (4, 4), (6, 3), (12, 4)])
def test_each_fragment_couples_once_every_h_steps_one_every_h_over_k(every, k):
    cfg = CouplingConfig(name="tanh", every=every, fragments=k)
    schedule = {step: fragment_at(cfg, step) for step in range(1, 5 * every + 1)}
    coupled = [step for step, f in schedule.items() if f is not None]
    assert coupled == list(range(every // k, 5 * every + 1, every // k))
    for f in range(k):
        steps = [step for step, g in schedule.items() if g == f]
        assert steps == list(range((f + 1) * every // k, 5 * every + 1, every))
    assert all(fragment_at(CouplingConfig(name=name, every=every), 4) is None for name in ("none", "ddp"))


# ---- what each step sends, counted in a real world

MODEL_SIZES = [8 * 6, 8, 8 * 8, 8, 3 * 8, 3]  # three Linear layers' weights and biases
"""fragment_bounds(MODEL_SIZES, 3) == [(0, 2), (2, 3), (3, 6)]: 56, 64 and 35 weights."""
FRAGMENT_NUMELS = [56, 64, 35]


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    )


def _count_sends(rank: int, world_size: int, root: str) -> None:
    results = {}
    for form, compress in (("tanh", "none"), ("average", "none"), ("diloco", "none"), ("linear", "int8")):
        torch.manual_seed(rank)
        model = _model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, fused=True)
        coupling = ReplicaCoupling(
            model, optimizer, form, every=6, fragments=3, compress=compress, compress_chunk=16, eta=0.1
        )
        sent: dict[int, list[list]] = {}
        current = [0]  # the step under way
        originals = {name: getattr(tdist, name) for name in ("all_reduce", "all_gather")}

        def counting(name, original, sent, current):
            def wrapper(tensor, *args, **kwargs):
                numel = sum(t.numel() for t in tensor) if isinstance(tensor, list) else tensor.numel()
                sent.setdefault(current[0], []).append([name, numel])
                return original(tensor, *args, **kwargs)

            return wrapper

        for name, original in originals.items():
            setattr(tdist, name, counting(name, original, sent, current))
        bytes_per_step = []
        try:
            for step in range(1, 13):
                before, current[0] = coupling.bytes_sent, step
                coupling.begin_step()
                x = torch.randn(4, 6, generator=torch.Generator().manual_seed(100 * step + rank))
                loss = model(x).square().mean()
                optimizer.zero_grad()
                loss.backward()
                coupling.step(loss)
                bytes_per_step.append(coupling.bytes_sent - before)
        finally:
            for name, original in originals.items():
                setattr(tdist, name, original)
        results[f"{form}-{compress}"] = {"sent": sent, "bytes": bytes_per_step}
    Path(root, f"rank{rank}.json").write_text(json.dumps(results))


def test_every_tensor_is_exchanged_once_per_h_steps_and_the_bytes_are_the_closed_form(tmp_path):
    assert fragment_bounds(MODEL_SIZES, 3) == [(0, 2), (2, 3), (3, 6)]
    run_world(_count_sends, 2, str(tmp_path))
    table = 2 * Guard.WORD_LENGTH  # float32 entries: one row of words per replica
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for case, result in results.items():
            sent = {int(step): calls for step, calls in result["sent"].items()}
            compressed = case.endswith("int8")
            # Steps 2, 4, ..., 12 couple fragments 0, 1, 2, 0, 1, 2; the others send nothing.
            assert sorted(sent) == [2, 4, 6, 8, 10, 12], (case, sorted(sent))
            for step, calls in sent.items():
                numel = FRAGMENT_NUMELS[(step // 2 - 1) % 3]
                if compressed:  # the scales agreed on (MAX), the payloads gathered, the words summed
                    scales = math.ceil(numel / 16)
                    assert calls == [["all_reduce", scales], ["all_gather", 2 * numel], ["all_reduce", table]]
                    expected_bytes = numel + 4 * scales + 4 * table
                else:
                    assert calls == [["all_reduce", numel + table]], (case, step, calls)
                    expected_bytes = 4 * (numel + table)
                assert result["bytes"][step - 1] == expected_bytes, (case, step)
            # Every tensor exactly once in any H = 6 steps, and the whole model no more.
            for window in (range(1, 7), range(7, 13), range(4, 10)):
                exchanged = sorted(FRAGMENT_NUMELS[(s // 2 - 1) % 3] for s in window if s in sent)
                assert exchanged == sorted(FRAGMENT_NUMELS), (case, window)
            assert all(b == 0 for step, b in enumerate(result["bytes"], 1) if step % 2), case


# ---- the trainer resumes bit for bit

TRAINER = [
    "coupling=diloco",
    "coupling.every=4",
    "coupling.fragments=2",
    "dist.compress=bf16",
    "train.steps=14",
    "train.batch_size=16",
    "model.hidden=[32]",
    "log.every=5",
    "eval.every=7",
    "checkpoint.every=4",
]


def _trainer(rank: int, world_size: int, run_dir: str, fail_at_step: int | None = None) -> None:
    if fail_at_step:
        fail_at_batch(ReplicaBatches, fail_at_step)
    cfg, _ = load_config(TRAINER + [f"hydra.run.dir={run_dir}"])
    loop.train(cfg, Path(run_dir), torch.device("cpu"))


def test_the_trainer_with_fragments_and_compression_resumes_bit_for_bit(tmp_path):
    reference, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_world(_trainer, 2, str(reference))
    with pytest.raises((ProcessRaisedException, ProcessExitedException)):
        run_world(_trainer, 2, str(resumed), 10)
    assert (resumed / "checkpoints" / "step-00000008" / "manifest.json").exists()
    run_world(_trainer, 2, str(resumed))
    for got, expected in zip(replica_weights(resumed, 2), replica_weights(reference, 2)):
        for name in expected:
            assert torch.equal(got[name], expected[name]), name
    for replica in range(2):
        losses = train_losses(resumed, replica)
        assert losses == train_losses(reference, replica)
        assert [step for step, _ in losses] == [1, 5, 10, 14] and all(math.isfinite(v) for _, v in losses)


# ---- bad settings


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["coupling.fragments=0"], "coupling.fragments must be >= 1; got 0"),
        (
            ["coupling=tanh", "coupling.every=4", "coupling.fragments=3"],
            "coupling.fragments must divide coupling.every (4)",
        ),
        (
            ["coupling=none", "coupling.fragments=2"],
            "coupling.fragments is only for coupling.name=tanh, linear, average or diloco; got none",
        ),
        (
            ["coupling=average", "coupling.every=4", "coupling.fragments=2", "dist.compress=int8"]
            + ["dist.error_feedback=true"],
            "dist.error_feedback does not combine with coupling.fragments > 1 yet",
        ),
    ],
)
def test_a_bad_fragments_setting_is_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as caught:
        load_config(overrides)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_more_fragments_than_tensors_is_refused_naming_the_key():
    """Before any collective: the trainer's workers refuse it alike, with the key."""
    cfg, _ = load_config(["coupling=average", "coupling.every=8", "coupling.fragments=8"])
    model = torch.nn.Linear(4, 2)  # two tensors
    with pytest.raises(ConfigError) as caught:
        ReplicaCoupling.from_config(cfg, None, model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert str(caught.value) == (
        "coupling.fragments must be at most the model's number of tensors (2: parameters and floating "
        "buffers; a fragment holds whole tensors); got 8"
    )
