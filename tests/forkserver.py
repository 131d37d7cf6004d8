"""A fork server for the tests' training runs: import torch, DeepSpeed, transformers and Hydra once per test
session, then fork a fresh child per ``python -m …`` / ``python -c …`` run (and N children per torchrun-style
multi-rank run), so that each run starts clean but pays no imports.

Why: a 3-step run of the tiny model costs ~12 CPU-s in a fresh interpreter, of which the steps take ~1 s;
the rest is importing the stack and DeepSpeed's ``cpuinfo`` subprocesses. The suite starts ~170 such runs.

What a child gets, as a fresh ``python`` would:

- its own session (``os.setsid``), so ``os.killpg(pid, sig)`` reaches it and everything it started, as
  ``Popen(start_new_session=True)`` did;
- the caller's environment, working directory, ``sys.argv`` and ``sys.path[0]``, stdin from /dev/null,
  stdout and stderr to files (or one file for both);
- ``python``'s exit status: ``SystemExit``'s code (a message goes to stderr with status 1), 1 after an
  uncaught exception with its traceback, the signal's negative number when a signal killed it; non-daemon
  threads are joined and ``atexit`` functions run before it exits.

A multi-rank job (``nproc`` > 0) stands in for ``torchrun --standalone --nproc_per_node N``: the job forks N
ranks with torchrun's process-group variables (rank 0 hosts the store, as without an agent) and their output
in one stream; when a rank fails, the others get SIGTERM (then SIGKILL after ``RANK_GRACE_S``) and the job
exits 1, as torchrun does. Tests whose subject is torchrun itself (its signal handling, its child processes)
still start the real one.

The server never computes with torch before forking: an OpenMP or gloo thread pool does not survive a fork.
It refuses to start (and the caller falls back to fresh processes) when importing left a second thread.
What the server imports is read at import time by some libraries (``HF_HOME``, ``OMP_NUM_THREADS``, …), so
the client (``tests.conftest.run_cmd``) only forks jobs whose environment agrees with the server's on such
variables (``FRESH_ENV_PREFIXES``), and starts a fresh interpreter otherwise. ``SFTDIST_TEST_FRESH=1`` runs
every job fresh, to compare (``tests/smoke/test_forkserver.py`` does for one run).

Protocol over a Unix socket, one connection per job: the client sends one JSON line (``argv``, ``env``,
``cwd``, ``stdout``, ``stderr``, ``nproc``, ``port``), the server answers ``{"pid": …}`` at once and
``{"returncode": …}`` when the job has ended.
"""

from __future__ import annotations

import atexit
import builtins
import json
import os
import runpy
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback

# Everything a training run, an export or a CLI imports; a module not listed here is imported by the child.
PRELOAD = (
    "torch", "torch.distributed", "torch.distributed.elastic.multiprocessing.errors", "numpy", "pandas", "pyarrow",
    "deepspeed", "deepspeed.ops.adam", "deepspeed.runtime.engine", "deepspeed.runtime.zero.stage3",
    "deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.bf16_optimizer", "deepspeed.checkpoint",
    "transformers", "transformers.models.llama.modeling_llama", "transformers.models.qwen2.modeling_qwen2",
    "transformers.modeling_utils", "transformers.trainer_pt_utils", "peft", "datasets", "safetensors.torch",
    "hydra", "hydra.main", "omegaconf", "hydra._internal.utils", "hydra.core.utils", "tqdm", "psutil",
    "sftdist.train", "sftdist.cli", "sftdist.cluster.launch", "sftdist.lifecycle.export", "sftdist.tools.plot",
    "sftdist.tools.sweep_report", "sftdist.tools.data_cli", "sftdist.tools.plan", "sftdist.tools.baseline_cli",
)
RANK_GRACE_S = 30  # torchrun's default shutdown timeout: SIGTERM, then SIGKILL


def preload() -> None:
    """Import the stack, and answer DeepSpeed's CPU-feature query once (py-cpuinfo runs ``python -m cpuinfo``
    in a subprocess for it, ~1 s, twice per run)."""
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception as e:  # an optional part missing here: the child imports (and fails) as usual
            print(f"forkserver: could not preload {name}: {e}", file=sys.stderr)
    try:
        import cpuinfo

        info = cpuinfo.get_cpu_info()
        cpuinfo.get_cpu_info = lambda: dict(info)
    except Exception as e:
        print(f"forkserver: no cpuinfo cache: {e}", file=sys.stderr)


FORK_SAFE_THREADS = {"jemalloc_bg_thd"}  # pyarrow's allocator: jemalloc re-creates it after a fork


