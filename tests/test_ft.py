"""Live fault tolerance (ft.enabled): its config, the reference of a step with missing
replicas, the faults a replica reports, and (slow tier) real replica jobs under torchft with a
replica killed and restarted by its own torchrun agent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_runs import REPO, scalar

from replica_dist.config import ConfigError, load_config
from replica_dist.reference import (
    Membership,
    membership_weights,
    participants_means,
    participants_pulls,
    reference_weights,
)


def _load(tmp_path: Path, *overrides: str):
    cfg, _ = load_config([f"hydra.run.dir={tmp_path / 'run'}", *overrides])
    return cfg


# ---- the config


def test_ft_is_off_by_default_and_its_quorum_is_a_majority_of_the_replicas(tmp_path):
    cfg = _load(tmp_path)
    assert cfg.ft.enabled is False
    assert [_load(tmp_path, f"ft.replicas={n}").ft.quorum for n in (1, 2, 3, 4, 5)] == [1, 2, 2, 3, 3]
    assert _load(tmp_path, "ft.replicas=5", "ft.min_replicas=1").ft.quorum == 1


def test_the_lighthouse_comes_from_the_key_or_from_torchft_s_environment_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHFT_LIGHTHOUSE", raising=False)
    with pytest.raises(ConfigError, match=r"^ft.lighthouse must be set \(or the TORCHFT_LIGHTHOUSE"):
        _load(tmp_path, "ft.enabled=true")
    assert _load(tmp_path, "ft.enabled=true", "ft.lighthouse=http://h:1").ft.lighthouse == "http://h:1"
    monkeypatch.setenv("TORCHFT_LIGHTHOUSE", "http://from-env:29510")
    assert _load(tmp_path, "ft.enabled=true").ft.lighthouse == "http://from-env:29510"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["ft.replicas=0"], "ft.replicas must be >= 1; got 0"),
        (["ft.replicas=3", "ft.replica_id=3"], "ft.replica_id must be in [0, ft.replicas=3); got 3"),
        (["ft.replicas=3", "ft.min_replicas=4"], "ft.min_replicas must be in [1, ft.replicas=3]; got 4"),
        (["ft.timeout_s=0"], "ft.timeout_s must be > 0; got 0.0"),
        (["ft.timeout_s=60"], "ft.quorum_timeout_s must be > ft.timeout_s=60.0; got 60.0"),
        (["coupling=diloco"], "coupling.name=diloco is not available with ft.enabled yet"),
        (["coupling=none"], "coupling.name=none is not available with ft.enabled yet"),
        (["parallel.dp=2"], "parallel.dp=2 is not available with ft.enabled yet"),
        (["dist.compress=int8"], "dist.compress=int8 is not available with ft.enabled yet"),
    ],
)
def test_a_bad_or_not_yet_supported_ft_setting_is_one_error_naming_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, "ft.enabled=true", "ft.lighthouse=http://h:1", *overrides)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_the_trainer_refuses_a_form_without_ft_rules_in_one_line_with_exit_status_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "replica_dist.train", f"hydra.run.dir={tmp_path}", "ft.enabled=true"]
        + ["ft.lighthouse=http://h:1", "coupling=diloco"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "replica_dist: error: coupling.name=diloco is not available with ft.enabled yet"
    )


def test_a_run_saved_before_the_ft_group_existed_resumes_under_its_defaults(tmp_path):
    import dataclasses

    from replica_dist.checkpoint import config_hash
    from replica_dist.config import may_change_on_resume
    from replica_dist.run_state import config_changes, resolved_config, run_hash

    cfg = _load(tmp_path)
    saved = resolved_config(cfg)
    del saved["ft"]  # config.yaml as the trainer wrote it before ft.*
    changes = config_changes(saved, cfg)
    assert {key for key, _, _ in changes} == {f"ft.{f.name}" for f in dataclasses.fields(cfg.ft)}
    assert all(may_change_on_resume(key) for key, _, _ in changes)
    before_ft = dataclasses.asdict(cfg)
    del before_ft["ft"], before_ft["parallel"]["shard"]  # parallel.shard came with the same batch
    assert run_hash(cfg) == config_hash(before_ft)  # its checkpoints' manifests still match


# ---- the reference of a step with missing replicas


def test_each_replica_is_pulled_toward_the_mean_of_its_own_participants_only():
    before = [[torch.tensor([0.0, 1.0])], [torch.tensor([3.0, 1.0])], [torch.tensor([9.0, 4.0])]]
    members = {0: (0, 2), 2: (0, 2), 1: ()}  # replica 1's exchange failed
    eta = 0.5
    linear = participants_pulls("linear", before, members, eta, 1.0)
    assert linear.keys() == {0, 2}  # no pull for replica 1
    torch.testing.assert_close(linear[0][0], torch.tensor([0.5 * 4.5, 0.5 * 1.5]), rtol=0, atol=0)
    torch.testing.assert_close(linear[2][0], torch.tensor([-0.5 * 4.5, -0.5 * 1.5]), rtol=0, atol=0)
    tanh = participants_pulls("tanh", before, members, eta, 2.0)
    expected = torch.tensor(
        [0.5 * torch.tanh(torch.tensor(4.5 / 2)).item(), 0.5 * torch.tanh(torch.tensor(0.75)).item()]
    )
    torch.testing.assert_close(tanh[0][0], expected)
    everyone = participants_pulls("linear", before, {r: (0, 1, 2) for r in range(3)}, 1.0, 1.0)
    torch.testing.assert_close(everyone[1][0], torch.tensor([4.0 - 3.0, 2.0 - 1.0]))  # to the mean (4, 2)


def test_average_sets_each_replica_to_the_mean_of_its_own_participants():
    weights = [[torch.tensor([0.0, 6.0])], [torch.tensor([3.0, 3.0])], [torch.tensor([9.0, 0.0])]]
    means = participants_means(weights, {0: (0, 2), 1: (), 2: (0, 1, 2)})
    assert means.keys() == {0, 2}  # replica 1's exchange failed: it keeps its own weights
    torch.testing.assert_close(means[0][0], torch.tensor([4.5, 3.0]), rtol=0, atol=0)
    torch.testing.assert_close(means[2][0], torch.tensor([4.0, 3.0]), rtol=0, atol=0)


SMALL = ["train.steps=12", "train.batch_size=16", "model.hidden=[16]", "seed=3"]


def _assert_same(actual: list[dict], expected: list[dict], atol: float = 0.0) -> None:
    for r, (a, e) in enumerate(zip(actual, expected)):
        assert a.keys() == e.keys()
        for name in e:
            torch.testing.assert_close(
                a[name], e[name], rtol=0, atol=atol, msg=lambda m, r=r, n=name: f"replica {r} {n}: {m}"
            )


@pytest.mark.parametrize("form", ["tanh", "linear", "average"])
def test_a_schedule_in_which_every_replica_always_takes_part_is_the_plain_reference(tmp_path, form):
    strength = [] if form == "average" else ["coupling.eta=0.1"]
    cfg = _load(tmp_path, *SMALL, f"coupling={form}", *strength, "coupling.every=2")
    everyone = Membership({s: {r: (0, 1, 2) for r in range(3)} for s in range(1, 13)})
    _assert_same(membership_weights(cfg, 3, everyone), reference_weights(cfg, 3), atol=1e-7)


def test_replicas_whose_exchanges_all_failed_train_as_uncoupled_ones(tmp_path):
    cfg = _load(tmp_path, *SMALL, "coupling=tanh", "coupling.eta=0.3")
    alone = Membership({s: {r: () for r in range(3)} for s in range(1, 13)})
    uncoupled = reference_weights(_load(tmp_path, *SMALL, "coupling=none"), 3)
    _assert_same(membership_weights(cfg, 3, alone), uncoupled)


def test_a_healed_replica_holds_its_source_s_state_from_before_that_step(tmp_path):
    """Replica 1 is down from step 5 and heals from replica 0 before step 12, the last step,
    which it does not take: it ends with replica 0's weights after 11 steps."""
    cfg = _load(tmp_path, *SMALL, "coupling=linear", "coupling.eta=0.2", "coupling.eta_growth=0")
    steps = {s: {0: (0, 1), 1: (0, 1)} for s in range(1, 5)}
    steps |= {s: {0: (0,)} for s in range(5, 13)}
    weights = membership_weights(cfg, 2, Membership(steps, heals={12: {1: 0}}))
    shorter = _load(
        tmp_path, *SMALL[1:], "train.steps=11", "coupling=linear", "coupling.eta=0.2", "coupling.eta_growth=0"
    )
    eleven = membership_weights(shorter, 2, Membership({s: steps[s] for s in range(1, 12)}))
    _assert_same([weights[1]], [eleven[0]])


