"""The operating-system sandbox for every process that runs a student's code.

Python-level guards (audit hooks, patched builtins, recorders) live in the process they
guard, so the code they guard can switch them off. The boundary here is the kernel's:
each process that runs student code (the scoring children of
:mod:`cs_helpers.grading.sandbox`, and the Jupyter kernel that nbgrader's ``Execute``
step starts, :class:`SandboxedKernelManager`) is started by the grader inside
bubblewrap (``bwrap``) with

* its own PID, mount, network, IPC and UTS namespaces (no other process is visible, no
  network but an unconfigured loopback, no signal reaches the grader);
* an unprivileged uid (65534, ``nobody``), with no capabilities and ``no_new_privs``;
  when the grader runs as root the process is ``nobody`` outside the sandbox as well;
* an allowlisted, read-only view of the file system: the system's ``/usr``, a few files
  of ``/etc``, the Python installation and the virtual environment, and a *student
  build* of ``cs_helpers`` (the package without ``cs_helpers.reference``); nothing of
  the course folder (source notebooks, gradebook, ``.git``, tests, build outputs, the
  course secret, other submissions);
* a private ``HOME`` and ``/tmp`` on size-limited tmpfs, thrown away with the sandbox;
* resource limits set by the grader (address space, CPU time, file size, processes),
  and death with its parent.

Where no sandbox can be started (not Linux, no ``bwrap``, namespaces refused),
:func:`require_sandbox` refuses with the reason and names the explicit way to grade
one's own trusted work without it; there is no silent fallback.
"""
from __future__ import annotations

import atexit
import functools
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

#: Set to 1 to grade without the sandbox: only for one's own, trusted work.
UNSANDBOXED_ENV = "CS_HELPERS_UNSANDBOXED"
#: The bubblewrap executable (a path or a name on PATH).
BWRAP_ENV = "CS_HELPERS_BWRAP"
#: Where the student build of the package is mounted inside the sandbox.
PACKAGE_MOUNT = "/opt/cs-course"
#: The uid and gid of the sandboxed process.
SANDBOX_UID = 65534
HOME = "/home/student"
UNSANDBOXED_FLAG = "--no-sandbox"

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent
_ETC_FILES = ("passwd", "group", "nsswitch.conf", "localtime", "ld.so.cache", "ld.so.conf",
              "ld.so.conf.d", "fonts", "ssl/openssl.cnf", "mime.types")


