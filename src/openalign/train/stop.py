"""Stopping a run cleanly on SIGTERM: after a whole step, with a checkpoint of it, on every rank alike.

A scheduler preempting a job, or ``torchrun`` passing its own SIGTERM on, gives the processes some
seconds before SIGKILL (Slurm's ``KillWait``, 30 s by default; torchrun waits 30 s). Raising at
once, as Ctrl-C does, loses every step since the last periodic checkpoint. While the training
loop runs, SIGTERM instead asks for a stop: the ranks agree on the step to stop after (one rank
may receive it, or all at slightly different times, and none may leave a collective that another
has entered), checkpoint it and raise :class:`~openalign.errors.Terminated`. Further SIGTERMs
change nothing: under Slurm and torchrun each rank gets the scheduler's and then torchrun's copy
of it, milliseconds apart. Ctrl-C (SIGINT) still stops at once.
"""

from __future__ import annotations

import signal
import threading
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist

from ..distributed import world_info
from ..errors import Terminated


class StopOnSigterm:
    """A context in which SIGTERM sets :attr:`requested` rather than stopping the process, and
    :meth:`agreed` tells every rank alike whether to stop.

    Under ``torchrun`` the ranks share the answer through an all-reduce on a gloo group of their
    own, started before each step and read before the next, so that it never waits on the devices'
    work nor holds a step up; they therefore stop one step later than a single process does.
    Off the main thread (where no handler can be installed) and where SIGTERM is ignored, the
    process's handling of SIGTERM is left as it is, and the rank still takes part in the agreement.
    A SIGTERM after the last agreement (in the last step's wait, or just after it) is passed on, on
    leaving, to the handler that was there before, as one during the final evaluation is.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False
        self._group: Any = None
        self._pending: tuple[Any, torch.Tensor] | None = None

    def __enter__(self) -> StopOnSigterm:
        if world_info()[1] > 1:  # every rank creates it, in the same order as its other groups
            self._group = dist.new_group(backend="gloo")
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGTERM)
            if previous is not signal.SIG_IGN:
                self._previous, self._installed = signal.signal(signal.SIGTERM, self._handle), True
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._pending is not None and kind is None:  # after an error a peer may never take part
            self._pending[0].wait()
        self._pending = None
        if self._installed:  # None: a handler installed outside Python, which cannot be put back
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
            self._installed = False
            if self.requested and kind is None:  # came after the last agreement: handled as outside the loop
                signal.raise_signal(signal.SIGTERM)

    def _handle(self, signum: int, frame: Any) -> None:
        Terminated.requested = True
        self.requested = True

    def agreed(self, wait: bool = False) -> bool:
        """Whether the ranks agree to stop now: whether any of them had received SIGTERM when it
        last asked (every rank must call this as often as the others). ``wait``: the answer as of
        now, waiting for every rank (at the end of the loop, where no later step will ask again)."""
        if self._group is None:
            return self.requested
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            stop = bool(flag.item())
            self._pending = None
            if stop:  # every rank alike: none starts another
                return True
        flag = torch.tensor([int(self.requested)])
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        if wait:
            work.wait()
            return bool(flag.item())
        self._pending = (work, flag)
        return False

