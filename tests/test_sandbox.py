"""The OS sandbox (bubblewrap) that every process running student code starts in, the
limits on what a child may send back, and the course secret behind the hidden cases.

A probe script runs inside the sandbox exactly as graded code does and reports what it
can see and do; each assertion is one guarantee of the design's trust boundary."""
import io
import json
import os
import socket
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from cs_helpers.grading import encoding, isolation, registry
from cs_helpers.grading.encoding import ResultRefused, pack_result, unpack_result

REPO = Path(__file__).resolve().parent.parent

needs_sandbox = pytest.mark.skipif(isolation.sandbox_problem() is not None,
                                   reason=f"no sandbox here: {isolation.sandbox_problem()}")

PROBE = r'''
import json, os, socket, sys
report = {"uid": os.getuid(), "euid": os.geteuid(), "pid": os.getpid()}
def can(fn):
    try:
        fn()
        return True
    except Exception:
        return False
repo = sys.argv[1]
report["sees_repo"] = {p: os.path.exists(os.path.join(repo, p)) for p in
                       (".git", "tests", "notebooks", "cs_helpers/reference", "nbgrader_config.py", "build",
                        ".cs-helpers-secret", "Makefile")}
report["sees_secret"] = os.path.exists(sys.argv[2])
def reference():
    import cs_helpers.reference  # noqa: F401
report["imports_reference"] = can(reference)
import cs_helpers.grading
report["package_at"] = os.path.dirname(os.path.dirname(os.path.dirname(cs_helpers.grading.__file__)))
report["processes"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
report["ppid"] = os.getppid()
def connect():
    s = socket.create_connection(("127.0.0.1", int(sys.argv[3])), timeout=2)
    s.close()
report["reaches_grader_port"] = can(connect)
report["home"] = os.environ.get("HOME")
report["home_empty_and_writable"] = (os.listdir(os.environ["HOME"]) == []
                                     and can(lambda: open(os.path.join(os.environ["HOME"], "x"), "w").write("1")))
report["writes_venv"] = can(lambda: open(os.path.join(sys.prefix, "planted.txt"), "w").write("1"))
report["writes_package"] = can(lambda: open(os.path.join(report["package_at"], "cs_helpers", "x.py"), "w").write("1"))
report["env"] = sorted(os.environ)
report["root_listing"] = sorted(os.listdir("/"))
report["etc"] = sorted(os.listdir("/etc")) if os.path.isdir("/etc") else []
with open("/proc/self/status") as f:
    report["caps"] = [line.split()[1] for line in f if line.startswith("CapEff")][0]
print(json.dumps(report))
'''


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    folder = tmp_path_factory.mktemp("probe")
    (folder / "probe.py").write_text(PROBE)
    os.chmod(folder, 0o755)
    os.chmod(folder / "probe.py", 0o644)
    secret = registry.secret_path()
    registry.course_secret()  # make sure one exists, so that its invisibility means something
    cmd = isolation.wrap([sys.executable, "/probe/probe.py", str(REPO), str(secret), str(port)],
                         binds=((folder, "/probe", False),))
    os.environ["CS_HELPERS_PROBE_MARKER"] = "grader-only"
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                              preexec_fn=isolation.Limits().apply)
    finally:
        os.environ.pop("CS_HELPERS_PROBE_MARKER")
        listener.close()
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_sandbox
def test_the_sandbox_runs_as_an_unprivileged_user_without_capabilities(probe):
    assert probe["uid"] == probe["euid"] == isolation.SANDBOX_UID
    assert int(probe["caps"], 16) == 0


@needs_sandbox
def test_the_course_folder_the_reference_and_the_secret_are_invisible(probe):
    assert not any(probe["sees_repo"].values()), probe["sees_repo"]
    assert not probe["sees_secret"]
    assert not probe["imports_reference"]
    assert probe["package_at"] == isolation.PACKAGE_MOUNT


@needs_sandbox
def test_no_other_process_and_no_network_is_reachable(probe):
    # Its own PID namespace: bwrap's init and the probe, nothing of the grader.
    assert len(probe["processes"]) <= 3 and max(probe["processes"]) < 10, probe["processes"]
    assert probe["ppid"] <= 2
    assert not probe["reaches_grader_port"]


@needs_sandbox
def test_home_is_private_and_the_installation_read_only(probe):
    assert probe["home"] == isolation.HOME and probe["home_empty_and_writable"]
    assert not probe["writes_venv"] and not probe["writes_package"]


