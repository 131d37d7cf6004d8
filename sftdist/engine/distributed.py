"""The thin layer over torch.distributed and DeepSpeed: process group, rank helpers, the pure DeepSpeed
config builder and the engine wrapper. DeepSpeed is imported only inside functions that need it."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist

from sftdist.cluster.launch import free_port
from sftdist.cluster.slurm import slurm_rank_env
from sftdist.config import ConfigError
from sftdist.config.redact import redact_text
from sftdist.engine.build_locks import use_env_extensions_dir


def has_gpu() -> bool:
    """Whether this process will train on a CUDA device."""
    return torch.cuda.is_available()


def init_distributed(*, timeout_s: float = 1800.0) -> None:
    """Join the process group that the launcher set up, or make a one-process group without a launcher.

    ``python -m sftdist.train`` runs without torchrun; DeepSpeed still needs a process group, and without
    the launcher's variables it would go looking for MPI. DeepSpeed's ops are built in this environment's
    own directory (``build_locks.use_env_extensions_dir``).

    A collective that waits ``timeout_s`` for a peer fails, so a rank that died or hung ends the job instead
    of stalling the others forever. gloo raises at once when a peer's connection closes, and after
    ``timeout_s`` when a peer is alive but silent. NCCL aborts a timed-out collective from its watchdog
    thread only with async error handling on (``TORCH_NCCL_ASYNC_ERROR_HANDLING``, set to 1 here unless the
    user set it; torch >= 2.2 defaults to 3, also on), otherwise its ranks would wait in the kernel forever.

    Args:
        timeout_s: Seconds before a collective without an answer fails (``parallelism.collective_timeout_s``).
            It also becomes the default of the groups made later without a timeout of their own: DeepSpeed
            runs its gradient reductions on such a group (a clone of the world), which would otherwise get
            torch's default (30 min for gloo, 10 min for NCCL). ``_slow_group`` keeps its day.
    """
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(slurm_rank_env(os.environ) or dict(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port())))
    if has_gpu():
        torch.cuda.set_device(local_rank())
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # read when the NCCL group is made
    use_env_extensions_dir()  # before DeepSpeed loads its first op (the shm all-reduce, just below)
    import deepspeed
    from torch.distributed import distributed_c10d

    timeout = timedelta(seconds=timeout_s)
    # torch has no public setter for the default of later groups; new_group reads these module values.
    distributed_c10d.default_pg_timeout = distributed_c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(dist_backend="nccl" if has_gpu() else "gloo", timeout=timeout)


def lost_peer(error: BaseException, *, timeout_s: float) -> Optional[str]:
    """What a collective's failure says about the other ranks, or None for any other error.

    gloo raises a plain ``RuntimeError`` whose message names its transport file, so the message is all there
    is to tell a lost peer from a bug. The survivor says it in one line; which rank died first is in the
    launcher's report (torchrun's "Root Cause", SLURM's task exit).

    Example:
        >>> lost_peer(RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer"), timeout_s=9)
        'a peer rank is gone (its connection closed: it died, or was killed)'
        >>> lost_peer(RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out"), timeout_s=9)
        'no answer from a peer rank for 9 s (parallelism.collective_timeout_s): it hung, or is far behind'
        >>> lost_peer(RuntimeError("shape mismatch"), timeout_s=9) is None
        True
    """
    text = str(error)
    if not isinstance(error, dist.DistError) and "gloo/transport" not in text:
        return None
    if "Timed out" in text or "timed out" in text:
        return (f"no answer from a peer rank for {timeout_s:g} s (parallelism.collective_timeout_s): it "
                f"hung, or is far behind")
    return "a peer rank is gone (its connection closed: it died, or was killed)"


def report_lost_peer(error: BaseException, *, timeout_s: float) -> bool:
    """Say on stderr, on every rank (the first to notice may not be rank 0), when ``error`` is a collective
    that failed for a lost peer, naming the silent ranks or those behind; the caller re-raises it. True if
    it was one."""
    why = lost_peer(error, timeout_s=timeout_s)
    if why:
        progress = peer_progress()
        silent = [f"rank {r} (host {progress.get(r, ('?', 0))[0]}, last finished step "
                  f"{progress.get(r, ('', 'none'))[1]})" for r in silent_ranks()]
        who = f"{', '.join(silent)} stopped answering" if silent else behind(progress, rank())
        print(f"sftdist rank {rank()}: error: a collective failed, {why}; {who}; this rank stops too",
              file=sys.stderr, flush=True)
    return why is not None


PROGRESS_KEY = "sftdist/progress/{}"
HEARTBEAT_KEY = "sftdist/heartbeat/{}"
HEARTBEAT_S = 2.0  # a rank's heartbeat thread counts up this often while the process runs (even in a collective)


def _store_client(timeout_s: float = 30) -> "dist.TCPStore":
    """A connection of its own to the launcher's store (``MASTER_ADDR:MASTER_PORT``), for the heartbeat
    thread, the progress notes and the reads after the process group failed, each with a short timeout."""
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=timeout_s))


def start_heartbeat() -> None:
    """Count up ``sftdist/heartbeat/<rank>`` every ``HEARTBEAT_S`` from a daemon thread: a rank that is
    stopped, frozen or dead stops counting, which ``silent_ranks`` sees; a slow one does not."""
    if world_size() <= 1:
        return
    key = HEARTBEAT_KEY.format(rank())

    def beat() -> None:
        try:
            store = _store_client()
            while True:
                store.add(key, 1)
                time.sleep(HEARTBEAT_S)
        except Exception:  # noqa: BLE001 - the store is gone with the job; nothing to report from here
            return

    threading.Thread(target=beat, name="sftdist-heartbeat", daemon=True).start()


def silent_ranks() -> list[int]:
    """The ranks whose heartbeat did not move over three beats ([] when the store cannot answer)."""
    try:
        store = _store_client(timeout_s=10)
        keys = [HEARTBEAT_KEY.format(r) for r in range(world_size())]
        before = [store.add(k, 0) for k in keys]
        time.sleep(3 * HEARTBEAT_S)
        return [r for r, (k, b) in enumerate(zip(keys, before)) if store.add(k, 0) == b and r != rank()]
    except Exception:  # noqa: BLE001 - a diagnosis must never hide the error it diagnoses
        return []


_PROGRESS_STORE = None


def record_progress(step: int) -> None:
    """Note in the launcher's store that this rank finished optimizer ``step`` (on its host), so that the
    ranks still alive can name the one that stopped answering."""
    global _PROGRESS_STORE
    if dist.is_initialized() and world_size() > 1:
        _PROGRESS_STORE = _PROGRESS_STORE or _store_client()
        _PROGRESS_STORE.set(PROGRESS_KEY.format(rank()), f"{socket.gethostname()} {step}")


def peer_progress() -> dict[int, tuple[str, int]]:
    """``{rank: (host, last finished step)}`` from the store, for the ranks that recorded one; {} when the
    store cannot answer (its host was the rank that died)."""
    try:
        store, found = _store_client(timeout_s=10), {}
        for r in range(world_size()):
            if store.check([PROGRESS_KEY.format(r)]):
                host, step = store.get(PROGRESS_KEY.format(r)).decode().rsplit(" ", 1)
                found[r] = (host, int(step))
        return found
    except Exception:  # noqa: BLE001 - a diagnosis must never hide the error it diagnoses
        return {}


def behind(progress: dict[int, tuple[str, int]], me: int) -> str:
    """Which ranks are behind the others, from ``peer_progress``.

    Example:
        >>> behind({0: ("n1", 3), 1: ("n2", 2)}, 0)
        'rank 1 (host n2) last finished step 2, this rank step 3'
        >>> behind({0: ("n1", 3), 1: ("n1", 3)}, 0)
        'every rank finished step 3'
        >>> behind({}, 0)
        "the ranks' progress is unknown (the launcher's report names the rank that failed first)"
    """
    if not progress:
        return "the ranks' progress is unknown (the launcher's report names the rank that failed first)"
    last = min(step for _, step in progress.values())
    late = [f"rank {r} (host {host})" for r, (host, step) in sorted(progress.items()) if step == last]
    if last == max(step for _, step in progress.values()):
        return f"every rank finished step {last}"
    mine = progress.get(me, ("", "?"))[1]
    return f"{', '.join(late)} last finished step {last}, this rank step {mine}"


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """True on global rank 0, the only rank that writes files and logs."""
    return rank() == 0


def device() -> torch.device:
    return torch.device("cuda", local_rank()) if has_gpu() else torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few numbers over all ranks (one collective; every rank must call it)."""
    t = torch.tensor(values, dtype=torch.float64, device=device())
    if dist.is_initialized() and world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_gather_text(text: str) -> list[str]:
    """Every rank's ``text``, in rank order (every rank must call it; for rare paths such as error messages)."""
    if not dist.is_initialized() or world_size() == 1:
        return [text]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, text)
    return out


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's value of ``obj`` on every rank."""
    if not dist.is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


T = TypeVar("T")
_SLOW_GROUP = None


def _slow_group():
    """A gloo group whose collectives wait up to a day: for ranks waiting on long work of another rank
    (tokenisation, checkpoint conversion), which must not trip the training process group's timeouts."""
    global _SLOW_GROUP
    if _SLOW_GROUP is None:
        _SLOW_GROUP = dist.new_group(backend="gloo", timeout=timedelta(days=1))
    return _SLOW_GROUP


def _run_on(selected: bool, fn: Callable[[], T]) -> Optional[T]:
    """Run ``fn`` where ``selected``; every rank waits, and raises the first error any rank hit."""
    error: Optional[BaseException] = None
    result = None
    if selected:
        try:
            result = fn()
        except Exception as e:  # re-raised below on every rank, after everyone has heard of it
            error = e
    errors: list = [None] * world_size()
    dist.all_gather_object(errors, error, group=_slow_group())
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return result


def agreed(decide: Callable[[], T]) -> T:
    """Rank 0's ``decide()``, on every rank; a ``ConfigError`` it raises is raised on every rank (every rank
    must call this)."""
    outcome = None
    if is_main():
        try:
            outcome = (decide(), None)
        except ConfigError as e:
            outcome = (None, str(e))
    value, error = broadcast_from_main(outcome)
    if error is not None:
        raise ConfigError(error)
    return value


def local_main_first(fn: Callable[[], T]) -> T:
    """Run ``fn`` on local rank 0 of every node first, then on the other ranks (which then find its cache).

    If ``fn`` fails on a node's first rank, every rank raises the same error.
    """
    if not dist.is_initialized() or world_size() == 1:
        return fn()
    result = _run_on(local_rank() == 0, fn)
    return result if local_rank() == 0 else fn()


def main_only(fn: Callable[[], T]) -> T:
    """Run ``fn`` once, on global rank 0, while the others wait; every rank gets its result (or its error).

    For work on shared storage that must happen once for the whole job, however many nodes it spans.
    """
    if not dist.is_initialized() or world_size() == 1:
        return fn()
    return broadcast_from_main(_run_on(is_main(), fn))


def shutdown() -> None:
    """Leave the process group cleanly (an abandoned gloo group can abort the interpreter at exit)."""
    global _SLOW_GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
    _SLOW_GROUP = None  # belonged to the destroyed group; a next run in this process (a sweep) makes its own


def barrier() -> None:
    if dist.is_initialized() and world_size() > 1:
        dist.barrier()


_START = time.time()


_writer: Optional[Callable[[str], None]] = None  # a progress bar's write(), while one is on screen


def log(msg: str) -> None:
    """Print one line on rank 0 (every other rank stays silent)."""
    if is_main():
        line = f"[sftdist {time.time() - _START:7.1f}s] {redact_text(msg)}"  # console logs get shared
        if _writer is not None:
            _writer(line)
        else:
            print(line, file=sys.stdout, flush=True)


def set_writer(writer: Optional[Callable[[str], None]]) -> None:
    """Send ``log()`` lines through ``writer`` (a progress bar's, which keeps the bar below them); None resets."""
    global _writer
    _writer = writer
