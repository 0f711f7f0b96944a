"""Run under ``torchrun --nproc_per_node 2``: ``openalign train`` with the given arguments, in which
rank 1 alone receives SIGTERM, during its second step (as when one node of a job is preempted)."""

from __future__ import annotations

import os
import signal
import sys

from openalign import cli
from openalign.train import loop

done = []
train_step = loop.train_step


def step_then_signal(*args, **kwargs):
    loss = train_step(*args, **kwargs)
    done.append(1)
    if len(done) == 2 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGTERM)
    return loss


if __name__ == "__main__":
    loop.train_step = step_then_signal
    sys.exit(cli.main(sys.argv[1:]))