# ---- the faults a replica reports


def test_a_replica_reports_each_peer_it_lost_with_the_seconds_to_detect_and_to_rejoin():
    def step(s, participants, committed=True, started=None, end=None):
        return {
            "step": s,
            "coupled": True,
            "participants": participants,
            "committed": committed,
            "started": float(s) if started is None else started,
            "time": float(s) + 0.5 if end is None else end,
        }

    events = [
        step(1, [0, 1, 2]),
        step(2, [], committed=False, started=2.0, end=7.0),  # replica 1 died in this exchange
        step(3, [0, 2], started=7.5, end=12.0),  # the quorum waited for its heartbeat to expire
        step(4, [0, 2]),
        step(5, [0, 1, 2], started=20.0, end=30.0),  # healed and back
        step(6, [0, 1]),  # replica 2 gone, never back
        {**step(7, []), "coupled": False},  # a step that exchanges nothing
        step(8, [0]),  # replica 1 missed the exchange of step 8, the first after step 6
    ]
    from replica_dist.ft_loop import faults_seen

    assert faults_seen(events) == [
        {"replica": 1, "step": 2, "seconds_to_detect": 10.0, "seconds_to_rejoin": 18.0},
        {"replica": 2, "step": 6, "seconds_to_detect": 0.5, "seconds_to_rejoin": None},
        {"replica": 1, "step": 8, "seconds_to_detect": 0.5, "seconds_to_rejoin": None},
    ]


