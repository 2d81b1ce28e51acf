"""Sharded replicas (parallel.shard=2): 4 gloo processes, 2 replicas x 2 shards, against the
unsharded trainer's 2-replica run (2 processes) of the same config, which the other tests hold
to the single-process reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException
from trainer_runs import assert_refused_launch, events, replica_weights, train_losses
from worlds import COLLECTIVE_TIMEOUT_S, fail_at_batch, run_world

from replica_dist import dist, loop
from replica_dist.config import ConfigError, load_config
from replica_dist.data import ReplicaBatches
from replica_dist.guard import Guard

COMMON = [
    "train.steps=30",
    "train.batch_size=16",
    "model.hidden=[33]",  # 33 rows over 2 shards: 17 and 16, an uneven split
    "log.every=7",
    "eval.every=10",
    "checkpoint.every=10",
    "seed=3",
    f"dist.timeout_s={COLLECTIVE_TIMEOUT_S}",
]

CASES = {
    "tanh": ["coupling=tanh", "coupling.eta=0.05", "optim.momentum=0.9"],
    "linear_sync": ["coupling=linear", "coupling.eta=0.2", "coupling.every=2", "dist.overlap=false"],
    "average": ["coupling=average", "coupling.every=4"],
    "none": ["coupling=none"],
    "ddp": ["coupling=ddp", "optim.momentum=0.9"],
    # HSDP takes the first replica's BatchNorm statistics at each step, as DDP broadcasts them.
    "ddp_cnn_batchnorm": ["coupling=ddp", "model=cnn", "model.hidden=[4,5]", "model.batch_norm=true"],
    # float64: in float32 Adam's division by sqrt(v) amplifies the one-ulp differences between
    # the fused optimizer (unsharded) and the foreach one (sharded: DTensors) to 5e-6.
    "tanh_adam_accumulated_same_init": [
        "coupling=tanh",
        "optim=adam",
        "optim.lr=0.01",
        "train.grad_accum=2",
        "init=same",
        "train.dtype=float64",
    ],
    # BatchNorm's statistics stay whole on every rank of a replica and are coupled as unsharded.
    "tanh_cnn_batchnorm": [
        "coupling=tanh",
        "coupling.eta=0.1",
        "model=cnn",
        "model.hidden=[4,5]",
        "model.batch_norm=true",
    ],
}


def config(case: str, run_dir: Path, shard: int):
    cfg, _ = load_config(COMMON + CASES[case] + [f"parallel.shard={shard}", f"hydra.run.dir={run_dir}"])
    return cfg


def _train_cases(rank: int, world_size: int, root: str, shard: int) -> None:
    for case in CASES:
        loop.train(config(case, Path(root) / case, shard), Path(root) / case, torch.device("cpu"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    run_world(_train_cases, 2, str(root / "unsharded"), 1)
    run_world(_train_cases, 4, str(root / "sharded"), 2)
    return root / "unsharded", root / "sharded"


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_every_replica_equals_the_unsharded_run(runs, case):
    unsharded, sharded = runs
    for got, expected in zip(replica_weights(sharded / case, 2), replica_weights(unsharded / case, 2)):
        assert got.keys() == expected.keys()
        for name in expected:
            assert not isinstance(got[name], torch.distributed.tensor.DTensor)  # a plain file
            torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0, msg=f"{case} {name}")
    center = torch.load(sharded / case / "weights" / "center.pt")
    for name, value in torch.load(unsharded / case / "weights" / "center.pt").items():
        torch.testing.assert_close(center[name], value, atol=1e-6, rtol=0)
    summary = json.loads((sharded / case / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["shard"] == 2 and summary["world_size"] == 2


# What each rank sends differs by design (1/S of the weights); everything else is the same run.
PER_RANK_TAGS = {"comm/bytes_sent"}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_diagnostics_equal_the_unsharded_run(runs, case):
    """Per-layer rates, distances, overlaps, the center's and the ensemble's evaluation: every
    scalar the unsharded run logs, at every step it logs it."""
    unsharded, sharded = runs
    for log in ("replica_0", "replica_1", "center", "ensemble"):
        expected, got = events(unsharded / case / "tb" / log), events(sharded / case / "tb" / log)
        tags = set(expected.Tags()["scalars"]) - PER_RANK_TAGS
        assert tags and tags == set(got.Tags()["scalars"]) - PER_RANK_TAGS, log
        for tag in tags:
            want = [(e.step, e.value) for e in expected.Scalars(tag)]
            have = [(e.step, e.value) for e in got.Scalars(tag)]
            assert [s for s, _ in have] == [s for s, _ in want], (log, tag)
            for (step, a), (_, b) in zip(have, want):
                assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6), (log, tag, step, a, b)


def _rank_0_numel(cfg, shards: int, shard: int = 0) -> int:
    """The weights of one shard (rank 0's by default) of a replica of the MLP on digits: that
    one of torch.chunk's parts of each parameter's rows, as FSDP2 splits them (with one shard,
    the whole replica)."""
    widths = [64, *cfg.model.hidden, 10]  # digits: 8x8 images, 10 classes
    shapes = [s for a, b in zip(widths, widths[1:]) for s in ((b, a), (b,))]
    return sum(torch.empty(shape).chunk(shards)[shard].numel() for shape in shapes)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["tanh", "average"])
def test_a_rank_sends_its_shard(runs, case):
    cfg = config(case, Path("unused"), 2)
    table = 2 * Guard.WORD_LENGTH  # the guard's words ride along, one row per replica
    unsharded, sharded = (
        json.loads((run / case / "summary.json").read_text())["comm"]["bytes_sent_per_rank"] for run in runs
    )
    assert unsharded > 0
    assert sharded * (_rank_0_numel(cfg, 1) + table) == unsharded * (_rank_0_numel(cfg, 2) + table)


def _crash_at_step_13(rank: int, world_size: int, run_dir: str) -> None:
    fail_at_batch(ReplicaBatches, 13)
    loop.train(config("tanh", Path(run_dir), 2), Path(run_dir), torch.device("cpu"))


def _resume(rank: int, world_size: int, run_dir: str) -> None:
    loop.train(config("tanh", Path(run_dir), 2), Path(run_dir), torch.device("cpu"))


@pytest.mark.slow
def test_a_crashed_sharded_run_resumes_bit_for_bit(runs, tmp_path):
    _, sharded = runs
    with pytest.raises((ProcessRaisedException, ProcessExitedException)):
        run_world(_crash_at_step_13, 4, str(tmp_path))
    assert (tmp_path / "checkpoints" / "step-00000010" / "manifest.json").exists()
    assert not (tmp_path / "summary.json").exists()
    run_world(_resume, 4, str(tmp_path))
    for got, expected in zip(replica_weights(tmp_path, 2), replica_weights(sharded / "tanh", 2)):
        for name in expected:
            assert torch.equal(got[name], expected[name]), name
    for replica in range(2):
        assert train_losses(tmp_path, replica) == train_losses(sharded / "tanh", replica)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["parallel.dp=2"], r"parallel.dp=2 and parallel.shard=2 cannot be combined"),
        (["coupling=diloco"], r"parallel.shard=2 is not available for coupling.name=diloco"),
        (["dist.compress=int8"], r"dist.compress=int8 is not available with parallel.shard=2"),
        (
            ["coupling.every=2", "coupling.fragments=2", "checkpoint.remap=true"],
            r"coupling.fragments=2, checkpoint.remap are not available with parallel.shard=2",
        ),
        (["coupling.via_optimizer=true"], r"coupling.via_optimizer is not available with parallel.shard=2"),
        (["optim.clip_norm=1"], r"optim.clip_norm=1.0 is not available with parallel.shard=2"),
        (
            ["coupling._target_=tests.test_own_form.Clamped"],  # a PullForm: its rule need not be elementwise
            r"parallel.shard=2 is not available for coupling._target_=tests.test_own_form.Clamped \(its pull",
        ),
    ],
)
def test_what_does_not_work_sharded_is_refused_naming_the_keys(overrides, named):
    with pytest.raises(ConfigError, match=named) as refused:
        load_config(["parallel.shard=2", *overrides])
    assert "\n" not in str(refused.value)


def test_parallel_shard_must_be_positive():
    with pytest.raises(ConfigError, match=r"parallel.shard must be >= 1; got 0"):
        load_config(["parallel.shard=0"])


def _mesh_of_a_world_of_3(rank: int, world_size: int) -> None:
    with pytest.raises(ConfigError, match=r"^parallel.shard=2 must divide the world size 3$"):
        dist.init_mesh(1, torch.device("cpu"), shard=2)


def test_a_world_not_divisible_by_the_shards_is_refused():
    run_world(_mesh_of_a_world_of_3, 3)


def _shard_tied_layers(rank: int, world_size: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from replica_dist.shard import shard_replica

    first, second = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    second.weight = first.weight  # tied: two FSDP units cannot both own it
    with pytest.raises(
        ConfigError,
        match=r"^parallel.shard=2: 0.weight and 2.weight are one parameter in two of the model.s children",
    ) as refused:
        shard_replica(torch.nn.Sequential(first, torch.nn.Tanh(), second), init_device_mesh("cpu", (2,)))
    assert "\n" not in str(refused.value)


def test_a_model_the_policy_cannot_shard_is_refused_naming_the_key():
    run_world(_shard_tied_layers, 2)


@pytest.mark.slow
def test_a_launch_whose_world_the_shards_do_not_divide_is_one_line(tmp_path):
    assert_refused_launch(["parallel.shard=4"], r"parallel\.shard=4 must divide the world size 2$", tmp_path)


GUARDED = COMMON + ["coupling=tanh", "coupling.eta=0.05", "coupling.every=3", "optim.momentum=0.9"]
NAN_STEP = 11
"""A step that neither couples (every 3), logs (every 7) nor saves (every 10): the replica's
shards agree on it with no exchange of the coupling's."""


def _poison_one_gradient(rank: int, world_size: int, run_dir: str, shard: int, policy: str) -> None:
    """A NaN in the last gradient element of replica 0's last rank (with 2 shards: of its second
    shard only) at step NAN_STEP, after the backward pass."""
    from torch.distributed.tensor import DTensor

    from replica_dist import recipe

    original, calls = recipe.clip_, [0]

    def clip_then_poison(parameters, max_norm):
        parameters = list(parameters)
        calls[0] += 1
        if calls[0] == NAN_STEP and rank == shard - 1:
            grad = parameters[0].grad
            (grad.to_local() if isinstance(grad, DTensor) else grad).view(-1)[-1] = float("nan")
        original(parameters, max_norm)

    recipe.clip_ = clip_then_poison
    cfg, _ = load_config(
        GUARDED + [f"parallel.shard={shard}", f"guard.nonfinite={policy}", f"hydra.run.dir={run_dir}"]
    )
    loop.train(cfg, Path(run_dir), torch.device("cpu"))


@pytest.mark.slow
def test_a_nan_in_one_shard_skips_the_whole_replica(tmp_path):
    """Replica 0 skips step 11 on both of its ranks, as the unsharded replica 0 does."""
    run_world(_poison_one_gradient, 2, str(tmp_path / "unsharded"), 1, "skip")
    run_world(_poison_one_gradient, 4, str(tmp_path / "sharded"), 2, "skip")
    for got, expected in zip(
        replica_weights(tmp_path / "sharded", 2), replica_weights(tmp_path / "unsharded", 2)
    ):
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0)
    skipped = [
        e.value for e in events(tmp_path / "sharded" / "tb" / "replica_0").Scalars("guard/skipped_steps")
    ]
    assert skipped[-1] == 1


