"""Read one streaming source's records (``streaming: true``) in a resumable order: this data-parallel rank's
share of a pass over local shards (JSONL, JSON, Parquet, plain text; a file, a folder or a glob) or a hub
dataset, with a position that a checkpoint stores and a resumed run seeks back to.

Each pass ("epoch") reads the shards in an order shuffled by ``(seed, epoch)``; record ``n`` of the pass
(counted over all shards) belongs to rank ``n % parts``, so ranks read disjoint records and together every
record once per pass. A rank parses only its own records (the others' lines are counted, not decoded).
Memory is bounded by one line, one Parquet batch, or a JSON array's read window.

Example (2 ranks, one file of 5 lines)::

    pass 0: lines 1 2 3 4 5  ->  rank 0 reads lines 1, 3, 5; rank 1 reads lines 2, 4
    a position {"epoch": 0, "file": 0, "offset": <byte after line 3>, "line": 3, "n": 3} resumes at line 4
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Iterator, Optional

from sftdist.config import DataSource
from sftdist.data.demo import resolve_builtin
from sftdist.data.messages import DataError
from sftdist.data.sources import is_glob, is_local, local_path_exists, parse_line, read_json_file, source_files

STREAM_EXTENSIONS = (".jsonl", ".json", ".parquet", ".txt")
PARQUET_BATCH = 256  # rows decoded at a time


def stream_files(source: DataSource) -> list[Path]:
    """The shards of a local streaming source: the file, every supported file under a folder, or the matches
    of a glob (``data/*.jsonl``, ``shards/**/*.parquet``), sorted (``sources.source_files``).

    Raises:
        DataError: naming the path when nothing matches or a shard's type cannot be streamed.
    """
    path = resolve_builtin(source.path)
    if not local_path_exists(path):
        raise DataError(f"data source {source.name!r}: no files match {path}", "missing_file")
    files = source_files(path)
    for f in files:
        if f.suffix not in STREAM_EXTENSIONS:
            raise DataError(f"data source {source.name!r}: {f}: cannot stream {f.suffix} files (streaming reads "
                            f"{', '.join(STREAM_EXTENSIONS)}); set streaming: false for it", "missing_file")
    return files


def is_streamed_hub(source: DataSource) -> bool:
    """A streaming source that names a hub dataset rather than local files (a glob is always local)."""
    return not is_glob(resolve_builtin(source.path)) and not is_local(source)


class RecordReader:
    """This rank's records of one streaming source, forever (pass after pass), with a resumable position.

    Iterating yields ``(where, row)``: ``row`` is a dict, or a ``DataError`` for a line that is not valid JSON
    (``data.on_bad_record`` decides). ``state_dict()`` after a record resumes at the record after it.
    """

    def __init__(self, source: DataSource, *, seed: int, part: int, parts: int):
        self.source, self.seed, self.part, self.parts = source, seed, part, parts
        self.hub = is_streamed_hub(source)
        self.files = [] if self.hub else stream_files(source)
        self.position: dict[str, Any] = {"epoch": 0, "file": 0, "offset": 0, "line": 0, "n": 0, "hub": None}

    def state_dict(self) -> dict:
        return dict(self.position)

    def load_state_dict(self, state: dict) -> None:
        self.position = dict(state)

    def file_order(self, epoch: int) -> list[Path]:
        """The shards in the order pass ``epoch`` reads them (shuffled by seed and pass when there are several)."""
        order = list(self.files)
        random.Random(f"stream-files:{self.seed}:{epoch}").shuffle(order)
        return order

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        while True:
            mine = 0
            for where, row in (self._hub_pass() if self.hub else self._local_pass()):
                mine += 1
                yield where, row
            if not mine:
                raise DataError(f"data source {self.source.name!r}: a pass over {self.source.path} gave data-parallel "
                                f"rank {self.part} of {self.parts} no record: it needs at least {self.parts} "
                                f"records", "empty_source")
            self.position = {"epoch": self.position["epoch"] + 1, "file": 0, "offset": 0, "line": 0, "n": 0,
                             "hub": None}

    def _capped(self) -> bool:
        cap = self.source.max_samples
        return cap is not None and self.position["n"] >= cap

    def _local_pass(self) -> Iterator[tuple[str, Any]]:
        order = self.file_order(self.position["epoch"])
        while self.position["file"] < len(order) and not self._capped():
            f = order[self.position["file"]]
            reader = _parquet_rows if f.suffix == ".parquet" else _array_rows if _is_json_array(f) else _lines
            for where, row in reader(f, self.position, self._mine):
                if row is not None:
                    yield where, row
                if self._capped():
                    return
            self.position.update(file=self.position["file"] + 1, offset=0, line=0)

    def _mine(self) -> bool:
        """Count the next record of the pass; whether it is this rank's."""
        n = self.position["n"]
        self.position["n"] = n + 1
        return n % self.parts == self.part

    def _hub_pass(self) -> Iterator[tuple[str, Any]]:
        import datasets
        from datasets.distributed import split_dataset_by_node

        path = resolve_builtin(self.source.path)
        try:
            ds = datasets.load_dataset(path, name=self.source.config, split=self.source.split,
                                       revision=self.source.revision, streaming=True, trust_remote_code=False)
        except Exception as e:  # the hub client raises many types; all mean "cannot get this data set"
            raise DataError(f"data source {self.source.name!r}: cannot stream hub dataset {path!r} "
                            f"(config={self.source.config}, split={self.source.split}): {e}", "missing_file") from e
        yield from hub_records(split_dataset_by_node(ds, rank=self.part, world_size=self.parts), self.position,
                               f"{path}[{self.source.split}]", self.source.max_samples)


