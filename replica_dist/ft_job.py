"""One replica's job under `launch/run.sh --ft`: torchrun's agent, run in this process.

`python -m replica_dist.ft_job TORCHRUN_ARGS...` is `python -m torch.distributed.run
TORCHRUN_ARGS...`, except for the stop the launcher passes on (SIGINT, SIGTERM, SIGHUP): the
agent passes it to its worker, which stops at its next logging step and says so in its
ft/replica_<r>.json, and this process then ends with status 0 instead of the agent's traceback
(the launcher reads how each replica ended from those files)."""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import parse_args, run


def main(argv: list[str]) -> int:
    try:
        run(parse_args(argv))
    except SignalException:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
