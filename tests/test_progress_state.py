"""The progress's history goes into the checkpoint: a resumed Progress says what an
uninterrupted one says (warnings, the center shown, the training time); and the progress
line's speed."""

from __future__ import annotations

from replica_dist import checkpoint
from replica_dist.progress import Progress

# A run that trains to 0.02, then jumps back toward its first loss after step 300: the jump is
# judged against step 200's loss, which a run resumed from step 250 saw only before the resume.
LOSSES = [(1, 2.3), (100, 0.4), (200, 0.02), (250, 0.05), (300, 0.08), (350, 1.5), (400, 2.0)]
EVALUATIONS = {200: (0.95, 0.96), 400: (0.40, 0.90)}


def _fresh() -> Progress:
    return Progress(400, "tanh", 2, "classification", samples_per_step=64)


def _feed(progress: Progress, steps: list[tuple[int, float]]) -> list[str]:
    """Warnings of the progress line at each logging step (no clock: the speed is left out)."""
    said = []
    for step, loss in steps:
        if step in EVALUATIONS:
            center, ensemble = EVALUATIONS[step]
            progress.observe_evaluation(
                step,
                {"center": {"test/accuracy": center}, "ensemble": {"test/accuracy": ensemble}},
                final=step == 400,
            )
        progress.observe_loss(step, loss)
        said.append(progress.line(step, loss, now=0.0))
    return said


def test_a_progress_restored_from_a_checkpoint_says_what_an_uninterrupted_one_says(tmp_path):
    uninterrupted = _fresh()
    said = _feed(uninterrupted, LOSSES)
    assert "jumped to 1.5 at step 350 from 0.02 at step 200" in said[5]
    assert "center acc 0.9500" in said[4]  # the last evaluation, shown until the next one

    before = _fresh()
    _feed(before, LOSSES[:4])  # up to the checkpoint at step 250
    # Through the checkpoint's own writer and reader (weights_only loading).
    checkpoint.save_replica(tmp_path, 250, 0, {"progress": before.state_dict()})
    checkpoint.write_manifest(tmp_path, 250, 1, "a config")
    resumed = _fresh()
    resumed.load_state_dict(checkpoint.load_replica(tmp_path, 250, 0)["progress"])
    assert _feed(resumed, LOSSES[4:]) == said[4:]
    assert resumed.warnings() == uninterrupted.warnings()
    assert len(uninterrupted.warnings()) == 2  # the first jump and the final center

    forgetful = _fresh()  # what a resume did before the history was checkpointed
    assert _feed(forgetful, LOSSES[4:]) != said[4:]


def test_the_training_time_adds_the_segments_up_to_their_checkpoints():
    first = _fresh()
    first.start_clock(100.0)
    assert first.wall_seconds(112.5) == 12.5
    state = first.state_dict()  # the checkpoint reads the process's clock itself
    assert state["wall_seconds"] > 0
    state["wall_seconds"] = 12.5  # as if saved at 112.5

    second = _fresh()
    second.load_state_dict(state)
    second.start_clock(5000.0)  # another process: another clock origin
    assert second.wall_seconds(5004.0) == 16.5


def test_the_progress_line_shows_the_step_time_and_samples_per_second_since_the_previous_line():
    progress = _fresh()
    first = progress.line(20, 0.5, now=10.0)
    assert "ms/step" not in first  # its steps include the start-up
    # 20 steps in 0.5 s: 25 ms a step; 64 samples a step (all ranks together): 2560 samples/s.
    assert progress.line(40, 0.4, now=10.5) == (
        "step 40/400 | loss 0.4000 (mean of 2 replicas) | center acc - | 25.0 ms/step, 2560 samples/s"
    )
    assert "| 100.0 ms/step, 640 samples/s" in progress.line(50, 0.4, now=11.5)
