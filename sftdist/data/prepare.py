"""Tokenise and mask one source into an on-disk cache, keyed by everything that affects the result.

A cache entry is a directory ``<cache>/<source>-<key>/`` holding ``train/`` (and ``eval/``) as Arrow
datasets with columns ``input_ids``, ``labels``, ``num_tokens``, ``num_supervised``, ``where``, ``stats.json``
and ``audit.json`` (the mask audit's verdicts). A record is one sample, or one per trained turn when
``data.split_turns`` splits it. The entry is written under a temporary name and renamed into place, so a
reader never sees half an entry. Building one streams the source through Arrow files in bounded batches
(``cache_files``) and encodes them in worker processes (``encode_pool``), so its memory does not grow with
the number of records.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from sftdist.config import DataConfig, DataSource
from sftdist.data import quality
from sftdist.data.audit import audit_entry, audit_pool_size
from sftdist.data.cache_files import RawFile, finish_split, raw_batches, write_raw
from sftdist.data.demo import cache_root, resolve_builtin
from sftdist.data.encode import encode_record  # noqa: F401 - its home before encode.py; callers import it here
from sftdist.data.encode_pool import MIN_RECORDS_PER_WORKER, OK_STATUSES, EncodeJob, SplitCounts, encode_raw
from sftdist.data.messages import SOURCE_KEY, DataError, to_conversation
from sftdist.data.sources import (check_shard_columns, is_local, local_path_exists, parse_line, raw_records,
                                  read_records, source_files)

PIPELINE_VERSION = 2  # bump when encoding changes, to invalidate every cache entry
LENGTH_STATUSES = ("dropped_too_long", "dropped_no_target")  # counted, never an error
# data.dedup, data.min_reply_tokens, data.drop_cut_replies: counted, never an error
FILTER_STATUSES = ("dropped_duplicate", "dropped_short_reply", "dropped_cut_reply")


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything about a tokenizer that changes token ids or masks."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)).encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    h.update(type(tokenizer).__name__.encode())
    return h.hexdigest()[:16]


def _files_identity(path: str) -> list:
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in source_files(path)]


def cache_key(source: DataSource, cfg: DataConfig, tokenizer_fp: str, *, max_length: int, seed: int,
              with_files: bool = True) -> str:
    """Hash of the source (and, ``with_files``, its files' size and mtime), the data options, the tokenizer
    and max_length."""
    parts: dict[str, Any] = {
        "version": PIPELINE_VERSION, "source": {k: v for k, v in vars(source).items() if k not in ("name", "weight")},
        "train_on": cfg.train_on, "split_turns": cfg.split_turns, "truncation": cfg.truncation,
        "on_bad_record": cfg.on_bad_record,
        "tokenizer": tokenizer_fp, "max_length": max_length, "seed": seed if source.eval_fraction else None,
    }
    # Only when set, so that caches built before these filters existed keep their keys.
    filters = {"dedup": cfg.dedup, "min_reply_tokens": cfg.min_reply_tokens,
               "drop_cut_replies": cfg.drop_cut_replies}
    if filters != {"dedup": "none", "min_reply_tokens": 0, "drop_cut_replies": False}:
        threshold = cfg.near_dup_threshold if cfg.dedup == "near" else None
        parts["filters"] = {**filters, "near_dup_threshold": threshold}
    for key in ("path", "eval_path"):
        p = getattr(source, key)
        if with_files and p and is_local(DataSource(name=source.name, path=resolve_builtin(p))) and local_path_exists(resolve_builtin(p)):
            parts[f"{key}_files"] = _files_identity(resolve_builtin(p))
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dedup_statuses(table: dict[str, list], fmt: str, columns: dict, mode: str, threshold: float) -> list[str]:
    """Per record, ``dropped_duplicate`` or "" under ``data.dedup=mode``: the first occurrence in file order is
    kept. Records that do not convert take no part (the encoder reports them)."""
    statuses = [""] * len(table["raw"])
    if mode == "none" or fmt == "text":
        return statuses
    records, index = [], []
    for i, (raw, where, err) in enumerate(zip(table["raw"], table["where"], table["read_error"])):
        try:
            if not err:
                records.append((where, to_conversation(json.loads(raw), fmt, where, columns)[0]))
                index.append(i)
        except DataError:
            pass
    for d in quality.dedup_drops(records, mode, threshold):
        statuses[index[d]] = "dropped_duplicate"
    return statuses


def _raw_table(source: DataSource, path: Optional[str]) -> dict[str, list]:
    raw, where, errors = [], [], []
    for w, row in read_records(source, path):
        if isinstance(row, DataError):
            raw.append("")
            errors.append(str(row))
        else:
            raw.append(json.dumps(row, default=str))
            errors.append("")
        where.append(w)
        if source.max_samples is not None and len(raw) >= source.max_samples:
            break
    if not raw:
        raise DataError(f"data source {source.name!r}: {resolve_builtin(path or source.path)} has no records",
                        "empty_source")
    return {"raw": raw, "where": where, "read_error": errors}


def _split_eval(table: dict[str, list], fraction: float, seed: int, name: str) -> tuple[dict, Optional[dict]]:
    if not fraction:
        return table, None
    n = len(table["raw"])
    held = set(random.Random(f"eval:{seed}:{name}").sample(range(n), max(1, round(n * fraction))))
    train = {k: [v for i, v in enumerate(col) if i not in held] for k, col in table.items()}
    evaluation = {k: [v for i, v in enumerate(col) if i in held] for k, col in table.items()}
    return train, evaluation


def raw_splits(source: DataSource, seed: int) -> tuple[dict[str, list], Optional[dict[str, list]]]:
    """The source's train and eval records as columns ``raw`` (JSON text), ``where`` and ``read_error``,
    split exactly as training splits them (``eval_fraction`` by seed, or ``eval_path``)."""
    table, eval_table = _split_eval(_raw_table(source, None), source.eval_fraction, seed, source.name)
    if source.eval_path:
        eval_table = _raw_table(source, source.eval_path)
    return table, eval_table


def source_key(cfg: DataConfig, source: DataSource) -> str:
    """The config path of ``source`` that a user sets a fix under, e.g. ``data.sources.1``."""
    names = [s.name for s in cfg.sources]
    return f"data.sources.{names.index(source.name)}" if source.name in names else SOURCE_KEY


def bad_record_error(first_error: str, name: str, reason: str) -> DataError:
    """The error that stops the data stage at its first bad record under ``data.on_bad_record=error``.

    Example:
        >>> print(bad_record_error("a.jsonl: line 3: invalid JSON: Expecting value at column 1", "task", "invalid_json"))
        a.jsonl: line 3: invalid JSON: Expecting value at column 1 [data source 'task'; set data.on_bad_record=skip to skip and count such records]
    """
    return DataError(f"{first_error} [data source {name!r}; set data.on_bad_record=skip to skip and count such "
                     f"records]", reason)


def no_usable_record(name: str, records: int, statuses: dict[str, int], first_error: str = "") -> DataError:
    """The error for a source of which no record is left to train on, whatever ``data.on_bad_record`` says:
    how many records were dropped or skipped for which reason, and the first bad record's own error.

    Example:
        >>> print(no_usable_record("task", 40, {"missing_field": 40}, "a.jsonl: line 1: missing field 'output'"))
        data source 'task': no usable record out of 40 ({'missing_field': 40}); the first: a.jsonl: line 1: missing field 'output'
    """
    example = f"; the first: {first_error}" if first_error else ""
    return DataError(f"data source {name!r}: no usable record out of {records} ({statuses}){example}", "empty_source")


def default_num_proc(cfg: DataConfig) -> int:
    """``data.num_proc``, else up to 8 workers on the CPUs this process may run on: a SLURM job's (or a
    container's, or taskset's) CPUs, not every core of the machine (#27)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cfg.num_proc or min(8, usable or 1)


def prepare_source(source: DataSource, cfg: DataConfig, tokenizer, *, max_length: int, seed: int) -> Path:
    """Build (or find) the cache entry of one source, with its mask-audit verdict, and return its directory.

    Raises:
        DataError: on a bad record with ``data.on_bad_record=error``, naming the file and record; when the
            mask audit fails; when the files of a folder source disagree on their columns.
    """
    root = Path(cfg.cache_dir) if cfg.cache_dir else cache_root() / "data"
    final = root / f"{source.name}-{cache_key(source, cfg, tokenizer_fingerprint(tokenizer), max_length=max_length, seed=seed)}"
    audit = dict(train_on=cfg.train_on, samples=cfg.audit_samples, seed=seed, split_turns=cfg.split_turns)
    if (final / "stats.json").exists():
        audit_entry(final, source, tokenizer, **audit)  # kept, or audited now from the file's first records
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{source.name}-", dir=root))
    try:
        stats = _build_entry(tmp, source, cfg, tokenizer, max_length=max_length, seed=seed, audit=audit)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
        os.rename(tmp, final)
    except OSError:
        if not (final / "stats.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return final


def _write_raw(source: DataSource, path: Optional[str], out: Path, pool_size: int = 0) -> RawFile:
    """The source's (or ``path``'s) records in a raw Arrow file, its folder's shards checked first."""
    where = resolve_builtin(path or source.path)
    if is_local(DataSource(name=source.name, path=where)) and local_path_exists(where):
        check_shard_columns(source_files(where), source.name)
    raw = write_raw(raw_records(source, path), out, max_samples=source.max_samples, pool_size=pool_size)
    if not raw.records:
        raise DataError(f"data source {source.name!r}: {where} has no records", "empty_source")
    return raw


def _build_entry(tmp: Path, source: DataSource, cfg: DataConfig, tokenizer, *, max_length: int, seed: int,
                 audit: dict) -> dict:
    """Write the entry's splits and audit verdict into ``tmp``; returns its stats. The raw records go to
    Arrow files first, in bounded batches (so memory stays flat however large the source), and are deleted
    once encoded."""
    raw = _write_raw(source, None, tmp / "raw.arrow", audit_pool_size(source, cfg.audit_samples))
    audit_entry(tmp, source, tokenizer, pool=raw.pool, **audit)  # before any tokenising
    raw.pool = []
    n, held = raw.records, set()
    if source.eval_fraction:
        k = max(1, round(n * source.eval_fraction))
        held = set(random.Random(f"eval:{seed}:{source.name}").sample(range(n), k))  # as before #27: by index
    eval_raw = _write_raw(source, source.eval_path, tmp / "raw-eval.arrow") if source.eval_path else None
    held_to = None if eval_raw else "eval"  # with eval_path, records held out by eval_fraction go nowhere
    jobs = [_job(raw, "a", tmp, lambda i: held_to if i in held else "train", source, cfg, tokenizer, max_length)]
    if eval_raw:
        jobs.append(_job(eval_raw, "b", tmp, lambda i: "eval", source, cfg, tokenizer, max_length))
    procs = default_num_proc(cfg)
    counts, train_shards, eval_shards = encode_raw(jobs[0], _procs(procs, n), cfg.on_bad_record == "error",
                                                   progress=progress_lines(source.name, n, _procs(procs, n)))
    _check_split(counts["train"], source, cfg, "train")
    if eval_raw:
        eval_counts, _, eval_shards = encode_raw(jobs[1], _procs(procs, eval_raw.records), False,
                                                 progress=progress_lines(f"{source.name} (eval_path)",
                                                                         eval_raw.records, 1))
        counts["eval"] = eval_counts["eval"]
    for f in (raw.path, eval_raw and eval_raw.path):
        if f:
            Path(f).unlink()
    stats = _stats(counts["train"])
    finish_split(tmp / "train", train_shards, fingerprint=_fingerprint(tmp, "train"))
    if held or eval_raw:
        _check_split(counts["eval"], source, cfg, "eval")
        finish_split(tmp / "eval", eval_shards, fingerprint=_fingerprint(tmp, "eval"))
        stats["eval"] = _stats(counts["eval"])
    return stats


PROGRESS_EVERY_S = 30.0


def progress_lines(name: str, records: int, workers: int) -> Callable[[int], None]:
    """Print (stderr) that ``name`` is being tokenised, then, given the records done so far, a line at most
    every ``PROGRESS_EVERY_S`` seconds and at the end: a million conversations take minutes, and the other
    ranks wait silently meanwhile. Only the rank that prepares (local rank 0) calls it."""
    start = last = time.time()
    print(f"tokenising {name}: {records:,} records, {workers} worker(s)", file=sys.stderr, flush=True)

    def done(count: int) -> None:
        nonlocal last
        now = time.time()
        if now - last >= PROGRESS_EVERY_S or count >= records:
            last = now
            print(f"tokenising {name}: {count:,}/{records:,} records ({count / max(now - start, 1e-9):,.0f}/s)",
                  file=sys.stderr, flush=True)

    return done


def _fingerprint(tmp: Path, split: str) -> str:
    """The split's ``datasets`` fingerprint (any unique name: sftdist keys its cache itself)."""
    return hashlib.sha256(f"{tmp.name}/{split}".encode()).hexdigest()[:16]


def _procs(procs: int, records: int) -> int:
    """Workers for ``records`` records: fewer where each would get under ``MIN_RECORDS_PER_WORKER``."""
    return max(1, min(procs, records // MIN_RECORDS_PER_WORKER))


def _job(raw: RawFile, tag: str, out: Path, split_of, source: DataSource, cfg: DataConfig, tokenizer,
         max_length: int) -> EncodeJob:
    kw = dict(fmt=source.format, columns=dict(source.columns), train_on=cfg.train_on, max_length=max_length,
              truncation=cfg.truncation, tokenizer=tokenizer, min_reply_tokens=cfg.min_reply_tokens,
              drop_cut_replies=cfg.drop_cut_replies, source_key=source_key(cfg, source), split_turns=cfg.split_turns)
    pre = _dedup_drops(raw.path, split_of, source, cfg)
    return EncodeJob(raw.path, raw.batch_sizes, tag, out, split_of, pre, kw,
                     is_bad=lambda s: s not in OK_STATUSES + LENGTH_STATUSES + FILTER_STATUSES)


def _dedup_drops(path: Path, split_of, source: DataSource, cfg: DataConfig) -> dict[int, str]:
    """Record index -> ``dropped_duplicate`` under ``data.dedup``, each split on its own (as it is trained).

    Dedup compares every record of a split with every other, so it holds the split's records while it runs;
    without it (the default), nothing is held."""
    if cfg.dedup == "none" or source.format == "text":
        return {}
    tables: dict[str, dict[str, list]] = {}
    index: dict[str, list[int]] = {}
    i = 0
    for batch in raw_batches(path):
        for raw, where, err in zip(batch["raw"], batch["where"], batch["read_error"]):
            split = split_of(i)
            if split is not None:
                t = tables.setdefault(split, {"raw": [], "where": [], "read_error": []})
                bad = err or parse_line(raw, where)  # a JSON Lines record is still its line, unparsed
                t["raw"].append(raw)
                t["where"].append(where)
                t["read_error"].append(str(bad) if isinstance(bad, (str, DataError)) else "")
                index.setdefault(split, []).append(i)
            i += 1
    drops = {}
    for split, table in tables.items():
        statuses = dedup_statuses(table, source.format, dict(source.columns), cfg.dedup, cfg.near_dup_threshold)
        drops.update({index[split][j]: s for j, s in enumerate(statuses) if s})
    return drops


def _check_split(c: SplitCounts, source: DataSource, cfg: DataConfig, split: str) -> None:
    """Stop at a split's first bad record (``data.on_bad_record=error``), or when the train split keeps no
    record (whatever it says); not cached, so that a fixed config rebuilds."""
    if c.first_bad and cfg.on_bad_record == "error":
        raise bad_record_error(c.first_error, source.name, c.first_bad)
    if split == "train" and not c.samples:
        raise no_usable_record(source.name, c.records, dict(c.statuses), c.first_error)


def _stats(c: SplitCounts) -> dict[str, Any]:
    """A split's ``stats.json`` entry."""
    return {"records": c.records, "kept": c.kept, "samples": c.samples, "statuses": dict(c.statuses),
            "split": {"conversations": c.split_conversations, "samples": c.split_samples},
            "tokens": c.tokens, "supervised_tokens": c.supervised}
