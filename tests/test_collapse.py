"""What a run says about itself: a collapsed center, a jump of the loss, the time left."""

from __future__ import annotations

import re

from replica_dist.progress import Progress


def _evaluation(center: float, ensemble: float, metric: str = "test/accuracy") -> dict:
    return {"center": {metric: center}, "ensemble": {metric: ensemble}}


def test_the_readme_run_that_lost_its_center_says_so_in_the_line_and_the_summary():
    # coupling=tanh coupling.temperature=0.1: center 0.9777 at step 1340, loss 0.023 -> 2.61, center 0.1838.
    progress = Progress(2000, "tanh", 4, "classification", samples_per_step=64)
    progress.observe_loss(1, 2.30)
    progress.observe_loss(1340, 0.023)
    progress.observe_evaluation(1340, _evaluation(0.9777, 0.9805), final=False)
    assert progress.line(1340, 0.023, now=0.0) == (
        "step 1340/2000 | loss 0.0230 (mean of 4 replicas) | center acc 0.9777"
    )
    progress.observe_loss(1360, 2.61)
    jump = (
        "the minibatch loss jumped to 2.61 at step 1360 from 0.023 at step 1340: "
        "try a lower optim.lr or a weaker coupling"
    )
    assert progress.line(1360, 2.61, now=0.0) == (
        f"step 1360/2000 | loss 2.6100 (mean of 4 replicas) | center acc 0.9777 | warning: {jump}"
    )
    progress.observe_loss(2000, 2.40)
    progress.observe_evaluation(2000, _evaluation(0.1838, 0.95), final=True)
    collapse = (
        "center accuracy 0.1838 is 77 points below the ensemble's 0.9500 (it was 0.9777 at step 1340): "
        "the coupling may be too strong (a lower coupling.eta or a higher coupling.temperature)"
    )
    still = jump.replace("2.61 at step 1360", "2.4 at step 2000")
    assert progress.line(2000, 2.40, now=0.0).endswith(
        f"center acc 0.1838 | warning: {still} | warning: {collapse}"
    )
    assert progress.warnings() == [jump, collapse]  # the first jump, and the final center


def test_minibatch_noise_around_a_small_loss_is_no_jump():
    progress = Progress(100, "tanh", 2, "classification", samples_per_step=64)
    for step, loss in [(1, 2.3), (20, 0.001), (40, 0.2), (60, 0.05)]:  # 200x the best, < 10% of 2.3
        progress.observe_loss(step, loss)
        assert progress.loss_warning is None
    progress.observe_loss(80, float("nan"))  # the guard's business
    assert progress.warnings() == []


def test_a_center_that_is_still_forming_is_no_warning_until_the_end():
    progress = Progress(100, "linear", 2, "classification", samples_per_step=64)
    progress.observe_evaluation(50, _evaluation(0.30, 0.90), final=False)  # replicas still far apart
    assert progress.center_warning is None
    progress.observe_evaluation(100, _evaluation(0.35, 0.90), final=True)
    assert progress.warnings() == ["center accuracy 0.3500 is 55 points below the ensemble's 0.9000"]


def test_a_center_within_ten_points_of_the_ensemble_is_fine():
    progress = Progress(100, "tanh", 2, "classification", samples_per_step=64)
    progress.observe_evaluation(50, _evaluation(0.95, 0.96), final=False)
    progress.observe_evaluation(100, _evaluation(0.87, 0.96), final=True)
    assert progress.warnings() == []


def test_an_uncoupled_run_has_no_center_to_lose():
    for form, replicas in (("none", 4), ("ddp", 4), ("tanh", 1)):
        progress = Progress(100, form, replicas, "classification", samples_per_step=64)
        progress.observe_evaluation(50, _evaluation(0.95, 0.96), final=False)
        progress.observe_evaluation(100, _evaluation(0.10, 0.96), final=True)
        assert progress.warnings() == [], form
        assert "center acc 0.1000" in progress.line(100, 0.1, now=0.0)


def test_regression_compares_test_losses():
    progress = Progress(100, "average", 2, "regression", samples_per_step=64)
    assert "center test loss -" in progress.line(1, 1.0, now=0.0)
    progress.observe_evaluation(50, _evaluation(0.010, 0.009, "test/loss"), final=False)
    progress.observe_evaluation(100, _evaluation(0.5, 0.01, "test/loss"), final=True)
    assert progress.warnings() == [
        "center test loss 0.5 is 50 times the ensemble's 0.01 (it was 0.01 at step 50)"
    ]
    assert "center test loss 0.5000" in progress.line(100, 0.1, now=0.0)


def test_the_time_left_leaves_out_the_first_step_and_waits_for_three_more():
    progress = Progress(103, "tanh", 2, "classification", samples_per_step=64)
    assert progress.line(1, 2.3, now=60.0) == "step 1/103 | loss 2.3000 (mean of 2 replicas) | center acc -"
    progress.step_done(1, now=60.0)  # start-up: a minute
    for step in (2, 3):
        progress.step_done(step, now=60.0 + 0.5 * (step - 1))
        assert progress.seconds_left(step, now=60.0 + 0.5 * (step - 1)) is None
    progress.step_done(4, now=61.5)
    assert progress.seconds_left(4, now=61.5) == 0.5 * 99
    # Steps 2 to 4 took 1.5 s: 500 ms a step, 64 samples in each.
    assert progress.line(4, 2.0, now=61.5).endswith(
        "| center acc - | 500.0 ms/step, 128 samples/s | 50 s left"
    )


def test_the_time_left_after_a_resume_counts_from_the_resumed_steps():
    progress = Progress(1000, "tanh", 2, "classification", samples_per_step=64)
    progress.step_done(501, now=10.0)
    assert progress.seconds_left(503, now=12.0) is None
    assert progress.seconds_left(510, now=19.0) == 1.0 * 490


def test_a_real_run_prints_the_center_only_when_known_and_the_time_left_only_when_meaningful(
    tmp_path, caplog
):
    import logging

    import torch

    from replica_dist import dist, loop
    from replica_dist.config import load_config

    cfg, _ = load_config(
        ["train.steps=8", "log.every=2", "eval.every=4", "model.hidden=[8]", f"hydra.run.dir={tmp_path}"]
    )
    dist.init(cfg.dist)  # a world of one, in this process
    try:
        with caplog.at_level(logging.INFO, logger="replica_dist.loop"):
            summary = loop.train(cfg, tmp_path, torch.device("cpu"))
    finally:
        dist.teardown()
    lines = {
        int(r.message.split()[1].split("/")[0]): r.message
        for r in caplog.records
        if r.message.startswith("step ")
    }
    assert sorted(lines) == [1, 2, 4, 6, 8]
    assert lines[1].endswith("| center acc -")  # no evaluation, no timed step yet
    speed = r"\d+\.\d ms/step, \d+ samples/s"  # since the previous line
    assert re.search(rf"\| center acc - \| {speed}$", lines[2])  # one timed step: no estimate yet
    assert re.search(rf"\| center acc 0\.\d{{4}} \| {speed} \| \d+ s left$", lines[4])  # evaluated at step 4
    assert lines[6].endswith(" s left")
    assert summary["status"] == "ok" and summary["warnings"] == []
