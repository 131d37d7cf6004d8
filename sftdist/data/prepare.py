"""Tokenise and mask one source into an on-disk cache, keyed by everything that affects the result.

A cache entry is a directory ``<cache>/<source>-<key>/`` holding ``train/`` (and ``eval/``) as Arrow
datasets with columns ``input_ids``, ``labels``, ``num_tokens``, ``num_supervised``, ``where``, and
``stats.json``. A record is one sample, or one per trained turn when ``data.split_turns`` splits it. The
entry is written under a temporary name and renamed into place, so a reader never sees half an entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from sftdist.config import DataConfig, DataSource
from sftdist.data import quality
from sftdist.data.demo import cache_root, resolve_builtin
from sftdist.data.messages import SOURCE_KEY, DataError, to_conversation, to_text
from sftdist.data.sources import is_local, read_records, source_files
from sftdist.data.split_turns import encode_samples
from sftdist.data.tokenize import IGNORE_INDEX, MaskError, encode_text

PIPELINE_VERSION = 2  # bump when encoding changes, to invalidate every cache entry
OK_STATUSES = ("ok", "truncated")
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
        if with_files and p and is_local(DataSource(name=source.name, path=resolve_builtin(p))) and Path(resolve_builtin(p)).exists():
            parts[f"{key}_files"] = _files_identity(resolve_builtin(p))
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encode_record(raw: str, where: str, *, fmt: str, columns: dict, train_on: str, max_length: int,
                  truncation: str, tokenizer, min_reply_tokens: int = 0, drop_cut_replies: bool = False,
                  source_key: str = SOURCE_KEY, split_turns: str = "auto") -> list[dict[str, Any]]:
    """Encode one raw JSON record into its samples; never raises for a bad record, reports it in
    ``status``/``error`` (whose fix names the source as ``source_key``, e.g. ``data.sources.1``).

    Returns:
        One sample, or one per trained turn when ``split_turns`` splits the conversation, each with
        ``input_ids``, ``labels``, ``num_tokens``, ``num_supervised``, ``where`` (``where``, and for a split
        sample the reply it trains), ``split`` (whether it is one), ``status`` (``ok``, ``truncated``,
        ``dropped_too_long``, ``dropped_no_target``, ``dropped_short_reply``, ``dropped_cut_reply`` or an error
        reason) and ``error`` (message or ""). A bad record is one sample, without ids.
    """
    empty = {"input_ids": [], "labels": [], "num_tokens": 0, "num_supervised": 0, "where": where, "split": False}
    try:
        row = json.loads(raw)
        if fmt == "text":
            samples = [(None, encode_text(tokenizer, to_text(row, where, columns, source_key=source_key)))]
        else:
            messages, tools = to_conversation(row, fmt, where, columns, source_key=source_key)
            dropped = _reply_filter([(where, messages)], tokenizer, min_reply_tokens, drop_cut_replies)
            if dropped:
                return [{**empty, "status": dropped, "error": ""}]
            samples = encode_samples(tokenizer, messages, tools, train_on=train_on, split_turns=split_turns)
    except DataError as e:
        return [{**empty, "status": e.reason, "error": str(e)}]
    except MaskError as e:
        return [{**empty, "status": "template_mismatch",
                 "error": f"{where}: {e} (tokenizer {tokenizer.name_or_path!r})"}]
    except Exception as e:  # a template raising on odd input (jinja exceptions, TypeErrors) is a bad record too
        return [{**empty, "status": "render_failed",
                 "error": f"{where}: chat template failed: {type(e).__name__}: {e}"}]
    out = []
    for j, (view, enc) in enumerate(samples, start=1):
        at = where if view is None else f"{where}, reply {j} of {len(samples)} (message {view.turn})"
        out.append({**_checked_length(enc, at, max_length=max_length, truncation=truncation, empty=empty),
                    "where": at, "split": view is not None})
    return out


def _checked_length(enc: dict, where: str, *, max_length: int, truncation: str, empty: dict) -> dict[str, Any]:
    """One encoded sample under ``data.truncation``, with its counts and status."""
    status = "ok"
    if len(enc["input_ids"]) > max_length:
        if truncation == "drop":
            return {**empty, "status": "dropped_too_long", "error": ""}
        if truncation == "error":
            return {**empty, "status": "too_long",
                    "error": f"{where}: {len(enc['input_ids'])} tokens, over train.max_length={max_length} "
                             f"(data.truncation=error): raise train.max_length, or set data.truncation=truncate "
                             f"or drop"}
        enc = {k: v[:max_length] for k, v in enc.items()}
        status = "truncated"
    labels = enc["labels"]
    # The first label is never a target (nothing predicts it).
    supervised = len(labels) - labels.count(IGNORE_INDEX) - (bool(labels) and labels[0] != IGNORE_INDEX)
    if supervised == 0:
        return {**empty, "status": "dropped_no_target", "error": ""}
    return {**enc, "num_tokens": len(enc["input_ids"]), "num_supervised": supervised, "status": status, "error": ""}


def _reply_filter(record: list, tokenizer, min_reply_tokens: int, drop_cut_replies: bool) -> str:
    """The filter status that drops this one-record list, or ""."""
    if drop_cut_replies and quality.cut_replies(record):
        return "dropped_cut_reply"
    count = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    if min_reply_tokens and quality.short_replies(record, min_reply_tokens, count):
        return "dropped_short_reply"
    return ""


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


def _encode_batch(batch: dict[str, list], indices: list[int], **kw) -> dict[str, list]:
    """Records to samples, each tagged with its record's index (a split record gives several)."""
    out = []
    for i, r, w, e, pre in zip(indices, batch["raw"], batch["where"], batch["read_error"], batch["pre_status"]):
        empty = {"input_ids": [], "labels": [], "num_tokens": 0, "num_supervised": 0, "where": w, "split": False}
        samples = ([{**empty, "status": "invalid_json", "error": e}] if e else
                   [{**empty, "status": pre, "error": ""}] if pre else encode_record(r, w, **kw))
        out += [{**s, "record": i} for s in samples]
    return {k: [o[k] for o in out] for k in out[0]}


