"""Stale torch-extension build locks: removed when no builder can hold them, kept while one can, and a run
that finds one left by a killed build trains instead of waiting forever."""

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import FAST, run_cmd

OPS = ("cpu_adam", "deepspeed_shm_comm", "fused_adam")  # what a CPU run of DeepSpeed builds


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    return tmp_path / "ext"


@pytest.fixture
def clear(root):
    """``clear_stale_build_locks``, imported here so that the end-to-end test also runs (and hangs) on a tree
    without it."""
    from sftdist.engine.build_locks import clear_stale_build_locks

    return clear_stale_build_locks


def make_lock(root: Path, op: str, age_s: float) -> Path:
    lock = root / op / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    os.utime(lock, (time.time() - age_s,) * 2)
    return lock


@pytest.fixture
def builder():
    """``builder(cwd, hold=None)``: a live process working in ``cwd`` (and holding ``hold`` open)."""
    procs = []

    def start(cwd: Path, hold: Path | None = None) -> subprocess.Popen:
        stdin = open(hold) if hold else subprocess.DEVNULL  # open from exec on: no wait for it to start
        procs.append(subprocess.Popen(["sleep", "60"], cwd=cwd, stdin=stdin))
        if hold:
            stdin.close()
        return procs[-1]

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_root_is_where_torch_builds(root, monkeypatch):
    from torch.utils.cpp_extension import _get_build_directory

    from sftdist.engine.build_locks import extensions_root, use_env_extensions_dir

    monkeypatch.setenv("PATH", os.environ["PATH"])  # restored afterwards: use_env_extensions_dir may change it

    # The user's TORCH_EXTENSIONS_DIR is kept.
    assert use_env_extensions_dir() == extensions_root() == root.resolve() == \
        Path(_get_build_directory("", verbose=False)).resolve()  # "": the root
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    shared = Path(_get_build_directory("", verbose=False)).resolve()  # torch's folder for every environment
    own = extensions_root()
    assert own.parent == shared and own.name.startswith("env-")
    assert use_env_extensions_dir() == own == Path(_get_build_directory("", verbose=False)).resolve()


def test_each_environment_builds_in_its_own_directory(tmp_path, monkeypatch):
    import torch

    from sftdist.engine.build_locks import env_extensions_dir, extensions_root

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    dirs = {}
    for name in ("venv-a", "venv-b"):
        (tmp_path / name).mkdir()
        monkeypatch.setattr(sys, "prefix", str(tmp_path / name))
        dirs[name] = env_extensions_dir()
    assert dirs["venv-a"] != dirs["venv-b"] and dirs["venv-a"].parent == dirs["venv-b"].parent
    assert extensions_root() == dirs["venv-b"]
    (tmp_path / "link").symlink_to(tmp_path / "venv-a")  # the same environment by another path
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "link"))
    assert env_extensions_dir() == dirs["venv-a"]
    monkeypatch.setattr(torch, "__version__", "0.0.1")  # torch upgraded in place: the old ops do not fit
    assert env_extensions_dir() != dirs["venv-a"]
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    assert extensions_root() == (tmp_path / "mine").resolve()


def test_stale_lock_is_removed_and_reported(root, clear):
    lock = make_lock(root, "cpu_adam", age_s=3600)
    make_lock(root, "fused_adam", age_s=0).unlink()  # an op directory without a lock
    logged = []
    assert clear(60, log=logged.append) == [lock]
    assert not lock.exists()
    assert len(logged) == 1 and str(lock) in logged[0] and "stale" in logged[0]


def test_lock_of_a_live_local_builder_is_kept_however_old(root, clear, builder):
    in_build = make_lock(root, "cpu_adam", age_s=3600)
    (root / "cpu_adam" / "sub").mkdir()
    builder(root / "cpu_adam" / "sub")  # ninja and the compiler run with the op directory as cwd
    held = make_lock(root, "fused_adam", age_s=3600)
    builder(root, hold=held)  # the baton keeps the lock open before ninja starts and after it ends
    logged = []
    start = time.monotonic()
    assert clear(60, poll_s=30, log=logged.append) == []
    assert time.monotonic() - start < 10  # no waiting either
    assert in_build.exists() and held.exists() and logged == []