def hub_records(ds, position: dict, label: str, cap: Optional[int]) -> Iterator[tuple[str, Any]]:
    """Records of a ``datasets.IterableDataset`` (already this rank's share), resuming from and updating
    ``position["hub"]`` (the dataset's own ``state_dict``) and ``position["n"]`` (records read)."""
    ds.set_epoch(position["epoch"])
    if position["hub"] is not None:
        ds.load_state_dict(position["hub"])
    for row in ds:
        if cap is not None and position["n"] >= cap:
            return
        position["n"] += 1
        position["hub"] = ds.state_dict()
        yield f"{label}: record {position['n'] - 1} of rank share", row


def _is_json_array(f: Path) -> bool:
    if f.suffix != ".json":
        return False
    with f.open("rb") as fh:
        head = fh.read(4096).lstrip()
    return head.startswith(b"[") or (head.startswith(b"{") and b'"data"' in head[:64] and b"\n{" not in head)


def _lines(f: Path, position: dict, mine) -> Iterator[tuple[str, Any]]:
    """JSONL or text lines from ``position["offset"]``; ``position`` follows each line read."""
    text = f.suffix == ".txt"
    with f.open("rb") as fh:
        fh.seek(position["offset"])
        while line := fh.readline():
            position["offset"] += len(line)
            position["line"] += 1
            if not line.strip():
                continue
            if not mine():
                yield "", None
                continue
            where = f"{f}: line {position['line']}"
            try:
                decoded = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, DataError(f"{where}: not UTF-8 text: {e}", "invalid_json")
                continue
            yield where, {"text": decoded.rstrip("\n")} if text else parse_line(decoded, where)


def _array_rows(f: Path, position: dict, mine) -> Iterator[tuple[str, Any]]:
    """Records of a JSON-array shard (read through a window, ``sources.read_json_file``) from record
    ``position["offset"]``, which counts records; those before it are parsed again, not held."""
    for i, (where, row) in enumerate(read_json_file(f)):
        if i < position["offset"]:
            continue
        position["offset"] = i + 1
        yield (where, row) if mine() else ("", None)


def _parquet_rows(f: Path, position: dict, mine) -> Iterator[tuple[str, Any]]:
    """Rows of a Parquet shard from row ``position["offset"]``, a batch at a time, skipping whole row groups
    before it."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    start, groups, first = 0, [], 0
    for g in range(pf.metadata.num_row_groups):
        rows = pf.metadata.row_group(g).num_rows
        if start + rows > position["offset"]:
            groups.append(g)
        elif not groups:
            first = start + rows
        start += rows
    row = first
    for batch in (pf.iter_batches(batch_size=PARQUET_BATCH, row_groups=groups) if groups else ()):
        for record in batch.to_pylist():
            row += 1
            if row <= position["offset"]:
                continue
            position["offset"] = row
            yield (f"{f}: row {row - 1}", record) if mine() else ("", None)