def test_the_scripted_fault_is_read_from_its_one_variable(monkeypatch):
    from replica_dist.ft_loop import FAULT_ENV, ScriptedFault, scripted_fault

    monkeypatch.delenv(FAULT_ENV, raising=False)
    assert scripted_fault() == ScriptedFault()  # none
    monkeypatch.setenv(FAULT_ENV, "kill=1@20,moment=exchange,step_s=0.1")
    assert scripted_fault() == ScriptedFault(
        kill_replica=1, kill_step=20, moment="exchange", step_seconds=0.1
    )
    monkeypatch.setenv(FAULT_ENV, "kill=1@20,moment=later")
    with pytest.raises(
        ConfigError, match=r"unknown part 'moment=later'; expected kill=R@S, moment=quorum\|exchange"
    ):
        scripted_fault()


# ---- real replica jobs under torchft: one killed, restarted by its agent, healed

FT_RUN = [
    "train.steps=300",
    "train.dtype=float64",
    "train.batch_size=16",
    "model.hidden=[32]",
    "seed=3",
    "log.every=100",
    "ft.enabled=true",
    "ft.replicas=3",
    "ft.timeout_s=5",
    "ft.quorum_timeout_s=120",
]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "form, moment", [("tanh", "quorum"), ("linear", "exchange"), ("average", "exchange")]
)
def test_a_killed_replica_heals_while_the_others_go_on_and_all_match_the_reference(tmp_path, form, moment):
    """Three replica jobs (torchrun, one worker each, --max-restarts=1) meet through a
    Lighthouse; replica 1's worker SIGKILLs itself at step 20 (ft_loop.FAULT_ENV), before its
    quorum or after it (the others' exchange of step 20 then fails), its agent restarts it,
    and it heals from a live replica. The survivors' workers never change, every job ends with
    exit status 0, and every replica's final weights equal the reference replaying the
    membership the replicas recorded."""
    from torchft.coordination import LighthouseServer

    from replica_dist.ft_loop import FAULT_ENV, read_record, recorded_membership

    # A lost replica's heartbeat expires in 1.5 s, well before its job has restarted it (a new
    # interpreter importing torch): the survivors then take steps without it.
    lighthouse = LighthouseServer(
        bind="[::]:0", min_replicas=2, join_timeout_ms=10000, heartbeat_timeout_ms=1500
    )
    run_dir = tmp_path / "run"
    overrides = FT_RUN + [
        f"hydra.run.dir={run_dir}",
        f"coupling={form}",
        "coupling.every=4" if form == "average" else "coupling.eta=0.05",
        f"ft.lighthouse={lighthouse.address()}",
    ]
    env = os.environ | {FAULT_ENV: f"kill=1@20,moment={moment},step_s=0.1", "RUST_LOG": "warn"}
    logs = [tmp_path / f"job{r}.log" for r in range(3)]
    jobs = []
    try:
        for r in range(3):
            with open(logs[r], "w") as log:  # a file, not a pipe: torchft logs every quorum
                command = [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    "--nproc_per_node=1",
                ]
                command += ["--max-restarts=1", "-m", "replica_dist.train", *overrides, f"ft.replica_id={r}"]
                jobs.append(
                    subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
                )
        for job in jobs:
            job.wait(timeout=400)
    finally:
        for job in jobs:
            job.kill()
        lighthouse.shutdown()
    for r, job in enumerate(jobs):
        assert job.returncode == 0, f"replica {r}:\n{logs[r].read_text()[-3000:]}"

    records = [read_record(run_dir / "ft" / f"replica_{r}.jsonl") for r in range(3)]
    starts = [[e for e in record if e["event"] == "start"] for record in records]
    assert [len(s) for s in starts] == [1, 2, 1]  # the survivors' one worker each; replica 1's two
    assert starts[1][0]["pid"] != starts[1][1]["pid"]
    # Its restarted worker healed once, from a survivor (a late start may have healed it before).
    heals = [e for e in records[1] if e["event"] == "heal" and e["time"] > starts[1][1]["time"]]
    assert len(heals) == 1 and heals[0]["step"] >= 20 and heals[0]["donor"] in (0, 2)
    for survivor in (0, 2):  # every step from its first (a late starter heals first) to the last
        steps = [e["step"] for e in records[survivor] if e["event"] == "step"]
        assert steps == list(range(steps[0], 301)) and steps[0] < 20
    survivor_steps = [e for e in records[0] if e["event"] == "step"]
    assert any(e["participants"] == [0, 2] for e in survivor_steps)  # steps without replica 1
    (step_20,) = [e for e in survivor_steps if e["step"] == 20]
    assert step_20["committed"] is (moment == "quorum")  # killed in the exchange: it failed
    assert survivor_steps[-1]["participants"] == [0, 1, 2]  # back, coupled again

    participants = scalar(run_dir / "tb" / "replica_0", "ft/participants")
    assert participants[300] == 3.0 and 2.0 in participants.values()

    membership = recorded_membership(run_dir, 3)
    cfg, _ = load_config([*overrides, "ft.replica_id=0"])
    expected = membership_weights(cfg, 3, membership)
    actual = [torch.load(run_dir / "weights" / f"replica_{r}.pt") for r in range(3)]
    _assert_same(actual, expected, atol=1e-6)
    summary = __import__("json").loads((run_dir / "ft" / "replica_0.json").read_text())
    (fault,) = summary["faults"]
    assert fault["replica"] == 1 and fault["step"] == 20 and fault["seconds_to_rejoin"] is not None