def unsafe_threads() -> list[str]:
    """The names of this process's threads besides the main one that a fork would lose."""
    names = []
    for task in os.listdir("/proc/self/task"):
        if int(task) != os.getpid():
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
    return [n for n in names if n not in FORK_SAFE_THREADS]


# --- the child ----------------------------------------------------------------------------------------

def exit_status(code) -> int:
    """What the interpreter makes of ``SystemExit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr, flush=True)
    return 1


def run_python(argv: list[str], cwd: str) -> None:
    """Run ``argv`` (``[python, -m, module, …]``, ``[python, -c, code, …]`` or ``[python, script, …]``) in this
    process as ``python`` would, then exit with its status."""
    status = 0
    try:
        if argv[1] == "-m":
            sys.argv = [argv[2], *argv[3:]]
            sys.path[0] = cwd
            sys.modules.pop(argv[2], None)  # preloaded, but a fresh `python -m` has not imported it yet
            runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
        elif argv[1] == "-c":
            sys.argv = ["-c", *argv[3:]]
            sys.path[0] = ""
            exec(compile(argv[2], "<string>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
        else:
            sys.argv = argv[1:]
            sys.path[0] = os.path.dirname(os.path.abspath(argv[1]))
            runpy.run_path(argv[1], run_name="__main__")
    except SystemExit as e:
        status = exit_status(e.code)
    except BaseException:
        traceback.print_exc()
        status = 1
    finally:
        try:
            threading._shutdown()  # join non-daemon threads, as interpreter exit does
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)


def redirect(stdout: str, stderr: str | None) -> None:
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    out = os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    err = out if not stderr else os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(out, 1)
    os.dup2(err, 2)


def torchrun_env(env: dict, rank: int, nproc: int, port: int) -> dict:
    """The variables ``torchrun --standalone --nproc_per_node nproc`` gives worker ``rank``."""
    return {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
            "ROLE_NAME": "default", "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
            "GROUP_WORLD_SIZE": "1", "ROLE_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
            "TORCHELASTIC_RUN_ID": "forkserver", "TORCHELASTIC_USE_AGENT_STORE": "False",
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")}


def run_ranks(req: dict) -> None:
    """Supervise ``nproc`` forked ranks as torchrun does; exit 0 when all succeed, else 1."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a signal to the session reaches the ranks themselves
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    base_env = dict(os.environ)
    ranks = []
    for rank in range(req["nproc"]):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            os.environ.clear()
            os.environ.update(torchrun_env(base_env, rank, req["nproc"], req["port"]))
            run_python(req["argv"], req["cwd"])
        ranks.append(pid)
    failed, deadline = False, None
    while ranks:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            if deadline and time.monotonic() > deadline:
                for p in ranks:
                    kill(p, signal.SIGKILL)
            time.sleep(0.05)
            continue
        if pid in ranks:
            ranks.remove(pid)
            if os.waitstatus_to_exitcode(status) != 0 and not failed:
                failed, deadline = True, time.monotonic() + RANK_GRACE_S
                for p in ranks:
                    kill(p, signal.SIGTERM)
    os._exit(1 if failed else 0)


def kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def start_job(req: dict) -> None:
    """In the forked job process: become a session leader, take the caller's world, run; never returns."""
    try:
        os.setsid()
        redirect(req["stdout"], req.get("stderr"))
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        if req.get("nproc"):
            run_ranks(req)
        run_python(req["argv"], req["cwd"])
    except BaseException:
        traceback.print_exc()
        os._exit(1)


# --- the server ---------------------------------------------------------------------------------------

