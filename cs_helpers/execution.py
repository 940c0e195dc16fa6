"""Running notebooks unattended without stalling on a lost wake-up.

nbclient waits for a cell's ``execute_reply`` with one ``poll`` of the shell socket
that lasts as long as the cell's timeout. With widget cells (ipywidgets' ``interact``
sends a burst of comm messages) that wait sometimes never wakes although the kernel
has answered and gone idle: the cell then costs its whole timeout (300 s in grading)
before it is interrupted (nbclient issue #312, "when cell contains ipywidget, execute
cell will sometimes blocks"). A ZeroMQ socket signals readiness by an edge; a wait that
misses the edge sleeps on, while a fresh ``poll`` looks at the socket's state first and
returns at once.

:class:`SlicedReplyWait` makes every wait on the shell channel a series of short polls
with the same overall deadline, so a missed edge costs at most one slice (0.1 s: with
2-second slices, a widget cell of notebook 01 took 2.0 s instead of 0.45 s in two of
three gradings, so misses are common). Mix it into
any ``nbclient.NotebookClient`` (nbconvert's ``ExecutePreprocessor`` and nbgrader's
``Execute`` are ones); :class:`CourseNotebookClient` is the plain client with it.
"""
from __future__ import annotations

import time
from queue import Empty

from nbclient import NotebookClient
from nbclient.util import run_sync
from traitlets import Float, HasTraits

__all__ = ["SlicedReplyWait", "CourseNotebookClient", "poll_in_slices"]


def poll_in_slices(channel, slice_s: float) -> None:
    """Replaces ``channel.get_msg`` (an async jupyter_client channel) by one that
    polls at most ``slice_s`` seconds at a time until its caller's timeout (None:
    forever) has passed; raises ``queue.Empty`` at that deadline as before."""
    if slice_s <= 0:
        raise ValueError(f"slice_s must be positive; got {slice_s!r}")
    if getattr(channel, "_cs_sliced", False):
        return
    single_poll = channel.get_msg

    async def get_msg(timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            wait = slice_s if left is None else min(slice_s, left)
            try:
                return await single_poll(timeout=wait)
            except Empty:
                if left is not None and left <= slice_s:
                    raise

    channel.get_msg = get_msg
    channel._cs_sliced = True


class SlicedReplyWait(HasTraits):
    """Mixin for ``nbclient.NotebookClient`` subclasses: the shell channel of every
    kernel client it starts waits in slices of ``reply_poll_slice_s`` seconds."""

    reply_poll_slice_s = Float(0.1, help="Longest single wait on the shell socket, in seconds.").tag(config=True)

    async def async_start_new_kernel_client(self):
        kc = await super().async_start_new_kernel_client()
        poll_in_slices(kc.shell_channel, self.reply_poll_slice_s)
        return kc

    # nbclient binds its synchronous twin to its own coroutine; bind it to this one
    # (nbconvert's ExecutePreprocessor, and so nbgrader's Execute, call the twin).
    start_new_kernel_client = run_sync(async_start_new_kernel_client)


class CourseNotebookClient(SlicedReplyWait, NotebookClient):
    """``nbclient.NotebookClient`` whose waits for replies cannot miss them."""