@pytest.mark.slow
def test_a_nan_in_one_shard_stops_every_rank(tmp_path):
    with pytest.raises(ProcessRaisedException, match=f"non-finite gradient in replica 0 at step {NAN_STEP}"):
        run_world(_poison_one_gradient, 4, str(tmp_path), 2, "stop")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged" and f"step {NAN_STEP}" in summary["reason"]


OWN_LOOP = ["train.steps=16", "train.batch_size=16", "model.hidden=[33]", "optim.momentum=0.9", "seed=5"]
OWN_CASES = {  # a constant eta (eta_growth=0), as ReplicaCoupling's by default
    "tanh": ["coupling=tanh", "coupling.eta=0.05", "coupling.eta_growth=0"],
    "linear_every_2": ["coupling=linear", "coupling.eta=0.2", "coupling.eta_growth=0", "coupling.every=2"],
    "average_every_4": ["coupling=average", "coupling.every=4"],
}


def _own_loop_config(case: str):
    cfg, _ = load_config(OWN_LOOP + OWN_CASES[case])
    return cfg


def _own_sharded_loop(rank: int, world_size: int, root: str) -> None:
    """A user's plain loop around ReplicaCoupling, the model sharded by shard_replica over a
    (2 replicas, 2 shards) mesh; each replica's whole weights saved by its first rank."""
    from torch.distributed.device_mesh import init_device_mesh

    from replica_dist import ReplicaCoupling
    from replica_dist.data import load_dataset, replica_indices
    from replica_dist.evaluate import LOSSES
    from replica_dist.loop import build_optimizer, replica_seed
    from replica_dist.model import build_model
    from replica_dist.shard import full_state_dict, shard_replica

    device_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replica", "shard"))
    replica = device_mesh.get_local_rank("replica")
    for case in OWN_CASES:
        cfg = _own_loop_config(case)
        data = load_dataset(cfg.data, cfg.seed, torch.float32)
        whole = build_model(cfg.model, data.input_shape, data.num_outputs, replica_seed(cfg.seed, replica))
        model = shard_replica(whole, device_mesh["shard"])
        optimizer = build_optimizer(cfg.optim, model.parameters(), fused=False)
        mine = replica_indices(cfg.data, len(data.x_train), cfg.seed, replica, 2)
        batches = ReplicaBatches(
            data.x_train[mine], data.y_train[mine], cfg.train.batch_size, cfg.seed, replica
        )
        c = cfg.coupling
        settings = {"every": c.every} | ({"eta": c.eta} if c.name != "average" else {})
        coupling = ReplicaCoupling(model, optimizer, c.name, device_mesh=device_mesh, **settings)
        for _ in range(cfg.train.steps):
            coupling.begin_step()
            x, y = batches.next()
            loss = LOSSES[data.loss](model(x), y)
            optimizer.zero_grad()
            loss.backward()
            coupling.step(loss)
        coupling.finish()
        # What this rank holds: its shard of the parameters, of their gradients and momentum.
        held = [(p, p.grad, optimizer.state[p]["momentum_buffer"]) for p in model.parameters()]
        counts = [sum(t.to_local().numel() for t in kind) for kind in zip(*held)]
        (Path(root) / f"{case}_rank{rank}_holds.json").write_text(json.dumps(counts))
        weights = full_state_dict(model)
        if device_mesh.get_local_rank("shard") == 0:
            torch.save(weights, Path(root) / f"{case}_{replica}.pt")