class SandboxUnavailable(RuntimeError):
    """No OS sandbox can be started on this machine."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed process tree.

    ``memory_gb``: address space per process (0: none, which CUDA needs);
    ``cpu_s``: CPU seconds per process; ``file_mb``: largest file it may write;
    ``processes``: how many processes uid 65534 may have (only enforced when the grader
    runs as root, where that uid is the sandbox's own); ``tmp_mb``: size of each tmpfs."""

    memory_gb: float = 6.0
    cpu_s: int = 600
    file_mb: int = 256
    processes: int = 256
    tmp_mb: int = 512

    def apply(self) -> None:
        """Sets the limits on the calling process (a ``preexec_fn``)."""
        if self.memory_gb > 0:
            limit = int(self.memory_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        resource.setrlimit(resource.RLIMIT_CPU, (self.cpu_s, self.cpu_s + 5))
        size = self.file_mb * 2**20
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if os.geteuid() == 0:
            resource.setrlimit(resource.RLIMIT_NPROC, (self.processes, self.processes))


def _bwrap() -> str | None:
    name = os.environ.get(BWRAP_ENV, "bwrap")
    return shutil.which(name) if os.sep not in name else (name if os.access(name, os.X_OK) else None)


def unsandboxed_allowed() -> bool:
    """Whether the instructor asked to grade without the sandbox (trusted work only)."""
    return os.environ.get(UNSANDBOXED_ENV, "") == "1"


@functools.lru_cache(maxsize=None)
def _probe(bwrap: str) -> str | None:
    """Starts one trivial sandbox; returns why it failed, or None."""
    try:
        done = subprocess.run(wrap(["/usr/bin/true"], bwrap=bwrap), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"bubblewrap could not be run ({type(exc).__name__}: {exc})"
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip().splitlines()
        return "bubblewrap could not create the namespaces" + (f" ({err[-1][:200]})" if err else "")
    return None


def sandbox_problem() -> str | None:
    """Why no sandbox can be started here, or None when one can."""
    _wait_for_warm_up()
    if not sys.platform.startswith("linux"):
        return f"the grading sandbox needs Linux namespaces; this is {sys.platform}"
    bwrap = _bwrap()
    if bwrap is None:
        where = os.environ.get(BWRAP_ENV, "bwrap")
        return (f"bubblewrap ({where!r}) was not found; install it (Debian/Ubuntu: "
                "apt-get install bubblewrap)")
    return _probe(bwrap)


def require_sandbox() -> bool:
    """True when graded code must run sandboxed; raises :class:`SandboxUnavailable`
    when it must and cannot. False only when the instructor chose to grade trusted
    work without a sandbox (``--no-sandbox``, ``CS_HELPERS_UNSANDBOXED=1``)."""
    if unsandboxed_allowed():
        return False
    problem = sandbox_problem()
    if problem:
        raise SandboxUnavailable(
            f"refusing to grade: {problem}. Student code is only run inside an OS sandbox. "
            f"To grade your own trusted work without one, pass {UNSANDBOXED_FLAG} to "
            f"`cs-helpers grade` or set {UNSANDBOXED_ENV}=1 for `nbgrader autograde`; "
            "never do that for students' submissions.")
    return True


def student_package() -> Path:
    """A folder holding a student build of ``cs_helpers`` (:func:`_student_package`)."""
    _wait_for_warm_up()
    return _student_package()


@functools.lru_cache(maxsize=None)
def _student_package() -> Path:
    """A folder holding a student build of ``cs_helpers``: the installed package
    without ``cs_helpers.reference`` and without compiled caches. Built once per
    process, removed at exit; mounted read-only at :data:`PACKAGE_MOUNT`."""
    root = Path(tempfile.mkdtemp(prefix="cs-student-package-"))
    atexit.register(shutil.rmtree, root, True)
    shutil.copytree(_PACKAGE_ROOT, root / "cs_helpers",
                    ignore=shutil.ignore_patterns("reference", "__pycache__", "*.pyc", ".*"))
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


def _matplotlib_font_cache() -> Path | None:
    """matplotlib's font list for the sandboxes (:func:`_build_matplotlib_font_cache`)."""
    _wait_for_warm_up()
    return _build_matplotlib_font_cache()


@functools.lru_cache(maxsize=None)
def _build_matplotlib_font_cache() -> Path | None:
    """matplotlib's font list, built once per grader process (trusted code, no student
    input) and bound read-only into every sandbox, which would otherwise rebuild it in
    its empty ``MPLCONFIGDIR`` each time (seconds per process)."""
    folder = Path(tempfile.mkdtemp(prefix="cs-mpl-cache-"))
    atexit.register(shutil.rmtree, folder, True)
    env = dict(os.environ, MPLCONFIGDIR=str(folder), MPLBACKEND="Agg")
    try:
        subprocess.run([sys.executable, "-c", "import matplotlib.font_manager"], env=env,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=120, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    built = sorted(folder.glob("fontlist-*.json"))
    if not built:
        return None
    built[0].chmod(0o644)
    folder.chmod(0o755)
    return built[0]


_warm_up: threading.Thread | None = None
_warm_up_lock = threading.Lock()
_warmed_up = threading.Event()


def warm_up(start_kernel: bool = False) -> None:
    """Starts preparing, in a background thread, what every sandbox needs: the probe,
    the student build of the package and matplotlib's font list (about 0.4 s, mostly a
    child process), then with ``start_kernel`` the first notebook's kernel
    (:func:`start_kernel_early`). The grading command calls it first, so that this
    overlaps the grader's own imports on another core; the functions that need a piece
    wait for it."""
    global _warm_up
    with _warm_up_lock:
        if _warm_up is None:
            _warm_up = threading.Thread(target=_prepare, args=(start_kernel,), name="cs-helpers-sandbox-warm-up",
                                        daemon=True)
            _warm_up.start()


def _prepare(start_kernel: bool) -> None:
    try:
        _student_package()
        _build_matplotlib_font_cache()
        bwrap = _bwrap()
        if sys.platform.startswith("linux") and bwrap is not None and not unsandboxed_allowed():
            _probe(bwrap)
    except Exception:  # nothing is cached then: the caller that needs the piece builds it and raises
        return
    finally:
        _warmed_up.set()
    if start_kernel:
        kernel = start_kernel_early()
        if kernel is not None:
            # bwrap's --die-with-parent ends the sandbox when the thread that started it
            # ends: this thread stays until the kernel has exited.
            kernel.process.wait()


def _wait_for_warm_up() -> None:
    if _warm_up is not None and threading.current_thread() is not _warm_up:
        _warmed_up.wait()


def _python_roots() -> list[Path]:
    """The interpreter's installation and the virtual environment, resolved."""
    roots = []
    for prefix in {sys.base_prefix, sys.prefix, os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))}:
        real = Path(os.path.realpath(prefix))
        if real != Path("/usr") and real not in roots:
            roots.append(real)
    return roots


def _hidden_inside(roots: list[Path]) -> list[Path]:
    """Copies of the full package (with the reference) inside the mounted Python
    trees, as a regular (not editable) install puts there: each is covered by an empty
    tmpfs in the sandbox."""
    real = _PACKAGE_ROOT
    return [real for root in roots if real == root or root in real.parents]


def _data_override() -> Path | None:
    value = os.environ.get("CS_HELPERS_DATA")
    return Path(value).expanduser().resolve() if value else None


def wrap(argv: list[str], *, bwrap: str | None = None, binds: tuple = (), chdir: str = HOME,
         env: dict | None = None, limits: Limits | None = None, share_net: bool = False) -> list[str]:
    """The command line that runs ``argv`` inside the sandbox.

    ``binds``: ``(host_path, sandbox_path, writable)`` triples added to the allowlist.
    ``env``: extra environment variables (the sandbox starts from an empty one).
    ``limits`` only sizes the tmpfs here; apply the rlimits with ``limits.apply`` as
    the ``preexec_fn`` of the process that starts bwrap."""
    limits = limits or Limits()
    bwrap = bwrap or _bwrap() or "bwrap"
    root_mode = os.geteuid() == 0
    cmd = [bwrap, "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc",
           "--unshare-uts", "--unshare-cgroup-try", "--hostname", "grading"]
    if not share_net:
        cmd.append("--unshare-net")
    if not root_mode:
        cmd += ["--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
    cmd += ["--ro-bind", "/usr", "/usr"]

    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/") / name
        if path.is_symlink():
            cmd += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            cmd += ["--ro-bind", str(path), str(path)]
    made: set[str] = {"/", "/tmp", HOME, "/usr", "/proc", "/dev"}

    def bind(host, inside, option="--ro-bind"):
        # Folders bwrap would create on the way are traversable by the sandbox's uid.
        for parent in reversed(Path(inside).parents):
            if str(parent) not in made:
                made.add(str(parent))
                cmd.extend(["--perms", "0755", "--dir", str(parent)])
        made.add(str(inside))
        cmd.extend([option, str(host), str(inside)])

    for name in _ETC_FILES:
        path = Path("/etc") / name
        if path.exists():
            bind(path, path)
    cmd += ["--proc", "/proc", "--dev", "/dev"]
    for device in sorted(Path("/dev").glob("nvidia*")):  # CUDA, when the grader has a GPU
        cmd += ["--dev-bind", str(device), str(device)]
    if Path("/sys/devices/system/cpu").exists():  # CPU topology, which PyTorch reads
        bind("/sys/devices/system/cpu", "/sys/devices/system/cpu")
    size = str(limits.tmp_mb * 2**20)
    cmd += ["--perms", "1777", "--size", size, "--tmpfs", "/tmp",
            "--perms", "0755", "--dir", str(Path(HOME).parent),
            "--perms", "0777", "--size", size, "--tmpfs", HOME]
    font_cache = _matplotlib_font_cache()
    if font_cache is not None:
        cmd += ["--perms", "0777", "--dir", "/tmp/matplotlib",
                "--ro-bind", str(font_cache), f"/tmp/matplotlib/{font_cache.name}"]
    roots = _python_roots()
    for root in roots:
        bind(root, root)
    for hidden in _hidden_inside(roots):
        cmd.extend(["--tmpfs", str(hidden)])
    bind(student_package(), PACKAGE_MOUNT)
    data = _data_override()
    if data is not None and data.is_dir():
        bind(data, "/opt/cs-data")
    for host, inside, writable in binds:
        bind(host, inside, "--bind" if writable else "--ro-bind")
    variables = {
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"]),
        "HOME": HOME, "TMPDIR": "/tmp", "USER": "student", "LANG": "C.UTF-8",
        "PYTHONPATH": PACKAGE_MOUNT, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1",
        "MPLCONFIGDIR": "/tmp/matplotlib",
    }
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                 "CUDA_VISIBLE_DEVICES"):
        if name in os.environ:
            variables[name] = os.environ[name]
    if data is not None:
        variables["CS_HELPERS_DATA"] = "/opt/cs-data"
    variables.update(env or {})
    cmd.append("--clearenv")
    for key, value in variables.items():
        cmd += ["--setenv", key, value]
    cmd += ["--chdir", chdir]
    if root_mode:
        # bwrap keeps root's capabilities to set up the mounts; setpriv then becomes
        # nobody for good, with every capability dropped and no way back.
        cmd += ["--", "/usr/bin/setpriv", f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}",
                "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]
    else:
        cmd += ["--"]
    return cmd + list(argv)


def private_dir(prefix: str) -> Path:
    """A host folder that the sandboxed uid can write to (bind it into the sandbox);
    the caller removes it."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if os.geteuid() == 0:
        os.chown(path, SANDBOX_UID, SANDBOX_UID)
    return path


# -- nbgrader's execution of the notebook, in the sandbox ------------------------------

def _kernel_argv(connection_file: str, socket_dir: Path) -> tuple[list[str], Limits]:
    """The command that starts an IPython kernel in the sandbox, reading
    ``connection_file`` and binding its ``ipc`` sockets in ``socket_dir``."""
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", connection_file]
    limits = Limits(memory_gb=float(os.environ.get("CS_HELPERS_KERNEL_MEMORY_GB", "8")), cpu_s=3600)
    return wrap(argv, binds=((socket_dir, socket_dir, True),), limits=limits), limits


@dataclass
class _StartedKernel:
    """A sandboxed kernel started ahead of its manager (:func:`start_kernel_early`)."""

    socket_dir: Path
    connection_file: str
    process: subprocess.Popen

    def discard(self) -> None:
        if self.process.poll() is None:
            self.process.kill()  # bwrap's death takes the sandbox with it
            self.process.wait()
        shutil.rmtree(self.socket_dir, ignore_errors=True)


_early_kernel: _StartedKernel | None = None
_early_kernel_lock = threading.Lock()


def start_kernel_early() -> _StartedKernel | None:
    """Starts the next notebook's sandboxed kernel now, in the background: the next
    :class:`SandboxedKernelManager` takes it over instead of starting one, so that the
    kernel's start (the sandbox, Python, IPython: about a second on the course's 2-core
    machine) overlaps the grader's own work before the execution (its imports,
    ``generate_assignment``, nbgrader's preparation of the submission) on another core.
    At most one kernel waits; one never taken over is stopped at exit. Does nothing
    where no sandbox is required, and nothing happens when it cannot start: the manager
    then starts its kernel as usual and reports the problem. Returns the kernel it
    started, if any: the calling thread must outlive it (bwrap's ``--die-with-parent``
    follows the thread that started the sandbox)."""
    global _early_kernel
    if unsandboxed_allowed():
        return None
    with _early_kernel_lock:
        if _early_kernel is not None:
            return None
        try:
            from jupyter_client.connect import write_connection_file
            from jupyter_client.launcher import launch_kernel

            if sandbox_problem() is not None:
                return None
            socket_dir = private_dir("cs-kernel-")
            connection_file, _ = write_connection_file(
                str(socket_dir / "connection.json"), ip=str(socket_dir / "kernel"), transport="ipc",
                kernel_name="python3")
            if os.geteuid() == 0:  # the kernel runs as nobody and must read its key
                os.chown(connection_file, SANDBOX_UID, SANDBOX_UID)
            argv, limits = _kernel_argv(connection_file, socket_dir)
            process = launch_kernel(argv, env=os.environ.copy(), preexec_fn=limits.apply)
        except Exception:  # noqa: BLE001 - the regular start reports what is wrong
            return None
        _early_kernel = _StartedKernel(socket_dir, connection_file, process)
        return _early_kernel


def _take_early_kernel() -> _StartedKernel | None:
    global _early_kernel
    with _early_kernel_lock:
        kernel, _early_kernel = _early_kernel, None
    if kernel is not None and kernel.process.poll() is not None:  # it died while waiting
        kernel.discard()
        return None
    return kernel


def _discard_early_kernel() -> None:
    kernel = _take_early_kernel()
    if kernel is not None:
        kernel.discard()


atexit.register(_discard_early_kernel)  # a kernel started early and never taken over


def _kernel_manager_class():
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_client.provisioning import LocalProvisioner

    class SandboxedKernelManager(AsyncKernelManager):
        """A Jupyter kernel inside the sandbox, reached over ``ipc`` sockets in a
        folder bound into it (the sandbox has no network to share with the grader).
        It takes over a kernel started early (:func:`start_kernel_early`) when one
        waits."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.transport = "ipc"
            self._early = None
            if getattr(self, "transport_encryption", "disabled") == "disabled":
                self._early = _take_early_kernel()
            if self._early is not None:
                self._socket_dir = self._early.socket_dir
                self.connection_file = self._early.connection_file
                self.load_connection_file()  # its ip, ports and key
                self._connection_file_written = True  # the kernel has read it: keep it as it is
            else:
                self._socket_dir = private_dir("cs-kernel-")
                self.ip = str(self._socket_dir / "kernel")
                self.connection_file = str(self._socket_dir / "connection.json")

        def write_connection_file(self, **kwargs):
            result = super().write_connection_file(**kwargs)
            if os.geteuid() == 0 and self._early is None:  # the kernel runs as nobody and must read its key
                os.chown(self.connection_file, SANDBOX_UID, SANDBOX_UID)
            return result

        def format_kernel_cmd(self, extra_arguments=None):
            argv, self._limits = _kernel_argv(self.connection_file, self._socket_dir)
            return argv

        async def _async_launch_kernel(self, kernel_cmd, **kw):
            early, self._early = self._early, None
            if early is not None and isinstance(self.provisioner, LocalProvisioner) \
                    and early.process.poll() is None:
                # Take over the running process, as LocalProvisioner.launch_kernel
                # records the one it starts.
                provisioner = self.provisioner
                provisioner.process = early.process
                provisioner.pid = early.process.pid
                try:
                    provisioner.pgid = os.getpgid(early.process.pid)
                except OSError:  # it ended just now: nbgrader's execution reports a dead kernel
                    provisioner.pgid = None
                provisioner.cwd = HOME
                self._reconcile_connection_info(provisioner.connection_info)
                return
            if early is not None:  # it died, or another provisioner: start afresh, same connection file
                if early.process.poll() is None:
                    early.process.kill()
                    early.process.wait()
            kw.pop("cwd", None)  # the sandbox starts in its private HOME
            kw["preexec_fn"] = getattr(self, "_limits", Limits()).apply
            return await super()._async_launch_kernel(kernel_cmd, **kw)

        async def _async_cleanup_resources(self, restart=False):
            await super()._async_cleanup_resources(restart=restart)
            if not restart:
                shutil.rmtree(self._socket_dir, ignore_errors=True)

        cleanup_resources = _async_cleanup_resources

    return SandboxedKernelManager
