"""The on-disk Arrow files of a cache entry under construction, written and read in bounded batches: a source's
raw records (``raw.arrow``, deleted once encoded) and the sample shards of a split, laid out as
``datasets.load_from_disk`` reads them.

Nothing here holds more than one batch of records in memory: the raw file is written batch by batch as the
source is read, read back one batch at a time without memory-mapping it (a mapped file's pages count towards
the process's resident set), and a split is the list of its shards, never concatenated or copied.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from sftdist.data.messages import DataError
from sftdist.data.sources import parse_line

RAW_BATCH = 256  # records per raw batch: the unit a worker encodes with one tokenizer call ...
RAW_BATCH_BYTES = 1 << 21  # ... or fewer, so that a batch of very long records stays ~2 MiB of text
RAW_SCHEMA_FIELDS = (("raw", "string"), ("where", "string"), ("read_error", "string"))
# The columns and types of a cached split, as datasets inferred them before (it stores input_ids as int32).
SAMPLE_FEATURES = {"where": "string", "input_ids": ("list", "int32"), "labels": ("list", "int64"),
                   "num_tokens": "int64", "num_supervised": "int64"}


@dataclass
class RawFile:
    """What writing a source's raw records gave.

    Attributes:
        path: The Arrow IPC file, one batch of up to ``RAW_BATCH`` records (``RAW_BATCH_BYTES`` of text) after
            another.
        records: How many records it holds (after ``max_samples``).
        batch_sizes: The records of each batch.
        pool: The first good records as parsed rows ``(where, row)``, up to the pool size asked for (the mask
            audit draws from them).
    """

    path: Path
    records: int
    batch_sizes: list[int] = field(default_factory=list)
    pool: list = field(default_factory=list)


def _raw_schema():
    import pyarrow as pa

    return pa.schema([(name, pa.string()) for name, _ in RAW_SCHEMA_FIELDS])


def write_raw(records: Iterator[tuple[str, Any]], path: Path, *, max_samples: Optional[int] = None,
              pool_size: int = 0) -> RawFile:
    """Write ``(where, raw)`` records (``sources.raw_records``) into an Arrow file, one batch at a time.

    A JSON Lines record stays the line it was (``str``); any other row is stored as JSON text; a
    ``DataError`` is stored as its message, under ``read_error``.

    Example::

        records   = [("a.jsonl: line 1", '{"messages": [...]}\\n'), ("a.jsonl: line 2", DataError("..."))]
        raw.arrow = raw: ['{"messages": [...]}\\n', ""], where: [...], read_error: ["", "a.jsonl: line 2: ..."]

    Args:
        records: The source's records in file order.
        path: The file to write.
        max_samples: Keep at most this many records (bad ones count).
        pool_size: Also parse and return the first this-many good records (for the mask audit).
    """
    import pyarrow as pa

    schema, count, pool, sizes, size = _raw_schema(), 0, [], [], 0
    cols: dict[str, list] = {name: [] for name, _ in RAW_SCHEMA_FIELDS}
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for where, raw in records:
            if isinstance(raw, DataError):
                text, error = "", str(raw)
            else:
                text, error = (raw if isinstance(raw, str) else json.dumps(raw, default=str)), ""
            if len(pool) < pool_size and not error:
                row = parse_line(text, where) if isinstance(raw, str) else raw
                if not isinstance(row, DataError):
                    pool.append((where, row))
            cols["raw"].append(text)
            cols["where"].append(where)
            cols["read_error"].append(error)
            count, size = count + 1, size + len(text)
            if len(cols["raw"]) == RAW_BATCH or size >= RAW_BATCH_BYTES:
                writer.write_batch(pa.RecordBatch.from_pydict(cols, schema=schema))
                sizes.append(len(cols["raw"]))
                cols, size = {name: [] for name in cols}, 0
            if max_samples is not None and count >= max_samples:
                break
        if cols["raw"]:
            writer.write_batch(pa.RecordBatch.from_pydict(cols, schema=schema))
            sizes.append(len(cols["raw"]))
    return RawFile(path, count, sizes, pool)


def raw_batches(path: Path, start: int = 0, stop: Optional[int] = None) -> Iterator[dict[str, list]]:
    """Batches ``start`` to ``stop`` of a raw file as column lists (``raw``, ``where``, ``read_error``),
    one in memory at a time."""
    import pyarrow as pa

    with pa.OSFile(str(path), "rb") as source:
        reader = pa.ipc.open_file(source)
        for b in range(start, reader.num_record_batches if stop is None else stop):
            yield reader.get_batch(b).to_pydict()


@functools.lru_cache(maxsize=1)
def sample_schema():
    """The Arrow schema of a cached split (with datasets' feature metadata)."""
    import datasets

    return datasets.Features(_features()).arrow_schema


def _features() -> dict:
    import datasets

    def feature(spec):
        return datasets.List(datasets.Value(spec[1])) if isinstance(spec, tuple) else datasets.Value(spec)

    return {name: feature(spec) for name, spec in SAMPLE_FEATURES.items()}


SHARD_BATCH_ROWS = 4096  # samples per record batch of a shard


class ShardWriter:
    """Append kept samples to one shard file of a split (an Arrow stream, as ``datasets`` writes them); the
    file is created at the first write.

    Samples are written in record batches of ``SHARD_BATCH_ROWS`` (held as Arrow until then, ~20 MB of ~600-token
    samples): a training rank reads a whole column (``num_tokens``) for its schedule, and each record batch's
    piece of it maps its own pages, so 256-row batches made a million-sample entry map ~250 MB of file pages
    into every rank."""

    def __init__(self, path: Path, schema):
        self.path, self.schema, self.rows = path, schema, 0
        self._sink = self._writer = None
        self._pending: list = []
        self._pending_rows = 0

    def write(self, samples: list[dict]) -> None:
        """Write samples (dicts with at least the cached columns)."""
        import pyarrow as pa

        if not samples:
            return
        cols = {name: [s[name] for s in samples] for name in SAMPLE_FEATURES}
        self._pending.append(pa.RecordBatch.from_pydict(cols, schema=self.schema))
        self._pending_rows += len(samples)
        self.rows += len(samples)
        if self._pending_rows >= SHARD_BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if not self._pending:
            return
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._sink = pa.OSFile(str(self.path), "wb")
            self._writer = pa.ipc.new_stream(self._sink, self.schema)
        table = pa.Table.from_batches(self._pending, schema=self.schema).combine_chunks()
        self._pending, self._pending_rows = [], 0
        for batch in table.to_batches():
            self._writer.write_batch(batch)

    def close(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._sink.close()


def finish_split(directory: Path, shards: list[Path], fingerprint: str) -> None:
    """Turn a folder of shard files (in order; missing or empty ones skipped) into what
    ``datasets.load_from_disk`` reads: ``data-0000k-of-0000n.arrow``, ``dataset_info.json``, ``state.json``.

    Example::

        shards = [train/part-00000.arrow (3 rows), train/part-00001.arrow (absent: no kept sample)]
        ->       train/data-00000-of-00001.arrow, train/dataset_info.json, train/state.json
    """
    import pyarrow as pa

    directory.mkdir(parents=True, exist_ok=True)
    kept = [s for s in shards if s.exists()]
    if not kept:  # a split without samples is still a dataset, of no rows
        kept = [directory / "part-empty.arrow"]
        with pa.OSFile(str(kept[0]), "wb") as sink, pa.ipc.new_stream(sink, sample_schema()):
            pass
    names = []
    for k, shard in enumerate(kept):
        name = f"data-{k:05d}-of-{len(kept):05d}.arrow"
        shard.rename(directory / name)
        names.append({"filename": name})
    import datasets

    features = datasets.Features(_features()).to_dict()
    (directory / "dataset_info.json").write_text(json.dumps(
        {"citation": "", "description": "", "features": features, "homepage": "", "license": ""}, indent=2))
    (directory / "state.json").write_text(json.dumps(
        {"_data_files": names, "_fingerprint": fingerprint, "_format_columns": None, "_format_kwargs": {},
         "_format_type": None, "_output_all_columns": False, "_split": None}, indent=2))
