"""What the launcher (replica_dist.launch) and its workers (replica_dist.train) agree on, in a
module of its own: the launcher imports the worker's entry point, so the worker must not import
the launcher for these."""

LAUNCHER_ENV = "REPLICA_DIST_LAUNCHER"
"""Set in the workers' environment: the launcher, not the worker, prints how to resume and
the worker's one-line error."""
ONE_LINE_KEY = "replica_dist_exit_status"
"""In a worker's torchrun error file that holds its one-line error: the exit status it meant
(see train.fail)."""