# ---- the exchange through torchft, two replicas in threads (as torchft's own tests run them)


def test_the_exchange_averages_over_the_participants_and_falls_back_to_its_own_weights_when_one_dies():
    from concurrent.futures import ThreadPoolExecutor

    from torch.distributed import TCPStore
    from torchft.coordination import LighthouseServer

    from replica_dist.config import FtConfig
    from replica_dist.ft import FtExchange, FtMesh, build_manager

    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=2)
    weights = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([5.0, 0.0, -1.0])]
    words = [torch.tensor([0.0, 0.0, 1.0, 2.0, 0.0]), torch.tensor([7.0, 1.0, 0.0, 3.0, 7.0])]

    def replica(r: int) -> list:
        store = TCPStore("localhost", 0, is_master=True, wait_for_workers=False)
        ft = FtConfig(enabled=True, lighthouse=lighthouse.address(), replica_id=r, replicas=3, timeout_s=2)
        mesh = FtMesh(replica_id=r, replica_count=3)
        mesh.manager = build_manager(ft, dict, lambda state: None, "localhost", store.port)
        exchange = FtExchange(3, len(words[r]), torch.float32, torch.device("cpu"), mesh)
        seen = []
        try:
            for step in (1, 2):
                mesh.manager.start_quorum()
                if step == 2 and r == 1:
                    break  # replica 1 dies after the quorum, before its exchange
                exchange.flat.copy_(weights[r])
                exchange.start(words[r])
                mesh.commit()
                mean, table = exchange.wait(divide=True)
                seen.append((mesh.committed, list(mesh.participants), mean.clone(), table.clone()))
        finally:
            mesh.manager.shutdown(wait=False)
        return seen

    try:
        with ThreadPoolExecutor(2) as pool:
            first, second = pool.map(replica, (0, 1))
    finally:
        lighthouse.shutdown()
    mean = (weights[0] + weights[1]) / 2
    for seen in (first, second):
        committed, participants, got, table = seen[0]
        assert committed and participants == [0, 1]
        torch.testing.assert_close(got, mean, rtol=0, atol=0)
        # One row per replica id: the presence flag, then the word exactly; replica 2's is zero.
        expected = torch.stack(
            [torch.cat([torch.ones(1), words[0]]), torch.cat([torch.ones(1), words[1]]), torch.zeros(6)]
        )
        torch.testing.assert_close(table, expected[:, 1:], rtol=0, atol=0)
    committed, participants, got, table = first[1]
    assert not committed and participants == []
    torch.testing.assert_close(got, weights[0], rtol=0, atol=0)  # its own: a mean of one, no pull
    torch.testing.assert_close(table[0], words[0], rtol=0, atol=0)
    assert not table[1:].any()