@needs_sandbox
def test_the_environment_is_the_sandbox_own(probe):
    assert "CS_HELPERS_PROBE_MARKER" not in probe["env"]
    # The system folders, the probe's own bind, and the first folder of each Python
    # installation the sandbox mounts (a venv may live anywhere: /work, /check, /home).
    python_tops = {root.parts[1] for root in isolation._python_roots()}
    allowed = {"bin", "dev", "etc", "home", "lib", "lib32", "lib64", "libx32",
               "opt", "probe", "proc", "root", "sbin", "sys", "tmp", "usr"} | python_tops
    assert set(probe["root_listing"]) <= allowed, set(probe["root_listing"]) - allowed
    assert "shadow" not in probe["etc"] and "hostname" not in probe["etc"]


def test_no_sandbox_means_a_refusal_that_names_the_reason_and_the_flag(monkeypatch):
    monkeypatch.setenv(isolation.BWRAP_ENV, "/nonexistent/bwrap")
    monkeypatch.delenv(isolation.UNSANDBOXED_ENV, raising=False)
    with pytest.raises(isolation.SandboxUnavailable) as info:
        isolation.require_sandbox()
    message = str(info.value)
    assert "/nonexistent/bwrap" in message and "--no-sandbox" in message and "CS_HELPERS_UNSANDBOXED" in message


def test_cs_helpers_grade_refuses_without_a_sandbox(monkeypatch, capsys, tmp_path):
    from cs_helpers.cli import main

    monkeypatch.setenv(isolation.BWRAP_ENV, "/nonexistent/bwrap")
    monkeypatch.delenv(isolation.UNSANDBOXED_ENV, raising=False)
    submission = tmp_path / "filters.ipynb"
    submission.write_text("{}")
    assert main(["grade", str(submission)]) == 2
    err = capsys.readouterr().err
    assert "refusing to grade" in err and "bubblewrap" in err and "--no-sandbox" in err


def test_the_explicit_flag_for_trusted_work_is_honoured(monkeypatch):
    monkeypatch.setenv(isolation.BWRAP_ENV, "/nonexistent/bwrap")
    monkeypatch.setenv(isolation.UNSANDBOXED_ENV, "1")
    assert isolation.require_sandbox() is False


# -- the course secret ----------------------------------------------------------------

def test_hidden_seeds_come_from_the_course_secret(tmp_path, monkeypatch):
    monkeypatch.setenv(registry.SECRET_ENV, str(tmp_path / "secret"))
    public = registry.hidden_seed("normalize_filters", secret=b"")
    first = registry.hidden_seed("normalize_filters")
    assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600
    assert first == registry.hidden_seed("normalize_filters")  # stable: a regrade scores the same
    assert first != public  # not derivable from the public function name
    (tmp_path / "secret").unlink()
    assert registry.hidden_seed("normalize_filters") != first  # a new course, new hidden cases
    assert registry.hidden_seed("pca") != registry.hidden_seed("normalize_filters")


def test_the_secret_is_ignored_by_git_and_not_released():
    ignored = subprocess.run(["git", "check-ignore", "-q", ".cs-helpers-secret"], cwd=REPO)
    assert ignored.returncode == 0
    from cs_helpers import course

    assert ".cs-helpers-secret" not in Path(course.__file__).read_text().split("def release")[1].split("def ")[0]


# -- what the grader accepts from a child ---------------------------------------------

def _outcome_blob(arrays=None, skeleton=None):
    skeleton = [{"error": None, "value": {"__tensor__": "a0"}}] if skeleton is None else skeleton
    return pack_result(skeleton, [], {"a0": np.ones(3, np.float32)} if arrays is None else arrays)


def test_an_ordinary_result_round_trips():
    skeleton, errors, arrays = unpack_result(_outcome_blob())
    outcomes = encoding.decode_outcomes(skeleton, arrays)
    assert outcomes[0].value.tolist() == [1.0, 1.0, 1.0] and errors == []