def serve(path: str) -> None:
    parent = os.getppid()
    preload()
    if threads := unsafe_threads():
        print(f"forkserver: refused: threads {threads} run after importing, and threads do not survive "
              f"a fork", flush=True)
        return
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    jobs: dict[int, socket.socket] = {}
    while os.getppid() == parent:  # the test session is gone: stop
        readable, _, _ = select.select([listener], [], [], 0.05)
        if readable:
            conn, _ = listener.accept()
            req = json.loads(conn.makefile("r").readline())
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                listener.close()
                conn.close()
                start_job(req)
            conn.sendall((json.dumps({"pid": pid}) + "\n").encode())
            jobs[pid] = conn
        while jobs:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = jobs.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall((json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n").encode())
                except OSError:
                    pass  # the caller stopped waiting (a timeout): nothing to tell
                conn.close()
    for pid in jobs:
        kill(-pid, signal.SIGKILL)


if __name__ == "__main__":
    serve(sys.argv[1])


# --- the client, in the test session ------------------------------------------------------------------

# Variables that some library reads when it is imported (or that change what is imported): a job whose
# value differs from the server's runs in a fresh interpreter instead.
FRESH_ENV_PREFIXES = ("HF_", "HUGGINGFACE", "TRANSFORMERS", "TORCH", "DS_", "DEEPSPEED", "OMP_", "MKL_", "OPENBLAS",
                      "PYTHON", "CUDA", "NCCL", "LD_")
# ... except these, read only when used: a job may differ from the server in them.
RUNTIME_ENV = ("TORCH_EXTENSIONS_DIR", "TORCHINDUCTOR_CACHE_DIR", "TORCHELASTIC_", "TORCH_NCCL_", "PYTHONUNBUFFERED",
               "PYTHONDONTWRITEBYTECODE")


class ForkedProcess:
    """A job of the fork server, used like ``subprocess.Popen``: ``pid`` leads the job's session."""

    def __init__(self, args, conn: socket.socket):
        self.args, self._conn, self._buffer = args, conn, b""
        self.pid = json.loads(self._line(None))["pid"]
        self.returncode = None

    def _line(self, timeout):
        while b"\n" not in self._buffer:
            if timeout is not None and not select.select([self._conn], [], [], max(timeout, 0))[0]:
                return None
            chunk = self._conn.recv(4096)
            if not chunk:
                raise RuntimeError("the fork server went away")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def poll(self):
        return self.wait(timeout=0, _raise=False)

    def wait(self, timeout=None, _raise=True):
        if self.returncode is None:
            deadline = None if timeout is None else time.monotonic() + timeout
            line = self._line(None if deadline is None else deadline - time.monotonic())
            if line is None:
                if _raise:
                    raise subprocess.TimeoutExpired(self.args, timeout)
                return None
            self.returncode = json.loads(line)["returncode"]
            self._conn.close()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The server process of this test session (started on first use; stopped with the session)."""

    def __init__(self, repo: str, env: dict):
        self.env = {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.socket = os.path.join(tempfile.mkdtemp(prefix="sftdist-fork-"), "server.sock")
        self.log = self.socket.replace("server.sock", "server.log")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.forkserver", self.socket], cwd=repo,
                                         env=self.env, stdout=subprocess.PIPE, stderr=log, text=True)
        line = "ready?"
        while line and line.strip() != "ready" and not line.startswith("forkserver: refused"):
            line = self.proc.stdout.readline()  # (DeepSpeed prints on import)
        self.ok = line.strip() == "ready"
        if not self.ok:
            print(f"fork server not used ({line.strip() or 'it exited'}; {self.log}): runs start fresh "
                  f"interpreters", file=sys.stderr)
        atexit.register(self.close)

    def accepts(self, env: dict) -> bool:
        """Whether a job with ``env`` may fork from this server (it agrees on every import-time variable)."""
        keys = {k for k in (*env, *self.env) if k.startswith(FRESH_ENV_PREFIXES) and not k.startswith(RUNTIME_ENV)}
        differ = sorted(k for k in keys if env.get(k) != self.env.get(k))
        if differ and os.environ.get("SFTDIST_TEST_FORK_DEBUG"):
            print(f"forkserver: fresh interpreter, the environment differs in {differ}", file=sys.__stderr__)
        return self.ok and not differ

    def start(self, argv: list[str], *, env: dict, cwd: str, stdout: str, stderr: str | None = None,
              nproc: int = 0) -> ForkedProcess:
        from sftdist.cluster.launch import free_port

        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.socket)
        request = {"argv": argv, "env": env, "cwd": str(cwd), "stdout": str(stdout),
                   "stderr": str(stderr) if stderr else None, "nproc": nproc, "port": free_port() if nproc else 0}
        conn.sendall((json.dumps(request) + "\n").encode())
        return ForkedProcess(argv, conn)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def as_job(cmd: list[str]):
    """``(argv, nproc)`` when ``cmd`` is a ``python -m/-c/script.py …`` run (nproc 0) or a ``torchrun --standalone
    --nproc_per_node N -m …`` run of python (N), which the fork server can run; else None."""
    cmd = [str(c) for c in cmd]
    if len(cmd) < 2 or cmd[0] != sys.executable:
        return None
    if cmd[1].endswith(".py") and os.path.isfile(cmd[1]):  # python script.py …
        return cmd, 0
    if len(cmd) < 3 or cmd[1] not in ("-m", "-c"):
        return None
    if cmd[1:3] != ["-m", "torch.distributed.run"]:
        return cmd, 0
    rest = cmd[3:]
    if rest[:2] == ["--standalone", "--nproc_per_node"] and len(rest) > 4 and rest[2].isdigit() and rest[3] == "-m":
        return [cmd[0], *rest[3:]], int(rest[2])
    return None