@pytest.mark.slow
def test_a_sharded_model_in_a_users_loop_equals_the_reference_and_each_rank_holds_its_shard(tmp_path):
    from replica_dist.reference import reference_weights

    run_world(_own_sharded_loop, 4, str(tmp_path))
    for case in OWN_CASES:
        expected = reference_weights(_own_loop_config(case), 2)
        for replica in range(2):
            got = torch.load(tmp_path / f"{case}_{replica}.pt")
            for name in expected[replica]:
                torch.testing.assert_close(got[name], expected[replica][name], atol=1e-6, rtol=0)
        for rank in range(4):  # rank = replica * 2 + shard
            shard = _rank_0_numel(_own_loop_config(case), 2, rank % 2)
            assert json.loads((tmp_path / f"{case}_rank{rank}_holds.json").read_text()) == [shard] * 3


def _misused_with_a_sharded_model(rank: int, world_size: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from replica_dist import CouplingError, ReplicaCoupling
    from replica_dist.shard import shard_replica

    device_mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("replica", "shard"))
    model = shard_replica(
        torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2)), device_mesh["shard"]
    )
    plain = torch.nn.Linear(4, 2)
    from torch.distributed.fsdp import fully_shard

    partly = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))
    fully_shard(partly[0], mesh=device_mesh["shard"])  # the second layer and the root left whole
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    misuses = [
        (
            (partly, torch.optim.SGD(partly.parameters(), lr=0.1), "tanh"),
            {"eta": 0.1, "device_mesh": device_mesh},
            r"^device_mesh=: the model is sharded in part",
        ),
        ((model, optimizer, "tanh"), {"eta": 0.1}, r"^the model is sharded .*: pass device_mesh="),
        (
            (model, optimizer, "tanh"),
            {"eta": 0.1, "device_mesh": device_mesh, "compress": "int8"},
            r"^compress= is",
        ),
        (
            (model, optimizer, "diloco"),
            {"device_mesh": device_mesh},
            r"^device_mesh= is not available for form",
        ),
        (
            (plain, optimizer, "tanh"),
            {"eta": 0.1, "device_mesh": device_mesh},
            r"^device_mesh= is for a model",
        ),
        (
            (model, optimizer, "tanh"),
            {"eta": 0.1, "device_mesh": device_mesh["shard"]},
            r"dimensions \('replica'",
        ),
    ]
    for args, kwargs, message in misuses:
        with pytest.raises(CouplingError, match=message):
            ReplicaCoupling(*args, **kwargs)


