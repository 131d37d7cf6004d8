"""Where DeepSpeed's JIT-built ops live (one directory per environment), and removing the build locks that a
killed run left there, so later runs neither rebuild nor hang.

Torch keys its default build root by Python and accelerator only (``~/.cache/torch_extensions/py311_cpu``),
so two clones or virtual environments on one machine shared it: each wrote its own install paths into the
ops' ``build.ninja``, and ninja rebuilt every op whenever the other environment had run last (1-2 min per op;
a 4-step CPU run took 145 s instead of 32 s), while a run started during the other's build waited silently
on its lock. ``use_env_extensions_dir`` gives each environment its own subdirectory instead.

DeepSpeed JIT-compiles its ops (cpu_adam, fused_adam, deepspeed_shm_comm, ...) through
``torch.utils.cpp_extension.load``, which serialises the builders of one op with a ``FileBaton``: the first
process creates ``<build root>/<op>/lock``, builds, and removes the file; every other process polls until the
file is gone, with no timeout. A run killed mid-build (OOM killer, scancel, a second Ctrl-C) never removes it,
and from then on every run on every node that shares the build root waits forever in ``deepspeed.initialize``,
silently.

A lock is left alone while a process on this host is building that op: ninja and the compiler run with the
op's directory as their working directory, and the builder keeps the lock file open. A lock with no local
builder may belong to a builder on another node sharing the filesystem, which cannot be seen from here, so it
is waited for until it is ``stale_after_s`` old (by mtime; the baton never touches it) and then removed.
Set ``stale_after_s`` above the longest build of any op.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterator


def warn(msg: str) -> None:
    """Print on every rank (``sftdist.engine.distributed.log`` is rank 0 only): whichever local rank removes a lock
    is the one that must say so."""
    print(f"[sftdist rank {os.environ.get('RANK', '0')}] WARNING: {msg}", file=sys.stderr, flush=True)


def extensions_root() -> Path:
    """The directory under which ``torch.utils.cpp_extension`` builds each op, in ``<root>/<op>``.

    ``TORCH_EXTENSIONS_DIR`` when set (by the user, or by ``use_env_extensions_dir``), else this
    environment's own directory, ``env_extensions_dir()``. Computed without creating anything: a run whose
    ops are prebuilt must not fail on a read-only home.
    """
    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    if explicit is not None:
        return Path(explicit).resolve()  # resolved, as the working directories in /proc are
    return env_extensions_dir()


def use_env_extensions_dir() -> Path:
    """Make torch build and load DeepSpeed's ops in this environment's own directory, unless the user set
    ``TORCH_EXTENSIONS_DIR``, and with this environment's own ``ninja``; call before DeepSpeed loads any op.
    Returns the directory now in use.

    Both variables are inherited by child processes, which are meant to be of the same environment (ranks).
    """
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(env_extensions_dir()))
    use_env_ninja()
    return extensions_root()


def use_env_ninja() -> None:
    """Put this environment's ``bin`` first on ``PATH`` when it has a ``ninja`` (pip's, a dependency) and
    ``PATH`` would find another one.

    torch runs whichever ``ninja`` ``PATH`` finds, and ninja rebuilds an op whenever the command hashes in
    its ``.ninja_log`` were written by another ninja version (1.12 changed the hash). A run started with the
    venv activated (or by SLURM with its ``bin`` on ``PATH``) and one started as ``.venv/bin/python`` with a
    system ninja then rebuilt every op each time they alternated: ~30-60 s per op.
    """
    own = Path(sys.executable).parent / "ninja"
    found = shutil.which("ninja")
    if own.is_file() and os.access(own, os.X_OK) and (found is None or not os.path.samefile(found, own)):
        os.environ["PATH"] = os.pathsep.join([str(own.parent), os.environ.get("PATH", "")])


def env_extensions_dir() -> Path:
    """``<torch's default root>/<py>_<accelerator>/env-<hash>``: one build directory per environment.

    The hash covers the environment's prefix (``sys.prefix``, the venv), torch's and DeepSpeed's versions:
    what the ops are compiled against. ``<py>_<accelerator>`` is torch's own folder rule (its private
    ``_get_build_directory``), so ``ls`` still shows which Python and accelerator a directory is for.
    """
    import hashlib
    from importlib import metadata

    import torch
    from torch.utils.cpp_extension import get_default_build_root

    try:
        deepspeed_version = metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        deepspeed_version = "none"
    key = f"{os.path.realpath(sys.prefix)}\0{torch.__version__}\0{deepspeed_version}"
    env = "env-" + hashlib.sha256(key.encode()).hexdigest()[:12]
    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root(), f"{python}_{accelerator}", env)


def readable_links(paths) -> Iterator[str]:
    """The targets of those symlinks that can be read: ``/proc`` entries of other users' processes, and of
    processes or descriptors that go away while being looked at, are skipped."""
    for path in paths:
        try:
            yield os.readlink(path)
        except OSError:
            continue


def has_local_builder(op_dir: Path) -> bool:
    """True when a process on this host works inside ``op_dir`` or holds its ``lock`` open."""
    lock = str(op_dir / "lock")
    try:
        procs = [p for p in Path("/proc").iterdir() if p.name.isdigit()]
    except OSError:  # no procfs (not Linux): no builder can be seen
        return False
    for proc in procs:
        if any(Path(cwd).is_relative_to(op_dir) for cwd in readable_links([proc / "cwd"])):
            return True
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue
        if lock in readable_links(fds):  # the baton's descriptor: before ninja starts and after it ends
            return True
    return False


def lock_age(lock: Path) -> float | None:
    """Seconds since ``lock`` was created (its mtime), or None once it is gone."""
    try:
        return time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return None


def settle(lock: Path, stale_after_s: float, poll_s: float, log: Callable[[str], None]) -> float | None:
    """Wait until ``lock`` is gone, has a local builder (both: None) or is stale (its age)."""
    waiting = False
    while True:
        if has_local_builder(lock.parent):
            return None
        age = lock_age(lock)  # read after the scan, so the age is as fresh as the removal needs
        if age is None or age >= stale_after_s:
            return age
        if not waiting:
            log(f"waiting for torch extension build lock {lock} (age {age:.0f} s, no build of it on this "
                f"host: another node may be building it); it is removed once {stale_after_s:.0f} s old")
            waiting = True
        time.sleep(min(poll_s, stale_after_s - age))


def clear_stale_build_locks(stale_after_s: float, *, poll_s: float = 5.0,
                            log: Callable[[str], None] = warn) -> list[Path]:
    """Remove every stale build lock under the torch extensions root; call before DeepSpeed builds ops.

    Locks are settled one after another, but they all age meanwhile, so the whole call waits at most
    about ``stale_after_s``.

    Args:
        stale_after_s: Age (seconds, by mtime) after which a lock with no builder on this host is stale.
        poll_s: Seconds between looks at a young lock with no local builder.
        log: Where the warnings go; by default stderr, on every rank.

    Returns:
        The lock files removed.

    Raises:
        RuntimeError: naming a stale lock that could not be removed (e.g. no permission), to delete by hand.
    """
    root = extensions_root()
    removed = []
    for lock in sorted(root.glob("*/lock")):
        age = settle(lock, stale_after_s, poll_s, log)
        if age is None:
            continue
        try:
            lock.unlink()
        except FileNotFoundError:  # another local rank removed it first
            continue
        except OSError as e:
            raise RuntimeError(f"stale torch extension build lock {lock} (age {age:.0f} s, no build of it on "
                               f"this host) cannot be removed ({e}); every run would wait on it forever: "
                               f"delete it by hand") from e
        log(f"removed stale torch extension build lock {lock} (age {age:.0f} s, no build of it on this "
            f"host): a run was killed while building this op")
        removed.append(lock)
    return removed