def _column(ds, name: str) -> list:
    """One column as a plain list, in one pass (a lazy column of datasets 5.x reads row by row)."""
    return ds.with_format("arrow")[name].to_pylist()


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


def _encode_table(table: dict[str, list], source: DataSource, cfg: DataConfig, tokenizer, max_length: int,
                  num_proc: int, split: str):
    import datasets

    pre = dedup_statuses(table, source.format, dict(source.columns), cfg.dedup, cfg.near_dup_threshold)
    ds = datasets.Dataset.from_dict({**table, "pre_status": pre})
    kw = dict(fmt=source.format, columns=dict(source.columns), train_on=cfg.train_on, max_length=max_length,
              truncation=cfg.truncation, tokenizer=tokenizer, min_reply_tokens=cfg.min_reply_tokens,
              drop_cut_replies=cfg.drop_cut_replies, source_key=source_key(cfg, source), split_turns=cfg.split_turns)
    records = len(ds)
    procs = num_proc if records >= 2000 else 1  # worker start-up costs more than small sets take
    # sftdist keys its own cache (cache_key); datasets' fingerprint of this map would pickle and hash the whole
    # tokenizer, which took longer than tokenising 1,000 alpaca records. A fixed one skips that. Every input
    # column is removed (``where`` comes back per sample): a split record gives more rows than it came in.
    ds = ds.map(_encode_batch, batched=True, batch_size=256, num_proc=procs if procs > 1 else None,
                with_indices=True, fn_kwargs=kw, remove_columns=["raw", "where", "read_error", "pre_status"],
                desc=f"tokenising {source.name} ({split})",
                new_fingerprint=f"sftdist-encode-{source.name}-{split}")
    statuses = Counter(_column(ds, "status"))  # per sample: a split record's samples each count
    bad = [s for s in statuses if s not in OK_STATUSES + LENGTH_STATUSES + FILTER_STATUSES]

    def first() -> str:  # only on the way to an error: a pass over the error column costs seconds on large sets
        return next((e for e in ds["error"] if e), "")

    if bad and cfg.on_bad_record == "error":
        raise bad_record_error(first(), source.name, bad[0])
    kept = ds.filter(lambda b: [s in OK_STATUSES for s in b], batched=True, input_columns="status",
                     new_fingerprint=f"sftdist-kept-{source.name}-{split}")
    split_records = [r for r, s in zip(_column(ds, "record"), _column(ds, "split")) if s]
    stats = {"records": records, "kept": len(set(_column(kept, "record"))), "samples": len(kept),
             "statuses": dict(statuses), "split": {"conversations": len(set(split_records)),
                                                   "samples": len(split_records)},
             "tokens": int(sum(kept["num_tokens"])), "supervised_tokens": int(sum(kept["num_supervised"]))}
    if split == "train" and not len(kept):  # nothing to train on; not cached, so that a fixed config rebuilds
        raise no_usable_record(source.name, records, stats["statuses"], first())
    return kept.remove_columns(["status", "error", "record", "split"]), stats


def default_num_proc(cfg: DataConfig) -> int:
    """``data.num_proc``, else up to 8 workers on the CPUs this process may run on: a SLURM job's (or a
    container's, or taskset's) CPUs, not every core of the machine (#27)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cfg.num_proc or min(8, usable or 1)


def prepare_source(source: DataSource, cfg: DataConfig, tokenizer, *, max_length: int, seed: int) -> Path:
    """Build (or find) the cache entry of one source and return its directory.

    Raises:
        DataError: on a bad record with ``data.on_bad_record=error``, naming the file and record.
    """
    root = Path(cfg.cache_dir) if cfg.cache_dir else cache_root() / "data"
    final = root / f"{source.name}-{cache_key(source, cfg, tokenizer_fingerprint(tokenizer), max_length=max_length, seed=seed)}"
    if (final / "stats.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{source.name}-", dir=root))
    try:
        table, eval_table = raw_splits(source, seed)
        train, stats = _encode_table(table, source, cfg, tokenizer, max_length, default_num_proc(cfg), "train")
        train.save_to_disk(str(tmp / "train"))
        if eval_table is not None:
            evaluation, eval_stats = _encode_table(eval_table, source, cfg, tokenizer, max_length, 1, "eval")
            evaluation.save_to_disk(str(tmp / "eval"))
            stats["eval"] = eval_stats
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
        os.rename(tmp, final)
    except OSError:
        if not (final / "stats.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return final
