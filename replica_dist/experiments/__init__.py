"""The project's own experiments and measurements, kept apart from the trainer.

    study        does coupling help? (docs/study.md; launch/study.sh)
    note_figure  the user's note reproduced (docs/note_results.md; launch/note_figure.sh)
    bench        step time, communication and memory of every coupling (docs/benchmark.md;
                 launch/bench.sh)
    against      the trainer's step time now against a git ref, each in its own venv, interleaved
                 (docs/benchmark.md; launch/bench.sh --against REF)
    shard_memory each rank's parameter, gradient and optimizer bytes, peak memory and bytes
                 sent with sharded replicas, for parallel.shard = 1, 2, 4 (docs/benchmark.md)
    step_ops     every operation of the trainer's steps with its size, or their CPU time; runs
                 as a file in another commit's tree too
    commands     what they share: the torchrun commands they start, the runs directory

Each is a program (`python -m replica_dist.experiments.study`, ...) that drives the core from
outside, as a user's own script would: through torchrun commands of replica_dist.train, or
through the core's public functions (loop.train, report.load_run). The core never imports
anything from here, so that an experiment can change, need matplotlib or go away without
touching the trainer.
"""