def _zip(members: dict, compression=zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


HEADER = _npy(np.frombuffer(json.dumps({"outcomes": [], "cell_errors": []}).encode(), np.uint8))


@pytest.mark.parametrize("blob, reason", [
    (b"not a zip at all", "readable archive"),
    (_zip({"__result__.npy": HEADER, "a0.npy": _npy(np.zeros(10**6, np.uint8))}, zipfile.ZIP_DEFLATED),
     "compressed|declared sizes"),
    (_zip({"__result__.npy": HEADER, **{f"a{i}.npy": _npy(np.zeros(1)) for i in range(encoding.MAX_ARRAYS + 1)}}),
     "too many arrays"),
    (_zip({"__result__.npy": HEADER, "a0.npy": _npy(np.array([object()], dtype=object))}), "not accepted"),
    (_zip({"__result__.npy": HEADER, "a0.npy": _npy(np.zeros(4))[:-16]}), "larger than its stored data|cut short"),
    (_zip({"a0.npy": _npy(np.zeros(4))}), "no description"),
    (_zip({"__result__.npy": _npy(np.frombuffer(b"[" * 100000, np.uint8))}), "JSON"),
    (_zip({"__result__.npy": _npy(np.frombuffer(("[" * 500 + "]" * 500).encode(), np.uint8))}), "malformed"),
    (_zip({"__result__.npy": HEADER, "evil.txt": b"x"}), "unexpected file"),
], ids=["garbage", "zip-bomb", "too-many", "object-dtype", "lying-size", "no-header", "deep-json",
        "nested-list", "other-file"])
def test_malformed_or_hostile_results_are_refused(blob, reason):
    with pytest.raises(ResultRefused, match=reason):
        unpack_result(blob)


def test_a_decompression_bomb_costs_the_grader_nothing():
    """A few-MB compressed member that would inflate to 1 GiB: refused before any
    decompression, with the grader's memory barely moving."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("__result__.npy", HEADER)
        with archive.open("a0.npy", "w", force_zip64=True) as member:
            member.write(np.lib.format.magic(1, 0))
            chunk = bytes(2**24)
            for _ in range(64):
                member.write(chunk)
    blob = buffer.getvalue()
    assert len(blob) < 8 * 2**20
    tracemalloc.start()
    with pytest.raises(ResultRefused):
        unpack_result(blob)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * len(blob) + 2**20


def test_an_oversized_result_is_refused_unread():
    with pytest.raises(ResultRefused, match="larger"):
        unpack_result(b"\0" * (encoding.MAX_RESULT_BYTES + 1))


# -- points come from outputs only ------------------------------------------------------

def test_no_check_pays_for_evidence_the_graded_code_could_forge():
    """Everything recorded inside the graded process (hooks left, the model's mode and
    parameters, the inputs after the call, counts of Python and torch calls) can be
    faked by the graded code. So an outcome with the reference's values and the worst
    possible record of all of these must still earn every point: any property that
    pays for that evidence is feedback only."""
    from dataclasses import replace

    from cs_helpers.grading import load_all
    from cs_helpers.grading.core import unique_cases
    from cs_helpers.grading.sandbox import reference_outcomes

    for name, check in sorted(load_all().items()):
        props = check.properties(registry.hidden_seed(name, secret=b"invariant"))
        cases = unique_cases(props)
        expected = reference_outcomes(check, cases, "cpu")
        forged = {key: replace(outcome, hooks_left=7, mode_changed=True, params_changed=True,
                               inputs_after=[], python_calls=10**9, torch_calls=("conv2d", "unfold"))
                  for key, outcome in expected.items()}
        report = check.evaluate(props, expected, forged)
        assert report.score == check.points, (name, report.failed)


def test_the_grading_command_reaches_the_kernel_before_it_imports_pytorch():
    """What runs before the notebook's kernel starts (the command, the course, nbgrader's
    settings and the course's preprocessors, the sandbox) does not import PyTorch: the
    grader imports it in the scoring thread, beside the kernel (benchmarks/run.py times
    the whole)."""
    code = ("import sys\n"
            "import cs_helpers, cs_helpers.cli, cs_helpers.course, cs_helpers.execution\n"
            "from cs_helpers.grading import feedback, isolation, nbgrader_plugin, nbgrader_settings\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_setup_cell_imports_are_what_the_grading_server_loads_before_it_forks():
    from cs_helpers.grading.sandbox import setup_imports

    assert setup_imports("import math\n\nimport numpy as np\nimport torch.nn.functional as F\n"
                         "from cs_helpers import grading, viz\nfrom cs_helpers.data import *\n"
                         "from . import local\nimport math\n") == [
        "math", "numpy", "torch.nn.functional", "cs_helpers", "cs_helpers.grading", "cs_helpers.viz",
        "cs_helpers.data"]
    assert setup_imports("def broken(:\n") == []


@needs_sandbox
def test_modules_loaded_before_the_fork_are_there_and_bad_names_cost_nothing():
    """The server imports the setup cell's modules once; each function's process finds
    them loaded. A name that is no module is skipped, and the function is scored as
    usual."""
    from cs_helpers.grading import get_check
    from cs_helpers.grading.sandbox import run_student_functions

    source = ("import sys\n"
              "LOADED = 'tabnanny' in sys.modules\n"
              "def normalize_filters(weights):\n"
              "    lo = weights.amin(dim=(1, 2, 3), keepdim=True)\n"
              "    hi = weights.amax(dim=(1, 2, 3), keepdim=True)\n"
              "    assert LOADED\n"
              "    return (weights - lo) / (hi - lo).clamp_min(1e-12)\n")
    check = get_check("normalize_filters")
    for preimport, loaded in ((["tabnanny", "no_such_module_here", "tabnanny.nothing"], True), ([], False)):
        _, cases, got, notes = run_student_functions([check], [source], [3], preimport=preimport)[0]
        assert len(got) == len(cases) and notes == []
        assert all(o.ok for o in got.values()) is loaded, [o.error for o in got.values()]
