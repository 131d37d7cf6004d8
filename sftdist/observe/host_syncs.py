"""Where the micro-batch loop makes the host wait for the GPU: ``SFTDIST_SYNC_CHECK=1`` turns on CUDA's
synchronisation warnings (``torch.cuda.set_sync_debug_mode``) around each step's micro-batches, and rank 0
logs each step's count by the line of Python that asked for it.

A host that waits for the GPU cannot queue the next kernels while the current ones run, so each wait
exposes the launch overhead of what follows. sftdist's own micro-batch code reads nothing back
(``forward.device_batch``); what the check still finds is DeepSpeed's, at the accumulation boundary (its
gradient-norm and overflow checks). Off, this costs nothing; without CUDA there is nothing to check.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch

ENV = "SFTDIST_SYNC_CHECK"


def wanted() -> bool:
    return os.environ.get(ENV) == "1" and torch.cuda.is_available()


@contextmanager
def counted(found: Counter) -> Iterator[None]:
    """Within the block, count CUDA's synchronising calls into ``found`` by ``file:line`` of the Python that
    made them (when ``wanted``; else a no-op)."""
    if not wanted():
        yield
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            found[f"{short_path(w.filename)}:{w.lineno}"] += 1


def short_path(filename: str) -> str:
    """A source file's path from its package down.

    Example:
        >>> short_path("/x/site-packages/deepspeed/runtime/engine.py"), short_path("/repo/sftdist/loop.py")
        ('deepspeed/runtime/engine.py', 'sftdist/loop.py')
    """
    parts = filename.replace(os.sep, "/").split("/")
    for package in ("sftdist", "deepspeed", "transformers", "torch", "peft", "liger_kernel"):
        if package in parts:
            return "/".join(parts[len(parts) - 1 - parts[::-1].index(package):])
    return "/".join(parts[-2:])


def summary(found: Counter) -> str:
    """One log line: the count and where, sftdist's own first.

    Example:
        >>> summary(Counter({"deepspeed/runtime/engine.py:10": 2}))
        'host syncs in the micro-batches: 2 (sftdist: 0; deepspeed/runtime/engine.py:10 x2)'
    """
    ours = sum(n for where, n in found.items() if where.startswith("sftdist/"))
    places = "; ".join(f"{where} x{n}" for where, n in sorted(found.items(), key=lambda kv: -kv[1]))
    return f"host syncs in the micro-batches: {sum(found.values())} (sftdist: {ours}; {places or 'none'})"