def test_a_sharded_model_without_its_mesh_or_with_what_is_not_sharded_yet_is_refused():
    run_world(_misused_with_a_sharded_model, 2)


def test_a_run_saved_before_parallel_shard_existed_still_resumes(tmp_path):
    """config.yaml and checkpoints written before the key existed: parallel.shard=1 (what those
    runs did) is no refused change, and the run's hash is the one their manifests hold;
    parallel.shard=2 on such a run is still refused, and hashed."""
    import dataclasses

    from replica_dist.checkpoint import config_hash
    from replica_dist.run_state import _refused, config_changes, resolved_config, run_hash

    cfg, _ = load_config([f"hydra.run.dir={tmp_path}"])
    saved = resolved_config(cfg)
    del saved["parallel"]["shard"]  # config.yaml as the trainer wrote it before parallel.shard
    changes = config_changes(saved, cfg)
    assert changes == [("parallel.shard", "(absent)", 1)]
    assert not any(_refused(change) for change in changes)
    before = dataclasses.asdict(cfg)
    del before["ft"], before["parallel"]["shard"]
    assert run_hash(cfg) == config_hash(before)  # its checkpoints' manifests still match

    sharded, _ = load_config([f"hydra.run.dir={tmp_path}", "parallel.shard=2"])
    assert [_refused(change) for change in config_changes(saved, sharded)] == [True]
    assert run_hash(sharded) != config_hash(before)
