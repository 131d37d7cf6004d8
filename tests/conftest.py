"""Shared fixtures: an isolated asset cache, the demo tokenizer, Hydra composition, and helpers that run
the real entry points (python -m sftdist.train, torchrun, sftdist-launch) in their own processes.

``run_cmd`` forks ``python -m …``/``python -c …`` runs and torchrun-style multi-rank runs from the session's
fork server (``tests/forkserver.py``), which has imported the stack once; ``fresh=True`` (or
``SFTDIST_TEST_FRESH=1`` for the whole session) starts a new interpreter instead, for the tests whose
subject is the interpreter or the launcher.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.forkserver import ForkedProcess, ForkServer, as_job

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Keep built-in demo assets out of the user's cache; subprocesses inherit this. One cache per pytest-xdist
# worker (whose environment is the controller's): two workers writing the same asset or data cache at once
# would read each other's partial files.
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
TEST_CACHE = str(REPO / ".pytest_cache" / "sftdist-assets")
if os.environ.setdefault("SFTDIST_CACHE", TEST_CACHE) == TEST_CACHE and WORKER:
    os.environ["SFTDIST_CACHE"] = f"{TEST_CACHE}-{WORKER}"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download anything
SESSION_ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # before any test changes it
_fork_server: list[ForkServer] = []

# Small and fast: a few optimizer steps of the tiny model on a slice of the demo data.
FAST = ["train.max_steps=3", "train.micro_batch_size=2", "train.global_batch_size=8", "train.max_length=96",
        "train.warmup_steps=0", "logging.log_every=1", "data.sources.0.max_samples=64",
        "data.sources.1.max_samples=16"]


def pytest_configure(config):
    if WORKER:  # each of the N workers computes in-process on its share of the cores
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))))


# Test modules by wall time in a clean-clone `make test`, longest first (see tests/README.md).
LONGEST_MODULES = ("dist/test_dead_rank.py", "smoke/test_real_model.py", "smoke/test_faults.py",
                   "smoke/test_extension_dirs.py", "smoke/test_resume.py", "smoke/test_train_cpu.py", "dist/test_resume_world_sizes.py",
                   "dist/test_loss_equivalence.py", "smoke/test_resume_semantics.py", "dist/test_stop_signals.py")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """Skip GPU tests without a GPU. For ``pytest -n N --dist loadgroup`` (``make test``), each test module
    is one unit of work, so a module's shared runs (module fixtures) are trained once, on one worker; the
    SLURM tests are one unit, as they share one cluster."""
    import torch

    slurm = REPO / "tests" / "slurm"
    for item in items:
        group = "slurm" if slurm in Path(str(item.path)).parents else str(Path(str(item.path)).relative_to(REPO))
        item.add_marker(pytest.mark.xdist_group(group))
    # xdist hands out modules in collection order: the longest go first, so that no worker starts one of
    # them while the other has nothing left to do (longest-processing-time-first).
    rank = {name: i for i, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(str(Path(str(item.path)).relative_to(REPO / "tests")), len(rank)))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_tokenizer():
    from sftdist.config import ModelConfig
    from sftdist.engine.model import load_tokenizer

    return load_tokenizer(ModelConfig(tokenizer="builtin:demo", from_config={"model_type": "llama"}))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is not present beside the checkout")
    return SHARED


def compose(overrides: list[str] | None = None):
    """The composed DictConfig for ``overrides``, as ``python -m sftdist.train`` would see it."""
    from sftdist.config import compose_raw

    return compose_raw(overrides or [])


def fork_server() -> ForkServer | None:
    """The session's fork server, started on first use; None under ``SFTDIST_TEST_FRESH=1`` or when it
    could not start (then every run starts a fresh interpreter, as it would without it)."""
    if os.environ.get("SFTDIST_TEST_FRESH") == "1":
        return None
    if not _fork_server:
        _fork_server.append(ForkServer(str(REPO), SESSION_ENV))
    return _fork_server[0] if _fork_server[0].ok else None


def _forkable(cmd: list[str], env: dict[str, str], fresh: bool):
    """``(server, (argv, nproc))`` when ``cmd`` with ``env`` may be forked from the fork server, else None."""
    job = None if fresh else as_job(cmd)
    server = fork_server() if job else None
    return (server, job) if server and server.accepts(env) else None


def start_cmd(cmd: list[str], log: Path, *, env: dict[str, str] | None = None,
              fresh: bool = False) -> subprocess.Popen | ForkedProcess:
    """Start ``cmd`` from the repo root in a session of its own (``os.killpg(proc.pid, …)`` reaches all it
    started), stdout and stderr to the file ``log``; forked from the fork server where it can be."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    if forkable := _forkable(cmd, env, fresh):
        (server, (argv, nproc)) = forkable
        Path(log).write_text("")
        return server.start(argv, env=env, cwd=str(REPO), stdout=str(log), nproc=nproc)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=Path(log).open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _run_forked(server: ForkServer, cmd: list[str], job, env: dict, timeout: float) -> subprocess.CompletedProcess:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sftdist-job-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        proc = server.start(job[0], env=env, cwd=str(REPO), stdout=str(out), stderr=str(err), nproc=job[1])
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
            proc.wait()
            raise subprocess.TimeoutExpired(cmd, timeout, output=out.read_text(errors="replace"),
                                            stderr=err.read_text(errors="replace"))
        return subprocess.CompletedProcess(cmd, returncode, out.read_text(errors="replace"),
                                           err.read_text(errors="replace"))


def run_cmd(cmd: list[str], *, timeout: int = 600, check: bool = True, env: dict[str, str] | None = None,
            fresh: bool = False) -> subprocess.CompletedProcess:
    """Run a command from the repo root (``env``: extra variables); on failure show its output.

    A ``python -m/-c`` or torchrun-style command is forked from the fork server unless ``fresh``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    if forkable := _forkable(cmd, env, fresh):
        proc = _run_forked(forkable[0], cmd, forkable[1], env, timeout)
    else:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def train_single(overrides: list[str], **kw) -> subprocess.CompletedProcess:
    return run_cmd([sys.executable, "-m", "sftdist.train", *overrides], **kw)


def train_torchrun(nproc: int, overrides: list[str], **kw) -> subprocess.CompletedProcess:
    return run_cmd([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                    str(nproc), "-m", "sftdist.train", *overrides], **kw)


def read_metrics(run_dir: Path, *, baseline: bool = False) -> list[dict]:
    """The training steps' rows of ``metrics.jsonl``; with ``baseline`` also the step-0 eval row."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if baseline or r["step"] > 0]


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory):
    """Train once per distinct layout and share the run directory between tests.

    ``trained_runs(name, nproc, overrides)`` -> run directory. ``nproc=0`` means no launcher at all
    (``python -m sftdist.train``); otherwise torchrun with that many processes.
    """
    cache: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("runs")

    def get(name: str, nproc: int, overrides: list[str]) -> Path:
        if name not in cache:
            run_dir = root / name
            args = [*FAST, *overrides, f"output_dir={run_dir}"]
            proc = train_single(args) if nproc == 0 else train_torchrun(nproc, args)
            (run_dir / "stdout.txt").write_text(proc.stdout)
            cache[name] = run_dir
        return cache[name]

    return get