def test_young_lock_of_a_live_local_builder_is_kept_without_waiting(root, clear, builder):
    lock = make_lock(root, "deepspeed_shm_comm", age_s=0)
    builder(lock.parent)
    start = time.monotonic()
    assert clear(600, poll_s=30, log=[].append) == []
    assert lock.exists() and time.monotonic() - start < 10


def test_young_lock_without_builder_is_waited_for_until_stale(root, clear):
    lock = make_lock(root, "cpu_adam", age_s=0.5)
    logged = []
    start = time.monotonic()
    assert clear(2.0, poll_s=0.1, log=logged.append) == [lock]
    assert 1.3 <= time.monotonic() - start < 10
    assert not lock.exists()
    assert "waiting" in logged[0] and str(lock) in logged[0] and str(lock) in logged[-1]


def test_lock_released_while_waiting_is_not_reported(root, clear):
    lock = make_lock(root, "cpu_adam", age_s=0)
    threading.Timer(0.5, lock.unlink).start()  # a builder on another node finishes
    assert clear(30, poll_s=0.1, log=[].append) == []


def test_lock_that_cannot_be_removed_names_the_file(root, clear, monkeypatch):
    lock = make_lock(root, "cpu_adam", age_s=3600)

    def refuse(self, missing_ok=False):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "unlink", refuse)
    with pytest.raises(RuntimeError, match=f"{lock}.*delete it"):
        clear(60, log=[].append)


def test_training_after_a_killed_build_removes_its_locks(tmp_path, monkeypatch):
    from sftdist.engine.build_locks import env_extensions_dir

    built = env_extensions_dir()  # where this environment's runs (and `make setup`'s prebuild_ops) build ops
    ext = tmp_path / "ext"
    if built.is_dir():  # the ops already built, so the run links them instead of compiling (mtimes kept)
        shutil.copytree(built, ext, symlinks=True)
    libraries = {so: so.stat().st_mtime for so in ext.glob("*/*.so")}
    # make setup prebuilt what a run loads, so that the first run starts in seconds, not minutes (#25)
    assert {so.stem for so in libraries} >= set(OPS), f"ops not prebuilt in {built}: run make setup"
    locks = [make_lock(ext, op, age_s=3600) for op in OPS]
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ext))
    # Without the clean-up, DeepSpeed waits on the first lock forever and this times out.
    train = [sys.executable, "-m", "sftdist.train", *FAST, f"output_dir={tmp_path / 'run'}"]
    proc = run_cmd(train, timeout=240)
    assert not any(lock.exists() for lock in locks)
    assert all(str(lock) in proc.stderr for lock in locks)
    assert (tmp_path / "run" / "final").is_dir()
    # What was built before (by prebuild_ops on a fresh machine) is what a run loads: nothing was rebuilt.
    assert {so: so.stat().st_mtime for so in libraries} == libraries


def test_runs_build_with_their_environments_ninja(tmp_path, monkeypatch):
    """torch runs the ninja PATH finds, and two ninja versions hash build commands differently, so each
    rebuilt every op the other had built. A run uses its environment's own ninja whatever PATH says."""
    from sftdist.engine.build_locks import use_env_ninja

    own = Path(sys.executable).parent / "ninja"
    if not own.is_file():
        pytest.skip(f"no ninja beside {sys.executable} (pip's ninja, a dependency, lives there in a venv)")
    other = tmp_path / "bin"
    other.mkdir()
    (other / "ninja").write_text("#!/bin/sh\necho 1.11.1\n")
    (other / "ninja").chmod(0o755)
    monkeypatch.setenv("PATH", f"{other}{os.pathsep}/usr/bin{os.pathsep}/bin")
    use_env_ninja()
    assert Path(shutil.which("ninja")).samefile(own)
    path = os.environ["PATH"]
    use_env_ninja()  # already first: PATH stays as it is
    assert os.environ["PATH"] == path
