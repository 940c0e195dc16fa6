"""Unattended execution does not stall on a reply it missed (cs_helpers.execution).

nbclient waits for a cell's reply in one long poll of the shell socket; a wake-up lost
there costs the cell's whole timeout. These tests fake a poll that misses the reply,
then run real notebooks (one with an ipywidgets explorer) through both clients that
the course uses: the walkthrough's and the grader's sandboxed ``Execute``."""
import asyncio
import os
from pathlib import Path
from queue import Empty

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from cs_helpers.execution import CourseNotebookClient, poll_in_slices
from cs_helpers.grading import isolation

REPO = Path(__file__).resolve().parent.parent


class MissingChannel:
    """A shell channel whose reply is there from the start, but whose first poll
    misses it (a lost edge) and sleeps its whole timeout, as nbclient's wait did."""

    def __init__(self):
        self.polls = []

    async def get_msg(self, timeout=None):
        self.polls.append(timeout)
        if len(self.polls) == 1:
            await asyncio.sleep(timeout if timeout is not None else 3600)
            raise Empty
        return {"msg_type": "execute_reply"}


class SilentChannel:
    def __init__(self):
        self.polls = []

    async def get_msg(self, timeout=None):
        self.polls.append(timeout)
        await asyncio.sleep(timeout)
        raise Empty


def test_a_missed_reply_costs_one_slice_not_the_timeout():
    channel = MissingChannel()
    poll_in_slices(channel, 0.05)
    reply = asyncio.run(asyncio.wait_for(channel.get_msg(timeout=300), 60))
    assert reply == {"msg_type": "execute_reply"}
    assert channel.polls == [0.05, 0.05]


def test_a_wait_without_timeout_is_sliced_too():
    channel = MissingChannel()
    poll_in_slices(channel, 0.05)
    assert asyncio.run(asyncio.wait_for(channel.get_msg(), 60)) == {"msg_type": "execute_reply"}
    assert channel.polls == [0.05, 0.05]


def test_no_reply_still_raises_empty_at_the_callers_deadline():
    channel = SilentChannel()
    poll_in_slices(channel, 0.05)
    with pytest.raises(Empty):
        asyncio.run(channel.get_msg(timeout=0.12))
    assert len(channel.polls) == 3 and all(0 <= t <= 0.05 for t in channel.polls)
    assert sum(channel.polls) == pytest.approx(0.12, abs=0.03)


def test_slicing_twice_wraps_once_and_a_bad_slice_is_refused():
    channel = MissingChannel()
    poll_in_slices(channel, 0.05)
    wrapped = channel.get_msg
    poll_in_slices(channel, 0.05)
    assert channel.get_msg is wrapped
    with pytest.raises(ValueError, match="slice_s must be positive"):
        poll_in_slices(SilentChannel(), 0)


WIDGET_NOTEBOOK = [
    "import ipywidgets as widgets\nimport matplotlib\nmatplotlib.use('module://matplotlib_inline.backend_inline')\n"
    "import matplotlib.pyplot as plt",
    "def show(k=2):\n    fig, ax = plt.subplots(figsize=(2, 2))\n    ax.plot(range(k))\n    plt.show()\n"
    "widgets.interact(show, k=(1, 9));",
    "print('after the explorer', 6 * 7)",
]


def _widget_notebook():
    return new_notebook(cells=[new_code_cell(source) for source in WIDGET_NOTEBOOK],
                        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})


def _printed(nb):
    return "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "stream")


def test_the_walkthrough_client_runs_a_widget_notebook_with_a_sliced_wait(tmp_path):
    nb = _widget_notebook()
    client = CourseNotebookClient(nb, timeout=120, kernel_name="python3", reply_poll_slice_s=1.0,
                                  resources={"metadata": {"path": str(tmp_path)}})
    sliced = []
    client.on_cell_executed = lambda **_: sliced.append(getattr(client.kc.shell_channel, "_cs_sliced", False))
    client.execute()
    assert sliced == [True, True, True]
    assert "after the explorer 42" in _printed(nb)
    widget_outputs = [o for o in nb.cells[1].outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert widget_outputs, nb.cells[1].outputs


def test_the_graders_execute_waits_in_slices(tmp_path, monkeypatch):
    from cs_helpers.grading.nbgrader_plugin import SandboxedExecute

    if isolation.sandbox_problem() is not None:
        monkeypatch.setenv(isolation.UNSANDBOXED_ENV, "1")
    sliced = []

    class Probe(SandboxedExecute):
        def preprocess_cell(self, cell, resources, index):
            sliced.append(getattr(self.kc.shell_channel, "_cs_sliced", False))
            return super().preprocess_cell(cell, resources, index)

    nb = _widget_notebook()
    Probe(timeout=120).preprocess(nb, {"metadata": {"path": str(tmp_path)}})
    assert sliced == [True, True, True]
    assert "after the explorer 42" in _printed(nb)


needs_sandbox = pytest.mark.skipif(isolation.sandbox_problem() is not None,
                                   reason=f"no sandbox here: {isolation.sandbox_problem()}")


def _kernel_pids(execute_class, nb, tmp_path):
    """Runs ``nb`` with ``execute_class``; returns the kernel's pid seen at each cell."""
    pids = []

    class Probe(execute_class):
        def preprocess_cell(self, cell, resources, index):
            pids.append(self.km.provisioner.pid)
            return super().preprocess_cell(cell, resources, index)

    Probe(timeout=120).preprocess(nb, {"metadata": {"path": str(tmp_path)}})
    return pids


@needs_sandbox
def test_a_kernel_started_early_is_taken_over_and_stopped_with_the_execution(tmp_path):
    """The grader starts the sandboxed kernel while it prepares the submission
    (isolation.start_kernel_early); nbgrader's execution then runs in that very process,
    as nobody, and shuts it down at the end like a kernel it started itself."""
    from cs_helpers.grading.nbgrader_plugin import SandboxedExecute

    early = isolation.start_kernel_early()
    assert early is not None and early.process.poll() is None
    assert isolation.start_kernel_early() is None  # one waits already
    nb = new_notebook(cells=[new_code_cell("import os\nprint('uid', os.getuid())"), new_code_cell("print(6 * 7)")])
    assert _kernel_pids(SandboxedExecute, nb, tmp_path) == [early.process.pid] * 2
    assert "uid 65534" in _printed(nb) and "42" in _printed(nb)
    assert early.process.poll() is not None and not early.socket_dir.exists()
    assert isolation._take_early_kernel() is None


@needs_sandbox
def test_an_early_kernel_that_died_or_was_never_taken_leaves_nothing_behind(tmp_path):
    from cs_helpers.grading.nbgrader_plugin import SandboxedExecute

    early = isolation.start_kernel_early()
    early.process.kill()
    early.process.wait()
    nb = new_notebook(cells=[new_code_cell("print('fresh kernel')")])
    pids = _kernel_pids(SandboxedExecute, nb, tmp_path)
    assert pids and pids[0] != early.process.pid and "fresh kernel" in _printed(nb)
    assert not early.socket_dir.exists()

    unused = isolation.start_kernel_early()
    isolation._discard_early_kernel()  # what happens at exit
    assert unused.process.poll() is not None and not unused.socket_dir.exists()
