"""Encode a source's raw file into the sample shards of its train and eval splits, in worker processes, and
sum up each split's statistics.

The raw file is cut into tasks of whole raw batches (``task_ranges``). Each task reads its batches (one at a
time), encodes each with one tokenizer call (``encode.encode_records``), writes the kept samples of each split
to its own shard file and returns only counts, so neither the parent nor a worker ever holds a split. Workers
are forked: they inherit the tokenizer and the job (the eval indices, dedup drops) instead of having them
pickled, which ``datasets.map`` did for every worker and which, with its per-shard start-up and the
single-threaded passes over the result after it, kept 2 workers at ~1.1x the speed of one (#27).
Results come back in task order, so the first bad record of a split is the first in file order, and under
``data.on_bad_record=error`` the work stops at the first task that has one.
"""

from __future__ import annotations

import math
import multiprocessing
import signal
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from sftdist.data.cache_files import ShardWriter, raw_batches, sample_schema
from sftdist.data.encode import encode_records

OK_STATUSES = ("ok", "truncated")
MAX_TASK_BATCHES = 32  # raw batches per task (8,192 records): bounds the shard count of large sources
MIN_RECORDS_PER_WORKER = 500  # below this, forking workers costs more than it saves


@dataclass
class SplitCounts:
    """What encoding gave for one split (summed over tasks in order).

    Attributes:
        records: Records of the split.
        kept: Records with at least one kept sample.
        samples: Kept samples.
        statuses: Samples per status, in order of first occurrence.
        split_conversations, split_samples: Records that ``data.split_turns`` split, and their samples (kept
            or not).
        tokens, supervised: Tokens and supervised tokens of the kept samples.
        first_error: The first bad sample's error ("" when none); ``first_bad`` its status.
    """

    records: int = 0
    kept: int = 0
    samples: int = 0
    statuses: Counter = field(default_factory=Counter)
    split_conversations: int = 0
    split_samples: int = 0
    tokens: int = 0
    supervised: int = 0
    first_error: str = ""
    first_bad: str = ""

    def add(self, other: "SplitCounts") -> None:
        """Add a later task's counts (keeps this one's first error)."""
        for name in ("records", "kept", "samples", "split_conversations", "split_samples", "tokens", "supervised"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.statuses.update(other.statuses)
        if not self.first_bad:
            self.first_error, self.first_bad = other.first_error, other.first_bad


@dataclass
class EncodeJob:
    """Everything a worker needs, inherited through fork.

    Attributes:
        raw: The raw file; ``batch_sizes`` its batches' records; ``split_of(i)`` says where its record ``i``
            goes: ``train``, ``eval`` or ``None`` (held out of train for an eval that comes from ``eval_path``).
        out: The entry folder; shards go to ``out/<split>/part-<tag>-<task>.arrow``.
        pre_status: Record index -> a status given before encoding (``dropped_duplicate``).
        encode_kwargs: ``encode_records``' options.
        is_bad: Whether a status is a bad record.
    """

    raw: Path
    batch_sizes: list[int]
    tag: str
    out: Path
    split_of: Callable[[int], Optional[str]]
    pre_status: dict[int, str]
    encode_kwargs: dict[str, Any]
    is_bad: Callable[[str], bool]


_JOB: Optional[EncodeJob] = None  # the job of the pool being run (set before forking, read by the workers)


def task_ranges(batches: int, procs: int) -> list[tuple[int, int]]:
    """Contiguous ranges of raw batches: about sixteen per worker, so that the last ones to finish leave the
    others idle only briefly, and at most ``MAX_TASK_BATCHES`` long (each range is one shard file).

    Example:
        >>> r = task_ranges(100, 2)
        >>> len(r), r[:2], r[-1]
        (25, [(0, 4), (4, 8)], (96, 100))
        >>> task_ranges(3, 1)
        [(0, 3)]
    """
    size = max(1, min(MAX_TASK_BATCHES, math.ceil(batches / (procs * 16)) if procs > 1 else MAX_TASK_BATCHES))
    return [(b, min(b + size, batches)) for b in range(0, batches, size)]


def _encode_task(task: tuple[int, int, int]) -> dict[str, SplitCounts]:
    """Encode raw batches ``start``-``stop`` of the job's raw file into shard ``index`` of each split."""
    job, (index, start, stop) = _JOB, task
    schema, counts = sample_schema(), {"train": SplitCounts(), "eval": SplitCounts()}
    writers = {s: ShardWriter(job.out / s / f"part-{job.tag}-{index:05d}.arrow", schema) for s in counts}
    base = sum(job.batch_sizes[:start])  # the index of the task's first record
    try:
        for batch in raw_batches(job.raw, start, stop):
            _encode_batch(job, batch, base, counts, writers)
            base += len(batch["raw"])
    finally:
        for w in writers.values():
            w.close()
    return counts


def _encode_batch(job: EncodeJob, batch: dict[str, list], base: int, counts: dict, writers: dict) -> None:
    """Encode one raw batch (record ``base`` onwards) and write its kept samples."""
    todo, results = [], {}
    for i, (raw, where, error) in enumerate(zip(batch["raw"], batch["where"], batch["read_error"])):
        pre = job.pre_status.get(base + i, "")
        if error or pre:
            results[i] = [{"where": where, "split": False, "status": "invalid_json" if error else pre,
                           "error": error}]
        elif job.split_of(base + i) is not None:
            todo.append(i)
    encoded = encode_records([batch["raw"][i] for i in todo], [batch["where"][i] for i in todo],
                             **job.encode_kwargs)
    results.update(zip(todo, encoded))
    kept: dict[str, list] = {"train": [], "eval": []}
    for i in range(len(batch["raw"])):
        split = job.split_of(base + i)
        if split is None:
            continue
        c, samples = counts[split], results[i]
        c.records += 1
        c.kept += any(s["status"] in OK_STATUSES for s in samples)
        for s in samples:
            c.statuses[s["status"]] += 1
            c.split_samples += s["split"]
            if s["status"] in OK_STATUSES:
                kept[split].append(s)
                c.tokens += s["num_tokens"]
                c.supervised += s["num_supervised"]
            elif job.is_bad(s["status"]) and not c.first_bad:
                c.first_error, c.first_bad = s["error"], s["status"]
        c.split_conversations += any(s["split"] for s in samples)
    for split, samples in kept.items():
        counts[split].samples += len(samples)
        writers[split].write(samples)


def _start_worker() -> None:
    # The parent may be a training process whose SIGTERM handler only sets a flag; a worker must die with its
    # pool, and ctrl-C is the parent's to handle.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def encode_raw(job: EncodeJob, procs: int, stop_at_bad_train: bool,
               progress: Callable[[int], None] = lambda done: None) -> tuple[dict[str, SplitCounts], list[Path],
                                                                             list[Path]]:
    """Encode the whole raw file of ``job`` with ``procs`` processes (1: in this one).

    Args:
        stop_at_bad_train: Stop at the first task whose train records hold a bad one (every earlier task done):
            its counts are then those of the tasks so far.
        progress: Called with the records encoded so far after each task.

    Returns:
        The counts of both splits, and the train and eval shard files in order (absent ones: no samples).
    """
    global _JOB
    ranges = task_ranges(len(job.batch_sizes), procs)
    tasks = [(k, a, b) for k, (a, b) in enumerate(ranges)]
    shards = {s: [job.out / s / f"part-{job.tag}-{k:05d}.arrow" for k, _, _ in tasks] for s in ("train", "eval")}
    total = {"train": SplitCounts(), "eval": SplitCounts()}
    _JOB = job
    try:
        if procs <= 1 or len(tasks) == 1:
            _collect(map(_encode_task, tasks), total, stop_at_bad_train, progress)
        else:
            ctx = multiprocessing.get_context("fork")
            with ctx.Pool(min(procs, len(tasks)), initializer=_start_worker) as pool:
                _collect(pool.imap(_encode_task, tasks), total, stop_at_bad_train, progress)
    finally:
        _JOB = None
    return total, shards["train"], shards["eval"]


def _collect(results, total: dict[str, SplitCounts], stop_at_bad_train: bool,
             progress: Callable[[int], None]) -> None:
    for counts in results:
        for split, c in counts.items():
            total[split].add(c)
        progress(total["train"].records + total["eval"].records)
        if stop_at_bad_train and total["train"].first_bad:
            return
